"""Run folders: what a training run leaves on disk, and how a new, a
resumed and a crashed run treat it.

A run folder holds ``checkpoint.npz`` (+ ``checkpoint.json``),
``metrics.jsonl``, ``losses.png`` and, from the command line,
``examples.png`` and ``eval/``. The rules kept here:

* a new run never writes into a folder that holds a run
  (``start_fresh`` raises ``RunExists`` unless told to overwrite); the
  command line picks a fresh folder (``runs/train``, ``runs/train2``, ...)
  when ``--out`` is not given (``fresh_run_dir``);
* a resumed run continues with the settings its checkpoint was trained
  with; a setting that differs is refused, naming it
  (``check_resume_settings``);
* a checkpoint's metadata is checked before anything trusts it
  (``resume_state``, ``check_metadata``), so a hand-edited or damaged
  ``checkpoint.json`` gives one line naming the file and the field;
* what a crash leaves behind is tidied on the next start: unfinished
  temporary checkpoint files are removed and a half-written last line of
  ``metrics.jsonl`` is dropped, each with a message naming the file.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path

__all__ = ["RunExists", "holds_run", "fresh_run_dir", "start_fresh", "clean_temporaries",
           "resume_state", "check_resume_settings", "check_metadata", "repair_metrics",
           "append_metrics", "describe_dataset", "latest_run_dir", "check_saved_settings",
           "write_text_atomic", "RESUME_FIXED"]

# files a run writes (removed by an explicit overwrite; nothing else is)
RUN_FILES = ("checkpoint.npz", "checkpoint.json", "metrics.jsonl", "losses.png",
             "examples.png")
RUN_DIRS = ("eval",)

# TrainSettings fields a resumed run must share with its checkpoint: they
# decide the weights. ``iters`` (continue further), ``workers`` (noted by
# train), ``out``, ``resume``, ``progress``, ``log_every`` and
# ``checkpoint_every`` may change.
RESUME_FIXED = ("batch_size", "lr", "momentum", "weight_decay", "warmup_iters",
                "warmup_factor", "schedule", "clip_grad_norm", "hflip", "seed")

LOSS_KEYS = ("cls", "box", "mask", "total")


class RunExists(ValueError):
    """A new run was pointed at a folder that already holds one."""


def holds_run(out) -> bool:
    """True when ``out`` holds a checkpoint or logged metrics."""
    out = Path(out)
    if (out / "checkpoint.npz").exists() or (out / "checkpoint.json").exists():
        return True
    metrics = out / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_size > 0


def fresh_run_dir(base="runs/train") -> Path:
    """``base`` when it holds no run, else the first of ``base2``,
    ``base3``, ... that holds none (as ultralytics numbers its runs)."""
    base = Path(base)
    candidate, n = base, 1
    while holds_run(candidate) or (candidate.exists() and not candidate.is_dir()):
        n += 1
        candidate = base.with_name(f"{base.name}{n}")
    return candidate


def start_fresh(out, overwrite: bool = False, log=print) -> None:
    """Prepare ``out`` for a new run. A folder holding a run is refused
    (``RunExists``) unless ``overwrite``: then the run's own files
    (``RUN_FILES``, ``eval/``) are removed first, and nothing else."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"run folder {str(out)!r} is a file, not a folder")
    if holds_run(out):
        if not overwrite:
            raise RunExists(
                f"{str(out)!r} already holds a run (checkpoint or metrics); continue it with "
                f"--resume, choose another --out, or pass --overwrite to replace it")
        for name in RUN_FILES:
            if (out / name).is_file():
                (out / name).unlink()
        for name in RUN_DIRS:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
        log(f"overwrite: removed the previous run's files from {out}")
    out.mkdir(parents=True, exist_ok=True)
    clean_temporaries(out, log)


