"""Kill a tiny training run with SIGKILL at random moments - between steps,
mid-step, in the middle of writing a checkpoint - and continue it each time
with ``train --resume``: it must end with exactly the weights, optimiser
state and metrics of a run that was never interrupted, bit for bit.

Each chain of kills runs the command line in subprocesses (as a user
would). ``MINIMASK_FAULT_CHAINS`` sets how many chains (default 1: under a
minute on an idle 2-core machine); the kill moments come from
``MINIMASK_FAULT_SEED`` (default: a fresh seed, printed when a chain fails,
so a failure can be replayed).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minimask.nn import load_npz

# single-process training: the ranks are tests/test_distributed.py's
pytestmark = pytest.mark.usefixtures("one_rank")

ROOT = Path(__file__).resolve().parent.parent
ITERS = 8
RUN = ["--iters", str(ITERS), "--num-images", "4", "--image-size", "64", "--batch-size", "2",
       "--seed", "3", "--workers", "1", "--eval-images", "0", "--no-progress",
       "--checkpoint-every", "1"]
MAX_KILLS = 3
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "MINIMASK_BACKEND": "cpu",
       "MINIMASK_RANKS": "1"}   # the single-process path (ranks: test_distributed)


def _train(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "minimask", "train", *args], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _saved_step(out: Path) -> int:
    """The step of the last complete checkpoint (0 when there is none)."""
    try:
        return int(json.loads((out / "checkpoint.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _run_with_a_kill(args, out: Path, rng: random.Random) -> bool:
    """Start ``train`` and SIGKILL it a random 0-60 ms after it has saved a
    randomly chosen step: mid-step, mid-write of the .npz, between the .npz
    and the .json. True when it was killed, False when it finished first."""
    target = rng.randint(_saved_step(out) + 1, ITERS - 1)
    proc = _train(args)
    deadline = time.time() + 300
    try:
        while proc.poll() is None and time.time() < deadline and _saved_step(out) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.06))
        if proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _state(out: Path):
    arrays, meta = load_npz(out / "checkpoint.npz")
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return arrays, meta, rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = _train([*RUN, "--out", str(out)])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    return _state(out)


def _chains():
    n = int(os.environ.get("MINIMASK_FAULT_CHAINS", "1"))
    seed = os.environ.get("MINIMASK_FAULT_SEED")
    base = int(seed) if seed else random.SystemRandom().randrange(2 ** 31)
    return [base + k for k in range(n)]


@pytest.mark.parametrize("seed", _chains())
def test_killed_runs_resume_to_the_same_weights(uninterrupted, tmp_path, seed):
    rng = random.Random(seed)
    out = tmp_path / "run"
    kills, finished, moments = 0, False, []
    while kills < MAX_KILLS and _saved_step(out) < ITERS - 1:
        if (out / "checkpoint.npz").exists():
            args = [*RUN, "--out", str(out), "--resume"]
        else:    # killed before its first checkpoint: start again
            args = [*RUN, "--out", str(out), "--overwrite"]
        if not _run_with_a_kill(args, out, rng):
            finished = True
            break
        kills += 1
        moments.append(_saved_step(out))
    if not finished:
        proc = _train([*RUN, "--out", str(out), "--resume"])
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (seed, stderr.decode()[-2000:])
    assert kills >= 1, f"seed {seed}: no kill landed"
    print(f"seed {seed}: killed {kills} times, the last saved steps then {moments}")
    arrays, meta, rows = _state(out)
    ref_arrays, ref_meta, ref_rows = uninterrupted
    assert meta["step"] == ref_meta["step"] == ITERS
    assert sorted(arrays) == sorted(ref_arrays)
    for name in ref_arrays:
        assert np.array_equal(arrays[name], ref_arrays[name]), (seed, kills, name)
    assert meta["running"] == ref_meta["running"], seed
    assert rows == ref_rows, (seed, rows, ref_rows)
    assert not list(out.glob(".tmp-*")), "a temporary checkpoint was left behind"
