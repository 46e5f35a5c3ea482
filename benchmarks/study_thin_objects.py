"""Issue 11's study: one row = the default train command with some
``--set`` changes, timed, then evaluated on fresh seeds.

    python benchmarks/study_thin_objects.py --name p2 --set roi_min_level=2 \
        --seeds 8001 8002 [--iters 6000] [--train-arg=--lr=0.08]

Each row appends one JSON line to benchmarks/results/study_thin_objects.jsonl
(the command, wall time of training, the load average before and after, and
per seed: box / mask AP and AP50, the bars' mask AP and the background share
of the bars' cut-outs by box and by predicted mask). ``--table`` prints the
rows as the Markdown table of weights/README.md.

Choose on some seeds, report on others: a row's seeds are written with it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "study_thin_objects.jsonl"


def summarise(metrics: dict) -> dict:
    pc, cut = metrics["per_category"], metrics["cutout"]
    return {"box_AP": metrics["bbox"]["AP"], "box_AP50": metrics["bbox"]["AP50"],
            "mask_AP": metrics["segm"]["AP"], "mask_AP50": metrics["segm"]["AP50"],
            "mask_AP_per_class": {k: v["AP"] for k, v in pc["segm"].items()},
            "bar_box_bg": cut["bar"]["box_crop_background"],
            "bar_mask_bg": cut["bar"]["mask_crop_background"]}


def run(cmd, log):
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name")
    p.add_argument("--set", action="append", default=[], dest="sets")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--train-arg", action="append", default=[])
    p.add_argument("--seeds", type=int, nargs="+", default=[8001, 8002])
    p.add_argument("--num-images", type=int, default=200)
    p.add_argument("--runs", default="runs/study")
    p.add_argument("--weights", default=None, help="evaluate these weights, train nothing")
    p.add_argument("--table", action="store_true")
    args = p.parse_args(argv)
    if args.table:
        return table()
    out = Path(args.runs) / args.name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    row = {"name": args.name, "sets": args.sets, "iters": args.iters,
           "train_args": args.train_arg, "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.weights is None:
        cmd = [sys.executable, "-m", "minimask", "train", "--out", str(out / "run"),
               "--overwrite", "--eval-images", "0", "--no-progress"]
        cmd += [f"--set={s}" for s in args.sets] + args.train_arg
        if args.iters:
            cmd += ["--iters", str(args.iters)]
        row["load_before"] = os.getloadavg()
        t0 = time.time()
        run(cmd, log)
        row["train_seconds"] = round(time.time() - t0, 1)
        row["load_after"] = os.getloadavg()
        weights = out / "run" / "checkpoint.npz"
    else:
        weights = Path(args.weights)
    row["weights"] = str(weights)
    row["seeds"] = {}
    for seed in args.seeds:
        ev = out / f"eval-{seed}"
        run([sys.executable, "-m", "minimask", "evaluate", "--weights", str(weights),
             "--seed", str(seed), "--num-images", str(args.num_images), "--out", str(ev),
             "--no-progress"], log)
        row["seeds"][str(seed)] = summarise(json.loads((ev / "metrics.json").read_text()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(format_row(row))
    return 0


def format_row(row) -> str:
    seeds = list(row["seeds"].values())

    def col(key, scale=100, fmt="{:.1f}"):
        return " / ".join(fmt.format(scale * s[key]) for s in seeds)

    bar = " / ".join(f"{100 * s['mask_AP_per_class']['bar']:.1f}" for s in seeds)
    change = " ".join(f"`{s}`" for s in row["sets"] + row.get("train_args", [])) or "none"
    t = row.get("train_seconds")
    return (f"| {change} | {row.get('iters') or 6000} | {'%.0f s' % t if t else '-'} | "
            f"{', '.join(row['seeds'])} | {col('mask_AP')} | {col('mask_AP50')} | {bar} | "
            f"{col('box_AP')} | {col('bar_mask_bg', 1, '{:.3f}')} |")


def table() -> int:
    print("| change | steps | train time | seeds | mask AP | mask AP50 | bar mask AP | box AP "
          "| bar crop bg (mask) |")
    print("| ---- | ---- | ---- | ---- | ---- | ---- | ---- | ---- | ---- |")
    for line in RESULTS.read_text().splitlines():
        print(format_row(json.loads(line)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
