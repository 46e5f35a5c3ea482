"""Training: SGD with warm-up and a cosine or step schedule, gradient
clipping, horizontal flips, a progress line, metrics, and checkpoints that
survive a crash or a Ctrl-C.

    from minimask.train import TrainSettings, train
    train(dataset, TrainSettings(iters=2000, out="runs/shapes"), config)

A run directory holds
- ``checkpoint.npz``  weights and optimiser state (written atomically)
- ``checkpoint.json`` the model config, the step and the settings
- ``metrics.jsonl``   one line per logged step: running means of the three
                      terms of eq. (2) (kept in the checkpoint, so a resumed
                      run continues them)
- ``losses.png``      their curves

``--resume`` (``resume=True``) reloads all of it and continues at the next
step; the data order and flips are drawn from ``(seed, step)``, so a resumed
run sees the same batches as an uninterrupted one.

Under MPI (``python -m minimask train`` on several cores, or ``mpiexec``),
every rank calls ``train``: each computes its part of every batch and one
allreduce averages the gradients (``minimask.distributed``); only rank 0
writes the files above.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minimask import distributed, runs
from minimask.data.batch import hflip, make_batch  # noqa: F401  (also part of this module's API)
from minimask._process import configure_process
from minimask.model import Config, RetinaMask
from minimask.nn import SGD, load_npz, save_npz


@dataclass
class TrainSettings:
    iters: int = 10000                # the default train: see weights/README.md for its time
    batch_size: int = 4
    lr: float = 0.08                  # for the tiny preset (GN heads); ResNet presets want ~0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 200
    warmup_factor: float = 0.001
    schedule: str = "cosine"          # or "step": x0.1 at 2/3 and 8/9 of the run
    clip_grad_norm: float = 10.0
    hflip: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 250
    out: str = "runs/train"
    resume: bool = False
    progress: bool = True

    def validated(self):
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError("iters and batch_size must be >= 1")
        if self.schedule not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")
        return self


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up from ``warmup_factor * lr``, then cosine to 0 or steps."""
    if step < s.warmup_iters:
        alpha = step / s.warmup_iters
        return s.lr * (s.warmup_factor * (1 - alpha) + alpha)
    if s.schedule == "cosine":
        t = (step - s.warmup_iters) / max(1, s.iters - s.warmup_iters)
        return s.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    factor = 1.0
    for milestone in (2 / 3, 8 / 9):
        if step >= milestone * s.iters:
            factor *= 0.1
    return s.lr * factor


def clip_gradients(params, max_norm: float) -> float:
    """Scale all gradients down together so their global L2 norm is at most
    ``max_norm``; returns the norm before clipping. Gradients on the GPU are
    measured and scaled there: only the norm (one number) crosses."""
    from minimask.backend import CPU, CUDA
    from minimask.layers import glue
    params = list(params)
    host = [p.grad for p in params if isinstance(p.grad, np.ndarray)]
    device = [p.grad for p in params if not isinstance(p.grad, np.ndarray)]
    squares = glue.sum_squares(host, CPU) if host else 0.0
    if device:
        squares += glue.sum_squares(device, CUDA)
    total = math.sqrt(squares)
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            glue.scale_into(p.grad, scale, CPU if isinstance(p.grad, np.ndarray) else CUDA)
    return total


def dataset_image_size(dataset) -> int:
    """The side of the (square) images a dataset yields."""
    for name in ("image_size", "size"):
        if isinstance(getattr(dataset, name, None), int):
            return getattr(dataset, name)
    return int(dataset[0][0].shape[-1])


class NonFiniteLoss(RuntimeError):
    pass


def save_checkpoint(out: Path, model: RetinaMask, optimizer: SGD, step: int,
                    settings: TrainSettings, extra: dict | None = None) -> None:
    """Weights + optimiser state as .npz, config + step as JSON; both
    written to a temporary file and renamed, so a crash never leaves half a
    checkpoint. The .npz also carries the metadata, so it stands alone."""
    meta = {"step": step, "config": model.config.to_dict(),
            "settings": dataclasses.asdict(settings), **(extra or {})}
    arrays = model.state_dict()
    arrays.update({f"optimizer.{k}": v for k, v in optimizer.state_dict().items()})
    save_npz(out / "checkpoint.npz", arrays, meta)
    runs.write_text_atomic(out / "checkpoint.json", json.dumps(meta, indent=2))


