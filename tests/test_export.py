"""``cfgx export``: safetensors + model.json that load back, without pickle, to bit-identical samples."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cfgx.cli import main
from cfgx.data import build_dataset
from cfgx.diffusion.samplers import build_sampler
from cfgx.diffusion.schedule import NoiseSchedule
from cfgx.errors import CfgxError
from cfgx.sample import balanced_labels, generate
from cfgx.store.checkpoints import load_ema_model
from cfgx.store.export import FORMAT, INFO, WEIGHTS, exported_schedule, load_exported
from cfgx.store.rundir import load_run_config, read_meta

st = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["export", f"run={tiny_run}", f"out={out}"]) == 0
    return out


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cfgx: error: "), err
    return err[0]


def test_export_writes_safetensors_and_conventions(exported, tiny_run):
    assert sorted(p.name for p in exported.iterdir()) == [INFO, WEIGHTS]
    info = json.loads((exported / INFO).read_text())
    cfg = load_run_config(tiny_run)
    assert info["format"] == FORMAT and info["prediction"] == "eps"
    assert (info["num_classes"], info["null_label"], info["label_rows"]) == (10, 10, 11)
    assert info["dataset"]["shape"] == [1, 8, 8] and info["dataset"]["name"] == "digits"
    assert info["backbone"] == cfg["backbone"]
    assert {k: info["schedule"][k] for k in cfg["diffusion"]} == cfg["diffusion"]
    assert info["source"]["config_hash"] == read_meta(tiny_run)["config_hash"]
    assert info["source"]["checkpoint_step"] == 12
    assert "s * (eps(x, t, c) - eps(x, t, null))" in info["guidance"]
    assert info["sha256"] == hashlib.sha256((exported / WEIGHTS).read_bytes()).hexdigest()


def test_plain_safetensors_reads_the_ema_weights(exported, tiny_run):
    tensors = st.load_file(str(exported / WEIGHTS))  # no cfgx, no pickle
    cfg = OmegaConf.create(load_run_config(tiny_run))
    data = build_dataset(cfg.dataset)
    ema, _ = load_ema_model(tiny_run, cfg, data, NoiseSchedule.from_config(cfg.diffusion), torch.device("cpu"))
    ref = ema.state_dict()
    assert tensors.keys() == ref.keys()
    assert all(torch.equal(tensors[k], ref[k]) for k in ref)
    assert tensors["label_emb.weight"].shape[0] == 11  # 10 classes + the null row


def test_loaded_export_samples_bit_identically_at_s_0_1_3(exported, tiny_run, one_thread):
    cfg = OmegaConf.create(load_run_config(tiny_run))
    data = build_dataset(cfg.dataset)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    cpu = torch.device("cpu")
    ema, _ = load_ema_model(tiny_run, cfg, data, schedule, cpu)
    model, info = load_exported(exported)
    sampler = build_sampler(cfg.sampler.name, schedule, int(cfg.sampler.steps), float(cfg.sampler.eta),
                            clip_x0=data.clip)
    # the loaded side builds everything from model.json alone
    s_info = info["sampler"]
    sampler2 = build_sampler(s_info["name"], exported_schedule(info), int(s_info["steps"]), float(s_info["eta"]),
                             clip_x0=info["dataset"]["clip_x0"])
    labels = balanced_labels(30, info["num_classes"])
    for s in (0.0, 1.0, 3.0):
        a = generate(ema, sampler, data.shape, labels, s, seed=7, batch_size=16, device=cpu)
        b = generate(model, sampler2, tuple(info["dataset"]["shape"]), labels, s, seed=7, batch_size=16, device=cpu)
        assert torch.equal(a.x, b.x), f"s={s}"
    assert not torch.equal(generate(ema, sampler, data.shape, labels, 0.0, 7, 16, cpu).x,
                           generate(ema, sampler, data.shape, labels, 3.0, 7, 16, cpu).x)


def test_default_out_and_reexport(tiny_run, tmp_path, capsys):
    run = tmp_path / "digits" / tiny_run.name
    shutil.copytree(tiny_run, run)
    assert main(["export", f"run={run}"]) == 0
    assert (run / "export" / WEIGHTS).is_file()
    assert main(["export", f"run={run}"]) == 0  # the same checkpoint again: rewritten, no error
    info = json.loads((run / "export" / INFO).read_text())
    info["source"]["checkpoint_step"] = 99  # pretend it came from another checkpoint
    (run / "export" / INFO).write_text(json.dumps(info))
    capsys.readouterr()
    assert main(["export", f"run={run}"]) == 2
    assert "already holds an export of another checkpoint" in _one_error(capsys)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    assert main(["export", f"run={run}", f"out={tmp_path / 'junk'}"]) == 2
    assert "is not a cfgx export" in _one_error(capsys)
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"


def test_bad_runs_are_one_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "digits" / "unfinished"
    run.mkdir(parents=True)
    for name in ("config.yaml", "meta.json"):
        shutil.copy(tiny_run / name, run / name)
    assert main(["export", f"run={run}", f"out={tmp_path / 'x'}"]) == 2
    assert "no checkpoint in" in _one_error(capsys)
    assert not (tmp_path / "x").exists()
    assert main(["export", f"run={tmp_path / 'nope'}"]) == 2
    assert "is not a cfgx run dir" in _one_error(capsys)
    assert main(["export", f"run={tiny_run}", "guidance=1,3"]) == 2
    assert "cfgx export takes run=" in _one_error(capsys)


def test_missing_safetensors_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    assert main(["export", f"run={tiny_run}", f"out={tmp_path / 'x'}"]) == 2
    line = _one_error(capsys)
    assert "needs the safetensors package" in line and 'pip install -e ".[export]"' in line


def test_a_tampered_weights_file_is_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    blob = bytearray((copy / WEIGHTS).read_bytes())
    blob[-1] ^= 1
    (copy / WEIGHTS).write_bytes(bytes(blob))
    with pytest.raises(CfgxError, match="does not match the sha256"):
        load_exported(copy)
