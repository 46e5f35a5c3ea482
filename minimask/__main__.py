"""The command line: ``python -m minimask <command>``.

    python -m minimask train                       # tiny model on synthetic shapes
    python -m minimask export-shapes --out data/shapes_val --num-images 100 --seed 1000
    python -m minimask evaluate --weights runs/train/checkpoint.npz
    python -m minimask predict --weights W photo.jpg --out runs/predict
    python -m minimask crop --weights W photo.jpg --out runs/crop
    python -m minimask check                       # gradient checks and backend parity
    python -m minimask import-weights resnet50.safetensors --preset resnet50-frozenbn \
        --num-classes 3 --out r50.npz                # a torchvision/timm checkpoint

Every command has ``--help``. Bad input (a missing or corrupt file, weights
of another configuration, a malformed annotation file, an unknown dataset)
ends with one line ``minimask: error: ...`` on stderr and exit status 2,
never a traceback (set ``MINIMASK_DEBUG=1`` to see the traceback).
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import textwrap
import zipfile
from pathlib import Path

BACKEND_CHOICES = ("numpy", "cpu", "cuda")

CROP_EPILOG = """\
Each cut-out is an RGBA PNG of the instance's box, at the image's original
resolution: the pixels are the image's, alpha is 255 on the predicted mask
and 0 elsewhere, so the background is transparent.

One line per instance is printed (and crops.json holds the same records):

  FILE class=C score=S box_background=F mask_background=0.000
       box_px=B mask_px=M box_share=... mask_share=...

With B the box crop (the pixels whose centre lies inside the box, what a
box-only detector would hand on) and M the mask crop (the predicted mask's
pixels, what the cut-out keeps):

  box_background  = |B minus M| / |B| = 1 - M/B: the share of the box crop
                    that is not the object - how much background a box crop
                    carries that the mask crop drops;
  mask_background = the same share for the mask crop: 0 by construction,
                    since a mask crop keeps only the predicted object;
  box_px, mask_px = |B| and |M| in pixels;
  box_share, mask_share = |B| and |M| as fractions of the image's pixels.

