"""Shared fixtures: the backend parametrisation and the Hypothesis profile.

The ``backend`` fixture runs a test once per backend. ``"cuda"`` is added
only where kernels can run - on a GPU, or under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1`` set before Numba is imported, as
``tests/run_all.sh`` does in its own pytest run) - and carries the ``cuda``
mark, so ``-m cuda`` selects exactly those cases and ``-m "not cuda"`` the
rest. It is never generated-then-skipped.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import minimask
from minimask._cuda import cuda_available

# the test run owns its process: passive OpenMP waiting and malloc tuning, as the CLI
minimask.configure_process()

# JIT compilation on a first call breaks any per-example deadline.
settings.register_profile(
    "default", deadline=None, max_examples=25, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "thorough", parent=settings.get_profile("default"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

BACKEND_PARAMS = [pytest.param("numpy", id="numpy"), pytest.param("cpu", id="cpu")]
FAST_BACKEND_PARAMS = [pytest.param("cpu", id="cpu")]
if cuda_available():
    BACKEND_PARAMS.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    FAST_BACKEND_PARAMS.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """Run the test body on each backend in turn."""
    with minimask.using_backend(request.param):
        yield request.param


@pytest.fixture(params=FAST_BACKEND_PARAMS)
def fast_backend(request):
    """Each backend other than the NumPy reference (for parity tests)."""
    yield request.param


@pytest.fixture(autouse=True)
def _restore_backend():
    before = minimask.get_backend()
    yield
    minimask.set_backend(before)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def one_rank():
    """``MINIMASK_RANKS=1`` for a whole module: ``python -m minimask train``
    (in this process or a subprocess) trains in one process instead of
    launching MPI ranks, for tests of the single-process path;
    tests/test_distributed.py covers the ranks."""
    before = os.environ.get("MINIMASK_RANKS")
    os.environ["MINIMASK_RANKS"] = "1"
    yield
    if before is None:
        os.environ.pop("MINIMASK_RANKS", None)
    else:
        os.environ["MINIMASK_RANKS"] = before