def clean_temporaries(out, log=print) -> list[Path]:
    """Remove what an interrupted checkpoint write left in ``out``
    (``.tmp-*.npz`` from ``save_npz``, ``.checkpoint.json.tmp``); returns
    the removed paths. Only one run writes into a folder, so a temporary
    file found at the start of a run belongs to a write that died."""
    out = Path(out)
    removed = []
    for path in sorted(out.glob(".tmp-*.npz")) + sorted(out.glob(".checkpoint.json.tmp")):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    if removed:
        log(f"removed {len(removed)} unfinished checkpoint file(s) that an interrupted write "
            f"left in {out}")
    return removed


# ----------------------------------------------------------------------
# checkpoint metadata
# ----------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_metadata(path, meta) -> None:
    """The fields of a checkpoint's metadata that predict, evaluate and
    resume read, checked for type and range: ``image_size``,
    ``class_names``, and (when present) ``step``, ``settings``,
    ``running``. Raises ValueError naming the file and the field."""
    where = f"weights file {str(path)!r}"
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: its metadata must be a JSON object, got "
                         f"{type(meta).__name__}")
    if "image_size" in meta and not (_is_int(meta["image_size"])
                                     and 8 <= meta["image_size"] <= 8192):
        raise ValueError(f"{where}: metadata field 'image_size' must be an integer in "
                         f"[8, 8192], got {meta['image_size']!r:.60}")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list)
                                  and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{where}: metadata field 'class_names' must be a list of names "
                         f"(strings), got {names!r:.60}")
    if "step" in meta and not (_is_int(meta["step"]) and meta["step"] >= 0):
        raise ValueError(f"{where}: metadata field 'step' must be a whole number >= 0, "
                         f"got {meta['step']!r:.60}")
    if "settings" in meta and not isinstance(meta["settings"], dict):
        raise ValueError(f"{where}: metadata field 'settings' must be an object, got "
                         f"{meta['settings']!r:.60}")
    if "running" in meta:
        running = meta["running"]
        if not (isinstance(running, dict) and all(k in LOSS_KEYS for k in running)
                and all(_is_finite_number(v) for v in running.values())):
            raise ValueError(f"{where}: metadata field 'running' must map {list(LOSS_KEYS)} "
                             f"to finite numbers, got {running!r:.60}")


def resume_state(path, meta) -> tuple[int, dict]:
    """``(step, running means)`` of a checkpoint to resume from; a
    checkpoint without a valid ``step`` or ``settings`` cannot be resumed."""
    check_metadata(path, meta)
    for field in ("step", "settings"):
        if field not in meta:
            raise ValueError(f"weights file {str(path)!r}: metadata has no {field!r}, so "
                             f"training cannot resume from it")
    check_saved_settings(path, meta["settings"])
    return int(meta["step"]), {k: float(v) for k, v in meta.get("running", {}).items()}


def check_resume_settings(path, meta, settings) -> None:
    """Refuse a resumed run whose settings differ from its checkpoint's in
    a field that decides the weights (``RESUME_FIXED``)."""
    saved = meta.get("settings", {})
    for field in RESUME_FIXED:
        if field not in saved:
            continue
        mine = getattr(settings, field)
        if saved[field] != mine:
            raise ValueError(
                f"--resume: {field} {mine!r} differs from {saved[field]!r}, the value the "
                f"run in {str(Path(path).parent)!r} was trained with; a resumed run keeps its "
                f"settings (start a new run with another --out to change it)")


# ----------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------

def repair_metrics(path, up_to_step: int, log=print) -> None:
    """Keep the lines of ``metrics.jsonl`` logged at or before
    ``up_to_step`` (the checkpoint's), so a resumed run continues the file
    without a seam. Lines that are not a JSON object with an integer
    ``step`` (the half-written last line a full disk or a kill leaves) are
    dropped, with a message naming the file."""
    path = Path(path)
    if not path.exists():
        return
    kept, bad = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if not (isinstance(row, dict) and _is_int(row.get("step"))):
            bad.append(number)
            continue
        if row["step"] <= up_to_step:
            kept.append(line)
    if bad:
        log(f"{path}: dropped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
            f"{', ...' if len(bad) > 5 else ''}), as an interrupted write or a full disk "
            f"leaves them")
    write_text_atomic(path, "".join(k + "\n" for k in kept))