A long thin object at an angle gives box_background near 1; a compact,
axis-aligned one near 0.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from minimask.train import TrainSettings

    defaults = TrainSettings()
    parser = argparse.ArgumentParser(
        prog="python -m minimask",
        description="RetinaMask from scratch in NumPy, with hand-written backward passes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("check", help="gradient-check every layer and compare the fast "
                                 "backends with the NumPy reference")

    # -- train ------------------------------------------------------------
    p = sub.add_parser(
        "train", help="train a model (default: the tiny preset on synthetic shapes)",
        description="Train RetinaMask. With no arguments: the tiny preset on synthetic "
                    "shapes, on the 'cpu' backend. Writes OUT/checkpoint.npz (+ .json), "
                    "OUT/metrics.jsonl and OUT/losses.png; then evaluates on fresh shapes "
                    "(seed + 1000) and draws OUT/examples.png.")
    # Settings that decide the weights default to None here, so that a
    # resumed run can tell a flag the user typed (checked against the
    # checkpoint) from one left out (taken from the checkpoint);
    # TRAIN_DEFAULTS fills in the rest for a new run.
    p.add_argument("--dataset", default=None, metavar="shapes|ANNOTATIONS.json",
                   help="'shapes' (synthetic, made from --seed) or a COCO annotation file "
                        "(default: shapes)")
    p.add_argument("--images", metavar="DIR",
                   help="image folder of a COCO dataset (default: the 'images' folder next "
                        "to the annotation file)")
    p.add_argument("--iters", type=_positive_int, default=None,
                   help=f"training steps (default: {defaults.iters}; with --resume, the "
                        f"run's own)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"images per step (default: {defaults.batch_size})")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"peak learning rate (default: {defaults.lr})")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="side of the square training images in pixels (default: 128)")
    p.add_argument("--ranks", type=_positive_int, default=None, metavar="N",
                   help="MPI ranks (processes) that share each batch, data parallel: train "
                        "starts them itself under the environment's mpiexec; 1 trains in "
                        "this process (default: $MINIMASK_RANKS, else one per core, at most "
                        "--batch-size; the run depends on it). Under mpiexec or srun the "
                        "launcher's rank count is used")
    p.add_argument("--workers", type=_positive_int, dest="ranks", help=argparse.SUPPRESS)
    p.add_argument("--num-images", type=_positive_int, default=None,
                   help="synthetic images to draw batches from (shapes only; default: 2000)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of the shapes, the initial weights and the batch order "
                        f"(default: {defaults.seed})")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"run folder (default: a new one, {defaults.out}, "
                        f"{defaults.out}2, ...); a folder that holds a run is refused "
                        f"unless --resume or --overwrite")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="cpu",
                   help="where the layers run (default: cpu)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (default: the latest run in "
                        f"{defaults.out}*) from its last checkpoint, with the settings and "
                        "data it was trained with, up to --iters (default: the run's own); a "
                        "flag that contradicts the run is refused")
    p.add_argument("--checkpoint-every", type=_positive_int, default=defaults.checkpoint_every,
                   metavar="N", help=f"save a checkpoint every N steps (and at the end and "
                                     f"on Ctrl-C; default: {defaults.checkpoint_every})")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out even though it holds one: that run's "
                        "checkpoint, metrics and plots are deleted first")
    p.add_argument("--eval-images", type=_non_negative_int, default=50,
                   help="fresh shapes to evaluate on after training; 0 skips it (default: 50)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="sets",
                   help="change one field of the tiny preset's model config for a new run, "
                        "e.g. --set mask_size=56 --set roi_mode=max (repeatable; VALUE is "
                        "JSON: 56, 0.3, true, \"max\" or max, [0.5,1,2]); the checkpoint "
                        "records the whole config. The fields: minimask/model/config.py")
    # issue 15: fine-tuning from imported (pretrained) weights
    p.add_argument("--weights", metavar="W.npz", default=None,
                   help="start from these weights (e.g. from import-weights) instead of a "
                        "fresh tiny model; their config (preset, image normalisation) is kept")
    p.add_argument("--trainable-stages", type=int, choices=range(6), default=None,
                   metavar="{0..5}",
                   help="pretrained backbones: train only the last k of stem, layer1..layer4 "
                        "(torchvision's trainable_layers; default: the weights' own setting, "
                        "3 for imported ones - stem and layer1 frozen)")

    # -- import-weights (issue 15) ------------------------------------------
    p = sub.add_parser(
        "import-weights", help="a torchvision/timm ResNet or RetinaNet checkpoint -> minimask",
        description="Read a ResNet-18/34/50/101 checkpoint in torchvision's or timm's naming, "
                    "or a torchvision retinanet_resnet50_fpn, from .safetensors (no torch "
                    "needed) or .pth (needs torch); check every tensor's name and shape; write "
                    "a complete minimask checkpoint of the preset (imported tensors set, the "
                    "rest initialised as usual) that every --weights option accepts.")
    p.add_argument("file", metavar="FILE", help="the checkpoint (.safetensors, .pth, .npz)")
    p.add_argument("--preset", required=True, metavar="NAME",
                   help="resnet18-frozenbn, resnet34-frozenbn, resnet50-frozenbn or "
                        "resnet101-frozenbn")
    p.add_argument("--num-classes", type=_positive_int, required=True, metavar="K",
                   help="classes of the detector (a RetinaNet's class head is imported when "
                        "it has K classes, else initialised anew)")
    p.add_argument("--out", required=True, metavar="W.npz", help="the minimask checkpoint")
    p.add_argument("--image-size", type=_positive_int, default=512,
                   help="side predict resizes images to with these weights (default: 512)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the tensors that are initialised, not imported (default: 0)")

    # -- export-shapes ----------------------------------------------------
    p = sub.add_parser(
        "export-shapes", help="write synthetic shapes as a COCO dataset (PNGs + JSON)",
        description="Write OUT/images/*.png and OUT/annotations.json (COCO format, "
                    "masks as RLE) for synthetic shapes made from --seed.")
    p.add_argument("--seed", type=int, default=1000, help="seed of the shapes (default: 1000)")
    p.add_argument("--num-images", type=_positive_int, default=100,
                   help="how many images (default: 100)")
    p.add_argument("--image-size", type=_positive_int, default=128,
                   help="side of the square images (default: 128)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")

    # -- evaluate ---------------------------------------------------------
    p = sub.add_parser(
        "evaluate", help="COCO box and mask AP of a checkpoint on a dataset",
        description="Run a checkpoint on a dataset and print COCO box and mask AP "
                    "(pycocotools). Writes OUT/detections.json and OUT/metrics.json. The "
                    "images are prepared at the checkpoint's training image size.")
    p.add_argument("--weights", required=True, metavar="W",
                   help="a checkpoint .npz written by train")
    p.add_argument("--dataset", default="shapes", metavar="shapes|ANNOTATIONS.json",
                   help="'shapes' (fresh synthetic images from --seed) or a COCO annotation "
                        "file (default: shapes)")
    p.add_argument("--images", metavar="DIR",
                   help="image folder of a COCO dataset (default: the 'images' folder next "
                        "to the annotation file)")
    p.add_argument("--seed", type=int, default=1000,
                   help="seed of the synthetic shapes (default: 1000, unseen in training)")
    p.add_argument("--num-images", type=_positive_int, default=100,
                   help="how many synthetic images (default: 100)")
    p.add_argument("--batch-size", type=_positive_int, default=8,
                   help="images per forward pass (default: 8)")
    p.add_argument("--out", default="runs/eval", metavar="DIR",
                   help="where the JSON files go (default: runs/eval)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help="where the layers run (default: $MINIMASK_BACKEND or cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress line")

    # -- predict and crop -------------------------------------------------
    for name, help_text, description, epilog, default_out in [
        ("predict", "detect instances in image files: overlay PNGs and JSON",
         "Detect instances in image files of any size and mode. Writes "
         "OUT/<image>_overlay.png per image (masks, boxes, classes, scores) and "
         "OUT/detections.json: per image, boxes (x1, y1, x2, y2) in the image's original "
         "pixels, class names, scores and masks as COCO RLE (pycocotools).",
         None, "runs/predict"),
        ("crop", "cut every detected instance out as a transparent PNG",
         "Detect instances in image files and save each one as an RGBA cut-out at the "
         "image's original resolution, with one line per instance comparing its box crop "
         "with its mask crop.", CROP_EPILOG, "runs/crop"),
    ]:
        # raw formatting keeps the epilog's layout; the description is wrapped here
        p = sub.add_parser(name, help=help_text, description=textwrap.fill(description, 78),
                           epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size; "
                       "RGB, greyscale, RGBA and palette images are converted to RGB)")
        p.add_argument("--weights", required=True, metavar="W",
                       help="a checkpoint .npz written by train")
        p.add_argument("--out", default=default_out, metavar="DIR",
                       help=f"output folder (default: {default_out})")
        p.add_argument("--score-thresh", type=_probability, default=0.5,
                       help="keep detections scoring above this (default: 0.5)")
        p.add_argument("--max-instances", type=_positive_int, default=None, metavar="N",
                       help="keep at most the N best detections per image (default: the "
                            "model's own limit, 100 for the presets)")
        p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                       help="where the layers run (default: $MINIMASK_BACKEND or cpu)")
    return parser


class CommandError(ValueError):
    """Bad input found by the command line itself."""


def main(argv=None) -> int:
    from minimask._process import configure_process
    configure_process()         # this process is minimask's: passive OpenMP waiting, malloc
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)   # for train's launcher
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "check":
        from minimask import selfcheck
        return selfcheck.main()
    from PIL import UnidentifiedImageError

    from minimask.train import NonFiniteLoss
    commands = {"train": cmd_train, "export-shapes": cmd_export_shapes,
                "evaluate": cmd_evaluate, "predict": cmd_predict, "crop": cmd_crop,
                "import-weights": cmd_import_weights}
    try:
        return commands[args.command](args)
    except NonFiniteLoss as e:
        _error(e)
        return 1
    except KeyboardInterrupt:
        # a Ctrl-C outside the training loop (which saves and returns):
        # while data loads, during the final evaluation, in predict
        print(f"\nminimask: interrupted ({args.command}); what was saved before is kept",
              file=sys.stderr)
        return 130
    except RecursionError:
        _error(ValueError("an input nests too deeply to be read (a JSON file with "
                          "thousands of levels?)"))
        return 2
    except (ValueError, OSError, UnidentifiedImageError) as e:
        # FileNotFoundError and PIL's UnidentifiedImageError are OSErrors;
        # json.JSONDecodeError is a ValueError.
        if os.environ.get("MINIMASK_DEBUG") == "1":
            raise                       # the full traceback, for developers
        _error(e)
        return 2


