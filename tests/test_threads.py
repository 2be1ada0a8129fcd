"""The thread budget (cfgx/cpu.py): CPUs from affinity and cgroup quotas, slots shared between processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cfgx import cpu
from cfgx.errors import CfgxError

REPO = Path(__file__).resolve().parents[1]


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    (tmp_path / "proc").write_text(proc)
    root = tmp_path / "cg"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return tmp_path / "proc", root


def test_cgroup_v2_quota_tightest_ancestor(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/jobs/job7\n", {"jobs/job7/cpu.max": "max 100000\n",
                                                        "jobs/cpu.max": "250000 100000\n"})
    assert cpu.cgroup_cpu_limit(proc, root) == 2.5
    assert cpu.usable_cpus(frozenset(range(64)), 2.5) == 2  # a fraction of a core only throttles
    assert cpu.usable_cpus(frozenset({3}), 2.5) == 1        # affinity is tighter
    assert cpu.usable_cpus(frozenset(range(4)), 0.3) == 1   # never zero


def test_cgroup_v1_quota_and_none(tmp_path):
    proc, root = _cgroup(tmp_path, "4:memory:/x\n2:cpu,cpuacct:/slurm/job1\n",
                         {"cpu,cpuacct/slurm/job1/cpu.cfs_quota_us": "400000\n",
                          "cpu,cpuacct/slurm/job1/cpu.cfs_period_us": "100000\n",
                          "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"})
    assert cpu.cgroup_cpu_limit(proc, root) == 4.0
    (tmp_path / "b").mkdir()
    proc, root = _cgroup(tmp_path / "b", "0::/\n", {"cpu.max": "max 100000\n"})
    assert cpu.cgroup_cpu_limit(proc, root) is None
    assert cpu.cgroup_cpu_limit(tmp_path / "absent", root) is None


def test_cgroup_path_missing_inside_a_container_falls_back_to_the_mount(tmp_path):
    proc, root = _cgroup(tmp_path, "0::/host/view/of/me\n", {"cpu.max": "100000 100000\n"})
    assert cpu.cgroup_cpu_limit(proc, root) == 1.0


def test_user_setting_beats_the_budget(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(cpu.AUTO_MARK, raising=False)
    assert cpu.user_threads("auto") is None
    assert cpu.user_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu.user_threads("auto") == 5
    assert cpu.user_threads(2) == 2                      # the config key beats the environment
    monkeypatch.setenv(cpu.AUTO_MARK, "1")               # set by cfgx for torchrun ranks: not the user's
    assert cpu.user_threads("auto") is None
    for bad in (0, -2, "many", True):
        with pytest.raises(CfgxError, match="cpu_threads"):
            cpu.user_threads(bad)


def test_slots_split_cpus_and_dead_holders_do_not_count(tmp_path):
    d = tmp_path / "slots"
    d.mkdir(mode=0o700)
    prev = torch.get_num_threads()
    a = cpu.ThreadBudget(4, frozenset(range(4)), directory=d, watch_load=False)
    try:
        assert a.apply() == 4
        b = cpu.ThreadBudget(4, frozenset(range(4)), directory=d, watch_load=False)
        assert a.share() == 2 and b.share() == 2
        elsewhere = cpu.ThreadBudget(4, frozenset({9}), directory=d, watch_load=False)  # other CPUs
        assert a.share() == 2
        elsewhere.close(restore=False)
        # A holder that died leaves its file unlocked: not counted, and removed.
        os.close(b.slot.fd)
        stale = b.slot.path
        assert a.share() == 4 and not stale.exists()
        fixed = cpu.ThreadBudget(4, frozenset(range(4)), fixed=1, directory=d, watch_load=False)
        assert fixed.share() == 1 and a.share() == 2    # a fixed process still occupies cores
        fixed.close(restore=False)
    finally:
        a.close()
    assert torch.get_num_threads() == prev and not list(d.iterdir())


def test_tick_leaves_a_pool_resized_by_someone_else(tmp_path):
    prev = torch.get_num_threads()
    budget = cpu.ThreadBudget(2, frozenset({0, 1}), directory=None, watch_load=False, every_s=0.0)
    try:
        budget.apply()
        torch.set_num_threads(1)   # the user's own choice, mid-run
        budget.tick()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(prev)
        budget.close()


def test_slot_dir_is_private_and_refuses_a_planted_link(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = cpu.slot_dir()
    assert d == tmp_path / "cfgx" / "threads" and oct(d.stat().st_mode & 0o777) == "0o700"
    evil = tmp_path / "evil"
    evil.mkdir()
    (tmp_path / "cfgx" / "threads").rmdir()
    (tmp_path / "cfgx" / "threads").symlink_to(evil)
    assert cpu.slot_dir() != tmp_path / "cfgx" / "threads"   # falls back to <tmp>/cfgx-<uid>


HOLDER = textwrap.dedent("""
    import sys, time
    from cfgx import cpu
    b = cpu.start_budget("auto")
    b.usable, b.watch_load = 2, False   # the slots alone, whatever else this machine runs
    print(b.apply(), flush=True)
    sys.stdin.readline()            # hold the slot until told
    b.tick()
    print(b.share(), flush=True)
