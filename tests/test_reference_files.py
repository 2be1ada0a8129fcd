"""Reference-statistics files (issue 19 item 3): ADM npz, EDM npz, EDM2 pickle through a numpy-only unpickler."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from cfgx.cli.entry import main
from cfgx.errors import CfgxError
from cfgx.metrics.reference import load_reference, parse_reference, write_reference
from cfgx.metrics.standard import fid_from_features


def _feats(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g,
                                                                            dtype=torch.float64) * 0.3 + shift


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind,name", [("adm", "ref.npz"), ("edm", "ref.pkl")])
def test_fid_from_stored_statistics_equals_fid_from_the_features(tmp_path, kind, name):
    real, real_s, fake, fake_s = _feats(300, 48, 0), _feats(300, 20, 1), _feats(250, 48, 2, 0.2), _feats(250, 20, 3)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8) if kind == "adm" else None
    path = write_reference(tmp_path / name, kind, {"fid": real, "sfid": real_s}, images=images)
    ref = load_reference(f"{kind}:{path}")
    for column, r, f in (("fid", real, fake), ("sfid", real_s, fake_s)):
        want = fid_from_features(r, f)
        got = ref.frechet(column, f)
        assert want > 0.1 and abs(got - want) / want < 1e-9, (column, got, want)
    assert ref.frechet("fd_dinov2", fake) is None
    if images is not None:  # arr_0: uint8 NHWC on disk, NCHW in cfgx
        assert torch.equal(ref.images, images)
        assert np.load(path)["arr_0"].shape == (5, 8, 8, 3)
    assert ref.describe() == f"{kind}:{path} sha256={ref.sha256}" and len(ref.sha256) == 12


def test_edm_npz_and_edm2_pickles_of_any_protocol_are_read(tmp_path):
    mu, sigma = np.arange(4.0), np.eye(4) * 2
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)
    ref = load_reference(f"edm:{tmp_path / 'edm.npz'}")
    assert set(ref.stats) == {"fid"} and np.array_equal(ref.stats["fid"][1].numpy(), sigma)
    blob = {"fid": {"mu": mu, "sigma": sigma}, "fd_dinov2": {"mu": mu.astype(np.float32), "sigma": sigma}}
    for protocol in (2, 4, 5):
        (tmp_path / "edm2.pkl").write_bytes(pickle.dumps(blob, protocol=protocol))
        ref = load_reference(f"edm:{tmp_path / 'edm2.pkl'}")
        assert set(ref.stats) == {"fid", "fd_dinov2"}
        assert np.array_equal(ref.stats["fd_dinov2"][0].numpy(), mu)


def test_the_unpickler_refuses_any_other_global_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(2), "sigma": Payload(marker)}}))
    with pytest.raises(CfgxError) as err:
        load_reference(f"edm:{path}")
    msg = str(err.value)
    assert "\n" not in msg and "refusing" in msg and str(path) in msg and "posix.system" in msg
    assert not marker.exists()
    # A harmless-looking but non-numpy global is refused too.
    path.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(2), "sigma": np.eye(2), "when": range(3)}}))
    with pytest.raises(CfgxError, match="builtins.range"):
        load_reference(f"edm:{path}")


@pytest.mark.parametrize("kind,content", [
    ("adm", {"mu_s": np.zeros(3), "sigma_s": np.eye(3)}),      # no mu/sigma
    ("adm", {"mu": np.zeros(3), "sigma": np.eye(2)}),          # shapes disagree
    ("adm", {"mu": np.zeros(3), "sigma": np.eye(3), "arr_0": np.zeros((2, 4, 4, 3))}),  # float images
    ("edm", {"mu": np.array(["a", "b"]), "sigma": np.eye(2)}),  # not numbers
])
def test_a_file_of_the_wrong_structure_is_one_line_naming_it(tmp_path, kind, content):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    with pytest.raises(CfgxError) as err:
        load_reference(f"{kind}:{path}")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_specs_and_missing_files(tmp_path):
    assert parse_reference(None) is None and load_reference("none") is None
    with pytest.raises(CfgxError, match="adm:PATH"):
        parse_reference("inception:/x.npz")
    with pytest.raises(CfgxError, match="cannot read reference file"):
        load_reference(f"adm:{tmp_path / 'missing.npz'}")
    (tmp_path / "x.bin").write_bytes(b"not a pickle")
    with pytest.raises(CfgxError, match="is not an ADM reference batch"):
        load_reference(f"adm:{tmp_path / 'x.bin'}")


def test_cli_reference_needs_out_and_a_known_format(capsys):
    assert main(["reference"]) == 2
    assert "needs out=PATH" in capsys.readouterr().err
    assert main(["reference", "out=x.npz", "format=tf"]) == 2
    assert "format='tf'" in capsys.readouterr().err


def test_sweep_exports_its_samples_as_an_adm_npz(tiny_run, tmp_path_factory, workdir, capsys):
    import json

    from conftest import private_copy

    from cfgx.data import to_uint8

    run = private_copy(tiny_run, tmp_path_factory, "save_npz")
    # overwrite: the shared tiny run may hold this row already (another test's sweep), and a kept row writes no npz
    argv = ["sweep", "guidance=2", f"run={run}", "eval.num_samples=20", "eval.save_npz=true", "eval.overwrite=true"]
    assert main(argv) == 0, capsys.readouterr().err
    (npz,) = (run / "sweep" / "samples").glob("*.npz")
    row = next(r for r in json.loads((run / "metrics.json").read_text())
               if r["num_samples"] == 20 and r["s"] == 2 and r["method"] == "cfg")
    with np.load(npz, allow_pickle=False) as z:
        arr0, arr1 = z["arr_0"], z["arr_1"]
    assert arr0.dtype == np.uint8 and arr0.shape == (20, 8, 8, 3) and arr1.shape == (20,)
    assert np.bincount(arr1).tolist() == [2] * 10  # balanced labels, in sampling order
    # The images are the row's samples: the first ones are the grid's, saved with the features.
    (feat,) = [f for f in (run / "sweep" / "features").glob("*.pt") if f.stem == npz.stem]
    blob = torch.load(feat, weights_only=True)
    grid = to_uint8(blob["grid_x"]).repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(arr0[:len(grid)], grid) and row["s"] == 2.0