def _error(e: BaseException) -> None:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"minimask: error: {message}", file=sys.stderr)


# ----------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------


def _use_backend(name: str | None) -> None:
    import minimask
    if name is None:
        return
    try:
        minimask.set_backend(name)
    except RuntimeError as e:  # 'cuda' with no GPU
        raise CommandError(str(e)) from None


def open_dataset(name: str, images: str | None, image_size: int, seed: int = 0,
                 num_images: int = 100):
    """``"shapes"`` -> ShapesDataset; a path to a .json file -> CocoDataset
    (images from ``images``, default the ``images`` folder beside it)."""
    if name == "shapes":
        from minimask.data.synthetic import ShapesDataset
        return ShapesDataset(seed=seed, num_images=num_images, size=image_size)
    if name.lower().endswith(".json") or os.path.exists(name):
        if not os.path.isfile(name):
            raise CommandError(f"annotation file {name!r} does not exist")
        images = images if images is not None else os.path.join(os.path.dirname(name) or ".",
                                                               "images")
        if not os.path.isdir(images):
            raise CommandError(f"image folder {images!r} does not exist (give it with --images)")
        from minimask.data.coco import CocoDataset
        return CocoDataset(name, images, image_size=image_size)
    raise CommandError(f"unknown dataset {name!r}: use 'shapes' or the path of a COCO "
                       f"annotation file (.json)")


