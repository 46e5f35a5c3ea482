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

``check_winograd_f23(fn)``
    ``fn(d, g) -> (y0, y1)``: the two outputs of the 3-tap correlation of
    ``d`` (4 numbers) with ``g`` (3 numbers), ``y0 = d0 g0 + d1 g1 + d2 g2``
    and ``y1 = d1 g0 + d2 g1 + d3 g2``, with Winograd's F(2, 3): at most 4
    multiplies of one input-dependent number by another. The grader passes
    numbers that count those multiplies (numpy object arrays of them: index
    them, or use ``@`` with ``winograd.transform_matrices``-style constant
    matrices); multiplying or dividing by a constant such as 1/2 is free, as
    it is once per filter in a layer.
"""
from __future__ import annotations

import numpy as np

from minimask._cuda import blocks_for
from minimask.exercises._grading import Grade

__all__ = ["check_launch_grid", "check_output_partition", "check_answer_fma_per_global_load",
           "check_winograd_f23"]


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


class _Counted:
    """A number for ``check_winograd_f23``: it carries its value, whether it
    depends on the grader's inputs (``varies``), and a shared counter of the
    multiplies (and divisions) of two such numbers. Constants mix in freely."""

    __slots__ = ("value", "varies", "counter")

    def __init__(self, value, varies, counter):
        self.value, self.varies, self.counter = float(value), varies, counter

    def _other(self, other):
        if isinstance(other, _Counted):
            return other
        if isinstance(other, (int, float, np.integer, np.floating)):
            return _Counted(other, False, self.counter)
        return None

    def _combine(self, other, op, counts):
        other = self._other(other)
        if other is None:
            return NotImplemented
        if counts and self.varies and other.varies:
            self.counter[0] += 1
        return _Counted(op(self.value, other.value), self.varies or other.varies, self.counter)

    def __add__(self, o):
        return self._combine(o, lambda a, b: a + b, False)

    def __radd__(self, o):
        return self._combine(o, lambda a, b: b + a, False)

    def __sub__(self, o):
        return self._combine(o, lambda a, b: a - b, False)

    def __rsub__(self, o):
        return self._combine(o, lambda a, b: b - a, False)

    def __mul__(self, o):
        return self._combine(o, lambda a, b: a * b, True)

    def __rmul__(self, o):
        return self._combine(o, lambda a, b: b * a, True)

    def __truediv__(self, o):
        return self._combine(o, lambda a, b: a / b, True)

    def __rtruediv__(self, o):
        return self._combine(o, lambda a, b: b / a, True)

    def __neg__(self):
        return _Counted(-self.value, self.varies, self.counter)

    def __pos__(self):
        return self

    def __float__(self):
        raise TypeError("the grader's numbers count your multiplies: use + - * / (and @ on "
                        "arrays of them), not float(), math functions or a float dtype")

    def __repr__(self):
        return f"{self.value!r}"


def _plain(value):
    """A result of the learner's function as a float (``None`` if it is not one)."""
    if isinstance(value, _Counted):
        return value.value
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def check_winograd_f23(fn, verbose: bool = True) -> bool:
    """Grade ``fn(d, g) -> (y0, y1)``: the 3-tap correlation's two outputs
    with at most 4 multiplies (Winograd's F(2, 3))."""
    g = Grade("winograd_f23", verbose)
    rng = np.random.default_rng(23)
    cases = [([1.0, 2.0, 3.0, 4.0], [1.0, 0.0, -1.0]),     # small integers: easy to follow by hand
             ([0.0, 0.0, 5.0, 0.0], [2.0, 3.0, 7.0])]
    cases += [(rng.normal(size=4), rng.normal(size=3)) for _ in range(3)]
    most = 0
    for k, (d, w) in enumerate(cases):
        d, w = np.asarray(d, dtype=np.float64), np.asarray(w, dtype=np.float64)
        name = f"d = {np.round(d, 3).tolist()}, g = {np.round(w, 3).tolist()}"
        counter = [0]
        d_in = np.array([_Counted(v, True, counter) for v in d], dtype=object)
        g_in = np.array([_Counted(v, True, counter) for v in w], dtype=object)
        ok, result = g.call(name, fn, d_in, g_in)
        if not ok:
            continue
        try:
            values = [_plain(v) for v in result]
        except TypeError:
            values = [None]
        if len(values) != 2 or any(v is None for v in values):
            g.record(name, False, f"return the two outputs (y0, y1) as numbers, got {result!r:.80}")
            continue
        expected = [d[0] * w[0] + d[1] * w[1] + d[2] * w[2],
                    d[1] * w[0] + d[2] * w[1] + d[3] * w[2]]
        g.compare(name, values, expected, rtol=1e-12, atol=1e-12)
        most = max(most, counter[0])
    if g.results and all(ok for _, ok, _ in g.results):
        ok = most <= 4
        g.record("multiplies of an input by an input, per call", ok,
                 f"{most}" if ok else f"{most}; F(2, 3) needs only 4 (m0 .. m3). The sums and "
                 "halves of g are free here: a layer computes them once per filter")
    return g.finish()
