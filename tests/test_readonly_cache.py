"""A cache its user cannot write: entries read without locks, new ones made in the private cache."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
import torch

from cfgx.metrics.feature_cache import FeatureCache
from cfgx.store import cached
from cfgx.store.atomic import atomic_torch_save
from cfgx.store.cached import load_or_make


@contextlib.contextmanager
def read_only(d: Path):
    """``d`` genuinely unwritable: mode 0555, plus the immutable flag when running as root."""
    os.chmod(d, 0o555)
    immutable = False
    try:
        if os.access(d, os.W_OK):  # root ignores modes
            immutable = subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0
            if not immutable or os.access(d, os.W_OK):
                pytest.skip("running as root where neither modes nor chattr +i make a directory read-only")
        yield d
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(d)], check=True)
        os.chmod(d, 0o755)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.setattr(cached, "_SAID", set())
    return h


def _never():
    raise AssertionError("made again although a readable entry exists")


def test_entry_in_a_read_only_cache_is_read_without_a_lock(tmp_path, home):
    shared = tmp_path / "shared"
    shared.mkdir()
    atomic_torch_save(shared / "clf.pt", {"w": torch.arange(3)})
    with read_only(shared):
        got = load_or_make(shared / "clf.pt", lambda b: b["w"], _never, lock=shared / ".clf.lock",
                           private_if_readonly=True)
        assert torch.equal(got, torch.arange(3))
        assert sorted(p.name for p in shared.iterdir()) == ["clf.pt"]   # no lock file, nothing written
    assert not (home / ".cache").exists()


def test_missing_entry_is_made_once_in_the_private_cache(tmp_path, home, capfd):
    shared = tmp_path / "shared"
    shared.mkdir()
    made = []

    def make():
        made.append(1)
        return "new", {"w": torch.ones(2)}

    with read_only(shared):
        assert load_or_make(shared / "x.pt", lambda b: "loaded", make, lock=shared / ".x.lock",
                            private_if_readonly=True) == "new"
        assert load_or_make(shared / "x.pt", lambda b: "loaded", make, lock=shared / ".x.lock",
                            private_if_readonly=True) == "loaded"
        assert not list(shared.iterdir())
    private = cached.private_path(shared / "x.pt")
    assert made == [1] and private.is_file() and str(private).startswith(str(home / ".cache" / "cfgx"))
    err = capfd.readouterr().err
    assert err.count("is read-only") == 1 and str(cached.private_root()) in err


def test_feature_cache_reads_a_read_only_entry_and_saves_privately(tmp_path, home, capfd):
    shared = tmp_path / "features"
    cache = FeatureCache(shared)
    cache.save("aaa", {"pool": torch.zeros(2, 3)})
    with read_only(shared):
        assert torch.equal(cache.load("aaa")["pool"], torch.zeros(2, 3))
        assert cache.load("bbb") is None
        where = cache.save("bbb", {"pool": torch.ones(1)})
        assert torch.equal(cache.load("bbb")["pool"], torch.ones(1))
        assert cache.lock_path("bbb").parent == where.parent
        assert sorted(p.name for p in shared.iterdir()) == ["aaa.pt"]
    assert where == cached.private_path(shared / "bbb.pt")
    assert capfd.readouterr().err.count("is read-only") == 1


def test_writable_cache_is_used_in_place(tmp_path, home):
    d = tmp_path / "mine"
    assert load_or_make(d / "e.pt", lambda b: "loaded", lambda: ("made", {"v": 1}), lock=d / ".e.lock",
                        private_if_readonly=True) == "made"
    assert (d / "e.pt").is_file() and not (home / ".cache").exists()