def _load_weights(path, num_classes=None):
    from minimask.predict import class_names_of, model_image_size
    from minimask.train import load_model
    if os.path.isfile(path) and not zipfile.is_zipfile(path):
        # np.load would take it for a pickle and say so; name the real problem
        raise CommandError(f"weights file {str(path)!r} is not a .npz checkpoint (not a zip "
                           f"archive)")
    model, meta = load_model(path, num_classes=num_classes)
    return model, model_image_size(meta), class_names_of(meta, model.config.num_classes)


def _mask_ap50(metrics: dict):
    """Mask AP at IoU 0.5 from evaluate()'s metrics, whichever way they nest."""
    return _find_metric(metrics, ("mask", "segm"), ("AP50", "ap50", "AP_50"))


def _box_ap50(metrics: dict):
    return _find_metric(metrics, ("box", "bbox"), ("AP50", "ap50", "AP_50"))


def _find_metric(metrics, kinds, names):
    for kind in kinds:
        for name in names:
            for key in (f"{kind}_{name}", f"{kind}/{name}", f"{kind}.{name}"):
                if isinstance(metrics.get(key), (int, float)):
                    return float(metrics[key])
            inner = metrics.get(kind)
            if isinstance(inner, dict) and isinstance(inner.get(name), (int, float)):
                return float(inner[name])
    return None


def _read_images(paths):
    """Read every image first, so a bad file stops the run before any output."""
    from minimask.predict import read_rgb
    return [read_rgb(p) for p in paths]


def _stems(paths):
    """A distinct output name per input image (a/x.png and b/x.png -> x, x-1)."""
    seen, stems = {}, []
    for p in paths:
        stem = Path(p).stem or "image"
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        stems.append(stem if n == 0 else f"{stem}-{n}")
    return stems


# ----------------------------------------------------------------------
# the commands
# ----------------------------------------------------------------------


