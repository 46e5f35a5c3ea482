"""Pictures for the "making it fast" chapter: the tiled GEMM plan, the
benchmark table, and how a scatter-add races.

``draw_gemm_plan`` reads its numbers from ``minimask.layers.gemm`` (``BM``,
``BN``, ``BK``, ``TM``, ``TN``), so the figure always shows the kernel as it
is. ``plot_benchmark`` draws a record written by
``benchmarks/bench_layers.py`` (the JSON in ``benchmarks/results/``).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from minimask.layers import gemm as _gemm


def gemm_plan_numbers():
    """The counts behind the tiled GEMM plan, per thread and per k-slice.

    Returns a dict: the tile sizes, the threads per block, the global
    elements each thread copies into shared memory per slice, the shared
    loads and the multiply-adds each thread does per slice, and the shared
    memory of one block in bytes (float32).
    """
    g = _gemm
    fma = g.TM * g.TN * g.BK                  # multiply-adds per thread per slice
    shared_loads = (g.TM + g.TN) * g.BK       # register fills per thread per slice
    return {
        "BM": g.BM, "BN": g.BN, "BK": g.BK, "TM": g.TM, "TN": g.TN, "PAD": g.PAD,
        "threads": g.THREADS,
        "global_loads_per_thread": g.A_LOADS + g.B_LOADS,
        "fma_per_thread": fma,
        "shared_loads_per_thread": shared_loads,
        "fma_per_shared_load": fma / shared_loads,
        # each element brought into shared memory feeds BN (A) or BM (B) FMAs
        "fma_per_global_load": (g.BM * g.BN * g.BK) / (g.BM * g.BK + g.BK * g.BN),
        "shared_bytes_float32": 4 * g.BK * (g.A_ROW + g.B_ROW),
    }


def draw_gemm_plan(M=512, N=512, K=256, thread=(1, 2)):
    """Draw the plan of ``minimask.layers.gemm``'s kernel in three panels.

    Inputs:
    - M, N, K: the sizes of an example product ``C = A @ B`` (C is M x N)
    - thread: ``(ty, tx)`` of the thread whose micro-tile is highlighted

    Left: C cut into ``BM x BN`` block tiles; one block reads a ``BM x K``
    band of A and a ``K x BN`` band of B, one ``BK``-deep slice at a time.
    Middle: that block tile, with the ``TM x TN`` elements one thread owns
    (strided by 16 rows and 16 columns). Right: the counts per thread and
    slice. Returns the figure.
    """
    g = _gemm
    n = gemm_plan_numbers()
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2), gridspec_kw={"width_ratios": [1.3, 1, 0.9]})

    # -- left: A, B, C and one block's bands and k-slice ----------------------
    ax = axes[0]
    gap = 0.12 * max(M, N)
    # C at the origin, A to its left (M x K), B above it (K x N)
    ax.add_patch(Rectangle((0, 0), N, M, fill=False, lw=1.2))
    ax.add_patch(Rectangle((-gap - K, 0), K, M, fill=False, lw=1.2))
    ax.add_patch(Rectangle((0, M + gap), N, K, fill=False, lw=1.2))
    for x0 in range(0, N, g.BN):
        ax.plot([x0, x0], [0, M], color="0.8", lw=0.6)
    for y0 in range(0, M, g.BM):
        ax.plot([0, N], [y0, y0], color="0.8", lw=0.6)
    bi, bj = 1, 2        # the highlighted block (row, column of tiles)
    top = M - (bi + 1) * g.BM   # y grows upwards; tile row 0 is at the top
    ax.add_patch(Rectangle((bj * g.BN, top), g.BN, g.BM, color="C0", alpha=0.5))
    ax.add_patch(Rectangle((-gap - K, top), K, g.BM, color="C1", alpha=0.2))
    ax.add_patch(Rectangle((bj * g.BN, M + gap), g.BN, K, color="C2", alpha=0.2))
    k0 = 3 * g.BK * 4    # one k-slice, drawn a little way in
    ax.add_patch(Rectangle((-gap - K + k0, top), g.BK, g.BM, color="C1"))
    ax.add_patch(Rectangle((bj * g.BN, M + gap + K - k0 - g.BK), g.BN, g.BK, color="C2"))
    ax.text(N / 2, -0.06 * M, f"C ({M} x {N}): {M // g.BM} x {N // g.BN} block tiles of "
            f"{g.BM} x {g.BN}", ha="center", va="top", fontsize=9)
    ax.text(-gap - K / 2, -0.06 * M, f"A ({M} x {K})", ha="center", va="top", fontsize=9)
    ax.text(N + 0.03 * N, M + gap + K / 2, f"B ({K} x {N})", ha="left", va="center", fontsize=9)
    ax.annotate(f"k-slice of A: {g.BM} x {g.BK}", (-gap - K + k0 + g.BK, top + g.BM / 2),
                (-gap - K, M + 0.55 * gap + K), fontsize=8, arrowprops={"arrowstyle": "->"})
    ax.annotate(f"k-slice of B: {g.BK} x {g.BN}", (bj * g.BN + g.BN, M + gap + K - k0 - g.BK / 2),
                (N * 0.55, M + gap + K + 0.35 * gap), fontsize=8, arrowprops={"arrowstyle": "->"})
    ax.text(bj * g.BN + g.BN / 2, top + g.BM / 2, "one\nblock", ha="center", va="center",
            fontsize=8, color="white")
    ax.set_xlim(-gap - K - 0.05 * N, N * 1.35)
    ax.set_ylim(-0.2 * M, M + gap + K + 0.6 * gap)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"a block walks over K in slices of BK = {g.BK}", fontsize=10)

    # -- middle: one block tile and the strided micro-tile of one thread -------
    ax = axes[1]
    ty, tx = thread
    # one element is 1/128 of the tile: draw owned elements as markers big
    # enough to see, and shade the 16 x 16 square the 256 threads cover at
    # each (i, j) of their micro-tiles
    ax.add_patch(Rectangle((-0.5, -0.5), g.COL_STEP, g.ROW_STEP, color="0.85", zorder=0))
    ax.text(g.COL_STEP + 1, g.ROW_STEP / 2, f"all {n['threads']} threads at (i, j) = (0, 0)",
            fontsize=7, va="center", color="0.35")
    for (oy, ox), colour in [((0, 0), "C3"), ((ty, tx), "C0")]:
        r = oy + g.ROW_STEP * np.arange(g.TM)
        c = ox + g.COL_STEP * np.arange(g.TN)
        cc, rr = np.meshgrid(c, r)
        ax.scatter(cc.ravel(), rr.ravel(), marker="s", s=22, color=colour, zorder=3)
    ax.set_xlim(-0.5, g.BN - 0.5)
    ax.set_ylim(g.BM - 0.5, -0.5)
    ax.set_aspect("equal")
    for t in range(0, g.BM + 1, g.ROW_STEP):
        ax.axhline(t - 0.5, color="0.85", lw=0.5)
    for t in range(0, g.BN + 1, g.COL_STEP):
        ax.axvline(t - 0.5, color="0.85", lw=0.5)
    ax.set_title(f"block tile {g.BM} x {g.BN}, {n['threads']} threads:\n"
                 f"thread (ty, tx) owns rows ty + {g.ROW_STEP} i, columns tx + {g.COL_STEP} j",
                 fontsize=9)
    ax.set_xlabel(f"red: thread (0, 0); blue: thread {tuple(thread)}: {g.TM} x {g.TN} "
                  "elements each", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])

    # -- right: the counts ----------------------------------------------------
    ax = axes[2]
    ax.axis("off")
    lines = [
        "per thread and k-slice",
        f"  global -> shared copies:  {n['global_loads_per_thread']}",
        f"  shared -> register loads: {n['shared_loads_per_thread']}  ((TM + TN) x BK)",
        f"  multiply-adds:            {n['fma_per_thread']}  (TM x TN x BK)",
        "",
        f"FMAs per shared load:  {n['fma_per_shared_load']:.0f}",
        f"FMAs per global load:  {n['fma_per_global_load']:.0f}",
        "  (one thread per C element, no tiles: 0.5)",
        "",
        f"shared memory per block: {n['shared_bytes_float32'] / 1024:.1f} KiB (float32,",
        f"  rows padded by PAD = {g.PAD} against bank conflicts)",
        "two __syncthreads per slice, reached by every thread",
    ]
    ax.text(0.0, 0.95, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes)
    ax.set_title("the arithmetic of the plan", fontsize=10)
    fig.tight_layout()
    return fig


def benchmark_rows(record):
    """Rows ``(case, {column: milliseconds}, {ratio name: value})`` of a
    benchmark record (the dict in ``layers_full.json``); a backend that was
    not timed for a case is missing from its row."""
    rows = []
    for case, seconds in record["seconds"].items():
        ms = {k: v * 1e3 for k, v in seconds.items()}
        ratios = {}
        for a, b in (("cpu", "numpy"), ("cpu", "torch"), ("cuda", "torch_cuda")):
            if a in seconds and b in seconds:
                ratios[f"{a}/{b}"] = seconds[a] / seconds[b]
        rows.append((case, ms, ratios))
    return rows


def plot_benchmark(record):
    """Bar chart of a benchmark record, with RoIAlign's cost against the RoI
    count and a 3x3 conv's against the map size. Returns the figure."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    results = record["seconds"]
    scale = record["scaling_s"]
    names = list(results)
    backends = [b for b in ("numpy", "cpu", "torch", "cuda", "torch_cuda")
                if any(b in results[n] for n in names)]
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        vals = [results[n].get(b, np.nan) * 1e3 for n in names]
        axes[0].bar(np.arange(len(names)) + i * width, vals, width, label=b)
    axes[0].set_yscale("log")
    axes[0].set_xticks(np.arange(len(names)) + 0.4 - width / 2)
    axes[0].set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    axes[0].set_ylabel("forward+backward, ms (median)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("layers at RetinaMask's shapes")
    for ax, key, xkey, title in [(axes[1], "rois", "n", "RoIAlign: cost against RoI count"),
                                 (axes[2], "conv", "size", "conv 3x3: cost against map size")]:
        for b in ("cpu", "torch"):
            if scale[key].get(b):
                ax.plot(scale[key][xkey], np.array(scale[key][b]) * 1e3, "o-", label=b)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("RoIs" if key == "rois" else "map side (pixels)")
        ax.set_ylabel("forward+backward, ms")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{record.get('machine', '?')}, {record.get('threads', '?')} threads, "
                 f"{record.get('date', '')}", fontsize=9)
    fig.tight_layout()
    return fig


