"""store/cached.py's load-or-make, and store/checkpoints.py's EMA and training-state helpers."""

from __future__ import annotations

import pytest
import torch

from cfgx.errors import CfgxError
from cfgx.store.cached import load_or_make
from cfgx.store.checkpoints import ema_weights, make_ema, restore_training_state, training_state
from cfgx.store.safeload import UnreadableFileError, UnsafeFileError
from cfgx.train import adamw_with_warmup, optimizer_step


class Maker:
    def __init__(self, value=1.0):
        self.calls, self.value = 0, value

    def __call__(self):
        self.calls += 1
        return self.value, {"value": torch.tensor(self.value)}


def _load(blob):
    return float(blob["value"])


def test_second_call_loads_instead_of_making(tmp_path):
    path, make = tmp_path / "c" / "x.pt", Maker(2.5)
    assert load_or_make(path, _load, make, lock=tmp_path / ".x.lock") == 2.5
    assert load_or_make(path, _load, make, lock=tmp_path / ".x.lock") == 2.5
    assert make.calls == 1 and path.is_file()
    assert not (tmp_path / ".x.lock").exists()  # released


def test_unreadable_file_is_rebuilt_with_a_message(tmp_path, capsys):
    path, make = tmp_path / "x.pt", Maker(3.0)
    path.write_bytes(b"not a torch file")
    said = []

    class Console:
        def print(self, msg, **_):
            said.append(msg)

    assert load_or_make(path, _load, make, console=Console(), unreadable="cache unreadable; rebuilding") == 3.0
    assert make.calls == 1 and said == ["cache unreadable; rebuilding"]
    assert load_or_make(path, _load, make) == 3.0 and make.calls == 1  # the rebuilt file loads


def test_a_blob_of_the_wrong_shape_counts_as_unreadable(tmp_path):
    path, make = tmp_path / "x.pt", Maker()
    torch.save({"other": 1}, path)
    assert load_or_make(path, _load, make, unreadable="rebuilding") == 1.0 and make.calls == 1


def test_without_unreadable_the_error_propagates_with_its_fix(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"junk")
    with pytest.raises(UnreadableFileError, match="delete it to restart"):
        load_or_make(path, _load, Maker(), fix="delete it to restart")


def test_load_returning_none_means_stale_and_remakes(tmp_path):
    path, make = tmp_path / "x.pt", Maker(4.0)
    torch.save({"value": torch.tensor(1.0)}, path)
    assert load_or_make(path, lambda blob: None, make) == 4.0
    assert make.calls == 1 and float(torch.load(path, weights_only=True)["value"]) == 4.0


def test_a_crafted_file_is_refused_never_rebuilt_over(tmp_path):
    path, make = tmp_path / "x.pt", Maker()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save(Evil(), path)
    with pytest.raises(UnsafeFileError):
        load_or_make(path, _load, make, unreadable="rebuilding")
    assert make.calls == 0


def _net():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def test_ema_weights_puts_saved_ema_into_a_fresh_net():
    torch.manual_seed(0)
    net = _net()
    ema = make_ema(net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update_parameters(net)
    fresh = ema_weights(_net(), ema.state_dict())
    for a, b in zip(fresh.state_dict().values(), ema.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError):
        ema_weights(torch.nn.Linear(3, 2), ema.state_dict())


def _setup(seed=0):
    torch.manual_seed(seed)
    net = _net()
    ema = make_ema(net, 0.9)
    opt, sched = adamw_with_warmup(net.parameters(), 1e-2, 0.0, 3)
    return net, ema, opt, sched


def _steps(net, ema, opt, sched, n, g):
    for _ in range(n):
        x = torch.randn(8, 3, generator=g)
        optimizer_step(net(x).square().mean(), net, opt, sched, ema, 1.0)


def test_training_state_round_trip_continues_bit_exactly(tmp_path):
    g = torch.Generator().manual_seed(1)
    straight = _setup()
    _steps(*straight, 6, g)

    g = torch.Generator().manual_seed(1)
    first = _setup()
    _steps(*first, 3, g)
    torch.save(training_state(*first, 3, rng={"gen": g.get_state()}, extra="x"), tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    assert list(ckpt) == ["model", "ema", "optimizer", "scheduler", "step", "rng", "extra"]
    resumed = _setup(seed=5)  # other initial weights: all of them come from the checkpoint
    assert restore_training_state(ckpt, *resumed) == 3
    g2 = torch.Generator()
    g2.set_state(ckpt["rng"]["gen"])
    _steps(*resumed, 3, g2)
    for a, b in zip(resumed[1].state_dict().values(), straight[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_restore_training_state_mismatch_message():
    net, ema, opt, sched = _setup()
    ckpt = training_state(net, ema, opt, sched, 0)
    other = torch.nn.Linear(3, 2)
    o_ema = make_ema(other, 0.9)
    o_opt, o_sched = adamw_with_warmup(other.parameters(), 1e-2, 0.0, 3)
    with pytest.raises(CfgxError, match="does not match; delete it"):
        restore_training_state(ckpt, other, o_ema, o_opt, o_sched, mismatch="does not match; delete it")
    with pytest.raises(RuntimeError):
        restore_training_state(ckpt, other, o_ema, o_opt, o_sched)
