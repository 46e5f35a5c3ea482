"""Data-parallel training over MPI ranks (mpi4py): one machine or many.

Every rank (one process, anywhere an MPI launcher can start it) builds the
same model from the same config and seed, and computes the loss of its own
slice of each batch (``minimask.data.batch.batch_parts``). Then one
allreduce sums, over the ranks, a flat buffer holding every parameter's
gradient followed by the loss terms, the counts and two flags, and each
rank divides by the number of ranks ``n``:

    rank k:   L_k = model.loss(images of part k)      (its own num_pos, its own RoIs)
    allreduce g   = (1/n) sum_k dL_k/dtheta           (the parameters' gradient)
              L   = (1/n) sum_k L_k                   (the logged losses; counts summed)

Every rank then clips and takes the same SGD step on the same numbers, so
all ranks hold identical parameters without ever sending them again. This
is what ``torch.nn.parallel.DistributedDataParallel`` and Horovod compute:
each rank normalises its focal and box losses by its own positive anchors
and its mask loss by its own RoIs, so with ``n > 1`` the gradient is the
mean of the parts' gradients, not the gradient of one big batch with one
normaliser - a run depends on ``n`` (and for a given ``n`` is reproducible).

Launching: ``python -m minimask train`` starts ``n`` ranks itself under the
``mpiexec`` that the ``mpich`` package installed next to this Python
(``launch``); under ``mpiexec`` or ``srun`` you start them yourself and
every rank finds its place from the launcher's environment
(``launched_by_mpi``). Only rank 0 writes files and prints.

Faults: a rank that raises sets a flag in the step's allreduce, so every
rank learns of it at the same step and raises the same error (naming the
rank); a Ctrl-C sets the other flag, so all ranks stop after the same step
and rank 0 saves it. A rank that dies without a word (``kill -9``, the
out-of-memory killer) cannot say anything; under ``launch`` its guard
process (``_rank_guard.py``) tells the others, rank 0 saves the last step
every rank finished, and ``launch`` names the dead rank. Under a plain
``mpiexec`` the launcher kills every rank at once: the last checkpoint
survives (it is written atomically), the steps since it are lost.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import traceback

import numpy as np

from minimask.data.batch import batch_parts, make_batch

LOSS_KEYS = ("cls", "box", "mask", "total")
COUNT_KEYS = ("num_pos", "num_mask_rois")
# MPI launchers tell each process its rank through one of these
# (MPICH's Hydra and Slurm's PMI/PMI2: PMI_RANK; PMIx: PMIX_RANK; Open MPI)
RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK")
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")
# set by ``launch`` for its ranks: the number it started (checked by each rank)
LAUNCHED_RANKS = "MINIMASK_LAUNCHED_RANKS"
# a folder for ``launch``'s notes: file RANK holds that rank's pid,
# killed-RANK its guard's report, "saved" what rank 0 kept after a loss
RANK_PIDS = "MINIMASK_RANK_PIDS"
POLL_SECONDS = 5e-5


# ----------------------------------------------------------------------
# how many ranks, and starting them
# ----------------------------------------------------------------------


def launched_by_mpi(environ=None) -> bool:
    """Whether this process is one rank of a job an MPI launcher started."""
    env = os.environ if environ is None else environ
    return any(k in env for k in RANK_VARIABLES)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                          # not on Linux
        return os.cpu_count() or 1


def default_ranks(batch_size: int, backend: str) -> int:
    """One rank per core, at most one per image of a batch: the tiny model's
    layers are too small to keep several threads of one process busy, so
    single-threaded ranks use the cores better. One on the cuda backend."""
    if backend == "cuda":
        return 1
    return max(1, min(usable_cores(), batch_size))


def check_ranks(ranks: int, batch_size: int, backend: str = "cpu") -> None:
    """The one check of a rank count, before any work (ValueError)."""
    if ranks < 1:
        raise ValueError(f"--ranks must be >= 1, got {ranks}")
    if ranks > batch_size:
        raise ValueError(f"--ranks {ranks} is more than --batch-size {batch_size}: each rank "
                         f"computes at least one image of every batch (use at most "
                         f"{batch_size} ranks, or a larger batch)")
    if ranks > 1 and backend == "cuda":
        raise ValueError(f"{ranks} ranks on the cuda backend: ranks split batches over CPU "
                         f"processes; use --ranks 1 with --backend cuda")


def find_mpiexec() -> str:
    """The ``mpiexec`` of this Python's environment: the ``mpich`` wheel
    installs it into the environment's scripts folder (``venv/bin``), which
    need not be on PATH; else the first on PATH."""
    candidates = [os.path.join(sysconfig.get_path("scripts"), "mpiexec"),
                  os.path.join(os.path.dirname(sys.executable), "mpiexec")]
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    found = shutil.which("mpiexec")
    if found:
        return found
    raise ValueError(f"no mpiexec next to {sys.executable} or on PATH: install the project's "
                     f"requirements (pip install -r requirements.txt brings MPICH), or train "
                     f"in this one process with --ranks 1")


def launch_command(ranks: int, program: list[str], mpiexec: str | None = None) -> list[str]:
    """``mpiexec -n RANKS PROGRAM...``."""
    return [mpiexec or find_mpiexec(), "-n", str(ranks), *program]


def rank_environment(ranks: int, pid_dir: str | None = None) -> dict:
    """This environment, plus what ``launch`` tells its ranks: the rank
    count, ``cores // ranks`` threads each (unless set already), unbuffered
    output, and where each rank notes its process id."""
    env = dict(os.environ)
    threads = str(max(1, usable_cores() // ranks))
    for name in THREAD_VARIABLES:
        env.setdefault(name, threads)
    env[LAUNCHED_RANKS] = str(ranks)
    env["PYTHONUNBUFFERED"] = "1"
    if pid_dir is not None:
        env[RANK_PIDS] = pid_dir
    return env


GUARD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_rank_guard.py")


def launch(ranks: int, args: list[str], out: str | None = None) -> int:
    """Run ``python -m minimask ARGS`` as ``ranks`` MPI ranks on this
    machine and wait; returns the job's exit status.

    Each rank runs under ``_rank_guard.py``: if one dies of a signal
    (``kill -9``, the out-of-memory killer), its guard tells the others,
    rank 0 saves the last step every rank finished (into ``out``), and
    this prints one line naming the dead rank and what was saved."""
    import tempfile
    cmd = launch_command(ranks, [sys.executable, GUARD, "-m", "minimask", *args])
    # A Ctrl-C reaches this process and mpiexec together; mpiexec passes it
    # on to every rank, which save and leave. This process only waits (a
    # Python handler, not SIG_IGN, which mpiexec would inherit).
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        with tempfile.TemporaryDirectory(prefix="minimask-ranks-") as notes:
            code = subprocess.Popen(cmd, env=rank_environment(ranks, notes)).wait()
            killed, saved = [], None
            for name in sorted(os.listdir(notes)):
                with open(os.path.join(notes, name)) as f:
                    text = f.read().split()
                if name.startswith("killed-"):
                    killed.append((name[len("killed-"):], *text))
                elif name == "saved":
                    saved = text
    finally:
        signal.signal(signal.SIGINT, previous)
    if killed:
        rank, pid, sig = killed[0]
        try:
            what = signal.Signals(int(sig)).name
        except ValueError:
            what = f"signal {sig}"
        where = f" in {out!r}" if out else ""
        if saved and saved[0] == "saved":
            kept = (f"rank 0 saved step {saved[1]}, the last step every rank finished, "
                    f"to its checkpoint{where}")
        elif saved:
            kept = f"the checkpoint{where} holds step {saved[1]}, the last step every rank finished"
        else:
            kept = f"the last checkpoint{where} is intact (checkpoints are written atomically)"
        print(f"minimask: error: rank {rank} (pid {pid}) was killed by {what} (kill -9, or out "
              f"of memory?), so every rank stopped; {kept}; continue with --resume",
              file=sys.stderr)
    return 128 - code if code < 0 else code


# ----------------------------------------------------------------------
# errors every rank agrees on
# ----------------------------------------------------------------------


class RankInputError(ValueError):
    """Bad input met by one rank, raised on every rank (one-line CLI error)."""
    agreed = True


class RankFailed(RuntimeError):
    """Any other error of one rank, raised on every rank with its traceback."""
    agreed = True


class PeerLost(RuntimeError):
    """Another rank died without a word; its guard (``_rank_guard.py``)
    said so by SIGUSR1. MPI cannot finish a collective without it: the job
    ends, after rank 0 has saved what every rank finished."""


def note_after_loss(kind: str, step: int) -> None:
    """Rank 0's note for ``launch``: ``saved`` step, or ``kept`` (the
    checkpoint already held the last finished step)."""
    folder = os.environ.get(RANK_PIDS)
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, "saved"), "w") as f:
            f.write(f"{kind} {step}")


def _error_record(rank: int, exc: BaseException) -> dict:
    return {"rank": rank, "message": " ".join(str(exc).split()) or type(exc).__name__,
            "type": type(exc).__name__, "input": isinstance(exc, (ValueError, OSError)),
            "traceback": traceback.format_exc()}


def _raise_agreed(records: list[dict], size: int):
    first = min(records, key=lambda r: r["rank"])
    everywhere = len(records) == size and len({r["message"] for r in records}) == 1
    where = "" if everywhere or size == 1 else f"rank {first['rank']}: "
    if first["input"]:
        raise RankInputError(f"{where}{first['message']}")
    raise RankFailed(f"{where}{first['type']}: {first['message']}\n"
                     f"--- traceback of rank {first['rank']} ---\n{first['traceback']}")


# ----------------------------------------------------------------------
# the ranks
# ----------------------------------------------------------------------


class Solo:
    """One process, no MPI: the same interface as ``World`` for ``n = 1``."""
    rank, size = 0, 1

    def agree(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def from_root(self, fn):
        return fn()

    def broadcast_parameters(self, model) -> None:
        pass

    def barrier(self) -> None:
        pass


_WORLD = None


def world():
    """This process's place among the ranks: ``World`` under an MPI launcher,
    else ``Solo``. Built once (MPI starts on the first call)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = World() if launched_by_mpi() else Solo()
    return _WORLD


