r"""A tiled matrix multiply for the GPU: the FLOPs of every convolution.

    C = op(A) @ op(B),   op(X) = X or X^T,   C is (M, N), the shared size K

The convolutions (``minimask.layers.conv``) turn each layer into one GEMM
after ``im2col``. Their forward needs ``A @ B``, the weight gradient
``A @ B^T`` and the input gradient ``A^T @ B``, so the kernel reads either
operand as stored or transposed, without making a transposed copy.

The plan of the kernel
----------------------
A naive kernel (one thread per element of C, reading a row of A and a column
of B from global memory) is limited by memory traffic, not arithmetic. Two
levels of reuse fix that:

1. Shared-memory tiles. A block of ``THREADS = 256`` threads owns a
   ``BM x BN = 128 x 128`` tile of C. It walks over K in steps of ``BK = 8``:
   each step the block copies a ``BM x BK`` slice of op(A) and a ``BK x BN``
   slice of op(B) into shared memory (4 + 4 elements per thread), waits at a
   barrier, and then every element it loaded is used 128 times from shared
   memory instead of once from global memory.

2. Register blocking. Each thread computes a ``TM x TN = 8 x 8`` micro-tile
   of C held in registers. For every k of the slice it reads 8 values of A and
   8 values of B from shared memory into registers and does 8 * 8 = 64
   multiply-adds: 16 shared loads per 64 FMAs instead of 2 per 1 with one
   output per thread. That ratio, not global memory, is what limits a
   16 x 16 tiled kernel.

Layout details, each chosen for a reason:

* The micro-tile is strided, not contiguous: thread ``(ty, tx)`` (``ty, tx``
  in ``0..15``) owns rows ``ty + 16 * i`` and columns ``tx + 16 * j`` of the
  block tile. In a warp, the 32 threads then read 16 consecutive addresses of
  the B slice (distinct banks) and 2 addresses of the A slice (broadcasts):
  no bank conflicts, and the final stores of C are coalesced across ``tx``.
* Both slices are kept in shared memory k-major, ``As[k, m]`` and
  ``Bs[k, n]``, so the inner loop indexes them the same way. Each row is
  padded by ``PAD = 4`` elements: the threads that store a row-major A
  (``A`` not transposed, read 8 consecutive k per row) or a transposed B
  then hit 32 different banks instead of 2 threads per bank.
* Global loads follow the memory layout of each operand: consecutive
  threads read consecutive addresses of A (or B), whichever of its two
  indices is the contiguous one, so loads coalesce in all four transpose
  combinations.
* Tails: a block at the edge of C, or the last K slice, loads zeros for
  elements past ``M``, ``N`` or ``K`` (zeros do not change the sum) and skips
  the stores past ``M`` and ``N``. Both barriers are reached by every thread:
  only the loads and the stores sit behind bounds checks.
* The transpose flags and the dtype are compile-time constants: ``_kernel``
  builds (and keeps) one kernel per combination, since
  ``cuda.shared.array`` needs its dtype at compile time, and a constant flag
  lets the compiler drop the unused branch of the loads.

Registers (ptxas for sm_90, checked by compiling to PTX without a GPU):
float32 uses 154 registers unbounded, i.e. one block (8 warps) per SM; the
kernel asks for ``launch_bounds=(256, 2)`` so two blocks fit, at the cost of
4-32 bytes of spill outside the inner loop. float64 uses 210-227 registers
and no spills. Whether two blocks beat one is for the H100 benchmark to say.

Shared memory per block: ``2 * BK * (128 + PAD)`` elements, 8.4 KB in float32
(16.9 KB in float64): registers, not shared memory, bound the blocks per SM.

The tile sizes are module constants; ``THREADS`` follows from them and the
loads assume each thread copies a whole number of elements per slice.
"""
from __future__ import annotations

import numpy as np

from minimask import _cuda
from minimask._checks import check_float_array, check_same_dtype, is_device_array
from minimask._cuda import cuda