def requested_ranks(args) -> int:
    """--ranks, else $MINIMASK_RANKS, else one rank per core (at most one per
    image of a batch)."""
    from minimask import distributed
    if args.ranks is not None:
        return args.ranks
    text = os.environ.get("MINIMASK_RANKS", "").strip()
    if text:
        try:
            return _positive_int(text)
        except (ValueError, argparse.ArgumentTypeError):
            raise CommandError(f"MINIMASK_RANKS must be a whole number >= 1, got {text!r}") \
                from None
    return distributed.default_ranks(args.batch_size, args.backend)


# what an untyped train flag means for a new run (see build_parser)
TRAIN_DEFAULTS = {"dataset": "shapes", "images": None, "iters": None, "batch_size": None,
                  "lr": None, "image_size": 128, "num_images": 2000, "seed": None}


def _fill_train_defaults(args) -> None:
    from minimask.train import TrainSettings
    defaults = TrainSettings()
    for name, value in TRAIN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value if value is not None else getattr(defaults, name, None))


def _resume_from_checkpoint(args, out: Path) -> None:
    """Take the run's own settings and data for every flag left out; a
    typed flag that contradicts the run is refused with one line naming it."""
    from minimask import runs
    from minimask.nn import load_npz

    ckpt = out / "checkpoint.npz"
    _, meta = load_npz(ckpt)
    runs.check_metadata(ckpt, meta)     # train() refuses what is missing, in its order
    saved, data = meta.get("settings") or {}, meta.get("dataset") or {}
    runs.check_saved_settings(ckpt, saved)
    wanted = {"lr": saved.get("lr"), "seed": saved.get("seed"),
              "batch_size": saved.get("batch_size"), "iters": saved.get("iters"),
              "image_size": meta.get("image_size")}
    if isinstance(data, dict) and data.get("kind") == "shapes":
        wanted.update(dataset="shapes", num_images=data.get("num_images"))
    elif isinstance(data, dict) and data.get("kind") == "coco":
        wanted.update(dataset=data.get("annotations"), images=data.get("images"))
    for name, value in wanted.items():
        typed = getattr(args, name)
        if value is None:
            continue                      # an older checkpoint that did not record it
        if typed is None:
            setattr(args, name, value)
        elif name == "iters":
            pass                          # continuing further is what --iters is for
        elif not _same_setting(name, typed, value):
            flag = "--" + name.replace("_", "-")
            raise CommandError(
                f"--resume: {flag} {typed} contradicts the run in {str(out)!r}, which was "
                f"trained with {flag} {value}; a resumed run keeps its settings and data - "
                f"leave {flag} out, or start a new run with another --out")
    _fill_train_defaults(args)


def _same_setting(name, typed, saved) -> bool:
    if name in ("dataset", "images") and typed != "shapes" and saved != "shapes":
        return os.path.abspath(str(typed)) == os.path.abspath(str(saved))
    return typed == saved


def cmd_train(args) -> int:
    """Not inside MPI: settle the run (its folder, and for --resume the
    settings the checkpoint records), check the rank count, then train here
    (1 rank) or start the ranks under mpiexec, each running this command
    with the settled --out. Inside MPI (started by us, mpiexec or srun): one
    rank's share of the work."""
    from minimask import distributed
    from minimask.train import NonFiniteLoss

    if not distributed.launched_by_mpi():
        _settle_run(args)
        ranks = requested_ranks(args)
        try:
            distributed.check_ranks(ranks, args.batch_size, args.backend)
        except ValueError as e:
            raise CommandError(str(e)) from None
        if ranks > 1:
            argv = [*args.argv, "--out", str(args.out), "--ranks", str(ranks)]
            return distributed.launch(ranks, argv, out=args.out)
        comm = distributed.Solo()
    else:
        comm = distributed.world()
        # every rank reads the same checkpoint and folder; nothing is written
        # before this agreement, so all ranks settle on the same run
        comm.agree(_settle_run, args)
    try:
        if args.ranks is not None and args.ranks != comm.size:
            comm.agree(_raise, CommandError(f"--ranks {args.ranks}, but the MPI launcher "
                                            f"started {comm.size} ranks"))
        return _train(args, comm)
    except distributed.PeerLost:
        # a rank died; rank 0 has saved, the launcher says so. Leave without
        # MPI_Finalize, which would wait for the dead rank.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except BaseException as e:
        if comm.size == 1:
            raise
        agreed = getattr(e, "agreed", False) or isinstance(e, NonFiniteLoss)
        if agreed and comm.rank != 0:      # rank 0 says it; the others leave quietly
            return 2 if isinstance(e, (ValueError, OSError)) else 1
        if agreed:
            raise
        # an error of this rank alone: say it here, then end every rank
        if isinstance(e, (ValueError, OSError)) and os.environ.get("MINIMASK_DEBUG") != "1":
            _error(e)
            code = 2
        else:
            import traceback
            traceback.print_exc()
            code = 130 if isinstance(e, KeyboardInterrupt) else 1
        comm.abort(code)
        raise


