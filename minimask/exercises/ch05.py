"""Chapter 5's exercises: a launch grid, a race-free partition, tile reuse.

``check_launch_grid(fn)``
    ``fn(n, threads_per_block) -> blocks``: the fewest blocks for one thread
    per element of ``n >= 1`` elements (``blocks * threads_per_block >= n``);
    minimask's ``_cuda.blocks_for`` is the reference.

``check_output_partition(fn)``
    ``fn(n_outputs, n_workers) -> list of (start, stop)``: split the output
    indices ``0 .. n_outputs - 1`` into ``n_workers`` contiguous ranges, one
    per parallel iteration, so that every output is written by exactly one
    iteration (no race) and the sizes differ by at most one (no idle
    worker). Ranges may be empty when there are more workers than outputs.

``check_answer_fma_per_global_load(value)``
    FMAs per element loaded from global memory for a ``64 x 64`` block tile.
"""
from __future__ import annotations

from minimask._cuda import blocks_for
from minimask.exercises._grading import Grade

__all__ = ["check_launch_grid", "check_output_partition", "check_answer_fma_per_global_load"]


def check_launch_grid(fn, verbose: bool = True) -> bool:
    """Grade ``fn(n, threads_per_block) -> blocks`` against ceil division."""
    g = Grade("launch_grid", verbose)
    for n, threads in [(1, 128), (127, 128), (128, 128), (129, 128), (256, 128), (1000, 256),
                       (1_000_000, 128), (33, 32), (300, 1)]:
        name = f"n = {n}, {threads} threads per block"
        ok, blocks = g.call(name, fn, n, threads)
        if not ok:
            continue
        expected = blocks_for(n, threads)
        try:
            blocks = int(blocks)
        except (TypeError, ValueError):
            g.record(name, False, f"return an integer, got {blocks!r}")
            continue
        if blocks == expected:
            g.record(name, True)
        elif blocks * threads < n:
            g.record(name, False, f"{blocks} blocks run {blocks * threads} threads: "
                     f"{n - blocks * threads} elements get no thread")
        else:
            extra = blocks - expected
            g.record(name, False, f"{blocks} blocks, but {expected} "
                     f"{'is' if expected == 1 else 'are'} enough ({extra} whole "
                     f"{'block runs' if extra == 1 else 'blocks run'} only the bounds guard)")
    return g.finish()


def check_output_partition(fn, verbose: bool = True) -> bool:
    """Grade ``fn(n_outputs, n_workers) -> [(start, stop), ...]``: a
    partition of the outputs into balanced contiguous ranges."""
    g = Grade("output_partition", verbose)
    for n, workers in [(8, 2), (10, 3), (256, 16), (7, 7), (5, 8), (1000, 6), (1, 1)]:
        name = f"{n} outputs over {workers} workers"
        ok, ranges = g.call(name, fn, n, workers)
        if not ok:
            continue
        try:
            ranges = [(int(a), int(b)) for a, b in ranges]
        except (TypeError, ValueError):
            g.record(name, False, "return a list of (start, stop) pairs")
            continue
        if len(ranges) != workers:
            g.record(name, False, f"{len(ranges)} ranges, expected one per worker ({workers})")
            continue
        writes = [0] * n
        outside = [(a, b) for a, b in ranges if a < 0 or b > n or b < a]
        if outside:
            g.record(name, False, f"range {outside[0]} is not inside 0..{n}")
            continue
        for a, b in ranges:
            for k in range(a, b):
                writes[k] += 1
        twice = [k for k in range(n) if writes[k] > 1]
        never = [k for k in range(n) if writes[k] == 0]
        sizes = [b - a for a, b in ranges]
        if twice:
            g.record(name, False, f"output {twice[0]} is written by {writes[twice[0]]} "
                     f"workers: a race ({len(twice)} such outputs)")
        elif never:
            g.record(name, False, f"output {never[0]} is written by no worker "
                     f"({len(never)} such outputs)")
        elif max(sizes) - min(sizes) > 1:
            g.record(name, False, f"sizes {min(sizes)} to {max(sizes)}: the largest worker "
                     f"finishes last while others idle; make them differ by at most one")
        else:
            g.record(name, True)
    return g.finish()


def check_answer_fma_per_global_load(value, verbose: bool = True) -> bool:
    """Grade ``B_M B_N / (B_M + B_N)`` for ``B_M = B_N = 64``."""
    g = Grade("answer_fma_per_global_load", verbose)
    g.answer("FMAs per global load for a 64 x 64 block tile", value, 64 * 64 / (64 + 64),
             rtol=1e-6)
    return g.finish()
