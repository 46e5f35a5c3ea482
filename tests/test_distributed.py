"""Data-parallel training over MPI ranks (minimask.distributed): the
arithmetic in one process, then real 2-rank jobs under the environment's
mpiexec (tests/mpi_job.py and the command line), each under a timeout."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minimask import distributed
from minimask.__main__ import main
from minimask.data.batch import batch_parts, make_batch
from minimask.data.synthetic import ShapesDataset
from minimask.model import RetinaMask
from minimask.nn import load_npz
from minimask.train import TrainSettings, train
from tests.mpi_job import DATA, micro_config, perturbed_model, run_settings

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "mpi_job.py"
TIMEOUT = 300          # seconds for one 2-rank job (a cold Numba cache compiles first)


def mpirun(*args, ranks=2):
    """``mpiexec -n 2 python tests/mpi_job.py ARGS`` -> CompletedProcess."""
    cmd = distributed.launch_command(ranks, [sys.executable, str(JOB), *map(str, args)])
    env = distributed.rank_environment(ranks)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)


def cli(*args, **kw):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")]))
    env.pop("MINIMASK_RANKS", None)
    return subprocess.run([sys.executable, "-m", "minimask", *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=TIMEOUT, **kw)


# ----------------------------------------------------------------------
# in one process
# ----------------------------------------------------------------------


@given(batch=st.integers(1, 12), n=st.integers(1, 12))
def test_batch_parts_cover_the_batch_once_in_order(batch, n):
    if n > batch:
        with pytest.raises(ValueError, match="ranks"):
            batch_parts(batch, n)
        return
    parts = batch_parts(batch, n)
    assert len(parts) == n
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(batch))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_make_batch_parts_are_slices_of_the_whole_batch():
    s = TrainSettings(batch_size=5, seed=3)
    images, targets = make_batch(DATA, 7, s)
    for k, mine in enumerate(batch_parts(5, 2)):
        part_images, part_targets = make_batch(DATA, 7, s, part=(k, 2))
        np.testing.assert_array_equal(part_images, images[mine])
        for t, u in zip(part_targets, [targets[i] for i in mine]):
            np.testing.assert_array_equal(t["masks"], u["masks"])


def test_average_losses_means_the_terms_and_sums_the_counts():
    parts = [dict(cls=1.0, box=2.0, mask=3.0, total=6.0, num_pos=4, num_mask_rois=2),
             dict(cls=3.0, box=0.0, mask=1.0, total=4.0, num_pos=1, num_mask_rois=5)]
    out = distributed.average_losses(parts)
    assert out == dict(cls=2.0, box=1.0, mask=2.0, total=5.0, num_pos=5, num_mask_rois=7)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_the_simulated_ring_allreduce_leaves_the_sum_on_every_rank(n):
    rng = np.random.default_rng(n)
    buffers = [rng.standard_normal(11) for _ in range(n)]      # 11: chunks of unequal size
    out, history = distributed.ring_allreduce(buffers)
    expected = np.sum(buffers, axis=0)
    for got in out:
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert len(history) == 2 * n - 1
    assert history[0] == [[{r}] * n for r in range(n)]
    if n > 1:       # after reduce-scatter, rank r alone holds the full sum of chunk r + 1
        assert all(history[n - 1][r][(r + 1) % n] == set(range(n)) for r in range(n))
        assert sum(h == set(range(n)) for rank in history[n - 1] for h in rank) == n
    assert all(h == set(range(n)) for rank in history[-1] for h in rank)


def test_the_rank_count_is_checked_in_one_place():
    distributed.check_ranks(4, 4)
    for ranks, batch, backend, words in [(3, 2, "cpu", ["--ranks 3", "--batch-size 2"]),
                                         (0, 2, "cpu", [">= 1"]),
                                         (2, 4, "cuda", ["--ranks 1", "cuda"])]:
        with pytest.raises(ValueError) as info:
            distributed.check_ranks(ranks, batch, backend)
        assert all(w in str(info.value) for w in words), str(info.value)


def test_default_ranks_one_per_core_at_most_one_per_image(monkeypatch):
    for cores, batch, backend, expected in [(1, 4, "cpu", 1), (2, 4, "cpu", 2), (16, 4, "cpu", 4),
                                            (16, 1, "cpu", 1), (16, 4, "cuda", 1)]:
        monkeypatch.setattr(distributed, "usable_cores", lambda: cores)
        assert distributed.default_ranks(batch, backend) == expected, (cores, batch, backend)


def test_launched_by_mpi_reads_the_launchers_variables():
    assert not distributed.launched_by_mpi({"PATH": "/bin"})
    for name in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK"):
        assert distributed.launched_by_mpi({name: "0"})


def test_the_environments_own_mpiexec_is_found_and_is_mpich():
    path = distributed.find_mpiexec()
    assert Path(path).parent == Path(sys.executable).parent, path   # venv/bin, not PATH
    version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    assert "HYDRA" in version.stdout, version.stdout          # MPICH's launcher
    assert distributed.launch_command(3, ["prog", "x"]) == [path, "-n", "3", "prog", "x"]
    env = distributed.rank_environment(2, "/some/dir")
    assert env[distributed.LAUNCHED_RANKS] == "2" and env[distributed.RANK_PIDS] == "/some/dir"


def test_too_many_ranks_are_refused_before_anything_starts(tmp_path, capsys):
    t0 = time.time()
    code = main(["train", "--ranks", "3", "--batch-size", "2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--ranks 3" in err and "--batch-size 2" in err, err
    assert not (tmp_path / "r").exists() and time.time() - t0 < 10


# ----------------------------------------------------------------------
# 2-rank jobs
# ----------------------------------------------------------------------


def test_two_ranks_average_the_gradient_of_their_parts(tmp_path):
    result = mpirun("gradient", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"gradient{r}.npz")) for r in range(2)]
    model = perturbed_model()
    s = TrainSettings(batch_size=3, seed=1)
    expected, parts = {}, []
    for k in range(2):                      # the same parts, computed here one after the other
        images, targets = make_batch(DATA, 4, s, part=(k, 2))
        parts.append(model.loss(images, targets))
        for n, p in model.named_parameters():
            expected[n] = expected.get(n, 0) + p.grad / 2
    mean = distributed.average_losses(parts)
    for got in ranks:
        assert not got["stop"]
        for key in ("cls", "box", "mask", "total"):
            assert float(got[key]) == pytest.approx(mean[key], rel=1e-12), key
        assert int(got["num_pos"]) == mean["num_pos"] > 0
        assert int(got["num_mask_rois"]) == mean["num_mask_rois"]
        for n in expected:
            np.testing.assert_allclose(got[n], expected[n], rtol=1e-12, atol=1e-15, err_msg=n)
    for n in expected:                      # and every rank holds the very same numbers
        np.testing.assert_array_equal(ranks[0][n], ranks[1][n], err_msg=n)
    assert sum(np.abs(g).sum() for g in expected.values()) > 0


def test_two_rank_training_is_identical_across_ranks_reproducible_and_resumes(tmp_path):
    result = mpirun("train", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    p0, p1 = (dict(np.load(tmp_path / f"params{r}.npz")) for r in range(2))
    for n in p0:
        np.testing.assert_array_equal(p0[n], p1[n], err_msg=n)          # bit for bit
    a, meta_a = load_npz(tmp_path / "a" / "checkpoint.npz")
    b, meta_b = load_npz(tmp_path / "b" / "checkpoint.npz")
    assert meta_a["step"] == meta_b["step"] == 4 and meta_a["ranks"] == 2
    for n in a:                             # 4 steps == 2 steps, then resumed to 4
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)
    initial = dict(RetinaMask(micro_config(dtype="float32")).named_parameters())
    assert sum(not np.array_equal(p0[n], initial[n].value) for n in p0) > len(p0) // 2
    # only rank 0 wrote: one folder per run, no per-rank files
    assert sorted(x.name for x in (tmp_path / "a").iterdir()) == [
        "checkpoint.json", "checkpoint.npz", "losses.png", "metrics.jsonl"]
    # the checkpoint does not depend on the rank count: one process resumes it
    lines = []
    model = train(DATA, run_settings(tmp_path / "a", 5, resume=True), log=lines.append)
    assert any("ran on 2 rank(s), this run uses 1" in line for line in lines), lines
    _, meta = load_npz(tmp_path / "a" / "checkpoint.npz")
    assert meta["step"] == 5 and meta["ranks"] == 1 and not model.interrupted


@pytest.fixture(scope="module")
def coco_missing_image(tmp_path_factory):
    """Exported shapes whose image 2 has been deleted."""
    out = tmp_path_factory.mktemp("coco")
    assert main(["export-shapes", "--seed", "5", "--num-images", "4", "--image-size", "64",
                 "--out", str(out)]) == 0
    victim = sorted((out / "images").iterdir())[2]
    victim.unlink()
    return out / "annotations.json", victim


def test_a_missing_image_gives_one_line_and_exit_2_on_two_ranks_as_on_one(coco_missing_image,
                                                                           tmp_path):
    annotations, victim = coco_missing_image
    messages = {}
    for ranks in (1, 2):
        result = cli("train", "--dataset", annotations, "--ranks", ranks, "--iters", 6,
                     "--batch-size", 4, "--image-size", 64, "--out", tmp_path / str(ranks),
                     "--no-progress")
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("minimask: error: "), result.stderr
        messages[ranks] = lines[0][len("minimask: error: "):]
    assert victim.name in messages[1] and "does not exist" in messages[1], messages
    # the same line; "rank K: " in front when only rank K met the missing image
    assert re.fullmatch(r"(rank [01]: )?" + re.escape(messages[1]), messages[2]), messages


def start_training(out, ready="metrics.jsonl"):
    """``python -m minimask train --ranks 2`` in its own session (as from a
    terminal), long enough never to finish; returns once ``out/ready`` has
    content (metrics: 10 steps; the checkpoint: 250)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MINIMASK_RANKS", None)
    proc = subprocess.Popen([sys.executable, "-m", "minimask", "train", "--ranks", "2",
                             "--iters", "100000", "--batch-size", "2", "--image-size", "64",
                             "--num-images", "8", "--out", str(out), "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + TIMEOUT
    metrics = out / ready
    while not (metrics.exists() and metrics.stat().st_size):
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(proc.communicate())
        time.sleep(0.2)
    return proc


def finish(proc):
    try:
        return proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def rank_pid(out, rank):
    """The process id of rank ``rank`` of the job writing to ``out``."""
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if (str(out).encode() in cmdline and f"PMI_RANK={rank}".encode() in environ
                and not any(part.endswith(b"_rank_guard.py") for part in cmdline)):
            return int(entry.name)                  # the rank, not its guard
    raise AssertionError(f"no rank {rank} writing to {out}")


def test_ctrl_c_saves_the_step_in_flight_and_every_rank_exits_130(tmp_path):
    out = tmp_path / "run"
    proc = start_training(out)
    os.killpg(proc.pid, signal.SIGINT)        # what a terminal does on Ctrl-C
    stdout, stderr = finish(proc)
    assert proc.returncode == 130, stderr[-3000:]
    assert stdout.count("interrupted: saved step") == 1, stdout
    saved = int(stdout.split("interrupted: saved step ")[1].split()[0])
    assert json.loads((out / "checkpoint.json").read_text())["step"] == saved >= 10
    assert "Traceback" not in stderr, stderr[-3000:]


def test_a_killed_rank_ends_the_job_naming_it_and_the_finished_steps_are_saved(tmp_path):
    out = tmp_path / "run"
    proc = start_training(out, ready="checkpoint.json")       # step 250 saved
    time.sleep(1.0)                                           # some steps past it
    pid = rank_pid(out, 1)
    os.kill(pid, signal.SIGKILL)              # kill -9, or the out-of-memory killer
    stdout, stderr = finish(proc)             # no hang: finish() has a timeout
    assert proc.returncode not in (0, 130), (stdout, stderr)
    lines = [l for l in stderr.splitlines() if l.startswith("minimask:")]
    assert len(lines) == 1, stderr[-3000:]
    assert f"rank 1 (pid {pid}) was killed by SIGKILL" in lines[0], lines
    assert "--resume" in lines[0] and "Traceback" not in stderr, stderr[-3000:]
    _, meta = load_npz(out / "checkpoint.npz")
    if "rank 0 saved step" in lines[0]:       # the steps since step 250 were kept
        saved = int(lines[0].split("rank 0 saved step ")[1].split(",")[0])
        assert meta["step"] == saved > 250, (meta["step"], lines)
    else:                                     # killed before a step past 250 finished
        assert "holds step 250" in lines[0] and meta["step"] == 250, lines
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] <= meta["step"] + 10, (steps[-1], meta["step"])