def _raise(error):
    raise error


def _settle_run(args) -> None:
    """The run folder and settings, decided before any rank starts, without
    writing anything: --resume takes the checkpoint's settings and data for
    every flag left out (and refuses one that contradicts them); a new run
    takes the defaults, and a fresh folder when --out is not given. An --out
    that holds a run is refused unless --overwrite (issue 10: nothing lost)."""
    from minimask import runs
    from minimask.train import TrainSettings

    _check_sets(args)
    if args.resume:
        if args.overwrite:
            raise CommandError("--resume continues a run and --overwrite replaces it: "
                               "give one of them")
        out = Path(args.out) if args.out is not None else runs.latest_run_dir(
            TrainSettings().out)
        if not (out / "checkpoint.npz").is_file():
            raise CommandError(f"--resume: no checkpoint to resume from in {str(out)!r} "
                               f"({out / 'checkpoint.npz'} does not exist)")
        _resume_from_checkpoint(args, out)
    else:
        _fill_train_defaults(args)
        if args.out is None:
            out = runs.fresh_run_dir(TrainSettings().out)
        else:
            out = Path(args.out)
            if runs.holds_run(out) and not args.overwrite:
                runs.start_fresh(out)     # raises RunExists, one line
    args.out = str(out)


def _train(args, comm) -> int:
    from minimask import runs
    from minimask.train import TrainSettings, train

    root = comm.rank == 0
    comm.agree(_use_backend, args.backend)
    dataset = comm.agree(open_dataset, args.dataset, args.images, args.image_size,
                         seed=args.seed, num_images=args.num_images)
    out = Path(args.out)
    if not args.resume:
        # the one write before training: a fresh folder, or --overwrite's
        # deletion of the old run's files - by rank 0 alone
        comm.agree(lambda: runs.start_fresh(out, overwrite=args.overwrite) if root else None)
    settings = TrainSettings(iters=args.iters, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, out=str(out), resume=args.resume,
                             progress=not args.no_progress,
                             checkpoint_every=args.checkpoint_every)
    start = comm.agree(_start_model, args, dataset)
    if root and args.sets:
        print("the tiny preset with " + ", ".join(
            f"{k}={v!r}" for k, v in parse_config_sets(args.sets).items()))
    if root:
        print(f"training on {type(dataset).__name__} ({len(dataset)} images, "
              f"{dataset.num_classes} classes) for {settings.iters} steps, backend "
              f"{args.backend}, {comm.size} rank{'s' if comm.size > 1 else ''}, "
              f"writing to {out}", flush=True)
    model = train(dataset, settings, comm=comm, log=print, model=start)
    if model.interrupted:               # Ctrl-C: train() saved the step in flight
        if root:
            step = _checkpoint_step(out)
            print(f"interrupted at step {step} of {settings.iters}; continue with: python -m "
                  f"minimask train --out {out} --resume", file=sys.stderr)
        return 130                      # what shells expect after a Ctrl-C
    if not root:
        return 0
    print(f"checkpoint:  {out / 'checkpoint.npz'} (+ checkpoint.json)")
    print(f"metrics:     {out / 'metrics.jsonl'}")
    print(f"loss curves: {out / 'losses.png'}")

    from minimask.predict import save_examples
    names = list(dataset.class_names)
    if args.dataset == "shapes":
        from minimask.data.synthetic import ShapesDataset
        fresh_seed = args.seed + 1000
        examples = ShapesDataset(seed=fresh_seed, num_images=4, size=args.image_size)
        if args.eval_images:
            from minimask.evaluate import evaluate
            fresh = ShapesDataset(seed=fresh_seed, num_images=args.eval_images,
                                  size=args.image_size)
            metrics = evaluate(model, fresh, out / "eval", progress=not args.no_progress)
            mask_ap, box_ap = _mask_ap50(metrics), _box_ap50(metrics)
            shown = ", ".join(f"{k} AP50 {v:.3f}" for k, v in (("mask", mask_ap), ("box", box_ap))
                              if v is not None)
            print(f"on {args.eval_images} fresh shapes (seed {fresh_seed}): "
                  f"{shown or 'see metrics.json'} ({out / 'eval' / 'metrics.json'})")
    else:
        examples = dataset
        print("evaluate it with: python -m minimask evaluate --weights "
              f"{out / 'checkpoint.npz'} --dataset ANNOTATIONS.json")
    images = [examples[i][0] for i in range(min(4, len(examples)))]
    path = save_examples(model, images, out / "examples.png", names)
    print(f"examples:    {path}")
    return 0


