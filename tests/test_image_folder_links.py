"""Symlinked folders in an image-folder dataset: a loop or a link out of a class folder is one line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from cfgx.cli.entry import main
from cfgx.config import compose
from cfgx.data import build_dataset, stack_dataset
from cfgx.errors import CfgxError


def _tree(root, per_class: int = 8):
    rng = np.random.default_rng(0)
    for cls in ("0", "1"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _load(root):
    return build_dataset(compose(["dataset=imagefolder", f"dataset.root={root}", "dataset.resolution=8"]).dataset)


@pytest.mark.parametrize("target", ["..", "."], ids=["link-to-root", "link-to-itself"])
def test_cli_refuses_a_symlinked_folder_that_loops_or_leaves_its_class(tmp_path, capsys, target, cache_dir):
    root = _tree(tmp_path / "imgs")
    os.symlink(target, root / "0" / "more")
    try:  # cfgx train runs under hydra.main, which exits itself
        rc = main(["train", "dataset=imagefolder", f"dataset.root={root}", "dataset.resolution=8",
                   f"paths.runs={tmp_path / 'runs'}", "train.steps=1"])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(root / "0" / "more") in err and "remove the link" in err
    assert not (tmp_path / "runs").exists()


def test_linked_class_folders_are_fine_and_a_second_link_to_one_folder_is_not(tmp_path):
    store = _tree(tmp_path / "store")
    root = tmp_path / "imgs"
    root.mkdir()
    os.symlink(store / "0", root / "a")            # a class folder may itself be a link: where images live
    os.symlink(store / "1", root / "b")
    data = _load(root)
    _, y = stack_dataset(data.train)
    assert data.class_names == ["a", "b"] and torch.bincount(y).tolist() == [8, 8]
    (store / "1" / "sub").mkdir()
    os.symlink("sub", store / "1" / "alias")        # the same images twice in one class
    with pytest.raises(CfgxError, match="second link"):
        _load(root)
