"""Graders for the chapters' "your turn" exercises.

Each chapter has a module here (``ch01.py``, ``ch02.py``, ...) with one
``check_<name>(your_function)`` per exercise. A grader calls the learner's
function on inputs it makes itself, compares the result with minimask's own
implementation (a value comparison or a gradient check), prints what agrees
and what differs, and returns ``True`` only when everything agrees::

    from minimask.exercises import check_bilinear_weights
    check_bilinear_weights(my_bilinear_weights)

Every ``check_*`` of every chapter module is importable from this package,
and so is ``grade(check, your_function)``, which the chapters use: it says
"not attempted yet" for a function that still raises ``NotImplementedError``
instead of stopping the chapter.
"""
from __future__ import annotations

import importlib
import pkgutil

from minimask.exercises._grading import NotAttempted, grade

__all__: list[str] = ["NotAttempted", "grade"]

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("ch"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in getattr(_module, "__all__", dir(_module)):
        if _name.startswith("check_"):
            globals()[_name] = getattr(_module, _name)
            __all__.append(_name)