def _checkpoint_step(out: Path):
    try:
        step = json.loads((out / "checkpoint.json").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


NOT_SETTABLE = {"num_classes": "it comes from the dataset", "seed": "give --seed",
                "preset_name": "the tiny preset is the starting point", "dtype": None}


def parse_config_sets(sets) -> dict:
    """``["mask_size=56", "roi_mode=max"]`` -> ``{"mask_size": 56, "roi_mode": "max"}``.
    Each VALUE is read as JSON (lists become tuples), else kept as a string;
    a field the config does not have, or one set twice, is refused."""
    import dataclasses

    from minimask.model.config import Config
    fields = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for item in sets or []:
        name, eq, text = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise CommandError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set mask_size=56")
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise CommandError(f"--set: the model config has no field {name!r}{hint} "
                               f"(the fields: minimask/model/config.py)")
        if name in NOT_SETTABLE and NOT_SETTABLE[name]:
            raise CommandError(f"--set {name}: not settable here ({NOT_SETTABLE[name]})")
        if name in out:
            raise CommandError(f"--set {name} given twice")
        try:
            value = json.loads(text)
        except ValueError:
            value = text.strip()
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _check_sets(args) -> None:
    """--set, checked before any rank starts: known fields, valid values,
    and only for a fresh model."""
    sets = parse_config_sets(getattr(args, "sets", None))
    if not sets:
        return
    if args.weights is not None or args.resume:
        raise CommandError("--set changes the config of a fresh tiny model; "
                           + ("--resume keeps the run's own config" if args.resume else
                              "--weights brings its own") + " (leave --set out)")
    from minimask.model.config import Config
    try:
        Config.preset("tiny", **sets)
    except (ValueError, TypeError) as e:
        raise CommandError(f"--set: {e}") from None


def _start_model(args, dataset):
    """train --weights / --trainable-stages / --set: the model to start
    from, or None (train() then makes the tiny preset)."""
    sets = parse_config_sets(args.sets)
    if sets and (args.weights is not None or args.resume):
        raise CommandError("--set changes the config of a fresh tiny model; "
                           + ("--resume keeps the run's own config" if args.resume else
                              "--weights brings its own") + " (leave --set out)")
    if args.weights is None:
        if args.trainable_stages is not None:
            raise CommandError("--trainable-stages needs --weights (a pretrained backbone "
                               "from import-weights)")
        if not sets:
            return None
        from minimask.model import RetinaMask
        from minimask.model.config import Config
        try:
            config = Config.preset("tiny", num_classes=dataset.num_classes, seed=args.seed,
                                   **sets)
        except (ValueError, TypeError) as e:
            raise CommandError(f"--set: {e}") from None
        return RetinaMask(config)
    if args.resume:
        raise CommandError("--weights starts a new run; --resume continues the one in --out "
                           "(give one of them)")
    model, _, _ = _load_weights(args.weights, num_classes=dataset.num_classes)
    if args.trainable_stages is not None:
        from minimask.pretrained import set_trainable_stages
        set_trainable_stages(model, args.trainable_stages)
    if model.config.backbone == "frozenbn":
        print(f"from {args.weights}: backbone {model.config.preset_name}, last "
              f"{model.config.trainable_stages} of 5 stages trainable, images normalised "
              f"with mean {model.config.pixel_mean} std {model.config.pixel_std}")
    return model


def cmd_import_weights(args) -> int:
    from minimask.pretrained import import_weights

    _, report = import_weights(args.file, args.preset, args.num_classes, out=args.out,
                               seed=args.seed, image_size=args.image_size)
    kind = {"retinanet": "torchvision RetinaNet", "retinanet_v2": "torchvision RetinaNet v2"
            }.get(report["kind"], "ResNet")
    print(f"{args.file}: {kind}, {len(report['imported'])} tensors imported into "
          f"{args.preset} ({args.num_classes} classes)")
    for line in report["skipped"]:
        print(f"  not imported: {line}")
    print(f"  initialised as usual: {len(report['initialised'])} tensors "
          f"({_summarise(report['initialised'])})")
    print(f"wrote {args.out}")
    return 0


def _summarise(names):
    tops = []
    for n in names:
        top = n.split(".")[0]
        if top not in tops:
            tops.append(top)
    return ", ".join(tops) or "none"


def cmd_export_shapes(args) -> int:
    from minimask.data.coco import export_coco
    from minimask.data.synthetic import ShapesDataset

    dataset = ShapesDataset(seed=args.seed, num_images=args.num_images, size=args.image_size)
    path = export_coco(dataset, args.out, class_names=list(dataset.class_names))
    print(f"wrote {args.num_images} images to {Path(args.out) / 'images'} and {path}")
    return 0


def cmd_evaluate(args) -> int:
    _use_backend(args.backend)
    model, size, _ = _load_weights(args.weights)
    dataset = open_dataset(args.dataset, args.images, size, seed=args.seed,
                           num_images=args.num_images)
    if dataset.num_classes != model.config.num_classes:
        raise CommandError(f"weights file {args.weights!r} is for {model.config.num_classes} "
                           f"classes, the dataset has {dataset.num_classes}")
    from minimask.evaluate import evaluate, format_metrics
    metrics = evaluate(model, dataset, args.out, batch_size=args.batch_size,
                       progress=not args.no_progress)
    print(format_metrics(metrics))
    print(f"wrote {Path(args.out) / 'detections.json'} and {Path(args.out) / 'metrics.json'}")
    return 0


def cmd_predict(args) -> int:
    from minimask.predict import detections_to_json, predict_array, save_overlay, write_json

    _use_backend(args.backend)
    model, size, names = _load_weights(args.weights)
    images = _read_images(args.images)
    out = Path(args.out)
    records = []
    for path, stem, rgb in zip(args.images, _stems(args.images), images):
        detections = predict_array(model, rgb, size, score_thresh=args.score_thresh,
                                   max_detections=args.max_instances)
        detections["file"] = str(path)
        overlay = save_overlay(rgb, detections, out / f"{stem}_overlay.png", names)
        records.append(detections_to_json(detections, names))
        print(f"{path}: {len(detections['boxes'])} instances -> {overlay}")
    json_path = write_json(out / "detections.json", records)
    print(f"detections: {json_path}")
    return 0


def cmd_crop(args) -> int:
    from minimask.predict import crop_instances, format_crop_line, predict_array, write_json

    _use_backend(args.backend)
    model, size, names = _load_weights(args.weights)
    images = _read_images(args.images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path, stem, rgb in zip(args.images, _stems(args.images), images):
        detections = predict_array(model, rgb, size, score_thresh=args.score_thresh,
                                   max_detections=args.max_instances)
        for record in crop_instances(rgb, detections, out, stem, names):
            record["image"] = str(path)
            records.append(record)
            print(format_crop_line(record))
    json_path = write_json(out / "crops.json", records)
    print(f"{len(records)} instances from {len(images)} images; records: {json_path}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
