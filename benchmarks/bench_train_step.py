"""Time one training step of a RetinaMask preset, and its peak memory.

    python benchmarks/bench_train_step.py                    # tiny, 128 and 256 px, batch 4
    python benchmarks/bench_train_step.py --preset resnet18 --sizes 256 --batch 2

A step is ``model.loss`` (forward, the three losses, the whole backward)
plus the SGD update, on synthetic shapes, on the current backend ("cpu" by
default; ``--backend`` to change). Each size runs in a fresh process so that
its peak resident memory (``ru_maxrss``) is its own; the NumPy heap peak
(``tracemalloc``) is reported too. Writes ``benchmarks/results/train_step.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(preset, size, batch, steps, backend):
    import resource
    import tracemalloc

    import numpy as np

    sys.path.insert(0, str(ROOT))
    import minimask
    minimask.configure_process()        # as the CLI does: this process is minimask's
    from minimask.data.synthetic import ShapesDataset
    from minimask.model import Config, RetinaMask
    from minimask.nn import SGD

    minimask.set_backend(backend)
    data = ShapesDataset(seed=0, num_images=batch, size=size)
    images = np.stack([data[i][0] for i in range(batch)])
    targets = [data[i][1] for i in range(batch)]
    model = RetinaMask(Config.preset(preset, num_classes=data.num_classes))
    opt = SGD(model.parameters(), lr=0.001)
    model.loss(images, targets)  # compile / warm up
    opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.loss(images, targets)
        opt.step()
        times.append(time.perf_counter() - t0)
    tracemalloc.start()
    model.loss(images, targets)
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"preset": preset, "size": size, "batch": batch, "backend": backend,
            "median_step_s": statistics.median(times), "min_step_s": min(times),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_numpy_heap_mb": heap_peak / 2**20,
            "parameters": model.num_parameters()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one(args.preset, args.sizes[0], args.batch, args.steps, args.backend)))
        return
    rows = []
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset,
                              "--sizes", str(size), "--batch", str(args.batch), "--steps",
                              str(args.steps), "--backend", args.backend],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'preset':9s} {'size':>5s} {'batch':>5s} {'step s (median)':>16s} "
          f"{'peak RSS MB':>12s} {'numpy heap MB':>14s}")
    for r in rows:
        print(f"{r['preset']:9s} {r['size']:5d} {r['batch']:5d} {r['median_step_s']:16.3f} "
              f"{r['peak_rss_mb']:12.0f} {r['peak_numpy_heap_mb']:14.0f}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