def draw_race_timeline(ax=None):
    """Draw how a scatter-add loses an update: two threads each add 1 to the
    same element, which holds 5.

    Top: the plain ``a[k] += 1``, three steps per thread (read, add, write)
    that interleave - both read 5, both write 6, one update is lost. Bottom:
    the same with an atomic add, where each thread's three steps are one
    indivisible step and the second thread sees the first one's result: 7.
    Returns the Axes.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = {"A": "tab:blue", "B": "tab:orange"}

    def lane(y0, steps, memory, title, verdict, ok):
        ax.text(-0.2, y0 + 1.5, title, fontsize=9, fontweight="bold", va="center")
        for row, name in enumerate(["thread A", "thread B"]):
            ax.text(-0.2, y0 + 0.5 - 0.9 * row, name, fontsize=8, va="center", ha="left",
                    color=colours[name[-1]])
        for t, (who, text, width) in enumerate(steps):
            row = 0 if who == "A" else 1
            x = 1.4 + t * 1.05
            ax.add_patch(Rectangle((x, y0 + 0.15 - 0.9 * row), 1.0 * width - 0.05, 0.7,
                                   facecolor=colours[who], alpha=0.25, edgecolor=colours[who]))
            ax.text(x + (1.0 * width - 0.05) / 2, y0 + 0.5 - 0.9 * row, text, fontsize=7.5,
                    ha="center", va="center")
        for t, value in enumerate(memory):
            ax.text(1.9 + t * 1.05, y0 - 1.05, str(value), fontsize=8, ha="center", va="center",
                    color="0.25")
        ax.text(-0.2, y0 - 1.05, "a[k] after", fontsize=8, va="center", color="0.25")
        ax.text(1.4 + len(memory) * 1.05 + 0.1, y0 - 1.05, verdict, fontsize=9, va="center",
                color="tab:green" if ok else "tab:red", fontweight="bold")

    racy = [("A", "read 5", 1), ("B", "read 5", 1), ("A", "5 + 1", 1), ("B", "5 + 1", 1),
            ("A", "write 6", 1), ("B", "write 6", 1)]
    lane(4.2, racy, [5, 5, 5, 5, 6, 6], "a[k] += 1 from two threads at once",
         "6: one update lost", False)
    # B's atomic add starts once A's is done: (thread, text, width, start step)
    ax_steps = [("A", "atomic: read 5, add, write 6", 2.95, 0),
                ("B", "atomic: read 6, add, write 7", 2.95, 3)]
    y0 = 0.6
    ax.text(-0.2, y0 + 1.5, "cuda.atomic.add(a, k, 1): read-add-write as one step",
            fontsize=9, fontweight="bold", va="center")
    for row, name in enumerate(["thread A", "thread B"]):
        ax.text(-0.2, y0 + 0.5 - 0.9 * row, name, fontsize=8, va="center",
                color=colours[name[-1]])
    for who, text, width, t in ax_steps:
        row = 0 if who == "A" else 1
        x = 1.4 + t * 1.05
        ax.add_patch(Rectangle((x, y0 + 0.15 - 0.9 * row), width + 0.1, 0.7,
                               facecolor=colours[who], alpha=0.25, edgecolor=colours[who]))
        ax.text(x + (width + 0.1) / 2, y0 + 0.5 - 0.9 * row, text, fontsize=7.5, ha="center",
                va="center")
    for t, value in enumerate([5, 5, 6, 6, 6, 7]):
        ax.text(1.9 + t * 1.05, y0 - 1.05, str(value), fontsize=8, ha="center", va="center",
                color="0.25")
    ax.text(-0.2, y0 - 1.05, "a[k] after", fontsize=8, va="center", color="0.25")
    ax.text(1.4 + 6 * 1.05 + 0.1, y0 - 1.05, "7: both counted", fontsize=9, va="center",
            color="tab:green", fontweight="bold")
    ax.annotate("", xy=(1.4 + 6 * 1.05, -1.0), xytext=(1.4, -1.0),
                arrowprops=dict(arrowstyle="-|>", color="0.5"))
    ax.text(1.4 + 3 * 1.05, -1.3, "time", fontsize=8, ha="center", color="0.5")
    ax.set_xlim(-0.3, 10.5)
    ax.set_ylim(-1.5, 6.0)
    ax.axis("off")
    return ax
