"""``eval.classifier.source=torchvision:ARCH:PATH``: a torchvision classifier from a local weights file scores the
samples. Oracle: the same torchvision network and its published transforms, run by hand on the sweep's own samples
(written as .npz) and reference images, give the row's accuracy and fd_classifier; bad files are one line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision
from omegaconf import OmegaConf

from cfgx.cli import main
from cfgx.config import compose, validate
from cfgx.data import build_dataset, stack_dataset, to_uint8
from cfgx.errors import CfgxError
from cfgx.metrics.torchvision_classifier import load_torchvision_classifier, parse_source
from cfgx.pretrained import weights
from cfgx.store import digest as digest_module
from cfgx.store.rundir import load_run_config
from cfgx.sweep.rows import load_rows

pytest.importorskip("diffusers")
from test_pretrained_dit import save_tiny_pipeline  # noqa: E402
from test_pretrained_import import _reference_folder  # noqa: E402

SWEEP = ["guidance=1,4", "eval.num_samples=6", "eval.batch_size=6", "sampler.steps=3", "eval.features=classifier"]


def _resnet18(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=classes).eval()


def _save(net: torch.nn.Module, path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    else:
        torch.save(net.state_dict(), path)
    return path


def _by_hand(net: torch.nn.Module, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features, logits) of uint8 NCHW images through torchvision's published resnet18 transform."""
    x = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()(images_u8.float() / 255)
    feats = {}
    hook = net.avgpool.register_forward_hook(lambda m, i, o: feats.update(f=o.flatten(1)))
    with torch.no_grad():
        logits = net(x)
    hook.remove()
    return feats["f"].double(), logits.double()


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Brute force: ||mu_a - mu_b||^2 + tr(Sa + Sb - 2 sqrtm(Sa Sb)), scipy's sqrtm in float64."""
    a, b = a.numpy(), b.numpy()
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * covmean))


