"""Fault injection: crafted files, bad inputs, full disks, locks and SIGKILLs.

What a lab hits in practice: run dirs shared on group filesystems (so loaded files are
untrusted), typos, disks that fill up, two people starting the same job, and jobs killed
at random moments. Every case must end in one clean line or in a result bit-identical
to an undisturbed run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from cfgx.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


class Payload:
    """A pickle that runs a shell command when unpickled (what an attacker would plant)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, real: dict | None = None) -> None:
    blob = dict(real or {})
    blob["step"] = Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "runs" / "digits" / tiny_run.name
    shutil.copytree(tiny_run, dst)
    return dst


# ---------------------------------------------------------------- crafted pickles


def test_crafted_checkpoint_is_refused_without_running_its_payload(run_copy, workdir, capsys):
    marker = workdir / "PWNED"
    ckpt = run_copy / "checkpoints" / "last.pt"
    plant(ckpt, marker, torch.load(ckpt, weights_only=True))
    before = snapshot(run_copy)
    assert main(["sweep", "guidance=1", f"run={run_copy}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "refusing to load" in line and str(ckpt) in line
    assert not marker.exists()
    assert snapshot(run_copy) == before
    # Resuming training from it is refused the same way (train reads the checkpoint too).
    meta = (run_copy / "meta.json").read_text().replace('"train_finished": true', '"train_finished": false')
    (run_copy / "meta.json").write_text(meta)
    with pytest.raises(SystemExit) as ex:
        main(["train", f"run={run_copy}", *overrides_of(run_copy)])
    assert ex.value.code == 2 and not marker.exists()
    assert "refusing to load" in one_error_line(capsys.readouterr().err)


def overrides_of(run: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(run / "overrides.yaml")]


@pytest.mark.parametrize("which", ["features", "guidance_classifier"])
def test_crafted_cache_files_are_refused(run_copy, workdir, capsys, which):
    marker = workdir / "PWNED"
    if which == "features":
        # The s=1 features of the run's own sweep (other tests add sweeps of other sizes to the session's run).
        target = next((run_copy / "sweep" / "features").glob("cfg-none-*-n40-*-s1-block0.pt"))
        args = ["sweep", "guidance=1", f"run={run_copy}", "eval.overwrite=false"]
        for row in (run_copy / "sweep" / "rows").glob("*.json"):
            row.unlink()  # rows gone, so the sweep reads the cached features
    else:
        target = run_copy / "guidance_classifier.pt"
        args = ["sweep", "guidance.method=classifier", "guidance=1", f"run={run_copy}"]
    plant(target, marker)
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "refusing to load" in line and str(target) in line
    assert not marker.exists()


def test_crafted_checkpoint_subprocess_prints_one_line(run_copy, workdir):
    marker = workdir / "PWNED"
    plant(run_copy / "checkpoints" / "last.pt", marker)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "cfgx", "sweep", "guidance=1", f"run={run_copy}"], cwd=workdir,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    assert "refusing to load" in one_error_line(proc.stderr)
    assert not marker.exists()


# ---------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def arena(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """A runs root holding a good run and damaged copies of it, plus broken image folders and weights."""
    from PIL import Image

    root = tmp_path_factory.mktemp("arena")
    runs = root / "runs"
    good = runs / "digits" / tiny_run.name
    shutil.copytree(tiny_run, good)
    paths = {"root": root, "runs": runs, "good": good}
    for name in ("badyaml", "badmeta", "nockpt", "corrupt", "norows"):
        paths[name] = root / "damaged" / name
        shutil.copytree(tiny_run, paths[name])
    (paths["badyaml"] / "config.yaml").write_text("dataset: {name: digits\n  : [unclosed\n")
    (paths["badmeta"] / "meta.json").write_text("{not json")
    (paths["nockpt"] / "checkpoints" / "last.pt").unlink()
    (paths["corrupt"] / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04truncated")
    shutil.rmtree(paths["norows"] / "sweep" / "rows")
    for name, classes in (("empty", []), ("oneclass", ["a"]), ("notimage", ["a", "b"])):
        paths[name] = root / "images" / name
        paths[name].mkdir(parents=True)
        for c in classes:
            (paths[name] / c).mkdir()
            Image.new("RGB", (8, 8), (40, 80, 120)).save(paths[name] / c / "x.png")
    (paths["notimage"] / "b" / "notes.png").write_text("this is not a PNG")
    paths["weights"] = root / "weights.pth"
    paths["weights"].write_bytes(b"not an inception checkpoint")
    paths["nodata"] = root / "nodata"
    paths["nodata"].mkdir()
    damage_run_files(tiny_run, root / "damaged", paths)
    return paths


def damage_run_files(tiny_run: Path, under: Path, paths: dict[str, Path]) -> None:
    """Copies of the run with one file damaged each, as a careless or hostile sender would (issue 18)."""
    deep = "[" * 200_000 + "]" * 200_000  # valid JSON that exhausts the parser's recursion
    for name in ("deepmeta", "badch", "badema", "badstep", "badsnap", "badinfo", "infotype", "travinfo", "deeprow",
                 "notrow"):
        paths[name] = under / name
        shutil.copytree(tiny_run, paths[name])
    (paths["deepmeta"] / "meta.json").write_text(deep)
    cfg = (paths["badch"] / "config.yaml").read_text()
    (paths["badch"] / "config.yaml").write_text(cfg.replace("  ch: 8\n", "  ch: abc\n", 1))
    assert "ch: abc" in (paths["badch"] / "config.yaml").read_text()
    for name, field, value in (("badema", "ema", "abc"), ("badstep", "step", "twelve")):
        ckpt = paths[name] / "checkpoints" / "last.pt"
        blob = torch.load(ckpt, weights_only=True)
        blob[field] = value
        torch.save(blob, ckpt)
    snap = sorted((paths["badsnap"] / "checkpoints" / "snapshots").glob("ema_*.pt"))[0]  # not last.pt's step
    torch.save({"ema": [1, 2, 3], "step": torch.tensor(6)}, snap)
    paths["snapstep"] = Path(str(int(snap.stem.split("_")[1])))
    travel = '{"finished": true, "settings": {}, "checkpoints": {"all": "../checkpoints/last.pt"}}'
    for name, text in (("badinfo", "{garbage"), ("infotype", '{"finished": true, "settings": "x"}'),
                       ("travinfo", travel)):
        (paths[name] / "postprocess").mkdir()
        (paths[name] / "postprocess" / "info.json").write_text(text)
    for name, text in (("deeprow", deep), ("notrow", '{"s": "x"}')):
        for row in (paths[name] / "sweep" / "rows").glob("*.json"):
            row.write_text(text)


def _train(*extra: str) -> list[str]:
    from conftest import TINY

    return ["train", *TINY, "paths.runs={runs}", *extra]


IMG = ["dataset=imagefolder", "dataset.resolution=8"]
INC = ["eval.features=[classifier,inception]"]

# (argv with {placeholders} from the arena, words the one error line must contain)
BAD_INPUTS = [
    (_train("dataset=cifar11"), "unknown dataset"),
    (_train("backbone=huge"), "valid: ddpm_cifar"),
    (_train("sampler=euler"), "unknown sampler"),
    (_train("cond_drop=1.5"), "outside [0, 1)"),
    (_train("cond_drop=-0.1"), "outside [0, 1)"),
    (_train("guidance=0,x"), "not a number"),
    (_train("guidance=0,inf"), "not finite"),
    (_train("train.steps=0"), "train.steps"),
    (_train("train.steps=2.5"), "train.steps"),
    (_train("train.batch_size=-1"), "train.batch_size"),
    (_train("train.lr=0"), "train.lr"),
    (_train("train.ema_decay=1"), "ema_decay"),
    (_train("train.precision=fp8"), "train.precision"),
    (_train("seed=xyz"), "seed='xyz' must be an integer"),
    (_train("eval.seed=abc"), "eval.seed"),
    (_train("sampler.steps=2000"), "exceeds diffusion.num_steps"),
    (_train("sampler.eta=2"), "sampler.eta"),
    (_train("guidance.method=magic"), "guidance.method"),
    (_train("diffusion.schedule=quadratic"), "diffusion.schedule"),
    (_train("eval.num_samples=0"), "eval.num_samples"),
    (_train("eval.seed_blocks=0"), "eval.seed_blocks"),
    (_train("nosuchkey=1"), "nosuchkey"),
    (_train("device=tpu"), "not a torch device"),
    (_train("-m", "cond_drop=0.1,2"), "outside [0, 1)"),
    (_train("run=/nonexistent/run"), "not a cfgx run dir"),
    (_train("run={good}", "train.steps=99"), "different config"),
    # Found before training by the up-front checks (nothing is trained, no run dir appears).
    (_train("eval.real_split=validation"), "eval.real_split"),
    (_train("eval.features=[magic]"), "eval.features"),
    (_train(*INC, "eval.inception_weights=/nonexistent/w.pth"), "Inception weights not found"),
    (_train(*INC, "eval.inception_weights={weights}"), "could not be loaded"),
    (_train("eval.classifier.steps=2"), "evaluation classifier"),
    (_train("postprocess=flow"), "needs a trained run"),
    (_train(*IMG, "dataset.root=/nonexistent/images"), "not a directory"),
    (_train(*IMG, "dataset.root={empty}"), "no images found"),
    (_train(*IMG, "dataset.root={oneclass}"), "at least two"),
    (_train(*IMG, "dataset.root={notimage}"), "notes.png is not a readable image"),
    (_train("dataset=mnist", "dataset.root={nodata}"), "not found under"),
    (["sweep", "run=/nonexistent/run"], "not a cfgx run dir"),
    (["sweep", "run={good}", "guidance=1,abc"], "not a number"),
    (["sweep", "run={good}", "guidance=abc"], "valid: default"),
    (["sweep", "run={good}", "backbone=tiny"], "changes training"),
    (["sweep", "run={good}", "eval.real_split=validation"], "eval.real_split"),
    (["sweep", "run={good}", "eval.num_samples=0"], "eval.num_samples"),
    (["sweep", "run={good}", "device=tpu"], "not a torch device"),
    (["sweep", "run={good}", "postprocess=flow"], "no trained postprocessor"),
    (["sweep", "run={badyaml}"], "config.yaml is not a readable cfgx config"),
    (["sweep", "run={badmeta}", "guidance=1"], "meta.json is not readable JSON"),
    (["sweep", "run={nockpt}"], "no checkpoint"),
    (["sweep", "run={corrupt}"], "last.pt is corrupt or unreadable"),
    (["report", "/nonexistent/run"], "/nonexistent/run is not a cfgx run dir"),
    (["report"], "needs at least one run dir"),
    (["report", "{good}", "foo=bar"], "takes run dirs"),
    (["report", "{norows}"], "no sweep rows yet"),
    (["report", "{good}", "out={good}"], "is a run dir"),
    (["toy", "dataset=digits"], "analytic mixtures"),
    (["toy", "guidance=x"], "unknown guidance"),
    (["postprocess", "run={good}", "postprocess=none"], "trains nothing"),
    (["postprocess", "run={good}", "postprocess.nn_space=magic"], "nn_space"),
    (["train-classifier", "run=/nonexistent/run"], "not a cfgx run dir"),
    (["frobnicate"], "unknown command"),
    # Issue 18: values the one validation pass (cfgx/schema.py) refuses before any run dir or training.
    (_train("train.ckpt_every=0"), "train.ckpt_every=0 must be > 0"),
    (_train("train.log_every=0"), "train.log_every=0 must be > 0"),
    (_train("train.weight_decay=-1"), "train.weight_decay=-1 must be >= 0"),
    (_train("train.weight_decay=nan"), "train.weight_decay=nan is not finite"),
    (_train("train.warmup_steps=abc"), "train.warmup_steps='abc' must be an integer"),
    (_train("diffusion.beta_end=2"), "beta_start < beta_end < 1"),
    (_train("diffusion.beta_start=0.5"), "beta_start < beta_end < 1"),
    (_train("diffusion.beta_start=0"), "diffusion.beta_start=0 must be > 0"),
    (_train("seed=99999999999999999999999"), "numpy's seed range"),
    (_train("seed=-1"), "numpy's seed range"),
    (_train("eval.seed=99999999999"), "eval.seed=99999999999 must be in"),
    (_train("device=meta"), "holds no data"),
    (_train("train.steps=${{train.steps}}"), "train.steps does not resolve"),
    (_train("hydra.run.dir=/proc/x"), "cannot create folders in /proc"),
    (_train("hydra.run.dir={weights}/x"), "is a file, not a folder"),
    (_train("eval.classifier.steps=0"), "eval.classifier.steps=0 must be > 0"),
    (_train("postprocess=flow", "postprocess.apply_steps=nan"), "postprocess.apply_steps=nan must be an integer"),
    (_train("postprocess=flow", "postprocess.steps=0"), "postprocess.steps=0 must be > 0"),
    (_train("postprocess=flow", "postprocess.lr=inf"), "postprocess.lr=inf is not finite"),
    (_train("postprocess=flow", "postprocess.apply_method=rk4"), "valid: euler, heun"),
    (_train("postprocess=flow", "postprocess.ema_decay=1"), "postprocess.ema_decay=1 must be in [0, 1)"),
    (_train("backbone.ch=abc"), "backbone.ch='abc' must be an integer"),
    (_train("backbone.ch_mult=abc"), "backbone.ch_mult='abc' must be a list"),
    (_train("backbone.dropout=1.5"), "backbone.dropout=1.5 must be in [0, 1)"),
    (_train("train.grad_clip=-1"), "flips the gradient"),
    (_train("train.grad_clip=0"), "train.grad_clip=0 must be > 0 or null"),
    (_train("guidance=0,-1e308"), "beyond +-1000"),
    (_train("guidance=1e6"), "beyond +-1000"),
    (_train("guidance.classifier.steps=-1"), "guidance.classifier.steps=-1 must be > 0"),
    (_train("guidance.classifier.lr=abc"), "guidance.classifier.lr='abc' must be a number"),
    (_train("guidance.rescale.phi=2"), "guidance.rescale.phi=2 must be in [0, 1]"),
    (_train("guidance.schedule=wiggly"), "valid: constant, linear, cosine"),
    (_train("guidance.interval.sigma=abc"), "guidance.interval.sigma='abc' must be a list"),
    (_train(*IMG, "dataset.root={empty}", "dataset.resolution=-8"), "dataset.resolution=-8 must be > 0"),
    (_train("dataset.resolution=0"), "dataset.resolution=0 must be > 0"),
    (_train("eval.pr_k=40"), "eval.pr_k=40 must be below eval.num_samples=40"),
    (_train("eval.dc_k=20000"), "must be below eval.num_samples"),
    (_train("eval.batch_size=0"), "eval.batch_size=0"),
    (_train("eval.kid_subsets=0"), "eval.kid_subsets=0 must be > 0"),
    (_train("eval.boundary_delta=-1"), "eval.boundary_delta=-1 must be > 0"),
    (_train("eval.real_samples=0"), "eval.real_samples=0"),
    (_train("train.ema_decay=nan"), "ema_decay"),
    (_train("train.lr=inf"), "train.lr=inf is not finite"),
    (_train("train.resume=maybe"), "train.resume='maybe' must be a true/false"),
    (_train("train.channels_last=3"), "train.channels_last=3 must be a true/false"),
    (_train("train.snapshot_every=abc"), "train.snapshot_every='abc' must be an integer"),
    (_train("diffusion.num_steps=abc"), "diffusion.num_steps='abc' must be an integer"),
    (_train("dist.timeout_min=0"), "dist.timeout_min=0 must be > 0"),
    (_train("sampler.steps=abc"), "sampler.steps='abc' must be an integer"),
    (["sweep", "run={good}", "eval.seed=99999999999"], "eval.seed=99999999999 must be in"),
    (["sweep", "run={good}", "guidance=1e6"], "beyond +-1000"),
    (["sweep", "run={good}", "device=meta"], "holds no data"),
    (["sweep", "run={good}", "eval.pr_k=40"], "must be below eval.num_samples=40"),
    (["sweep", "run={good}", "postprocess=flow", "postprocess.apply_steps=nan"], "postprocess.apply_steps"),
    (["postprocess", "run={good}", "postprocess=flow", "postprocess.steps=0"], "postprocess.steps=0 must be > 0"),
    # Issue 18: damaged run-dir files, each one line naming the file (cfgx/store/reader.py, weights_blob).
    (["sweep", "run={deepmeta}", "guidance=1"], "meta.json is not readable JSON"),
    (["sweep", "run={badch}", "guidance=1"], "backbone.ch='abc' must be an integer"),
    (["sweep", "run={badema}", "guidance=1"], "'ema' is not a map of weight tensors"),
    (["sweep", "run={badstep}", "guidance=1"], "'step'='twelve' is not a step number"),
    (["sweep", "run={badsnap}", "guidance=1", "checkpoint={snapstep}"], "'ema' is not a map of weight tensors"),
    (["sweep", "run={badinfo}", "guidance=1", "postprocess=flow"], "info.json is not readable JSON"),
    (["sweep", "run={infotype}", "guidance=1", "postprocess=flow"], "settings='x' is not what cfgx wrote"),
    (["sweep", "run={travinfo}", "guidance=1", "postprocess=flow"], "'checkpoints' is not what cfgx wrote"),
    (["report", "{deeprow}"], "no sweep rows yet"),
    (["report", "{notrow}"], "no sweep rows yet"),
    (["report", "{good}", "out={weights}"], "is a file, not a folder"),
    (["report", "{good}", "out={good}/sweep/rows"], "inside the run dir"),
]


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # errors raised inside Hydra's task leave through sys.exit
        return int(e.code or 0)


def tree(folder: Path) -> tuple[dict[str, bytes], list[str]]:
    return snapshot(folder), sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_bad_input_table(arena, workdir, capsys):
    """Every bad input: exit 2, one stderr line naming the problem, no traceback, nothing written or lost."""
    assert len(BAD_INPUTS) >= 100
    before = tree(arena["root"])
    failures = []
    for argv, needle in BAD_INPUTS:
        argv = [a.format(**{k: str(v) for k, v in arena.items()}) for a in argv]
        code = run_main(argv)
        out, err = capsys.readouterr()
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        ok = (code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in out + err
              and lines[0].startswith("cfgx: error: "))
        if not ok:
            failures.append(f"{' '.join(argv[:1] + argv[-2:])}: exit {code}, stderr {err.strip()[-300:]!r}")
        elif tree(arena["root"]) != before:
            failures.append(f"{' '.join(argv)}: changed files under {arena['root']}")
            before = tree(arena["root"])
    assert not failures, "\n".join(failures)
    assert not (workdir / "runs").exists()


def test_bad_inputs_in_a_subprocess_print_one_line(arena, workdir):
    """The real entry point: no traceback reaches the terminal (Hydra's own handler included)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for args, needle in [(["sweep", f"run={arena['badyaml']}"], "not a readable cfgx config"),
                         (["train", *IMG, f"dataset.root={arena['notimage']}", f"paths.runs={arena['runs']}"],
                          "not a readable image")]:
        # One case through main() and one through Hydra's job handler; the in-process table has the rest.
        proc = subprocess.run([sys.executable, "-m", "cfgx", *args], cwd=workdir, capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr
        assert needle in one_error_line(proc.stderr)
        assert "Traceback" not in proc.stdout


# ---------------------------------------------------------------- file modes and locks


def test_files_and_run_dirs_honour_the_umask(tmp_path):
    from cfgx.metrics.feature_cache import FeatureCache
    from cfgx.store.atomic import atomic_write_text
    from cfgx.store.rundir import new_run_dir

    old = os.umask(0o002)
    try:
        run = new_run_dir(tmp_path / "runs", "digits", files={"config.yaml": "a: 1\n"})
        atomic_write_text(run / "metrics.md", "x")
        entry = FeatureCache(tmp_path / "cache").save("k", {"pool": torch.zeros(2)})
        assert run.stat().st_mode & 0o777 == 0o775
        for f in (run / "config.yaml", run / "metrics.md", entry):
            assert f.stat().st_mode & 0o777 == 0o664, f
        os.umask(0o077)
        atomic_write_text(run / "private.txt", "x")
        assert (run / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    assert not list((tmp_path / "runs" / "digits").glob(".*"))  # no staging folder left behind


HOLD = """
import sys, time
from pathlib import Path
from cfgx.store.locks import acquire
acquire(Path(sys.argv[1]))
print("held", flush=True)
if len(sys.argv) > 3:  # once another process waits for the lock (/proc/locks: "->"), finish the guarded work
    inode = f":{Path(sys.argv[1]).stat().st_ino} "
    t0 = time.time()
    while time.time() - t0 < float(sys.argv[2]):
        if any("->" in ln and inode in ln for ln in open("/proc/locks")):
            break
        time.sleep(0.05)
    Path(sys.argv[3]).rename(sys.argv[4])
else:
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(path: Path, seconds: float, *rename: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds), *map(str, rename)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_holder_leaves_a_stale_lock_that_the_next_process_takes(tmp_path):
    from cfgx.store.locks import acquire, holder

    path = tmp_path / ".train.lock"
    proc = hold_lock(path, 60)
    assert holder(path).startswith(f"pid {proc.pid} on ")
    assert acquire(path, wait=False) is None
    proc.kill()
    proc.wait()
    assert path.exists() and holder(path) is None  # left behind, but stale
    lock = acquire(path, wait=False)
    assert lock is not None and holder(path).startswith(f"pid {os.getpid()} on ")  # recovered: ours now
    lock.release()
    assert not path.exists()


def test_second_train_of_a_run_being_trained_is_refused_and_sweep_says_so(tiny_run, workdir, capsys):
    from conftest import TINY

    root = workdir / "lockruns"
    run = root / "digits" / tiny_run.name
    shutil.copytree(tiny_run, run)
    meta = (run / "meta.json").read_text().replace('"train_finished": true', '"train_finished": false')
    (run / "meta.json").write_text(meta)
    proc = hold_lock(run / ".train.lock", 120)
    try:
        before = snapshot(run)
        assert run_main(["train", *TINY, f"paths.runs={root}"]) == 2  # finds this run to resume: it is busy
        line = one_error_line(capsys.readouterr().err)
        assert f"{run} is being trained by pid {proc.pid}" in line
        assert snapshot(run) == before and len(list((root / "digits").iterdir())) == 1
        assert run_main(["sweep", "guidance=1", f"run={run}"]) == 0
        out = capsys.readouterr().out
        assert f"is still being trained (pid {proc.pid}" in out and "step 12 of 12" in out
    finally:
        proc.kill()
        proc.wait()
    assert run_main(["sweep", "guidance=1", f"run={run}"]) == 0
    assert "training of" in capsys.readouterr().out  # unfinished (meta says so), nobody training it


def test_concurrent_sweep_waits_for_a_scale_in_progress_and_reuses_its_row(tiny_run, workdir, capsys):
    import re

    run = workdir / "digits" / tiny_run.name
    shutil.copytree(tiny_run, run)
    rows = run / "sweep" / "rows"
    row = next(rows.glob("cfg-none-*-n40-*-s1.json"))
    aside = run / "row.tmp"
    row.rename(aside)
    sample_key = re.sub(r"-m[0-9a-f]+-s1$", "-s1", row.stem)
    proc = hold_lock(rows / f".{sample_key}.lock", 300, aside, row)  # "another sweep" finishing s=1
    try:
        assert run_main(["sweep", "guidance=1", f"run={run}"]) == 0
    finally:
        proc.wait()
    out = capsys.readouterr().out
    assert "waiting for s=1" in out and "already in the table" in out


# ---------------------------------------------------------------- SIGKILL and full disks


# Timings and bookkeeping of a particular process, not results: they differ between any two runs.
NOT_RESULTS = ("timing", "resumed_from", "pairs_per_s", "samples_per_s")


def same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in NOT_RESULTS and not str(k).endswith("seconds") and not str(k).endswith("seconds_this_call"):
                same(a[k], b[k], f"{where}[{k}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_results(a: Path, b: Path, parts: list[str]) -> None:
    """Every file of ``parts`` (files or folders) in run ``b`` holds exactly what it holds in run ``a``."""
    import json

    from cfgx.store.safeload import safe_load

    for part in parts:
        files = sorted(p.relative_to(a) for p in (a / part).rglob("*") if p.is_file() and not p.name.startswith("."))
        files = files or [Path(part)]
        assert files == sorted(p.relative_to(b) for p in (b / part).rglob("*")
                               if p.is_file() and not p.name.startswith(".")) or (b / part).is_file(), part
        for rel in files:
            if rel.suffix == ".pt":
                same(safe_load(a / rel), safe_load(b / rel), str(rel))
            elif rel.suffix == ".json":
                same(json.loads((a / rel).read_text()), json.loads((b / rel).read_text()), str(rel))


def visible_runs(root: Path) -> list[Path]:
    d = root / "runs" / "digits"
    return sorted(p for p in d.iterdir() if not p.name.startswith(".")) if d.is_dir() else []


KILL_TRAIN = ["backbone.ch=8", "train.batch_size=16", "train.steps=60", "train.ckpt_every=4", "train.log_every=4",
              "eval.num_samples=20", "eval.batch_size=20", "sampler.steps=4", "eval.classifier.steps=150",
              "eval.classifier.width=8", "guidance=1", "paths.runs=runs"]


def test_train_ends_bit_identical_after_sigkills_and_full_disks(workdir, cache_dir, tiny_run):
    """5+ seeded SIGKILLs, then ENOSPC at 4 points: re-runs reach the undisturbed run's weights and rows."""
    import random

    import faultkit

    from cfgx.store.rundir import read_meta
    from cfgx.store.safeload import safe_load

    dirs = {k: workdir / k for k in "abc"}
    for d in dirs.values():
        d.mkdir()
    argv = ["train", *KILL_TRAIN]
    code, seconds = faultkit.run(argv, dirs["a"], cache_dir)
    assert code == 0, (dirs["a"] / "stderr.txt").read_text()
    (ref,) = visible_runs(dirs["a"])

    def resume_in(d: Path):
        def next_argv():  # once training is done, the documented way to finish is 'cfgx sweep'
            runs = visible_runs(d)
            if runs and read_meta(runs[0]).get("train_finished"):
                return ["sweep", f"run=runs/digits/{runs[0].name}"]
            return argv
        return next_argv

    landed = faultkit.kill_until_done(argv, dirs["b"], cache_dir, seconds, seed=12, after_kill=resume_in(dirs["b"]))
    assert landed >= 5
    (run_b,) = visible_runs(dirs["b"])
    assert_same_results(ref, run_b, ["checkpoints/last.pt", "sweep/features", "sweep/rows"])

    # Full disk: in the run dir's creation, at the 2nd and 5th checkpoint of a process (steps 8, 36), and
    # in the sweep's first writes once training (10 more checkpoints from step 24) is done.
    ckpt = (ref / "checkpoints" / "last.pt").stat().st_size
    rng = random.Random(12)
    budgets = [rng.randint(100, 2000), int(ckpt * 1.5), int(ckpt * 4.5), int(ckpt * 10 + rng.randint(5000, 20000))]
    c, next_argv = dirs["c"], resume_in(dirs["c"])
    for budget in budgets:
        code, _ = faultkit.run(next_argv(), c, cache_dir, full_after=budget)
        assert code == 2, f"no ENOSPC with a budget of {budget} bytes (checkpoint {ckpt} bytes)"
        line = one_error_line((c / "stderr.txt").read_text())
        assert "No space left on device" in line and "cannot write runs/" in line, line
        assert not [p for p in (c / "runs").rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".new")]
        for run in visible_runs(c):  # the last good checkpoint stays loadable
            if (run / "checkpoints" / "last.pt").exists():
                safe_load(run / "checkpoints" / "last.pt")
    code, _ = faultkit.run(next_argv(), c, cache_dir)
    assert code == 0, (c / "stderr.txt").read_text()
    (run_c,) = visible_runs(c)
    assert_same_results(ref, run_c, ["checkpoints/last.pt", "sweep/features", "sweep/rows"])


def test_a_file_size_limit_is_one_line(workdir, cache_dir, tiny_run):
    """Under 'ulimit -f' a write past the limit fails with EFBIG: one line naming the file and the limit."""
    import faultkit

    code, _ = faultkit.run(["train", *KILL_TRAIN], workdir, cache_dir, fsize=8192)
    line = one_error_line((workdir / "stderr.txt").read_text())
    assert code == 2 and "File too large" in line and "ulimit -f" in line, line


def test_a_feature_file_of_the_wrong_structure_is_recomputed_not_a_traceback(tiny_run):
    from cfgx.store.reader import features_blob
    from cfgx.store.safeload import safe_load

    good = safe_load(next((tiny_run / "sweep" / "features").glob("*.pt")))
    assert features_blob(good)
    for bad in ({**good, "features": "abc"}, {**good, "features": {"clf": [1, 2]}}, {**good, "timing": [1]},
                {**good, "grid_x": "x"}, [good], {"timing": {}}):
        assert not features_blob(bad)


def _two_copies(tiny_run: Path, workdir: Path, drop: str) -> tuple[Path, Path]:
    out = []
    for k in "ab":
        run = workdir / k / "runs" / "digits" / tiny_run.name
        shutil.copytree(tiny_run, run)
        shutil.rmtree(run / drop, ignore_errors=True)
        out.append(workdir / k)
    return out[0], out[1]


def test_sweep_ends_bit_identical_after_sigkills(workdir, cache_dir, tiny_run):
    import faultkit

    a, b = _two_copies(tiny_run, workdir, "sweep")
    argv = ["sweep", f"run=runs/digits/{tiny_run.name}", "guidance=0,1,3,5"]
    code, seconds = faultkit.run(argv, a, cache_dir)
    assert code == 0, (a / "stderr.txt").read_text()
    assert faultkit.kill_until_done(argv, b, cache_dir, seconds, seed=7) >= 5
    rel = Path("runs") / "digits" / tiny_run.name
    assert_same_results(a / rel, b / rel, ["sweep/features", "sweep/rows", "metrics.json"])


POST = ["postprocess.steps=48", "postprocess.samples_per_scale=20", "postprocess.train_scales=[1,3]",
        "postprocess.batch_size=8", "postprocess.ckpt_every=4", "postprocess.k=3", "postprocess.apply_steps=2"]


def test_postprocess_ends_bit_identical_after_sigkills(workdir, cache_dir, tiny_run):
    import faultkit

    a, b = _two_copies(tiny_run, workdir, "postprocess")
    argv = ["postprocess", f"run=runs/digits/{tiny_run.name}", *POST]
    code, seconds = faultkit.run(argv, a, cache_dir)
    assert code == 0, (a / "stderr.txt").read_text()
    assert faultkit.kill_until_done(argv, b, cache_dir, seconds, seed=3) >= 5
    rel = Path("runs") / "digits" / tiny_run.name
    assert_same_results(a / rel, b / rel, ["postprocess/flow.pt", "postprocess/pairs.pt", "postprocess/info.json"])


def test_sweep_names_options_the_trained_flow_overrides(workdir, tiny_run, capsys):
    import faultkit

    run = workdir / "runs" / "digits" / tiny_run.name
    shutil.copytree(tiny_run, run)
    argv = ["postprocess", f"run=runs/digits/{tiny_run.name}", *POST[1:], "postprocess.steps=4"]
    code, _ = faultkit.run(argv, workdir, Path(os.environ["CFGX_CACHE"]))
    assert code == 0, (workdir / "stderr.txt").read_text()
    assert run_main(["sweep", f"run={run}", "postprocess=flow", "guidance=1", "postprocess.k=7",
                     "postprocess.apply_steps=1"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "postprocess.k=7 ignored: the trained flow" in out and "used k=3" in out
    assert "apply_steps" not in out.split("sweeping")[0]  # apply_* options do apply: nothing to say


def test_unreadable_row_files_are_named_and_recomputed(run_copy, workdir, capsys):
    import json

    rows = run_copy / "sweep" / "rows"
    victim = next(rows.glob("cfg-none-*-n40-*-s1.json"))
    victim.write_text("{half a row")
    (rows / "foreign.json").write_text("not json")
    assert run_main(["sweep", "guidance=0,1,3", f"run={run_copy}"]) == 0
    out = "".join(capsys.readouterr().out.split())  # rich wraps long lines, paths included
    assert f"rowfile{victim}isunreadable;recomputingit" in out
    assert "ignoringunreadablerowfile" in out and "foreign.json" in out
    assert json.loads(victim.read_text())["s"] == 1.0
    table = json.loads((run_copy / "metrics.json").read_text())
    assert sorted(r["s"] for r in table if r["num_samples"] == 40 and r["method"] == "cfg") == [0.0, 1.0, 3.0]
