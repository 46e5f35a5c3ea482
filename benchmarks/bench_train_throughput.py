"""Training steps per second: one process against MPI ranks.

    python benchmarks/bench_train_throughput.py            # the shipped tiny model, batch 4, 128 px
    python benchmarks/bench_train_throughput.py --steps 100 --weights runs/train/checkpoint.npz

Starts from trained weights (the shipped model by default) because a trained
model's steps cost more than an untrained one's: its detections become mask
RoIs. Each variant runs in fresh processes, so its thread settings apply
from the start:

* ``1 rank, 1 thread``   - ``NUMBA_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1``
* ``1 rank, N threads``  - Numba's and BLAS's defaults (one per core)
* ``R ranks``            - ``minimask.distributed`` under the environment's
  ``mpiexec -n R`` (``train --ranks R``): R single-threaded processes, each
  computing ``batch / R`` images, one allreduce per step

A step is the loss and gradient of one batch plus the SGD update, as in
``train``. Prints the median step time, the ratio to ``1 rank, N threads``
and, for R ranks, the allreduce's share of a step: the time spent in it
(which includes waiting for the slower rank) and the allreduce alone
(the same buffer, ranks already in step). Writes
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


def one(weights, steps, batch):
    """Time ``steps`` training steps in this process, or in this rank of an
    MPI job; returns (on rank 0) the medians as a dict."""
    sys.path.insert(0, str(ROOT))
    import minimask
    minimask.configure_process()        # as the CLI does: this process is minimask's

    from minimask import distributed
    from minimask.data.synthetic import ShapesDataset
    from minimask.nn import SGD
    from minimask.train import TrainSettings, load_model, make_batch

    comm = distributed.world()
    model, meta = load_model(weights)
    data = ShapesDataset(seed=0, num_images=2000, size=int(meta.get("image_size", 128)))
    settings = TrainSettings(batch_size=batch)
    opt = SGD(model.parameters(), lr=1e-5, momentum=0.9)   # tiny steps: the model stays trained
    times, reduce_times = [], []
    if comm.size > 1:
        dp = distributed.DataParallel(model, data, settings, comm)
        allreduce = comm.allreduce_sum

        def timed(buffer):
            t = time.perf_counter()
            allreduce(buffer)
            reduce_times.append(time.perf_counter() - t)
        comm.allreduce_sum = timed
        for step in range(steps + 3):
            t0 = time.perf_counter()
            dp.loss(step)
            opt.step()
            times.append(time.perf_counter() - t0)
        comm.allreduce_sum = allreduce
        alone = []                           # the allreduce by itself, ranks in step
        for _ in range(30):
            comm.barrier()
            t = time.perf_counter()
            comm.allreduce_sum(dp.buffer)
            alone.append(time.perf_counter() - t)
        extra = {"allreduce_in_step_s": statistics.median(reduce_times[3:]),
                 "allreduce_alone_s": statistics.median(alone),
                 "gradient_bytes": int(dp.buffer.nbytes), "ranks": comm.size}
    else:
        for step in range(steps + 3):
            t0 = time.perf_counter()
            images, targets = make_batch(data, step, settings)
            model.loss(images, targets)
            opt.step()
            times.append(time.perf_counter() - t0)
        extra = {"ranks": 1}
    times = times[3:]                      # warm-up: compilation, first allocations
    if comm.rank == 0:
        print(json.dumps({"median_step_s": statistics.median(times), "min_step_s": min(times),
                          **extra}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=str(ROOT / "weights" / "shapes_tiny.npz"))
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ranks", type=int, nargs="+", default=[2])
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.weights, args.steps, args.batch)
        return
    sys.path.insert(0, str(ROOT))
    from minimask import distributed
    cores = distributed.usable_cores()
    me = [sys.executable, __file__, "--one", "--weights", args.weights, "--steps",
          str(args.steps), "--batch", str(args.batch)]
    single = {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    variants = [("1 rank, 1 thread", me, single), (f"1 rank, {cores} threads", me, {})]
    variants += [(f"{r} ranks, 1 thread each", distributed.launch_command(r, me),
                  {**distributed.rank_environment(r), **single}) for r in args.ranks]
    rows = []
    for name, cmd, env in variants:
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows.append({"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    base = rows[1]["median_step_s"]
    load = os.getloadavg()
    print(f"batch {args.batch}, {args.steps} steps each, from {Path(args.weights).name}; "
          f"{cores} cores, load average {load[0]:.2f}")
    print(f"{'variant':<24}{'median step':>12}{'steps/s':>9}{'speed-up':>10}"
          f"{'allreduce in step':>19}{'alone':>9}")
    for r in rows:
        r["speedup_vs_threads"] = base / r["median_step_s"]
        shares = ""
        if r["ranks"] > 1:
            shares = (f"{r['allreduce_in_step_s'] * 1e3:>9.1f} ms {r['allreduce_in_step_s'] / r['median_step_s']:>5.1%}"
                      f"{r['allreduce_alone_s'] * 1e3:>6.1f} ms")
        print(f"{r['variant']:<24}{r['median_step_s']:>11.3f}s{1 / r['median_step_s']:>9.1f}"
              f"{r['speedup_vs_threads']:>9.2f}x{shares}")
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
