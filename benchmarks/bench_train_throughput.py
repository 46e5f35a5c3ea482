"""Training steps per second: one process against data-parallel workers.

    python benchmarks/bench_train_throughput.py            # the shipped tiny model, batch 4, 128 px
    python benchmarks/bench_train_throughput.py --steps 100 --weights runs/train/checkpoint.npz

Starts from trained weights (the shipped model by default) because a trained
model's steps cost more than an untrained one's: its detections become mask
RoIs. Each variant runs in a fresh process, so its thread settings apply
from the start:

* ``1 process, 1 thread``  - ``NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1``
* ``1 process, N threads`` - Numba's and BLAS's defaults (one per core)
* ``W workers``            - ``DataParallel`` (``train --workers W``): W
  single-threaded processes, each computing ``batch / W`` images

A step is the loss and gradient of one batch plus the SGD update, as in
``train``. Prints the median step time and the ratio to ``1 process, N
threads`` (the default before workers existed); writes
``benchmarks/results/train_throughput.json`` and
``figures/benchmark_train_throughput.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(weights, workers, steps, batch):
    sys.path.insert(0, str(ROOT))
    import minimask
    minimask.configure_process()        # as the CLI does: this process is minimask's
    from minimask.data.synthetic import ShapesDataset
    from minimask.nn import SGD
    from minimask.train import TrainSettings, load_model, make_batch

    model, meta = load_model(weights)
    data = ShapesDataset(seed=0, num_images=2000, size=int(meta.get("image_size", 128)))
    settings = TrainSettings(batch_size=batch, workers=max(1, workers))
    opt = SGD(model.parameters(), lr=1e-5, momentum=0.9)   # tiny steps: the model stays trained
    times = []
    if workers:
        from minimask.parallel import DataParallel
        with DataParallel(model, data, settings, workers) as dp:
            for step in range(steps + 3):
                t0 = time.perf_counter()
                dp.loss(step)
                opt.step()
                times.append(time.perf_counter() - t0)
    else:
        for step in range(steps + 3):
            t0 = time.perf_counter()
            images, targets = make_batch(data, step, settings)
            model.loss(images, targets)
            opt.step()
            times.append(time.perf_counter() - t0)
    times = times[3:]                      # warm-up: compilation, first allocations
    return {"median_step_s": statistics.median(times), "min_step_s": min(times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(ROOT / "weights" / "shapes_tiny.npz"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[2])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.weights, int(args.one), args.steps, args.batch)))
        return
    cores = os.cpu_count() or 1
    variants = [("1 process, 1 thread", 0, {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}),
                (f"1 process, {cores} threads", 0, {})]
    variants += [(f"{w} workers", w, {}) for w in args.workers]
    rows = []
    for name, workers, env in variants:
        out = subprocess.run([sys.executable, __file__, "--one", str(workers), "--weights",
                              args.weights, "--steps", str(args.steps), "--batch", str(args.batch)],
                             env={**os.environ, **env}, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows.append({"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    base = rows[1]["median_step_s"]
    load = os.getloadavg()
    print(f"batch {args.batch}, {args.steps} steps each, from {Path(args.weights).name}; "
          f"{cores} cores, load average {load[0]:.2f}")
    print(f"{'variant':<24}{'median step':>12}{'steps/s':>9}{'speed-up':>10}")
    for r in rows:
        r["speedup_vs_threads"] = base / r["median_step_s"]
        print(f"{r['variant']:<24}{r['median_step_s']:>11.3f}s{1 / r['median_step_s']:>9.1f}"
              f"{r['speedup_vs_threads']:>9.2f}x")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "train_throughput.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": cores,
         "load_average": load, "batch": args.batch, "steps": args.steps,
         "weights": Path(args.weights).name, "rows": rows}, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 2.6))
    ax.barh([r["variant"] for r in rows], [1 / r["median_step_s"] for r in rows], color="tab:blue")
    for k, r in enumerate(rows):
        ax.text(1 / r["median_step_s"], k, f" {r['speedup_vs_threads']:.2f}x", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("training steps per second (higher is better)")
    ax.set_title(f"tiny model, batch {args.batch}, {cores}-core CPU", fontsize=10)
    ax.margins(x=0.2)
    fig.tight_layout()
    figures = ROOT / "figures"
    figures.mkdir(exist_ok=True)
    fig.savefig(figures / "benchmark_train_throughput.png", dpi=120)
    print(f"wrote {results / 'train_throughput.json'} and {figures / 'benchmark_train_throughput.png'}")


if __name__ == "__main__":
    main()
