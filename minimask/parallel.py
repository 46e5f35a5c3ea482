"""Data parallelism on one machine: each batch split over a few processes.

Why: the tiny model's layers are too small for Numba's threads to pay off
(a training step takes about as long on two threads as on one), so on a
2-core laptop the second core sits idle. Splitting every batch of ``B``
images into ``n`` parts, one per process, keeps both cores busy:

    process k:   L_k = model.loss(images of part k)      (own num_pos, own RoIs)
    then         g   = (1/n) sum_k dL_k/dtheta           (the parameters' gradient)
                 L   = (1/n) sum_k L_k                   (the logged losses)

This is what ``torch.nn.parallel.DistributedDataParallel`` computes: every
process normalises its focal and box losses by its own number of positive
anchors and its mask loss by its own RoIs, and the gradients are averaged.
With ``n = 1`` it is exactly ``model.loss`` on the whole batch; with ``n > 1``
it is the average of the parts' losses - a slightly different normaliser,
so a run depends on ``n`` (and, for a given ``n``, is still reproducible).

How: ``n`` worker processes, started with "spawn" (forking a process that
runs OpenMP threads is not safe) and limited to one thread each, build the
same model from its config and compute one part each; this process only
waits, averages and steps (its own Numba and BLAS threads cannot be
limited once loaded, so it leaves the cores to the workers). The parameter values and the workers' gradients travel through
shared memory, one flat float array each; the step number, the losses and
errors through a pipe. Only the main process keeps an optimiser: after the
averaged gradient is in place it steps, and the next call copies the new
values to the workers.

    with DataParallel(model, dataset, settings, n=2) as dp:
        losses = dp.loss(step)          # fills every Parameter.grad
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from multiprocessing import shared_memory

import numpy as np

LOSS_KEYS = ("cls", "box", "mask", "total")
COUNT_KEYS = ("num_pos", "num_mask_rois")


def batch_parts(batch_size: int, n: int) -> list[np.ndarray]:
    """The positions in a batch that each of ``n`` processes computes:
    contiguous, sizes differing by at most one."""
    if not 1 <= n <= batch_size:
        raise ValueError(f"the number of workers must lie in [1, batch size {batch_size}], got {n}")
    return np.array_split(np.arange(batch_size), n)


def average_losses(parts: list[dict]) -> dict:
    """Loss terms averaged over the parts, counts summed."""
    out = {k: float(np.mean([p[k] for p in parts])) for k in LOSS_KEYS}
    out.update({k: int(sum(p.get(k, 0) for p in parts)) for k in COUNT_KEYS})
    return out


def _flat_views(buffer, params, dtype):
    """Views into one flat shared buffer, shaped like each parameter."""
    flat = np.ndarray((sum(p.value.size for p in params),), dtype=dtype, buffer=buffer)
    views, start = [], 0
    for p in params:
        views.append(flat[start:start + p.value.size].reshape(p.value.shape))
        start += p.value.size
    return flat, views


def _worker(conn, config_dict, dataset, settings, part, params_name, grads_name, backend):
    """A worker's loop: wait for a step, load the parameters, compute the
    loss of its part of that step's batch, write the gradients, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the main process handles Ctrl-C
    params_shm = grads_shm = None
    try:
        import minimask
        minimask.configure_process()                # a worker owns its process
        from minimask.model import Config, RetinaMask
        from minimask.train import make_batch
        minimask.set_backend(backend)
        model = RetinaMask(Config.from_dict(config_dict))
        params = model.parameters()
        dtype = params[0].value.dtype
        params_shm = shared_memory.SharedMemory(name=params_name)
        grads_shm = shared_memory.SharedMemory(name=grads_name)
        _, values = _flat_views(params_shm.buf, params, dtype)
        _, grads = _flat_views(grads_shm.buf, params, dtype)
        conn.send(("ready", None))
        while True:
            step = conn.recv()
            if step is None:
                break
            for p, v in zip(params, values):
                p.value[...] = v
            images, targets = make_batch(dataset, step, settings, part=part)
            losses = model.loss(images, targets)
            for p, g in zip(params, grads):
                g[...] = p.grad
            conn.send(("ok", {k: losses[k] for k in LOSS_KEYS + COUNT_KEYS}))
    except BaseException:                               # report, don't hang the main process
        try:
            conn.send(("error", traceback.format_exc()))
        except (OSError, EOFError):
            pass
    finally:
        values = grads = None                           # release the views before closing
        for shm in (params_shm, grads_shm):
            if shm is not None:
                _close(shm)
        conn.close()


