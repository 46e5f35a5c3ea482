"""What every grader shares: run the learner's code, compare, say what differs.

A grade is a list of named checks. Each check either agrees or carries one
line that says what differs (which entry, your value, the expected value), so
a learner sees where to look instead of a bare ``False``.
"""
from __future__ import annotations

import traceback

import numpy as np


class Grade:
    """Collects the checks of one exercise and prints them as they come."""

    def __init__(self, exercise: str, verbose: bool = True):
        self.exercise = exercise
        self.verbose = verbose
        self.results: list[tuple[str, bool, str]] = []

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        self.results.append((name, bool(ok), detail))
        if self.verbose:
            mark = "ok  " if ok else "DIFF"
            print(f"  [{mark}] {name}" + (f": {detail}" if detail else ""))
        return bool(ok)

    def call(self, name: str, fn, *args, **kwargs):
        """Run the learner's function; an exception becomes a failed check
        (with the last line of its traceback) instead of stopping the grader."""
        try:
            return True, fn(*args, **kwargs)
        except Exception as e:  # the learner's code may raise anything
            last = traceback.format_exception_only(type(e), e)[-1].strip()
            self.record(name, False, f"your function raised {last}")
            return False, None

    def compare(self, name: str, yours, expected, rtol: float = 1e-7,
                atol: float = 1e-9) -> bool:
        """Agree when shapes match and ``|yours - expected| <= atol + rtol |expected|``
        everywhere; otherwise say the worst entry."""
        expected = np.asarray(expected)
        try:
            yours = np.asarray(yours, dtype=np.result_type(expected.dtype, np.float64)
                               if expected.dtype.kind == "f" else None)
        except (TypeError, ValueError) as e:
            return self.record(name, False, f"could not read your result as an array ({e})")
        if yours.shape != expected.shape:
            return self.record(name, False, f"shape {yours.shape}, expected {expected.shape}")
        if expected.dtype.kind in "biu":
            bad = np.argwhere(yours != expected)
            if len(bad):
                i = tuple(int(k) for k in bad[0])
                return self.record(name, False, f"{len(bad)} entries differ, first at {i}: "
                                   f"yours {yours[i]}, expected {expected[i]}")
            return self.record(name, True)
        if not np.all(np.isfinite(yours)):
            i = tuple(np.argwhere(~np.isfinite(yours))[0])
            return self.record(name, False, f"non-finite value {yours[i]} at {i}")
        err = np.abs(yours - expected) - (atol + rtol * np.abs(expected))
        if yours.size and err.max() > 0:
            i = np.unravel_index(np.argmax(err), err.shape)
            n_bad = int((err > 0).sum())
            return self.record(name, False, f"{n_bad} of {yours.size} entries differ; worst at "
                               f"{tuple(int(k) for k in i)}: yours {yours[i]:.6g}, "
                               f"expected {expected[i]:.6g}")
        return self.record(name, True)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(ok for _, ok, _ in self.results)

    def finish(self) -> bool:
        if self.verbose:
            n_ok = sum(ok for _, ok, _ in self.results)
            verdict = "passed" if self.passed else "not yet"
            print(f"{self.exercise}: {verdict} ({n_ok}/{len(self.results)} checks agree)")
        return self.passed
