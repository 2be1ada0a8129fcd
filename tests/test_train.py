"""Training: the label self-check and bit-exact resume."""

from __future__ import annotations

import pytest
import torch

from cfgx.backbones import build_backbone, check_label_dependence
from cfgx.config import compose
from cfgx.data import build_dataset
from cfgx.errors import CfgxError
from cfgx.store.checkpoints import load_checkpoint
from cfgx.store.rundir import new_run_dir
from cfgx.train import train

SMALL = ["backbone.ch=8", "train.steps=10", "train.batch_size=16", "train.ckpt_every=4", "train.log_every=2"]


def test_self_check_passes_for_the_unet_and_fails_when_labels_are_ignored():
    cfg = compose([])
    data = build_dataset(cfg.dataset)
    model = build_backbone(cfg.backbone, data)
    check_label_dependence(model, data.shape)

    dim = model.label_emb.embedding_dim

    class Zero(torch.nn.Module):  # a class embedding that is not wired to anything
        def forward(self, y):
            return torch.zeros(y.shape[0], dim)

    model.label_emb = Zero()
    with pytest.raises(CfgxError, match="does not depend on the class label"):
        check_label_dependence(model, data.shape)


def test_null_label_is_a_reserved_extra_row():
    cfg = compose([])
    data = build_dataset(cfg.dataset)
    model = build_backbone(cfg.backbone, data)
    assert model.label_emb.num_embeddings == data.num_classes + 1


class Crash(Exception):
    pass


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_after_interruption_reaches_same_step_and_weights(tmp_path):
    cfg = compose(SMALL)
    data = build_dataset(cfg.dataset)
    dev = torch.device("cpu")

    straight = train(cfg, data, new_run_dir(tmp_path, "a"), dev)

    run = new_run_dir(tmp_path, "b")

    def crash_at_7(step):  # a hard kill: no checkpoint is written at step 7
        if step == 7:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, data, run, dev, on_step=crash_at_7)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    resumed = train(cfg, data, run, dev)
    assert resumed.step == straight.step == 10
    assert torch.equal(_weights(resumed.model), _weights(straight.model))
    raw = load_checkpoint(run / "checkpoints" / "last.pt")
    ref = load_checkpoint(tmp_path / "a" / sorted(p.name for p in (tmp_path / "a").iterdir())[0] /
                          "checkpoints" / "last.pt")
    for k in raw["model"]:
        assert torch.equal(raw["model"][k], ref["model"][k]), k


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    cfg = compose(SMALL)
    data = build_dataset(cfg.dataset)
    run = new_run_dir(tmp_path, "c")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CfgxError, match="corrupt"):
        train(cfg, data, run, torch.device("cpu"))
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"not a checkpoint"


def test_loss_decreases_on_digits(tmp_path):
    cfg = compose(["train.steps=60", "train.batch_size=32", "train.log_every=10", "backbone.ch=16"])
    data = build_dataset(cfg.dataset)
    run = new_run_dir(tmp_path, "d")
    train(cfg, data, run, torch.device("cpu"))
    import json

    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_rerunning_an_interrupted_command_resumes_the_same_run_dir(tmp_path, cache_dir):
    from cfgx.cli.train import train_task

    overrides = SMALL + ["eval.num_samples=20", "eval.batch_size=20", "sampler.steps=2", "guidance=1",
                         "eval.classifier.steps=150", "eval.classifier.width=8", f"paths.runs={tmp_path}"]

    def crash_at_6(step):
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        train_task(compose(overrides), overrides=overrides, on_step=crash_at_6)
    runs = list((tmp_path / "digits").iterdir())
    assert len(runs) == 1 and not (runs[0] / "metrics.csv").exists()
    run = train_task(compose(overrides), overrides=overrides)
    assert run == runs[0] and len(list((tmp_path / "digits").iterdir())) == 1
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 10
    assert (run / "metrics.csv").is_file()


def _losses(run):
    import json

    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_channels_last_trains_the_same_model_and_does_not_change_the_run(tmp_path, one_thread):
    from cfgx.config import config_hash

    data = build_dataset(compose([]).dataset)
    dev = torch.device("cpu")
    plain = train(compose(SMALL), data, new_run_dir(tmp_path, "p"), dev)
    cl_run = new_run_dir(tmp_path, "cl")
    cl = train(compose(SMALL + ["train.channels_last=true"]), data, cl_run, dev)
    assert cl.step == plain.step == 10
    torch.testing.assert_close(_weights(cl.model), _weights(plain.model), rtol=1e-4, atol=1e-5)
    # An execution option, not a training choice: same config hash, so the run resumes either way.
    assert config_hash(compose(SMALL)) == config_hash(compose(SMALL + ["train.channels_last=true",
                                                                         "train.compile=false"]))
    ckpt = load_checkpoint(cl_run / "checkpoints" / "last.pt")
    model = build_backbone(compose(SMALL).backbone, data)
    model.load_state_dict(ckpt["model"])  # a channels_last checkpoint loads into a default-layout (NCHW) model


def test_compile_is_on_for_cuda_and_off_for_cpu_by_default():
    from cfgx.train import compile_enabled

    tc = compose([]).train
    assert compile_enabled(tc, torch.device("cuda")) and not compile_enabled(tc, torch.device("cpu"))
    assert compile_enabled(compose(["train.compile=true"]).train, torch.device("cpu"))
    with pytest.raises(CfgxError, match="train.compile='fast'; valid: auto, true, false"):
        from cfgx.config import validate

        validate(compose(["train.compile=fast"]))


@pytest.mark.slow  # compiling the U-Net on CPU took 235 s on the shared 2-core box (eager: 0.7 s)
def test_compiled_training_step_matches_eager(tmp_path, one_thread):
    data = build_dataset(compose([]).dataset)
    dev = torch.device("cpu")
    small = ["backbone.ch=8", "train.steps=6", "train.batch_size=16", "train.log_every=2", "train.ckpt_every=6"]
    eager_run, comp_run = new_run_dir(tmp_path, "e"), new_run_dir(tmp_path, "c")
    train(compose(small), data, eager_run, dev)
    res = train(compose(small + ["train.compile=true"]), data, comp_run, dev)
    assert res.step == 6
    assert _losses(comp_run) == pytest.approx(_losses(eager_run), rel=1e-4)
    assert set(load_checkpoint(comp_run / "checkpoints" / "last.pt")["model"]) == \
        set(load_checkpoint(eager_run / "checkpoints" / "last.pt")["model"])  # no _orig_mod. prefixes