def append_metrics(path, row: dict) -> None:
    """Append one JSON line; a failed write (a full disk) names the file."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise _with_path(e, path) from None


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename;
    a failure names the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise _with_path(e, path) from None


def _with_path(e: OSError, path) -> OSError:
    """The same error, saying which file (a write into a full disk says
    only 'No space left on device')."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno == errno.ENOSPC:
        reason += " (the disk is full)"
    return OSError(e.errno, f"cannot write {str(path)!r}: {reason}")


# ----------------------------------------------------------------------
# which data a run trained on
# ----------------------------------------------------------------------

def describe_dataset(dataset) -> dict:
    """What a checkpoint records about its training data, so ``--resume``
    reopens the same data: ``{"kind": "shapes", "seed", "num_images",
    "size"}`` or ``{"kind": "coco", "annotations", "images",
    "image_size"}`` (absolute paths); ``{"kind": type name}`` otherwise."""
    from minimask.data.coco import CocoDataset
    from minimask.data.synthetic import ShapesDataset
    if isinstance(dataset, ShapesDataset):
        return {"kind": "shapes", "seed": int(dataset.seed),
                "num_images": int(len(dataset)), "size": int(dataset.size)}
    if isinstance(dataset, CocoDataset):
        return {"kind": "coco", "annotations": str(dataset.annotations_path.resolve()),
                "images": str(dataset.images_dir.resolve()),
                "image_size": int(dataset.image_size)}
    return {"kind": type(dataset).__name__}


def latest_run_dir(base="runs/train") -> Path:
    """Of ``base``, ``base2``, ``base3``, ... the one whose checkpoint was
    written last (``base`` when none holds a checkpoint): what a bare
    ``--resume`` continues."""
    base = Path(base)
    best, best_time, n = base, -math.inf, 1
    candidate = base
    while candidate.exists():
        ckpt = candidate / "checkpoint.npz"
        if ckpt.is_file() and ckpt.stat().st_mtime > best_time:
            best, best_time = candidate, ckpt.stat().st_mtime
        n += 1
        candidate = base.with_name(f"{base.name}{n}")
    return best


def check_saved_settings(path, saved: dict) -> None:
    """The types of the TrainSettings fields a checkpoint records; fields
    this version does not know are left alone."""
    import dataclasses

    from minimask.train import TrainSettings
    for f in dataclasses.fields(TrainSettings):
        if f.name not in saved:
            continue
        default, value = getattr(TrainSettings(), f.name), saved[f.name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = _is_int(value)
        elif isinstance(default, float):
            ok = _is_finite_number(value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"weights file {str(path)!r}: metadata field 'settings.{f.name}' "
                             f"must be {type(default).__name__}, got {value!r:.60}")
        lo, hi = SETTINGS_RANGES.get(f.name, (None, None))
        if lo is not None and not lo <= value <= hi:
            raise ValueError(f"weights file {str(path)!r}: metadata field 'settings.{f.name}' "
                             f"must lie in [{lo}, {hi}], got {value!r:.60}")
    if saved.get("schedule", "cosine") not in ("cosine", "step"):
        raise ValueError(f"weights file {str(path)!r}: metadata field 'settings.schedule' "
                         f"must be 'cosine' or 'step', got {saved['schedule']!r:.60}")


# the ranges a checkpoint's recorded settings must lie in (types: TrainSettings)
SETTINGS_RANGES = {
    "iters": (1, 10 ** 9), "batch_size": (1, 4096), "lr": (1e-12, 1e3),
    "momentum": (0.0, 0.999999), "weight_decay": (0.0, 1.0), "warmup_iters": (0, 10 ** 9),
    "warmup_factor": (0.0, 1.0), "clip_grad_norm": (0.0, 1e12), "seed": (0, 2 ** 63 - 1),
    "log_every": (1, 10 ** 9), "checkpoint_every": (1, 10 ** 9), "workers": (1, 4096),
}