def _close(shm, unlink=False):
    try:
        shm.close()
    except BufferError:         # a view still alive somewhere: the OS frees it at exit
        pass
    if unlink:
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


class DataParallel:
    """``loss(step)``: the model's loss on batch ``step`` (from
    ``train.make_batch``), computed in ``n`` processes and averaged; leaves
    every ``Parameter.grad`` of ``model`` equal to the averaged gradient.
    Use as a context manager, so the workers stop and the shared memory is
    freed whatever happens."""

    def __init__(self, model, dataset, settings, n: int):
        from minimask.backend import get_backend
        self.parts = batch_parts(settings.batch_size, n)
        self.model, self.dataset, self.settings, self.n = model, dataset, settings, n
        self.params = model.parameters()
        dtype = self.params[0].value.dtype
        nbytes = sum(p.value.nbytes for p in self.params)
        self._shms, self._procs, self._conns = [], [], []
        try:
            self._values_shm = self._new_shm(nbytes)
            _, self._values = _flat_views(self._values_shm.buf, self.params, dtype)
            self._grads = []
            ctx = mp.get_context("spawn")
            # one thread per worker: n single-threaded workers fill n cores, while this
            # process only waits for them (spawned children read these at start-up)
            saved = {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                    "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
            os.environ.update({k: "1" for k in saved})
            try:
                for k in range(n):
                    grads_shm = self._new_shm(nbytes)
                    self._grads.append(_flat_views(grads_shm.buf, self.params, dtype)[1])
                    parent, child = ctx.Pipe()
                    proc = ctx.Process(
                        target=_worker, daemon=True, name=f"minimask-worker-{k}",
                        args=(child, model.config.to_dict(), dataset, settings, (k, n),
                              self._values_shm.name, grads_shm.name, get_backend()))
                    proc.start()
                    child.close()
                    self._procs.append(proc)
                    self._conns.append(parent)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            for conn in self._conns:
                try:
                    self._receive(conn)                 # "ready", or the worker's error
                except RuntimeError as e:
                    if "without a message" not in str(e):
                        raise
                    raise RuntimeError(
                        "a data-parallel worker process died while starting. Workers start "
                        "by re-importing the main script (Python's 'spawn'), so a script "
                        "that trains with workers > 1 must call it under "
                        "`if __name__ == \"__main__\":`; the worker's own error is printed "
                        "above") from None
        except BaseException:
            self.close()
            raise

    def _new_shm(self, nbytes):
        shm = shared_memory.SharedMemory(create=True, size=max(1, nbytes))
        self._shms.append(shm)
        return shm

    def _receive(self, conn):
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            raise RuntimeError("a data-parallel worker process died without a message "
                               "(out of memory?)") from None
        if kind == "error":
            raise RuntimeError(f"a data-parallel worker failed:\n{payload}")
        return payload

    def loss(self, step: int) -> dict:
        for p, v in zip(self.params, self._values):
            v[...] = p.value
        for conn in self._conns:
            conn.send(step)
        parts = [self._receive(conn) for conn in self._conns]
        for k, p in enumerate(self.params):
            p.grad[...] = self._grads[0][k]
            for grads in self._grads[1:]:
                p.grad += grads[k]
            if self.n > 1:
                p.grad /= self.n
        return average_losses(parts)

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._values = self._grads = None
        for shm in self._shms:
            _close(shm, unlink=True)
        self._shms, self._procs, self._conns = [], [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