BM = 128   # rows of C per block
BN = 128   # columns of C per block
BK = 8     # depth of one shared-memory slice
TM = 8     # rows of C per thread
TN = 8     # columns of C per thread
if _cuda.SIMULATED:
    # The simulator runs each thread in Python: the same kernel with 32 x 32
    # tiles of 4 x 4 micro-tiles (64 threads) keeps a model step quick there,
    # and tiny test matrices then span several tiles, so the edge handling is
    # exercised too. A GPU always gets the sizes above.
    BM, BN, TM, TN = 32, 32, 4, 4
PAD = 4    # padding of each shared row (see the plan above)

THREADS = (BM // TM) * (BN // TN)   # 256 threads per block (64 simulated)
A_LOADS = BM * BK // THREADS        # elements of the A slice each thread copies
B_LOADS = BK * BN // THREADS
ROW_STEP = BM // TM                 # stride between the rows a thread owns
COL_STEP = BN // TN
A_ROW = BM + PAD                    # padded row lengths of the shared slices
B_ROW = BN + PAD                    # (literal constants: shared shapes must be)

assert BM % TM == 0 and BN % TN == 0
assert (BM * BK) % THREADS == 0 and (BK * BN) % THREADS == 0


def gemm_reference(a, b, trans_a=False, trans_b=False):
    """``op(a) @ op(b)`` with NumPy: what ``gemm`` must return."""
    a = np.asarray(a)
    b = np.asarray(b)
    return (a.T if trans_a else a) @ (b.T if trans_b else b)


# --------------------------------------------------------------------------
# CUDA kernel, built once per (dtype, trans_a, trans_b)
# --------------------------------------------------------------------------

_KERNELS = {}


def _build_kernel(dtype, trans_a, trans_b):
    import numba
    nb_dtype = numba.from_dtype(np.dtype(dtype))
    # float32: ask for two resident blocks per SM (caps registers at 128; see
    # the plan). float64 needs 128 registers for the accumulators alone.
    bounds = (THREADS, 2) if nb_dtype == numba.float32 else THREADS
    # The simulator's jit takes no launch bounds (it has no registers).
    options = {} if numba.config.ENABLE_CUDASIM else {"launch_bounds": bounds}

    @cuda.jit(**options)
    def gemm_kernel(a, b, c, M, N, K):
        As = cuda.shared.array((BK, A_ROW), nb_dtype)
        Bs = cuda.shared.array((BK, B_ROW), nb_dtype)
        acc = cuda.local.array((TM, TN), nb_dtype)
        a_reg = cuda.local.array(TM, nb_dtype)
        b_reg = cuda.local.array(TN, nb_dtype)

        t = cuda.threadIdx.x
        tx = t % COL_STEP
        ty = t // COL_STEP
        m0 = cuda.blockIdx.y * BM
        n0 = cuda.blockIdx.x * BN

        for i in range(TM):
            for j in range(TN):
                acc[i, j] = 0

        for k0 in range(0, K, BK):
            # Copy the A slice: element (m, k) of op(A) into As[k, m].
            for q in range(A_LOADS):
                e = t + q * THREADS
                if trans_a:      # a is (K, M): m is contiguous
                    kk = e // BM
                    mm = e % BM
                else:            # a is (M, K): k is contiguous
                    mm = e // BK
                    kk = e % BK
                gm = m0 + mm
                gk = k0 + kk
                v = nb_dtype(0)
                if gm < M and gk < K:
                    if trans_a:
                        v = a[gk, gm]
                    else:
                        v = a[gm, gk]
                As[kk, mm] = v
            # Copy the B slice: element (k, n) of op(B) into Bs[k, n].
            for q in range(B_LOADS):
                e = t + q * THREADS
                if trans_b:      # b is (N, K): k is contiguous
                    nn = e // BK
                    kk = e % BK
                else:            # b is (K, N): n is contiguous
                    kk = e // BN
                    nn = e % BN
                gn = n0 + nn
                gk = k0 + kk
                v = nb_dtype(0)
                if gn < N and gk < K:
                    if trans_b:
                        v = b[gn, gk]
                    else:
                        v = b[gk, gn]
                Bs[kk, nn] = v
            cuda.syncthreads()

            # 8 x 8 outer products from registers.
            for kk in range(BK):
                for i in range(TM):
                    a_reg[i] = As[kk, ty + i * ROW_STEP]
                for j in range(TN):
                    b_reg[j] = Bs[kk, tx + j * COL_STEP]
                for i in range(TM):
                    for j in range(TN):
                        acc[i, j] += a_reg[i] * b_reg[j]
            # Nobody overwrites the slices until everybody has used them.
            cuda.syncthreads()

        for i in range(TM):
            gm = m0 + ty + i * ROW_STEP
            if gm < M:
                for j in range(TN):
                    gn = n0 + tx + j * COL_STEP
                    if gn < N:
                        c[gm, gn] = acc[i, j]

    return gemm_kernel


def _kernel(dtype, trans_a, trans_b):
    key = (np.dtype(dtype), bool(trans_a), bool(trans_b))
    if key not in _KERNELS:
        _KERNELS[key] = _build_kernel(*key)
    return _KERNELS[key]


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def _shape_text(shape):
    return "(" + ", ".join(str(s) for s in shape) + ")"


def gemm(a, b, out=None, trans_a=False, trans_b=False):
    """Matrix product on the GPU, ``out = op(a) @ op(b)``.

    Inputs:
    - a: (M, K), or (K, M) with ``trans_a=True``; float32 or float64,
      C-contiguous; a host array (copied over) or a device array
    - b: (K, N), or (N, K) with ``trans_b=True``; the dtype of ``a``
    - out: optional (M, N) device array of that dtype to write into
    - trans_a, trans_b: read ``a`` / ``b`` transposed, without a copy

    Returns ``out`` (M, N): a device array if ``a`` is a device array or
    ``out`` was given, else a host array. ``K = 0`` gives zeros.
    Always runs the CUDA kernel (the simulator where there is no GPU),
    whatever the current backend.
    """
    a = check_float_array("a", a, ndim=2, what="(M, K)")
    b = check_float_array("b", b, ndim=2, what="(K, N)")
    check_same_dtype("b", b, "a", a)
    M, K = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
    K_b, N = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    if K != K_b:
        raise ValueError(f"inner sizes differ: op(a) is {_shape_text((M, K))} and "
                         f"op(b) is {_shape_text((K_b, N))}")
    d_a = _cuda.to_device(a)
    d_b = _cuda.to_device(b)
    d_out = None
    if out is not None:
        if not (is_device_array(out) or hasattr(out, "copy_to_host")):
            raise ValueError("out must be a device array")
        if tuple(out.shape) != (M, N):
            raise ValueError(f"out must have shape {_shape_text((M, N))}, "
                             f"got {_shape_text(out.shape)}")
        check_same_dtype("out", out, "a", a)
        d_out = out
    d_out = gemm_device(d_a, d_b, trans_a, trans_b, d_out)
    if out is not None:
        return d_out
    return _cuda.to_output(d_out, a)


def gemm_device(d_a, d_b, trans_a=False, trans_b=False, d_out=None):
    """``gemm`` without the checks, for callers that hold device arrays of
    matching shapes and dtype already (the convolutions). Returns the device
    array ``d_out`` (allocated when None)."""
    M = d_a.shape[1] if trans_a else d_a.shape[0]
    K = d_a.shape[0] if trans_a else d_a.shape[1]
    N = d_b.shape[0] if trans_b else d_b.shape[1]
    if d_out is None:
        d_out = cuda.device_array((M, N), dtype=d_a.dtype)
    if M and N:
        grid = (-(-N // BN), -(-M // BM))   # ceil-div: edge tiles are guarded
        _kernel(d_a.dtype, trans_a, trans_b)[grid, THREADS](d_a, d_b, d_out, M, N, K)
    return d_out