def test_pt_and_safetensors_equal_torchvision_by_hand(tmp_path) -> None:
    net = _resnet18()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    want_f, want_l = _by_hand(net, to_uint8(x))
    for path in (_save(net, tmp_path / "r18.pt"), _save(net, tmp_path / "r18.safetensors")):
        clf, info = load_torchvision_classifier(parse_source(f"torchvision:resnet18:{path}"), 3, torch.device("cpu"))
        f = clf.features(x)
        torch.testing.assert_close(f.double(), want_f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clf.head(f).double(), want_l, rtol=1e-5, atol=1e-5)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert info["classifier_weights"] == digest and f"{path.name}@{digest[:12]}" in info["extractor_classifier"]
        assert info["extractor_classifier"].startswith("torchvision:resnet18:")
    gray = torch.rand(2, 1, 16, 16) * 2 - 1  # one channel: repeated to RGB
    torch.testing.assert_close(clf.features(gray).double(), _by_hand(net, to_uint8(gray).expand(-1, 3, -1, -1))[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_file_replaced_after_hashing_loads_the_hashed_weights(tmp_path, monkeypatch, suffix: str) -> None:
    """The weights file is replaced right after cfgx hashes it: the classifier is still the hashed file's, so
    the digest in the rows names the weights that were used (a second open by name would load the new file)."""
    first, other = _resnet18(), torchvision.models.resnet18(num_classes=3).eval()
    path = _save(first, tmp_path / f"r18{suffix}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    real = digest_module.sha256_of_file

    def hash_then_replace(f):
        out = real(f)
        os.replace(_save(other, tmp_path / f"new{suffix}"), path)
        return out

    monkeypatch.setattr(digest_module, "sha256_of_file", hash_then_replace)  # whichever reader hashes it
    monkeypatch.setattr(weights, "sha256_of_file", hash_then_replace)
    clf, info = load_torchvision_classifier(parse_source(f"torchvision:resnet18:{path}"), 3, torch.device("cpu"))
    monkeypatch.undo()
    assert hashlib.sha256(path.read_bytes()).hexdigest() != digest  # the swap happened
    assert info["classifier_weights"] == digest
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(clf.features(x).double(), _by_hand(first, to_uint8(x))[0], rtol=1e-5, atol=1e-5)


def _import(workdir: Path, *extra: str) -> Path:
    save_tiny_pipeline(workdir / "dit", num_classes=3)
    ref = _reference_folder(workdir / "ref", classes=3, per_class=4)
    assert main(["import", "model=dit", f"dataset.root={ref}", *extra]) == 0
    (run,) = [p.parent for p in (workdir / "runs").glob("imagefolder/*/meta.json")]
    return run


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 6 samples, 512 features: singular covariances
def test_sweep_rows_equal_the_oracle(workdir, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    net = _resnet18()
    weights = _save(net, workdir / "r18.pt")
    run = _import(workdir, "eval.classifier.source=torchvision:resnet18:r18.pt")  # relative to the cwd
    assert _config(run).eval.classifier.source == f"torchvision:resnet18:{weights}"  # stored absolute
    assert main(["sweep", f"run={run}", *SWEEP, "eval.save_npz=true"]) == 0
    rows = load_rows(run)
    assert len(rows) == 2
    data = build_dataset(_config(run).dataset)
    real_x, real_y = stack_dataset(data.train)
    real_f, real_l = _by_hand(net, to_uint8(real_x))
    for r in rows:
        (npz,) = (run / "sweep" / "samples").glob(f"*-s{r['s']:g}-block0.npz")
        blob = np.load(npz)
        f, logits = _by_hand(net, torch.from_numpy(blob["arr_0"]).permute(0, 3, 1, 2))
        labels = torch.from_numpy(blob["arr_1"])
        assert r["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).double().mean()), abs=1e-12)
        assert r["fd_classifier"] == pytest.approx(_frechet(real_f, f), rel=1e-4)
        top2 = logits.topk(2, dim=1).values  # the logits themselves (a random net may predict one class only)
        assert r["margin"] == pytest.approx(float((top2[:, 0] - top2[:, 1]).mean()), rel=1e-4)
        assert r["feature_space"] == "classifier" and r["classifier_weights"] == hashlib.sha256(
            weights.read_bytes()).hexdigest()
        assert r["eval_classifier_acc"] == pytest.approx(float((real_l.argmax(1) == real_y).double().mean()),
                                                         abs=1e-4)
        assert r["extractor_classifier"].startswith("torchvision:resnet18:r18.pt@")


def _config(run: Path):
    return OmegaConf.create(load_run_config(run))


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*")}


def test_bad_classifiers_are_one_line_and_write_nothing(workdir, capsys) -> None:
    run = _import(workdir)
    assert json.loads((run / "meta.json").read_text())["train_finished"]
    assert _config(run).eval.classifier.source == "none"
    before = _files(run)
    torch.save(_resnet18(5).state_dict(), workdir / "five.pt")
    torch.save(_resnet18(), workdir / "module.pt")  # a pickled nn.Module: needs code to unpickle
    cases = [(f"torchvision:resnet18:{workdir / 'five.pt'}", "has 5 classes but the reference set has 3"),
             (f"torchvision:resnet18:{workdir / 'missing.pt'}", "not found"),
             (f"torchvision:resnet18:{workdir / 'module.pt'}", "needs code to unpickle"),
             (f"torchvision:resnet9000:{workdir / 'five.pt'}", "not a torchvision classification model"),
             ("torchvision:resnet18", "valid: auto, own, none, torchvision:ARCH:PATH")]
    for source, why in cases:
        assert main(["sweep", f"run={run}", *SWEEP, f"eval.classifier.source={source}"]) == 2, source
        err = capsys.readouterr().err
        assert why in err and err.count("\n") == 1 and err.startswith("cfgx: error:"), err
    # none and no other feature space: nothing to measure
    assert main(["sweep", f"run={run}", *SWEEP]) == 2
    err = capsys.readouterr().err
    assert "leaves nothing to measure" in err and err.count("\n") == 1
    assert _files(run) == before
    # at import time too: a classifier that does not fit the reference set is refused before the run dir exists
    ref = workdir / "ref"
    assert main(["import", "model=dit", f"dataset.root={ref}", f"eval.classifier.source={cases[0][0]}"]) == 2
    assert "has 5 classes" in capsys.readouterr().err
    assert len(list((workdir / "runs").glob("imagefolder/*/meta.json"))) == 1


@pytest.mark.parametrize("value", ["mine", "torchvision:resnet50", "torchvision::x.pth", "torchvision"])
def test_schema_refuses_bad_sources(value: str) -> None:
    with pytest.raises(CfgxError, match="eval.classifier.source"):
        validate(compose([f"eval.classifier.source={value}"]))


def test_schema_accepts_sources() -> None:
    for value in ("auto", "own", "none", "torchvision:vit_b_16:/w/vit_b_16-c867db91.pth"):
        validate(compose([f"eval.classifier.source={value}"]))
    assert compose([]).eval.classifier.source == "auto"
    assert parse_source("auto", pretrained=True).kind == "none" and parse_source("auto").kind == "own"


def test_own_classifier_keys_unchanged_by_the_source_key() -> None:
    """``source`` is not part of the own classifier's settings: its cache key (and so every cached classifier and
    row of a trained run) is what it was before the key existed."""
    from cfgx.metrics.eval_classifier import _cache_key
    from cfgx.metrics.suite import MetricSettings

    cfg = compose(["dataset=digits"])
    data = build_dataset(cfg.dataset)
    old = OmegaConf.create(OmegaConf.to_container(cfg))
    del old.eval.classifier["source"]
    new_opt, old_opt = MetricSettings.from_config(cfg), MetricSettings.from_config(old)
    assert new_opt.classifier == old_opt.classifier and "source" not in new_opt.classifier
    assert new_opt.classifier_source.kind == old_opt.classifier_source.kind == "own"
    key = _cache_key(data, new_opt.dataset, new_opt.classifier)
    assert key == _cache_key(data, old_opt.dataset, old_opt.classifier)


def test_guidance_auto_metric_without_a_classifier() -> None:
    from cfgx.sweep.search import search_metric

    assert search_metric("auto", ["inception"]) == "fid" and search_metric("auto", ["classifier"]) == "fd_classifier"
    assert search_metric("auto", ["dinov2"]) == "fd_dinov2"  # eval.classifier.source=none, eval.features=dinov2
    for metric, spaces, why in (("fd_classifier", ["inception"], "needs an evaluation classifier"),
                                ("auto", [], "computes none")):
        with pytest.raises(CfgxError, match=why):
            search_metric(metric, spaces)


def test_published_transform_follows_the_file_hash() -> None:
    """ResNet-50's two ImageNet weights resize differently (256 vs 232 px): the file's sha256 picks the entry."""
    from cfgx.metrics.torchvision_classifier import _published_weights

    v1, v2 = torchvision.models.ResNet50_Weights.IMAGENET1K_V1, torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert _published_weights("resnet50", "0676ba61" + "0" * 56) is v1
    assert _published_weights("resnet50", "11ad3fa6" + "0" * 56) is v2
    assert _published_weights("resnet50", "f" * 64) is v2  # unknown file: torchvision's default entry
    assert v1.transforms().resize_size != v2.transforms().resize_size


def test_rows_of_different_classifiers_are_never_compared() -> None:
    from cfgx.protocol import split_by_protocol
    from cfgx.report.tables import reader_columns

    base = {"method": "cfg", "sampler": "ddim", "steps": 3, "num_samples": 12, "checkpoint_step": 0, "fid": 1.0}
    own = [{**base, "s": s, "extractor_classifier": "eval_classifier:imagefolder-abc"} for s in (1, 4)]
    none = [{**base, "s": s, "extractor_classifier": "none"} for s in (1, 4)]
    assert [len(rs) for _, rs in split_by_protocol(own)] == [2]
    assert "classifier" not in split_by_protocol(own)[0][0] and "extractor_classifier" not in reader_columns(own)
    parts = split_by_protocol(own + none)
    assert sorted(len(rs) for _, rs in parts) == [2, 2] and any(lbl.endswith("classifier none") for lbl, _ in parts)
    assert "extractor_classifier" in reader_columns(own + none)
