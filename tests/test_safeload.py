"""Weights files are read once, weights-only, and refused from their metadata when oversized (issue 18 items 1, 6)."""

from __future__ import annotations

import os
import resource
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import random_fidelity_inception

import cfgx.metrics.inception as inception
from cfgx.errors import CfgxError
from cfgx.metrics.inception import FeatureExtractor, weights_sha256
from cfgx.store.safeload import UnreadableFileError, UnsafeFileError, safe_load


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg and msg
    return msg


def _random_inception_state() -> dict[str, torch.Tensor]:
    net = random_fidelity_inception()
    return {k: v.clone() for k, v in net.state_dict().items()}


# ----------------------------------------------------------------------------- item 1: read once


def test_inception_file_swapped_after_the_read_never_runs(tmp_path, monkeypatch):
    """The file is swapped for a payload right after cfgx reads it: nothing re-opens it; features are the
    first file's."""
    weights, marker = tmp_path / "w.pth", tmp_path / "PWNED"
    state = _random_inception_state()
    torch.save(state, weights)
    good_hash = weights_sha256(weights)

    real_safe_load = inception.safe_load
    swapped = []

    def read_then_swap(path, *args, **kwargs):
        out = real_safe_load(path, *args, **kwargs)
        crafted = tmp_path / "crafted.pth"
        torch.save({**state, "fc.weight": Payload(marker)}, crafted)
        os.replace(crafted, path)  # the moment between cfgx's check and any later use
        swapped.append(path)
        return out

    loads = []
    real_torch_load = torch.load

    def spy(f, *args, **kwargs):
        loads.append(f)
        return real_torch_load(f, *args, **kwargs)

    monkeypatch.setattr(inception, "safe_load", read_then_swap)
    monkeypatch.setattr(torch, "load", spy)
    ext = FeatureExtractor.inception(weights, batch_size=4)
    monkeypatch.undo()

    assert swapped and not marker.exists()
    # No path to the weights ever reached torch.load (torch-fidelity's goes weights_only=False).
    assert not any(isinstance(f, (str, os.PathLike)) for f in loads), loads
    with pytest.raises(UnsafeFileError):  # what is at the path now is a live payload
        safe_load(weights)
    assert not marker.exists()
    # The network holds the first file's tensors, and provenance hashes the bytes that were loaded.
    assert ext.provenance()["weights_sha256"] == good_hash
    got = ext.net.model.fc.weight
    assert torch.equal(got, state["fc.weight"])
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref = FeatureExtractor(inception.speed_up_for_inference(inception._fidelity_inception(state)).eval(),
                           batch_size=4)
    assert torch.allclose(ext(images).pool, ref(images).pool, rtol=0, atol=0)


def test_inception_file_crafted_before_the_read_is_refused(tmp_path):
    weights, marker = tmp_path / "w.pth", tmp_path / "PWNED"
    torch.save({"fc.weight": Payload(marker)}, weights)
    with pytest.raises(UnsafeFileError) as err:
        FeatureExtractor.inception(weights)
    assert "refusing to load" in _one_line(err.value) and str(weights) in str(err.value)
    assert not marker.exists()


def test_inception_file_of_wrong_tensors_is_one_line(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.zeros(3)}, weights)
    with pytest.raises(CfgxError, match="could not be loaded") as err:
        FeatureExtractor.inception(weights)
    _one_line(err.value)


def test_crafted_snapshot_is_one_line_and_never_runs(tmp_path):
    from cfgx.store.checkpoints import load_snapshot_model, snapshot_path

    marker = tmp_path / "PWNED"
    path = snapshot_path(tmp_path, 10)
    path.parent.mkdir(parents=True)
    torch.save({"ema": {}, "step": Payload(marker)}, path)
    with pytest.raises(UnsafeFileError) as err:
        load_snapshot_model(tmp_path, None, None, None, torch.device("cpu"), 10)  # type: ignore[arg-type]
    assert str(path) in _one_line(err.value)
    assert not marker.exists()
    path.write_bytes(b"garbage")
    with pytest.raises(UnreadableFileError) as err:
        load_snapshot_model(tmp_path, None, None, None, torch.device("cpu"), 10)  # type: ignore[arg-type]
    assert str(path) in _one_line(err.value)


