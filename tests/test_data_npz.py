"""``dataset=npz``: an ADM-format batch (arr_0 uint8 NHWC, arr_1 labels) as a labelled dataset, read without
pickle; and ``cfgx import`` with such a batch as the reference set instead of an image folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cfgx.cli import main
from cfgx.config import compose
from cfgx.data import build_dataset, to_uint8
from cfgx.errors import CfgxError
from cfgx.sweep.rows import load_rows


def write_batch(path, n=24, res=16, classes=3, seed=0):
    """A colour per class plus noise (as tests/test_pretrained_import's folders): a classifier can learn it."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    base = np.stack([25 * y, 255 - 25 * y, (70 * y) % 255], axis=1)[:, None, None, :]
    x = np.clip(base + rng.normal(0, 30, (n, res, res, 3)), 0, 255).astype(np.uint8)
    np.savez(path, x, y)
    return x, y


def _load(*overrides):
    return build_dataset(compose(["dataset=npz", *overrides]).dataset)


def test_npz_batch_is_a_dataset_pixel_for_pixel(tmp_path) -> None:
    x, y = write_batch(tmp_path / "b.npz")
    data = _load(f"dataset.root={tmp_path / 'b.npz'}")
    assert data.num_classes == 3 and data.shape == (3, 16, 16) and data.test is None
    xt, yt = data.train.tensors
    assert torch.equal(to_uint8(xt), torch.from_numpy(x).permute(0, 3, 1, 2)) and yt.tolist() == y.tolist()
    assert _load(f"dataset.root={tmp_path / 'b.npz'}", "dataset.num_classes=1000").num_classes == 1000


@pytest.mark.parametrize("case, msg", [
    ("no_labels", "needs arr_0 and arr_1"), ("pickled", "not a readable .npz"), ("float", "not square uint8"),
    ("resolution", "not 32x32"), ("label", "outside dataset.num_classes=2"), ("missing", "is not a file"),
])
def test_bad_batches_are_one_line(tmp_path, case: str, msg: str) -> None:
    f, extra = tmp_path / "b.npz", []
    x, y = np.zeros((4, 16, 16, 3), np.uint8), np.arange(4) % 2
    if case == "no_labels":
        np.savez(f, x)
    elif case == "pickled":  # an object array needs pickle to load: allow_pickle=False refuses it
        np.savez(f, np.array([{"a": 1}] * 4, dtype=object), y)
    elif case == "float":
        np.savez(f, x.astype(np.float32), y)
    elif case == "resolution":
        np.savez(f, x, y)
        extra = ["dataset.resolution=32"]
    elif case == "label":
        np.savez(f, x, y + 1)
        extra = ["dataset.num_classes=2"]
    with pytest.raises(CfgxError, match=msg) as e:
        _load(f"dataset.root={f}", *extra)
    assert "\n" not in str(e.value)


def test_import_with_an_npz_reference(workdir) -> None:
    pytest.importorskip("diffusers")
    from test_pretrained_dit import save_tiny_pipeline

    save_tiny_pipeline(workdir / "dit")  # 10 classes, 16x16 decoded images
    write_batch(workdir / "ref.npz", n=80, classes=9)  # label 9 never occurs: the model's 10 classes count
    assert main(["import", "model=dit", "dataset.root=ref.npz"]) == 0
    (run,) = [p.parent for p in (workdir / "runs").glob("npz/*/meta.json")]
    assert json.loads((run / "meta.json").read_text())["dataset"] == "npz"
    assert main(["sweep", f"run={run}", "guidance=1", "eval.num_samples=20", "eval.batch_size=10",
                 "sampler.steps=2", "eval.features=classifier", "eval.classifier.steps=60",
                 "eval.classifier.width=8", "eval.classifier.source=own"]) == 0
    (row,) = load_rows(run)
    assert row["real_reference"] == "npz:train (80)" and row["accuracy"] is not None
