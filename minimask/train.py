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

from minimask._process import configure_process
from minimask.model import Config, RetinaMask
from minimask.nn import SGD, load_npz, save_npz


@dataclass
class TrainSettings:
    iters: int = 6000                 # the default train: 11.5 min on an idle 2-core CPU, 2 workers
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
    # processes sharing each batch (minimask.parallel); 1 = this one only
    workers: int = 1

    def validated(self):
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError("iters and batch_size must be >= 1")
        if not 1 <= self.workers <= self.batch_size:
            raise ValueError(f"workers must lie in [1, batch_size = {self.batch_size}], "
                             f"got {self.workers}")
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
    ``max_norm``; returns the norm before clipping."""
    total = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in params))
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            p.grad *= scale
    return total


def hflip(image, target):
    """Mirror an image and its boxes and masks left to right."""
    W = image.shape[-1]
    boxes = target["boxes"].copy()
    if len(boxes):
        boxes[:, [0, 2]] = W - target["boxes"][:, [2, 0]]
    return image[..., ::-1].copy(), {"boxes": boxes, "labels": target["labels"],
                                     "masks": target["masks"][..., ::-1].copy()}


def make_batch(dataset, step: int, s: TrainSettings, part: tuple[int, int] = (0, 1)):
    """The batch of ``step``: indices and flips drawn from (seed, step).

    ``part=(k, n)``: only the k-th of n contiguous slices of it (what one
    data-parallel process computes, see ``minimask.parallel``)."""
    rng = np.random.default_rng([s.seed, step])
    idx = rng.integers(0, len(dataset), s.batch_size)
    flips = rng.random(s.batch_size) < 0.5
    if part != (0, 1):
        from minimask.parallel import batch_parts
        mine = batch_parts(s.batch_size, part[1])[part[0]]
        idx, flips = idx[mine], flips[mine]
    images, targets = [], []
    for i, flip in zip(idx, flips):
        image, target = dataset[int(i)]
        if s.hflip and flip:
            image, target = hflip(image, target)
        images.append(image)
        targets.append(target)
    return np.stack(images), targets


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
    tmp = out / ".checkpoint.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "checkpoint.json")


def load_model(weights_path, num_classes: int | None = None) -> tuple[RetinaMask, dict]:
    """A model built from the config stored with its weights, and the
    metadata. Raises ValueError (saying which file and why) for a missing,
    corrupt or mismatched file."""
    arrays, meta = load_npz(weights_path)
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
          log=print) -> RetinaMask:
    configure_process()     # training's process settings (minimask/_process.py)
    s = settings.validated()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    start = 0
    if s.resume:
        ckpt = out / "checkpoint.npz"
        model, meta = load_model(ckpt, num_classes=dataset.num_classes)
        optimizer = SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                        weight_decay=s.weight_decay)
        optimizer.load_state_dict(meta["_optimizer"])
        start = int(meta["step"])
        running = {k: float(v) for k, v in meta.get("running", {}).items()}
        log(f"resumed from {ckpt} at step {start}")
        before = meta.get("settings", {}).get("workers", 1)
        if before != s.workers:
            log(f"note: steps up to {start} ran with {before} worker(s), this run uses "
                f"{s.workers}; each worker normalises its own part of the batch, so the "
                f"result differs slightly from an uninterrupted run")
        if start >= s.iters:
            log(f"the checkpoint is already at step {start}, at or past --iters {s.iters}: "
                f"nothing to train (raise --iters to continue)")
        if metrics_path.exists():  # drop lines logged after the checkpoint
            kept = [l for l in metrics_path.read_text().splitlines()
                    if l.strip() and json.loads(l)["step"] <= start]
            metrics_path.write_text("".join(k + "\n" for k in kept))
    else:
        if config is None:
            config = Config.preset("tiny", num_classes=dataset.num_classes, seed=s.seed)
        if config.num_classes != dataset.num_classes:
            raise ValueError(f"the model config has {config.num_classes} classes, the dataset "
                             f"has {dataset.num_classes}")
        model = RetinaMask(config)
        optimizer = SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                        weight_decay=s.weight_decay)
        metrics_path.write_text("")
        running = {}
    params = model.parameters()
    # what predict needs to prepare images like the training ones
    about = {"image_size": int(dataset_image_size(dataset)),
             "class_names": list(getattr(dataset, "class_names", []))}

    # Ctrl-C: finish the step in flight, save, and leave.
    interrupted = []
    previous_handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    step = start
    parallel = None
    try:
        if s.workers > 1 and start < s.iters:
            from minimask.backend import get_backend
            if get_backend() == "cuda":
                raise ValueError("workers > 1 splits batches over CPU processes; on the "
                                 "cuda backend use workers=1")
            from minimask.parallel import DataParallel
            parallel = DataParallel(model, dataset, s, s.workers)
        t0 = time.time()
        for step in range(start, s.iters):
            lr = learning_rate(step, s)
            optimizer.lr = lr
            if parallel is not None:
                losses = parallel.loss(step)
            else:
                images, targets = make_batch(dataset, step, s)
                losses = model.loss(images, targets)
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
            if done % s.log_every == 0 or done == s.iters:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": done, "lr": lr, "grad_norm": grad_norm,
                                        "seconds": time.time() - t0, **running}) + "\n")
            if s.progress:
                _progress(done, s.iters, start, t0, running, lr)
            if done % s.checkpoint_every == 0 or done == s.iters:
                save_checkpoint(out, model, optimizer, done, s, {**about, "running": running})
            if interrupted:
                save_checkpoint(out, model, optimizer, done, s, {**about, "running": running})
                log(f"\ninterrupted: saved step {done} to {out / 'checkpoint.npz'}; "
                    f"continue with --resume")
                break
    finally:
        if parallel is not None:
            parallel.close()
        signal.signal(signal.SIGINT, previous_handler)
        if s.progress:
            sys.stderr.write("\n")
        if metrics_path.exists() and metrics_path.stat().st_size:
            plot_losses(metrics_path, out / "losses.png")
    return model


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