# ----------------------------------------------------------------------------- item 6: oversized


def _rewrite(src: Path, dst: Path, numel: int | None = None, bomb_bytes: int | None = None) -> None:
    """Copy a 1000-float torch zip, declaring ``numel`` elements and/or deflating a ``bomb_bytes`` record."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            data = z.read(info.filename)
            if info.filename.endswith("data.pkl") and numel is not None:
                old = b"M\xe8\x03t"  # BININT2 1000, TUPLE: the numel of the storage's persistent id
                assert data.count(old) == 1
                data = data.replace(old, b"J" + numel.to_bytes(4, "little") + b"t")
            if info.filename.endswith("data/0") and bomb_bytes is not None:
                zi = zipfile.ZipInfo(info.filename)
                zi.compress_type = zipfile.ZIP_DEFLATED
                with out.open(zi, "w", force_zip64=True) as f:
                    chunk = bytes(1 << 22)
                    for _ in range(bomb_bytes // len(chunk)):
                        f.write(chunk)
                continue
            out.writestr(info.filename, data)


def _refused_quickly(path: Path) -> str:
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(UnreadableFileError) as err:
        safe_load(path)
    assert time.perf_counter() - t0 < 2.0
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024 < 50  # MB; Linux reports KiB
    line = _one_line(err.value)
    assert line.startswith(f"refusing to load {path}:")
    return line


def test_storage_declared_bigger_than_its_record_is_refused(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(1000, dtype=torch.float32)}, ok)
    assert torch.equal(safe_load(ok)["w"], torch.arange(1000, dtype=torch.float32))
    big = tmp_path / "big.pt"
    _rewrite(ok, big, numel=900_000_000)  # 3.6 GB declared, 4 kB held
    assert "3600000000-byte" in _refused_quickly(big)


def test_deflate_bomb_is_refused_from_its_directory(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"w": torch.zeros(1000)}, ok)
    bomb = tmp_path / "bomb.pt"
    n = 64 << 20  # 64 MB of zeros in a ~70 kB file (torch itself would inflate it all)
    _rewrite(ok, bomb, numel=n // 4, bomb_bytes=n)
    assert bomb.stat().st_size < 200_000
    assert "unpack to" in _refused_quickly(bomb)


def test_legacy_file_declaring_more_than_it_holds_is_refused(tmp_path):
    ok = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1000), "b": [torch.ones(3, dtype=torch.bfloat16)]}, ok,
               _use_new_zipfile_serialization=False)
    assert safe_load(ok)["w"].shape == (1000,)  # legacy files still load
    data = ok.read_bytes()
    at = data.index(b"M\xe8\x03", data.index(b"ctorch\nFloatStorage"))
    big = tmp_path / "legacy_big.pt"
    big.write_bytes(data[:at] + b"J" + (900_000_000).to_bytes(4, "little") + data[at + 3:])
    assert "bytes of tensors in a" in _refused_quickly(big)


def test_ordinary_files_still_load(tmp_path):
    blob = {"a": torch.randn(3, 4), "v": torch.arange(10)[2:5], "u": torch.ones(2, dtype=torch.float16),
            "nested": {"list": [torch.zeros(0), 1, "x"]}, "step": 7}
    blob["shared"] = blob["a"][1]  # a view sharing a storage
    path = tmp_path / "b.pt"
    torch.save(blob, path)
    got = safe_load(path)
    assert torch.equal(got["a"], blob["a"]) and torch.equal(got["shared"], blob["a"][1])
    assert torch.equal(got["v"], torch.arange(2, 5)) and got["nested"]["list"][1:] == [1, "x"] and got["step"] == 7
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UnreadableFileError, match="not a readable torch file"):
        safe_load(tmp_path / "garbage.pt")
