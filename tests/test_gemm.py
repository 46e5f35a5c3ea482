"""The tiled CUDA GEMM: parity with NumPy for every transpose combination,
sizes that are not multiples of the tile, several tiles and K slices, and the
input checks.

The kernel cases carry the ``cuda`` mark: they run in the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cuda tests/test_gemm.py``) and
on a GPU. The simulator runs each of the 256 threads of a block as a Python
thread, so there the matrices are tiny.
"""
import numpy as np
import pytest

from minimask._cuda import cuda_available
from minimask.layers import gemm as gemm_module
from minimask.layers.gemm import BK, BM, BN, gemm, gemm_reference
from tests.conftest import SIMULATED

needs_cuda = [pytest.mark.cuda,
              pytest.mark.skipif(not cuda_available(), reason="no GPU and no CUDA simulator")]

TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]
DTYPES = [np.float32, np.float64]


def _operands(rng, M, K, N, trans_a, trans_b, dtype):
    """a and b as stored, so that op(a) is (M, K) and op(b) is (K, N)."""
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
    return a, b


def _assert_close(got, a, b, trans_a, trans_b, what):
    """Error bound of a K-term dot product: |got - exact| <= c K eps sum|a_k b_k|
    (the standard gamma_K bound, c = 4 for slack). The exact value is taken
    in float64 (for float64 inputs that reference has the same bound, hence
    the factor 2 folded into c)."""
    op_a = (a.T if trans_a else a).astype(np.float64)
    op_b = (b.T if trans_b else b).astype(np.float64)
    exact = op_a @ op_b
    K = op_a.shape[1]
    eps = np.finfo(a.dtype).eps
    bound = 4 * max(K, 1) * eps * (np.abs(op_a) @ np.abs(op_b)) + 1e-30
    got = np.asarray(got)
    assert got.shape == exact.shape, (what, got.shape, exact.shape)
    assert got.dtype == a.dtype, (what, got.dtype)
    excess = np.abs(got - exact) - bound
    assert np.all(excess <= 0), (what, float(np.max(np.abs(got - exact))),
                                 np.unravel_index(np.argmax(excess), excess.shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a, trans_b", TRANSPOSES)
@pytest.mark.parametrize("cuda_param", [pytest.param("cuda", marks=needs_cuda)])
def test_gemm_small_odd_sizes(cuda_param, trans_a, trans_b, dtype):
    # 5 x 7 @ 7 x 3: every size below the tile and K below one slice.
    a, b = _operands(np.random.default_rng(0), 5, 7, 3, trans_a, trans_b, dtype)
    got = gemm(a, b, trans_a=trans_a, trans_b=trans_b)
    _assert_close(got, a, b, trans_a, trans_b, f"5x7x3 {trans_a} {trans_b} {dtype.__name__}")


# Several tiles in M and N and several K slices, each with a ragged edge.
MULTI_TILE = (BM + 3, 2 * BK + 1, BN + 1)
MULTI_TILE_CASES = ([(MULTI_TILE, False, False, np.float32),
                     (MULTI_TILE, True, True, np.float64)] if SIMULATED else
                    [((M, K, N), ta, tb, dt)
                     for (M, K, N) in [MULTI_TILE, (300, 200, 150), (1, 1000, 257), (513, 3, 1)]
                     for ta, tb in TRANSPOSES for dt in DTYPES])


@pytest.mark.parametrize("cuda_param", [pytest.param("cuda", marks=needs_cuda)])
def test_gemm_several_tiles(cuda_param):
    rng = np.random.default_rng(1)
    for (M, K, N), trans_a, trans_b, dtype in MULTI_TILE_CASES:
        a, b = _operands(rng, M, K, N, trans_a, trans_b, dtype)
        got = gemm(a, b, trans_a=trans_a, trans_b=trans_b)
        _assert_close(got, a, b, trans_a, trans_b,
                      f"{M}x{K}x{N} {trans_a} {trans_b} {np.dtype(dtype).name}")


@pytest.mark.parametrize("cuda_param", [pytest.param("cuda", marks=needs_cuda)])
def test_gemm_empty_k_gives_zeros_and_out_is_written(cuda_param):
    from numba import cuda
    a = np.zeros((3, 0))
    b = np.zeros((0, 2))
    got = gemm(a, b)
    np.testing.assert_array_equal(got, np.zeros((3, 2)))

    rng = np.random.default_rng(2)
    a, b = _operands(rng, 4, 3, 2, False, True, np.float32)
    out = cuda.to_device(np.full((4, 2), np.nan, dtype=np.float32))
    returned = gemm(a, b, out=out, trans_b=True)
    assert returned is out
    _assert_close(out.copy_to_host(), a, b, False, True, "out=")


def test_gemm_reference_is_numpy_matmul():
    rng = np.random.default_rng(3)
    for trans_a, trans_b in TRANSPOSES:
        a, b = _operands(rng, 4, 5, 6, trans_a, trans_b, np.float64)
        expected = (a.T if trans_a else a) @ (b.T if trans_b else b)
        np.testing.assert_array_equal(gemm_reference(a, b, trans_a, trans_b), expected)


def test_tile_constants_fit_together():
    # Each thread copies a whole number of elements of each slice, and the
    # micro-tiles cover the block tile exactly.
    assert gemm_module.THREADS == (BM // gemm_module.TM) * (BN // gemm_module.TN)
    assert gemm_module.A_LOADS * gemm_module.THREADS == BM * BK
    assert gemm_module.B_LOADS * gemm_module.THREADS == BK * BN


@pytest.mark.parametrize("kwargs, message", [
    (dict(a=np.zeros((2, 3)), b=np.zeros((4, 2))), "inner sizes differ"),
    (dict(a=np.zeros((2, 3)), b=np.zeros((2, 4)), trans_b=True), "inner sizes differ"),
    (dict(a=np.zeros((2, 3)), b=np.zeros((3, 4)), trans_a=True),
     "inner sizes differ"),
    (dict(a=np.zeros(3), b=np.zeros((3, 2))), "a must have 2 dimensions"),
    (dict(a=np.zeros((2, 3)), b=np.zeros((3, 2, 1))), "b must have 2 dimensions"),
    (dict(a=np.zeros((2, 3), dtype=np.int32), b=np.zeros((3, 2))), "a must be float32"),
    (dict(a=np.zeros((2, 3), dtype=np.float32), b=np.zeros((3, 2))),
     "b must have the dtype of a"),
])
def test_gemm_refuses_bad_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gemm(**kwargs)