class World:
    """The ranks of ``MPI.COMM_WORLD``. Every wait polls a non-blocking
    request with short sleeps: a rank that is ahead waits without keeping a
    core busy (MPICH's blocking calls spin), and a rank that died is
    noticed (SIGUSR1 from its guard: ``PeerLost``) instead of waited for
    forever."""

    def __init__(self, comm=None):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.peer_lost = False
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, self._on_peer_lost)
        self.host = socket.gethostname()
        if os.environ.get(RANK_PIDS):
            with open(os.path.join(os.environ[RANK_PIDS], str(self.rank)), "w") as f:
                f.write(str(os.getpid()))
        self.places = self.comm.allgather((self.host, os.getpid()))
        expected = os.environ.get(LAUNCHED_RANKS)
        if expected is not None and int(expected) != self.size:
            raise ValueError(
                f"mpiexec was asked for {expected} ranks but this process sees an MPI world of "
                f"{self.size}: the mpiexec found ({find_mpiexec()}) belongs to another MPI "
                f"than mpi4py's; put the environment's own bin folder first on PATH")
        local = sum(host == self.host for host, _ in self.places)
        if "NUMBA_NUM_THREADS" not in os.environ and local > 1:
            import numba
            numba.set_num_threads(max(1, min(numba.config.NUMBA_NUM_THREADS,
                                             usable_cores() // local)))

    def _on_peer_lost(self, *_):
        self.peer_lost = True

    def wait(self, request) -> None:
        while not request.Test():
            if self.peer_lost:
                raise PeerLost("another rank died")
            time.sleep(POLL_SECONDS)

    def allreduce_sum(self, buffer: np.ndarray) -> None:
        """``buffer`` <- its sum over the ranks, in place."""
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM))

    def barrier(self) -> None:
        self.wait(self.comm.Ibarrier())

    def agree(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on every rank; if it raises on any, every
        rank raises (the lowest failing rank's error)."""
        try:
            result, record = fn(*args, **kwargs), None
        except Exception as e:
            result, record = None, _error_record(self.rank, e)
        failed = np.array([record is not None], np.int64)
        self.allreduce_sum(failed)
        if failed[0]:
            _raise_agreed([r for r in self.comm.allgather(record) if r], self.size)
        return result

    def from_root(self, fn):
        """``fn()`` on rank 0, its result sent to every rank (or its error
        raised on every rank)."""
        result = record = None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as e:
                record = _error_record(0, e)
        failed = np.array([record is not None], np.int64)
        self.wait(self.comm.Ibcast(failed, root=0))
        if failed[0]:
            _raise_agreed([self.comm.bcast(record, root=0)], self.size)
        return self.comm.bcast(result, root=0)

    def broadcast_parameters(self, model) -> None:
        """Rank 0's parameter values on every rank (they start equal from
        the same seed; this makes sure)."""
        params = model.parameters()
        flat = np.concatenate([p.value.ravel() for p in params])
        self.wait(self.comm.Ibcast(flat, root=0))
        start = 0
        for p in params:
            p.value[...] = flat[start:start + p.value.size].reshape(p.value.shape)
            start += p.value.size

    def abort(self, code: int) -> None:
        """End every rank now (for an error only this rank has met)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.comm.Abort(code)


class DataParallel:
    """``loss(step, interrupted)``: the model's loss on this rank's part of
    batch ``step``, averaged over the ranks by one allreduce; leaves every
    ``Parameter.grad`` equal to the averaged gradient. Returns the averaged
    losses (counts summed) and whether any rank was interrupted."""

    def __init__(self, model, dataset, settings, comm: World):
        check_ranks(comm.size, settings.batch_size)
        self.model, self.dataset, self.settings, self.comm = model, dataset, settings, comm
        self.params = model.parameters()
        self.offsets = np.cumsum([0] + [p.value.size for p in self.params])
        n = int(self.offsets[-1])
        # gradients | loss terms | counts | failed | interrupted
        self.buffer = np.zeros(n + len(LOSS_KEYS) + len(COUNT_KEYS) + 2,
                               dtype=self.params[0].value.dtype)
        self.scalars = self.buffer[n:]

    def loss(self, step: int, interrupted: bool = False) -> tuple[dict, bool]:
        buf, scalars, nk = self.buffer, self.scalars, len(LOSS_KEYS) + len(COUNT_KEYS)
        record = None
        try:
            images, targets = make_batch(self.dataset, step, self.settings,
                                         part=(self.comm.rank, self.comm.size))
            losses = self.model.loss(images, targets)
            for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
                buf[a:b] = p.grad.ravel()
            scalars[:nk] = [losses[k] for k in LOSS_KEYS + COUNT_KEYS]
            scalars[nk] = 0
        except Exception as e:
            record = _error_record(self.comm.rank, e)
            buf[:] = 0
            scalars[nk] = 1
        scalars[nk + 1] = 1 if interrupted else 0
        self.comm.allreduce_sum(buf)
        if scalars[nk]:
            _raise_agreed([r for r in self.comm.comm.allgather(record) if r], self.comm.size)
        n = self.comm.size
        for p, a, b in zip(self.params, self.offsets[:-1], self.offsets[1:]):
            p.grad[...] = buf[a:b].reshape(p.grad.shape)
            p.grad /= n
        out = {k: float(scalars[i]) / n for i, k in enumerate(LOSS_KEYS)}
        out.update({k: int(round(float(scalars[len(LOSS_KEYS) + i])))
                    for i, k in enumerate(COUNT_KEYS)})
        return out, bool(scalars[nk + 1])


def average_losses(parts: list[dict]) -> dict:
    """Loss terms averaged over the parts, counts summed (what the allreduce
    computes, written out for one process)."""
    out = {k: float(np.mean([p[k] for p in parts])) for k in LOSS_KEYS}
    out.update({k: int(sum(p.get(k, 0) for p in parts)) for k in COUNT_KEYS})
    return out


def ring_allreduce(buffers: list[np.ndarray]) -> tuple[list[np.ndarray], list[list[set]]]:
    """A ring allreduce of ``n`` ranks' equal-length buffers, simulated step
    by step in one process (for teaching; MPI picks its own algorithm).

    Each buffer is cut into ``n`` chunks. Reduce-scatter, ``n - 1`` steps:
    rank ``r`` sends chunk ``(r - s) mod n`` to rank ``r + 1``, which adds it
    to its own; afterwards rank ``r`` holds the full sum of chunk
    ``(r + 1) mod n``. Allgather, ``n - 1`` steps: the summed chunks travel
    once more around the ring, overwriting. Every rank sends ``2 (n - 1)``
    chunks, ``2 (n - 1) / n`` of the buffer, whatever ``n`` is.

    Returns the buffers after the allreduce (every one the sum of all) and,
    after each of the ``2 n - 1`` states (the start, then each step), which
    ranks' values each chunk of each rank holds: ``history[t][r][c]``."""
    n = len(buffers)
    chunks = [np.array_split(np.asarray(b, dtype=np.float64).copy(), n) for b in buffers]
    holds = [[{r} for _ in range(n)] for r in range(n)]
    history = [[[set(h) for h in rank] for rank in holds]]
    for s in range(n - 1):                                   # reduce-scatter
        sent = [(r, (r - s) % n, chunks[r][(r - s) % n].copy(), set(holds[r][(r - s) % n]))
                for r in range(n)]                           # every rank sends at once
        for r, c, values, who in sent:
            chunks[(r + 1) % n][c] += values
            holds[(r + 1) % n][c] |= who
        history.append([[set(h) for h in rank] for rank in holds])
    for s in range(n - 1):                                   # allgather
        sent = [(r, (r + 1 - s) % n, chunks[r][(r + 1 - s) % n].copy(),
                 set(holds[r][(r + 1 - s) % n])) for r in range(n)]
        for r, c, values, who in sent:
            chunks[(r + 1) % n][c] = values
            holds[(r + 1) % n][c] = who
        history.append([[set(h) for h in rank] for rank in holds])
    return [np.concatenate(c) for c in chunks], history
