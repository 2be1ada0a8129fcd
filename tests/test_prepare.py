"""``cfgx prepare`` (issue 19): the artifact registry and the offline failure path (nothing downloaded here)."""

from __future__ import annotations

import hashlib
import urllib.error

import pytest
import torch
from omegaconf import OmegaConf

from cfgx.cli import prepare
from cfgx.cli.entry import main
from cfgx.config import compose
from cfgx.errors import CfgxError


def test_registry_names_urls_files_and_keys_that_exist():
    cfg = compose([])
    assert {"inception", "dinov2"} <= set(prepare.ARTIFACTS)
    for art in prepare.ARTIFACTS.values():
        assert art.url.startswith("https://") and art.url.endswith("/" + art.filename)
        # the key a user sets to point at a copy
        assert OmegaConf.select(cfg, art.config_key, default=KeyError) is not KeyError, art.config_key
        assert art.default_path().name == art.filename
    assert prepare.ARTIFACTS["dinov2"].filename == "dinov2_vitl14_pretrain.pth"


def _offline(url, dst):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_offline_is_one_line_saying_what_failed_and_where_to_put_the_file(tmp_path):
    dest = tmp_path / "w" / "dinov2_vitl14_pretrain.pth"
    with pytest.raises(CfgxError) as err:
        prepare.fetch("dinov2", dest, download=_offline)
    msg = str(err.value)
    assert "\n" not in msg and "URLError" in msg and str(dest) in msg and prepare.DINOV2_URL in msg
    assert "eval.dinov2_weights" in msg and not list(tmp_path.rglob("*.pth*"))  # no partial file left


def test_hash_is_checked_and_a_present_file_is_kept(tmp_path):
    def write(data):
        return lambda url, dst: open(dst, "wb").write(data)

    dest = tmp_path / "inception.pth"
    with pytest.raises(CfgxError, match="expected 6726825d"):
        prepare.fetch("inception", dest, download=write(b"not the weights"))
    assert not dest.exists() and not list(tmp_path.iterdir())
    good = b"x" * 10  # an entry whose hash prefix matches: saved, then kept
    real = prepare.ARTIFACTS["inception"]
    try:
        prepare.ARTIFACTS["inception"] = prepare.Artifact(real.url, real.filename, hashlib.sha256(good).hexdigest()[:8],
                                                          real.config_key, real.what)
        assert prepare.fetch("inception", dest, download=write(good)) == (dest, True)
        assert dest.read_bytes() == good
        assert prepare.fetch("inception", dest, download=_offline) == (dest, False)  # present: no download
    finally:
        prepare.ARTIFACTS["inception"] = real


def test_cli_unknown_name_and_offline(tmp_path, monkeypatch, capsys):
    assert main(["prepare", "stylegan"]) == 2
    assert "unknown artifact 'stylegan'" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(prepare, "_download", _offline)
    assert main(["prepare", "dinov2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "could not download dinov2" in err and str(tmp_path) in err


def test_cli_hub_model_offline_is_one_line(tmp_path, monkeypatch, capsys):
    """``cfgx prepare OWNER/MODEL`` goes to the hub fetch (configs + safetensors); offline it is one line."""
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # never touches the network
    assert main(["prepare", "facebook/DiT-XL-2-256"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot fetch facebook/DiT-XL-2-256" in err and str(tmp_path) in err


def test_classifier_artifact_prints_the_source_to_name(tmp_path, monkeypatch, capsys):
    """A present ResNet-50 file (nothing downloaded): prepare prints the eval.classifier.source value naming it."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    art = prepare.ARTIFACTS["resnet50"]
    art.default_path().parent.mkdir(parents=True)
    art.default_path().write_bytes(b"present")
    assert main(["prepare", "resnet50"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"set eval.classifier.source=torchvision:resnet50:{art.default_path()}" in out
