"""Winograd's two tile sizes against each other: a 3x3 stride-1 conv on the
"cpu" backend, forward + backward, float32, with F(2x2, 3x3) tiles
(``winograd.set_algorithm("f2x2")``) and with F(4x4, 3x3) tiles (every
floor of ``winograd.tile_for`` at 1, so each size takes them), and im2col
for scale. Prints the time of F(4x4) over F(2x2) per input size and thread
count - the measurement behind ``winograd.F4_MIN_SIZE`` and
``F4_MIN_POSITIONS`` - and what "auto" picks there.

    python benchmarks/bench_winograd_tiles.py                  # 1 and 2 threads, ~1 minute
    python benchmarks/bench_winograd_tiles.py --threads 1 --reps 9

Writes ``benchmarks/results/winograd_tiles.json`` and, with matplotlib,
``figures/benchmark_winograd_tiles.png``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# (N, C, side): the tiny preset's head maps at 128 and 256 px (C = 64, batch
# 4) and ResNet-18-like widths
CASES = [(4, 64, 8), (4, 64, 16), (4, 64, 24), (4, 64, 32), (1, 64, 64),
         (1, 256, 16), (1, 256, 32), (2, 256, 32), (1, 256, 64), (4, 128, 32)]


def _median_ms(fn, reps):
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def measure(threads, reps):
    import numba

    import minimask
    from minimask.layers import conv2d_backward, conv2d_forward, winograd
    from minimask.layers.conv import Geometry

    numba.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    floors = (winograd.F4_MIN_SIZE, winograd.F4_MIN_POSITIONS)
    for N, C, S in CASES:
        x = rng.standard_normal((N, C, S, S)).astype(np.float32)
        w = (rng.standard_normal((C, C, 3, 3)) * np.sqrt(2 / (9 * C))).astype(np.float32)
        b = np.zeros(C, np.float32)

        def step():
            out, cache = conv2d_forward(x, w, b, 1, 1)
            conv2d_backward(out, cache)

        row = {"N": N, "C": C, "side": S, "threads": threads}
        with minimask.using_backend("cpu"):
            for name, algorithm, f4_floors in (("f2x2", "f2x2", floors), ("f4x4", "auto", (1, 1)),
                                               ("im2col", "im2col", floors)):
                winograd.F4_MIN_SIZE, winograd.F4_MIN_POSITIONS = f4_floors
                with winograd.algorithm(algorithm):
                    step()                                   # compile, warm the workspace
                    row[name + "_ms"] = _median_ms(step, reps)
            winograd.F4_MIN_SIZE, winograd.F4_MIN_POSITIONS = floors
            g = Geometry(N, C, S, S, 3, 3, 1, 1, 1, 1, S, S)
            row["auto_picks"] = f"F({winograd.tile_for(g)}x{winograd.tile_for(g)})"
        row["f4_over_f2"] = row["f4x4_ms"] / row["f2x2_ms"]
        rows.append(row)
        print(f"{threads} thr.  {N} x {C:3d} x {S:2d} x {S:2d} ({N * S * S:5d} positions): "
              f"F(2x2) {row['f2x2_ms']:7.3f} ms  F(4x4) {row['f4x4_ms']:7.3f} ms  "
              f"im2col {row['im2col_ms']:7.3f} ms  F(4x4)/F(2x2) {row['f4_over_f2']:.2f}  "
              f"auto: {row['auto_picks']}", flush=True)
    return rows


def plot(rows, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4))
    for threads, marker in ((1, "o"), (2, "s")):
        mine = [r for r in rows if r["threads"] == threads]
        if not mine:
            continue
        ax.plot([r["N"] * r["side"] ** 2 for r in mine], [r["f4_over_f2"] for r in mine], marker,
                label=f"{threads} thread(s)")
        for r in mine:
            ax.annotate(f"C{r['C']}", (r["N"] * r["side"] ** 2, r["f4_over_f2"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("output positions N * OH * OW")
    ax.set_ylabel("time F(4x4) / F(2x2), fwd + bwd")
    ax.set_title("Winograd tiles: F(4x4, 3x3) against F(2x2, 3x3), float32, cpu backend")
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/winograd_tiles.json"))
    ap.add_argument("--png", default=str(ROOT / "figures/benchmark_winograd_tiles.png"))
    args = ap.parse_args()
    import minimask
    minimask.configure_process()
    rows = []
    for threads in args.threads:
        rows += measure(threads, args.reps)
    Path(args.json).write_text(json.dumps({"rows": rows, "reps": args.reps}, indent=1))
    print(f"wrote {args.json}")
    try:
        plot(rows, Path(args.png))
        print(f"wrote {args.png}")
    except ImportError:
        print("matplotlib is not installed here: no figure")


if __name__ == "__main__":
    main()
