"""What every grader shares: run the learner's code, compare, say what differs.

A grade is a list of named checks. Each check either agrees or carries one
line that says what differs (which entry, your value, the expected value), so
a learner sees where to look instead of a bare ``False``.
"""
from __future__ import annotations

import traceback

import numpy as np

from minimask.gradcheck import numerical_gradient, rel_error


class NotAttempted(Exception):
    """The learner's function still raises ``NotImplementedError`` (or an
    answer is still ``None``): the skeleton as handed out."""

    def __init__(self, exercise: str, why: str = "your function raises NotImplementedError"):
        super().__init__(f"{exercise}: not attempted yet ({why})")
        self.exercise = exercise


def grade(check, your_function, **kwargs):
    """Run ``check(your_function)``, the way a chapter calls a grader.

    A function that still raises ``NotImplementedError`` (the skeleton as
    handed out) prints "not attempted yet" and gives ``None`` instead of
    stopping the chapter, so every chapter runs top to bottom before the
    learner has written a line. Otherwise returns what the grader returns:
    ``True`` when every check agrees, ``False`` when one differs.
    """
    try:
        return check(your_function, **kwargs)
    except NotAttempted as e:
        print(e)
        return None


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
        (with the last line of its traceback) instead of stopping the grader.
        ``NotImplementedError``, the untouched skeleton, raises
        ``NotAttempted`` instead, which ``grade`` turns into "not attempted yet"."""
        try:
            return True, fn(*args, **kwargs)
        except NotImplementedError:
            # the skeleton as handed out: nothing to grade yet (see ``grade``)
            raise NotAttempted(self.exercise) from None
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

    def gradient(self, name: str, f, x: np.ndarray, yours, dout: np.ndarray,
                 tol: float = 1e-6, h: float = 1e-6) -> bool:
        """Gradient check: ``yours`` against centred differences of
        ``sum(f() * dout)`` with respect to ``x`` (``f`` takes no arguments
        and reads ``x``, which is perturbed in place and restored; use
        float64 and a random ``dout``). Agrees when the relative error
        (``minimask.gradcheck.rel_error``) is below ``tol``."""
        numeric = numerical_gradient(f, x, dout, h=h)
        try:
            yours = np.asarray(yours, dtype=np.float64)
        except (TypeError, ValueError) as e:
            return self.record(name, False, f"could not read your gradient as an array ({e})")
        if yours.shape != numeric.shape:
            return self.record(name, False, f"shape {yours.shape}, expected {numeric.shape}")
        if not np.all(np.isfinite(yours)):
            return self.record(name, False, "your gradient has non-finite values")
        err = rel_error(yours, numeric)
        if err < tol:
            return self.record(name, True, f"relative error {err:.1e} against centred differences")
        i = np.unravel_index(np.argmax(np.abs(yours - numeric)), numeric.shape)
        return self.record(name, False, f"relative error {err:.1e} against centred differences; "
                           f"worst at {tuple(int(k) for k in i)}: yours {yours[i]:.6g}, "
                           f"numerical {numeric[i]:.6g}")

    def answer(self, name: str, yours, expected: float, rtol: float = 1e-3) -> bool:
        """A numeric answer: agrees within ``rtol`` (relative). ``None`` (the
        blank as handed out) is not attempted yet (see ``grade``)."""
        if yours is None:
            raise NotAttempted(self.exercise, "your answer is still None")
        try:
            value = float(yours)
        except (TypeError, ValueError):
            return self.record(name, False, f"your answer {yours!r} is not a number")
        if not np.isfinite(value):
            return self.record(name, False, f"your answer {value} is not finite")
        ok = abs(value - expected) <= rtol * abs(expected)
        return self.record(name, ok, "" if ok else f"yours {value:.6g} is not it "
                           f"(within {rtol:.0e} relative)")

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(ok for _, ok, _ in self.results)

    def finish(self) -> bool:
        if self.verbose:
            n_ok = sum(ok for _, ok, _ in self.results)
            verdict = "passed" if self.passed else "not yet"
            print(f"{self.exercise}: {verdict} ({n_ok}/{len(self.results)} checks agree)")
        return self.passed
