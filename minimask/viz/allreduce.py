"""A ring allreduce drawn step by step (``minimask.distributed.ring_allreduce``)."""
from __future__ import annotations

import numpy as np


def draw_ring_allreduce(n: int = 4, fig=None):
    """One panel per state of a ring allreduce of ``n`` ranks: a row per
    rank, a cell per chunk, the cell split into the colours of the ranks
    whose values it holds (full width, all colours: the finished sum).
    Arrows mark the chunk each rank sends to the next in that step."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, Rectangle

    from minimask.distributed import ring_allreduce

    _, history = ring_allreduce([np.full(n, float(r)) for r in range(n)])
    steps = len(history)
    if fig is None:
        fig = plt.figure(figsize=(2.1 * steps, 2.6))
    axes = fig.subplots(1, steps)
    colours = plt.get_cmap("tab10").colors
    for t, (ax, state) in enumerate(zip(axes, history)):
        for r in range(n):
            for c in range(n):
                who = sorted(state[r][c])
                for k, w in enumerate(who):
                    ax.add_patch(Rectangle((c + k / len(who), n - 1 - r), 1 / len(who), 0.9,
                                           color=colours[w % 10], lw=0))
                ax.add_patch(Rectangle((c, n - 1 - r), 1, 0.9, fill=False, lw=0.6, ec="0.3"))
        if t < steps - 1:                     # what moves in the next step
            phase = t if t < n - 1 else t - (n - 1)
            for r in range(n):
                c = (r - phase) % n if t < n - 1 else (r + 1 - phase) % n
                y0, y1 = n - 1 - r + 0.45, n - 1 - (r + 1) % n + 0.45
                ax.add_patch(FancyArrowPatch((c + 0.5, y0), (c + 0.5, y1), arrowstyle="-|>",
                                             mutation_scale=7, lw=0.8, color="0.15",
                                             connectionstyle="arc3,rad=0.35" if (r + 1) % n
                                             else "arc3,rad=-0.6"))
        ax.set_xlim(-0.1, n + 0.1)
        ax.set_ylim(-0.2, n)
        ax.set_xticks(np.arange(n) + 0.5, [f"c{c}" for c in range(n)], fontsize=7)
        ax.set_yticks(np.arange(n) + 0.45, [f"rank {r}" for r in reversed(range(n))], fontsize=7)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        if t == 0:
            title = "start: own gradient"
        elif t < n:
            title = f"reduce-scatter {t}/{n - 1}"
        else:
            title = f"allgather {t - n + 1}/{n - 1}"
        ax.set_title(title, fontsize=8)
        if t:
            ax.set_yticks([])
    fig.suptitle(f"ring allreduce, {n} ranks: each cell a chunk of the gradient, coloured by "
                 f"the ranks whose values it sums; arrows: what is sent to the next rank",
                 fontsize=8.5)
    fig.tight_layout()
    return fig
