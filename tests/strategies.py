"""Hypothesis strategies shared by the test modules.

Sizes are small on purpose: gradient checks cost one forward pass per input
element, and the CUDA simulator runs one Python thread per CUDA thread. Set
``tiny=True`` for cases that run in the simulator.
"""
import numpy as np
from hypothesis import strategies as st

from tests.conftest import SIMULATED


def dims(lo=1, hi=6):
    """A small dimension; odd sizes included."""
    return st.integers(lo, hi)


@st.composite
def arrays(draw, shape, dtype=np.float64, lo=-2.0, hi=2.0, away_from=None, gap=1e-3):
    """A random array with entries in ``[lo, hi]`` drawn from a seeded
    generator (so Hypothesis shrinks the seed, not each value). With
    ``away_from`` set, entries within ``gap`` of that value are pushed away:
    ReLU at 0, max-pool ties and the like are kinks a centred difference
    straddles."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    a = rng.uniform(lo, hi, size=shape)
    if away_from is not None:
        close = np.abs(a - away_from) < gap
        a[close] = away_from + np.where(a[close] >= away_from, gap, -gap) * 2
    return a.astype(dtype)


def seeds():
    return st.integers(0, 2**32 - 1)


def tiny_or(n_normal, n_tiny=2):
    """Upper bound for a dimension: smaller under the CUDA simulator."""
    return n_tiny if SIMULATED else n_normal