def load_model(weights_path, num_classes: int | None = None) -> tuple[RetinaMask, dict]:
    """A model built from the config stored with its weights, and the
    metadata. Raises ValueError (saying which file and why) for a missing,
    corrupt or mismatched file."""
    arrays, meta = load_npz(weights_path)
    runs.check_metadata(weights_path, meta)
    if "config" not in meta:
        raise ValueError(f"weights file {str(weights_path)!r} has no model config in its metadata")
    try:
        config = Config.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"weights file {str(weights_path)!r} has an invalid config: {e}") from None
    if num_classes is not None and config.num_classes != num_classes:
        raise ValueError(f"weights file {str(weights_path)!r} is for {config.num_classes} classes, "
                         f"the dataset has {num_classes}")
    model = RetinaMask(config)
    weights = {k: v for k, v in arrays.items() if not k.startswith("optimizer.")}
    try:
        model.load_state_dict(weights)
    except ValueError as e:
        raise ValueError(f"weights file {str(weights_path)!r} does not fit its model: {e}") from None
    return model, {**meta, "_optimizer": {k[len("optimizer."):]: v for k, v in arrays.items()
                                          if k.startswith("optimizer.")}}


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in [("cls", "$L_{cls}$ (focal)"), ("box", "$L_{loc}$ (smooth L1)"),
                       ("mask", "$L_{mask}$ (BCE, eq. 3)"), ("total", "$L$, eq. (2)")]:
        ax.plot(steps, [r[key] for r in rows], label=label, lw=1.5 if key == "total" else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (running mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def train(dataset, settings: TrainSettings, config: Config | None = None,
          log=print, comm=None, model: RetinaMask | None = None) -> RetinaMask:
    """Train and return the model (``model.interrupted``: True when a Ctrl-C
    stopped the run early, after saving).

    ``comm``: the ranks sharing each batch (``minimask.distributed``); by
    default ``distributed.world()`` - every rank of an MPI job, or this
    process alone. Every rank calls ``train``; only rank 0 writes files,
    logs and draws the progress line.

    ``model``: start from this model (e.g. imported pretrained weights)
    instead of a fresh ``RetinaMask(config)``. Frozen parameters (frozen
    batch norm, the stages ``trainable_stages`` leaves out) are not given to
    the optimiser, so they keep their values bit for bit."""
    configure_process()     # training's process settings (minimask/_process.py)
    s = settings.validated()
    comm = distributed.world() if comm is None else comm
    if comm.size > 1:
        from minimask.backend import get_backend
        comm.agree(distributed.check_ranks, comm.size, s.batch_size, get_backend())
    root = comm.rank == 0
    if not root:
        log = _quiet
    out = Path(s.out)
    if not s.resume:
        # a folder holding a run is refused, never emptied (rank 0 decides)
        comm.agree(lambda: runs.start_fresh(out, log=log) if root else None)
    metrics_path = out / "metrics.jsonl"
    start = 0
    if root:
        out.mkdir(parents=True, exist_ok=True)
    if s.resume:
        ckpt = out / "checkpoint.npz"

        def read_checkpoint():
            model, meta = load_model(ckpt, num_classes=dataset.num_classes)
            return model.config.to_dict(), model.state_dict(), meta

        # rank 0 reads it (the run folder need only exist on its machine)
        config_dict, state, meta = comm.from_root(read_checkpoint)
        model = RetinaMask(Config.from_dict(config_dict))
        model.load_state_dict(state)
        optimizer = SGD(_trainable(model), lr=s.lr, momentum=s.momentum,
                        weight_decay=s.weight_decay)
        optimizer.load_state_dict(meta["_optimizer"])
        # the same checks on every rank, agreed: an error is said once, by rank 0
        start, running = comm.agree(runs.resume_state, ckpt, meta)
        comm.agree(runs.check_resume_settings, ckpt, meta, s)
        if root:
            runs.clean_temporaries(out, log)
        log(f"resumed from {ckpt} at step {start}")
        before = meta.get("ranks", meta.get("settings", {}).get("workers", 1))
        if before != comm.size:
            log(f"note: steps up to {start} ran on {before} rank(s), this run uses "
                f"{comm.size}; each rank normalises its own part of the batch, so the "
                f"result differs slightly from an uninterrupted run")
        if start >= s.iters:
            log(f"the checkpoint is already at step {start}, at or past --iters {s.iters}: "
                f"nothing to train (raise --iters to continue)")
        if root:
            runs.repair_metrics(metrics_path, start, log)  # drop lines logged after the checkpoint
    else:
        if model is not None:
            config = model.config
        if config is None:
            config = Config.preset("tiny", num_classes=dataset.num_classes, seed=s.seed)
        comm.agree(_check_classes, config, dataset)
        if model is None:
            model = RetinaMask(config)
        comm.broadcast_parameters(model)
        optimizer = SGD(_trainable(model), lr=s.lr, momentum=s.momentum,
                        weight_decay=s.weight_decay)
        if root:
            metrics_path.write_text("")
        running = {}
    params = _trainable(model)
    # what predict needs to prepare images like the training ones; the rank
    # count is recorded for the resume note only - the checkpoint is the same
    about = {"image_size": int(dataset_image_size(dataset)),
             "class_names": list(getattr(dataset, "class_names", [])),
             "dataset": runs.describe_dataset(dataset), "ranks": comm.size}

    # Ctrl-C: finish the step in flight, save, and leave (every rank: the
    # flag travels in the step's allreduce, so all stop after the same step).
    interrupted = []
    previous_handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    model.interrupted = False
    step = saved = start
    parallel = distributed.DataParallel(model, dataset, s, comm) if comm.size > 1 else None
    try:
        t0 = time.time()
        for step in range(start, s.iters):
            lr = learning_rate(step, s)
            optimizer.lr = lr
            if parallel is not None:
                losses, stop = parallel.loss(step, bool(interrupted))
            else:
                images, targets = make_batch(dataset, step, s)
                losses = model.loss(images, targets)
                stop = bool(interrupted)
            if not all(np.isfinite(losses[k]) for k in ("cls", "box", "mask", "total")):
                raise NonFiniteLoss(
                    f"the loss became non-finite at step {step} ({_fmt(losses)}); training "
                    f"stopped and the last good checkpoint in {out} was kept. Try a lower "
                    f"--lr or a longer warm-up.")
            grad_norm = clip_gradients(params, s.clip_grad_norm)
            optimizer.step()
            for k in ("cls", "box", "mask", "total"):
                running[k] = losses[k] if k not in running else 0.9 * running[k] + 0.1 * losses[k]
            done = step + 1
            if root and (done % s.log_every == 0 or done == s.iters):
                runs.append_metrics(metrics_path, {"step": done, "lr": lr, "grad_norm": grad_norm,
                                                   "seconds": time.time() - t0, **running})
            if root and s.progress:
                _progress(done, s.iters, start, t0, running, lr)
            if done % s.checkpoint_every == 0 or done == s.iters or stop:
                if root:
                    save_checkpoint(out, model, optimizer, done, s, {**about, "running": running})
                saved = done
            if stop:
                model.interrupted = True
                log(f"\ninterrupted: saved step {done} to {out / 'checkpoint.npz'}; "
                    f"continue with --resume")
                break
    except distributed.PeerLost:
        # A rank died during step `step`, which no rank finished: the
        # parameters here are those after `step` steps, the same on every rank.
        if root:
            if step > saved:
                save_checkpoint(out, model, optimizer, step, s, {**about, "running": running})
            distributed.note_after_loss("saved" if step > saved else "kept", step)
        raise
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if root and s.progress:
            sys.stderr.write("\n")
        if root and metrics_path.exists() and metrics_path.stat().st_size:
            plot_losses(metrics_path, out / "losses.png")
    return model


def _trainable(model):
    """The parameters the optimiser updates: all but the frozen ones."""
    return [p for p in model.parameters() if not p.frozen]


def _check_classes(config, dataset):
    if config.num_classes != dataset.num_classes:
        raise ValueError(f"the model config has {config.num_classes} classes, the dataset "
                         f"has {dataset.num_classes}")


def _quiet(*_args, **_kwargs):
    pass


def _fmt(losses):
    return ", ".join(f"{k} {losses[k]:.4f}" for k in ("cls", "box", "mask", "total"))


def _progress(done, total, start, t0, running, lr):
    width = 24
    filled = int(width * done / total)
    rate = (done - start) / max(time.time() - t0, 1e-9)
    eta = (total - done) / max(rate, 1e-9)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                     f"{_fmt(running)} lr {lr:.4f} {rate:.1f} it/s eta {eta / 60:.1f} min ")
    sys.stderr.flush()