""")


def test_two_processes_see_each_others_slots(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", cpu.AUTO_MARK)}
    env.update(PYTHONPATH=str(REPO), XDG_RUNTIME_DIR=str(tmp_path))
    os.chmod(tmp_path, 0o700)
    procs = []
    try:
        first = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        procs.append(first)
        assert first.stdout.readline().strip() == "2"
        second = subprocess.Popen([sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        procs.append(second)
        assert second.stdout.readline().strip() == "1"      # 2 CPUs, 2 holders
        slots = list((tmp_path / "cfgx" / "threads").glob("slot-*"))
        assert len(slots) == 2
        second.kill()                                       # dies holding its slot: the lock goes with it
        second.wait()
        time.sleep(0.1)
        out, _ = first.communicate("\n", timeout=60)
        assert out.strip() == "2"                           # alone again: the whole pool
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_other_programs_running_shrink_the_share(tmp_path):
    stat_file, tasks = tmp_path / "stat", tmp_path / "task"
    for tid, state in (("1", "R"), ("2", "S")):
        (tasks / tid).mkdir(parents=True)
        (tasks / tid / "stat").write_text(f"{tid} (py (x)) {state} 1 2 3\n")
    stat_file.write_text("cpu  1 2 3\nprocs_running 4\nprocs_blocked 0\n")
    assert cpu.others_running(1, stat_file, tasks) == 3      # 4 runnable, 1 of them our running thread
    assert cpu.others_running(2, stat_file, tasks) == 2      # our pool of 2, one worker asleep as we read
    stat_file.write_text("procs_running 1\n")
    assert cpu.others_running(2, stat_file, tasks) == 0
    assert cpu.others_running(1, tmp_path / "absent", tasks) is None


def test_start_budget_keeps_the_users_count_and_stop_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(cpu.AUTO_MARK, raising=False)
    prev = torch.get_num_threads()
    try:
        budget = cpu.start_budget("auto")
        assert budget.fixed == 1 and torch.get_num_threads() == 1
        assert len(list((tmp_path / "cfgx" / "threads").glob("slot-*"))) == 1   # it still occupies a core
        assert cpu.start_budget(2).fixed == 2 and torch.get_num_threads() == 2  # the config key wins
    finally:
        cpu.stop_budget()
    assert torch.get_num_threads() == prev and not list((tmp_path / "cfgx" / "threads").iterdir())


def test_share_ignores_a_one_sample_blip_of_other_load(monkeypatch):
    readings = iter([0, 1, 0, 1, 1])
    monkeypatch.setattr(cpu, "others_running", lambda pool: next(readings))
    budget = cpu.ThreadBudget(2, frozenset({0, 1}), directory=None, watch_load=True)
    assert [budget.share() for _ in range(5)] == [2, 2, 2, 1, 1]
