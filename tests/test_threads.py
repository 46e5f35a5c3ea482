"""Threads by work size (minimask._threads) and minimask's BLAS call
(minimask._blas): the rule picks serial for small work and parallel for
large, and the serial and parallel kernels give the same numbers."""
import numba
import numpy as np
import pytest

import minimask
from minimask import _blas, _threads
from minimask._threads import ParallelKernel
from minimask.layers import (conv2d_backward, conv2d_forward, conv_transpose2d_backward,
                             conv_transpose2d_forward, frozen_bn_backward, frozen_bn_forward,
                             group_norm_backward, group_norm_forward, mask_bce_backward,
                             mask_bce_forward, max_pool2d_backward, max_pool2d_forward,
                             relu_backward, relu_forward, roi_align_backward,
                             roi_align_forward, sigmoid_backward, sigmoid_focal_loss_backward,
                             sigmoid_focal_loss_forward, sigmoid_forward, smooth_l1_backward,
                             smooth_l1_forward, upsample_nearest2d_backward,
                             upsample_nearest2d_forward)


@pytest.fixture
def thresholds():
    old = _threads.set_thresholds()
    yield _threads.set_thresholds
    _threads.set_thresholds(*old)


@pytest.fixture
def two_threads():
    """Two Numba threads, and the load check off: what the rule picks must
    not depend on what else the test machine runs."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("these tests need Numba to have at least 2 threads")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    aware = _threads.set_load_aware(False)
    yield
    _threads.set_load_aware(aware)
    numba.set_num_threads(old)


@pytest.fixture
def fake_load(monkeypatch):
    """``fake_load(others, cores)``: the load check sees ``others`` runnable
    tasks of other processes on ``cores`` cores."""
    def set_load(others, cores):
        monkeypatch.setattr(_threads, "_other_running_tasks", lambda: others)
        monkeypatch.setattr(_threads, "_our_cores", lambda: cores)
        _threads.set_load_aware(True)         # also forgets the last reading
    aware = _threads.set_load_aware(True)
    yield set_load
    _threads.set_load_aware(aware)


def test_threads_now_leaves_the_cores_other_processes_use(fake_load):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.fail("this test needs Numba to have at least 2 threads")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        big = 2 * _threads.KERNEL_SERIAL_ELEMENTS
        fake_load(0, 2)                       # only us: both threads
        assert _threads.free_cores() == 2 and _threads.threads_now() == 2
        assert _threads.use_parallel(big) and _threads.gemm_threads(1e12) == 2
        fake_load(1, 2)                       # one busy process beside us: one thread
        assert _threads.free_cores() == 1 and _threads.threads_now() == 1
        assert not _threads.use_parallel(big) and _threads.gemm_threads(1e12) == 1
        fake_load(8, 2)                       # never fewer than one
        assert _threads.threads_now() == 1
        fake_load(2, 8)                       # 8 cores, 2 others: still our 2 threads
        assert _threads.free_cores() == 6 and _threads.threads_now() == 2
        fake_load(None, 2)                    # unknown (not Linux): every thread
        assert _threads.free_cores() is None and _threads.threads_now() == 2
        _threads.set_load_aware(False)        # off: Numba's count whatever the load
        fake_load(5, 2)
        _threads.set_load_aware(False)
        assert _threads.threads_now() == 2
    finally:
        numba.set_num_threads(old)


def test_a_task_runnable_at_one_reading_only_does_not_cost_a_thread(fake_load, monkeypatch):
    fake_load(0, 2)
    monkeypatch.setattr(_threads, "LOAD_RECHECK_S", 0.0)       # every call reads
    readings = iter([0, 1, 0, 0, 1, 1, 1, 0])
    monkeypatch.setattr(_threads, "_other_running_tasks", lambda: next(readings))
    _threads.set_load_aware(True)
    seen = [_threads.free_cores() for _ in range(8)]
    # the least of the last three readings: one busy reading is ignored,
    # three in a row count; the first idle reading after them frees the core
    assert seen == [2, 2, 2, 2, 2, 2, 1, 2]


def test_the_load_is_read_at_most_every_recheck_interval(fake_load, monkeypatch):
    calls = []
    fake_load(0, 2)
    monkeypatch.setattr(_threads, "_other_running_tasks", lambda: calls.append(1) or 0)
    monkeypatch.setattr(_threads, "LOAD_RECHECK_S", 3600.0)
    _threads.set_load_aware(True)
    for _ in range(100):
        _threads.free_cores()
    assert len(calls) == 1


def test_other_running_tasks_leaves_out_our_own_threads():
    import sys
    import threading
    if not sys.platform.startswith("linux"):
        assert _threads._other_running_tasks() is None
        return
    baseline = [_threads._other_running_tasks() for _ in range(5)]
    assert all(isinstance(n, int) and n >= 0 for n in baseline)
    # a thread of ours kept running (BLAS releases the GIL): not another
    # process's load, so it must not raise the count
    stop = threading.Event()
    a = np.random.default_rng(0).standard_normal((300, 300))

    def work():
        while not stop.is_set():
            a @ a

    t = threading.Thread(target=work)
    t.start()
    try:
        busy_here = [_threads._other_running_tasks() for _ in range(5)]
    finally:
        stop.set()
        t.join()
    assert min(busy_here) <= max(baseline)


def test_rule_picks_serial_for_small_work_and_parallel_for_large(two_threads):
    kernel = minimask.layers.activations._relu_forward_cpu
    assert isinstance(kernel, ParallelKernel)
    small = np.ones(16, np.float32)
    n = _threads.KERNEL_SERIAL_ELEMENTS
    large = np.ones(n, np.float32)
    assert not kernel.picks_parallel(small, np.empty_like(small))
    assert kernel.picks_parallel(large, np.empty_like(large))
    # the work counts every array argument: n/2 elements in, n/2 out
    half = np.ones(n // 2, np.float32)
    assert kernel.picks_parallel(half, np.empty_like(half))
    assert not kernel.picks_parallel(half[:-1], np.empty_like(half[:-1]))


def test_rule_is_serial_on_one_thread(two_threads):
    kernel = minimask.layers.activations._relu_forward_cpu
    large = np.ones(4 * _threads.KERNEL_SERIAL_ELEMENTS, np.float32)
    numba.set_num_threads(1)
    assert not kernel.picks_parallel(large, np.empty_like(large))
    assert _threads.gemm_threads(1e12) == 1


def test_gemm_threads_by_flops(two_threads):
    assert _threads.gemm_threads(2.0 * 8 * 8 * 8) == 1
    assert _threads.gemm_threads(_threads.GEMM_SERIAL_FLOPS - 1) == 1
    assert _threads.gemm_threads(_threads.GEMM_SERIAL_FLOPS) == 2
    assert _threads.gemm_threads(2.0 * 256 * 2304 * 4096) == 2


def test_set_thresholds_returns_the_old_pair(thresholds):
    old = thresholds(10, 20.0)
    assert thresholds() == (10, 20.0)
    thresholds(*old)
    assert (_threads.KERNEL_SERIAL_ELEMENTS, _threads.GEMM_SERIAL_FLOPS) == old


def _every_layer(rng, dtype):
    """Run every layer of the "cpu" backend forward and backward once, at
    sizes where each kernel does a few thousand elements; returns every
    output and gradient, in order."""
    def r(*shape):
        return rng.standard_normal(shape).astype(dtype)
    results = []
    x = r(2, 6, 9, 11)
    for fwd, bwd, args in ((conv2d_forward, conv2d_backward, (r(5, 6, 3, 3), r(5), 2, 1)),
                           (conv2d_forward, conv2d_backward, (r(4, 6, 1, 1), None, 1, 0)),
                           (conv_transpose2d_forward, conv_transpose2d_backward,
                            (r(6, 3, 2, 2), r(3), 2, 0))):
        out, cache = fwd(x, *args)
        results += [out, *bwd(r(*out.shape), cache)]
    for fwd, bwd, args in ((relu_forward, relu_backward, ()),
                           (sigmoid_forward, sigmoid_backward, ()),
                           (upsample_nearest2d_forward, upsample_nearest2d_backward, (2,)),
                           (max_pool2d_forward, max_pool2d_backward, (3, 2, 1)),
                           (group_norm_forward, group_norm_backward, (1 + r(6), r(6), 3)),
                           (frozen_bn_forward, frozen_bn_backward,
                            (r(6), r(6), r(6), 1 + np.abs(r(6))))):
        out, cache = fwd(x, *args)
        results += [out, *[g for g in bwd(r(*out.shape), cache) if g is not None]]
    rois = np.array([[0, 1.0, 2.0, 30.0, 25.0], [1, 5.0, 0.5, 12.0, 40.0],
                     [0, 0.0, 0.0, 43.0, 35.0]])
    for mode in ("avg", "max"):
        out, cache = roi_align_forward(x, rois, 4, 0.25, 2, True, mode)
        results += [out, *[g for g in roi_align_backward(r(*out.shape), cache)
                           if g is not None]]
    logits = r(2, 300, 7)
    t = (rng.random(logits.shape) < 0.1).astype(dtype)
    loss, cache = sigmoid_focal_loss_forward(logits, t, weights=rng.random(logits.shape))
    results += [loss, *sigmoid_focal_loss_backward(np.array(1.5, dtype), cache)]
    pred, target = r(500, 4), r(500, 4)
    loss, cache = smooth_l1_forward(pred, target, weights=rng.random(pred.shape))
    results += [loss, *smooth_l1_backward(np.array(0.7, dtype), cache)]
    logits = r(6, 3, 8, 8)
    loss, cache = mask_bce_forward(logits, np.array([0, 2, 1, 1, 0, 2]),
                                   (rng.random((6, 8, 8)) < 0.5))
    results += [loss, *mask_bce_backward(np.array(1.0, dtype), cache)]
    return [np.asarray(v) for v in results if v is not None]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_serial_and_parallel_kernels_agree_on_every_layer(thresholds, two_threads, dtype):
    """Everything serial (threshold above any work) against everything
    parallel (threshold 0), same inputs. Element-wise kernels and the
    gathers give identical numbers; the loss sums (prange reductions) add
    in another order: 1e-6 relative in float32, 1e-13 in float64."""
    with minimask.using_backend("cpu"):
        thresholds(1 << 60, 1e30)
        serial = _every_layer(np.random.default_rng(0), dtype)
        thresholds(0, 0.0)
        parallel = _every_layer(np.random.default_rng(0), dtype)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert len(serial) == len(parallel) > 30
    for i, (a, b) in enumerate(zip(serial, parallel)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        scale = max(1.0, float(np.abs(a).max()) if a.size else 1.0)
        assert np.abs(a - b).max(initial=0.0) <= tol * scale, i


def test_every_parallel_kernel_runs_both_versions(thresholds, two_threads, monkeypatch):
    """The rule really switches: with threshold 0 every kernel the layers
    call runs its parallel version, with a huge one its serial version."""
    used = {"parallel": set(), "serial": set()}
    real_call = ParallelKernel.__call__

    def spy(self, *args):
        used["parallel" if self.picks_parallel(*args) else "serial"].add(self.__name__)
        return real_call(self, *args)

    monkeypatch.setattr(ParallelKernel, "__call__", spy)
    with minimask.using_backend("cpu"):
        thresholds(0, 0.0)
        _every_layer(np.random.default_rng(1), np.float32)
        thresholds(1 << 60, 1e30)
        _every_layer(np.random.default_rng(1), np.float32)
    assert used["parallel"] == used["serial"]
    assert len(used["parallel"]) >= 20


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_blas_gemm_matches_numpy(dtype, trans_a, trans_b, thresholds, two_threads):
    rng = np.random.default_rng(2)
    M, K, N = 37, 129, 53
    a = rng.standard_normal((K, M) if trans_a else (M, K)).astype(dtype)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(dtype)
    expect = (a.T if trans_a else a) @ (b.T if trans_b else b)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for flops in (1e30, 0.0):          # one thread, then all
        thresholds(None, flops)
        got = _blas.gemm(a, b, trans_a, trans_b)
        assert got.shape == (M, N) and got.dtype == dtype
        np.testing.assert_allclose(got, expect, rtol=tol, atol=tol * np.abs(expect).max())
        # into a strided view, and accumulating
        out = np.zeros((M, 2 * N), dtype)
        view = out[:, 3:3 + N]
        _blas.gemm(a, b, trans_a, trans_b, out=view)
        _blas.gemm(a, b, trans_a, trans_b, out=view, accumulate=True)
        np.testing.assert_allclose(view, 2 * expect, rtol=tol, atol=tol * np.abs(expect).max())
        assert not out[:, :3].any() and not out[:, 3 + N:].any()


def test_blas_info_says_what_runs():
    info = _blas.info()
    assert info["blas"] in ("scipy-openblas", "numpy")
    assert info["why"]


def test_minimask_blas_numpy_falls_back_to_numpys_matmul():
    import os
    import subprocess
    import sys
    code = ("import numpy as np; from minimask import _blas; "
            "a = np.arange(6.0).reshape(2, 3); b = np.arange(12.0).reshape(3, 4); "
            "assert np.array_equal(_blas.gemm(a, b), a @ b); "
            "assert np.array_equal(_blas.gemm(b, a, True, True), b.T @ a.T); "
            "print(_blas.info()['blas'], _blas.info()['why'])")
    env = {**os.environ, "MINIMASK_BLAS": "numpy"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "numpy MINIMASK_BLAS=numpy"


def test_a_parallel_kernel_shows_its_source():
    import inspect
    kernel = minimask.layers.activations._relu_forward_cpu
    source = inspect.getsource(kernel)
    assert "def _relu_forward_cpu(" in source and "prange" in source
    assert kernel.__name__ == "_relu_forward_cpu" and kernel.__module__.endswith("activations")


def test_a_large_multiply_gives_the_same_bits_on_one_and_two_threads(thresholds):
    """The load check may give a multiply 1 or 2 threads from one call to the
    next; the pieces are the same either way, so the result is too, bit for
    bit (resumed training is compared bit for bit)."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((96, 300)).astype(np.float32)
    b = rng.standard_normal((300, 1000)).astype(np.float32)
    assert 2.0 * 96 * 300 * 1000 >= _threads.GEMM_SERIAL_FLOPS
    one = _blas.gemm(a, b, threads=1)
    two = _blas.gemm(a, b, threads=2)
    assert np.array_equal(one, two)
    np.testing.assert_allclose(one, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["focal_loss._focal_forward_cpu", "mask_bce._mask_bce_forward_cpu",
                                  "smooth_l1._smooth_l1_forward_cpu"])
def test_loss_sums_pick_threads_without_the_load_check(name, fake_load, two_threads):
    """A loss kernel sums across its parallel loop: which version runs must
    not depend on the machine's load, or a loss would change in its last
    bits with it."""
    module, attr = name.split(".")
    kernel = getattr(getattr(minimask.layers, module), attr)
    assert kernel.reduces
    big = np.ones(4 * _threads.KERNEL_SERIAL_ELEMENTS, np.float32)
    work = kernel.work(big) if kernel.work is not None else 2 * big.size
    assert work >= _threads.KERNEL_SERIAL_ELEMENTS
    fake_load(5, 2)                                   # a busy machine
    assert _threads.threads_now() == 1                # the other kernels: one thread
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "work", lambda *args: work)
        assert kernel.picks_parallel(big)             # the loss kernel: still by work size


def _openblas_count_functions():
    _blas.info()                     # loads the state
    state = _blas._state
    if state["lib"] is None:
        pytest.skip(f"minimask's BLAS here is NumPy's ({state['why']}), not SciPy's OpenBLAS")
    get = state["lib"].scipy_openblas_get_num_threads
    get.restype = __import__("ctypes").c_int
    return state, get, state["set_local"]


@pytest.mark.parametrize("batch", [False, True], ids=["gemm", "gemm_batch"])
def test_every_openblas_call_runs_on_one_openblas_thread(batch, monkeypatch):
    """SciPy's OpenBLAS keeps one process-wide thread count (its
    ``openblas_set_num_threads_local`` is not thread-local), and its
    two-thread sgemm rounds differently from its one-thread sgemm. So every
    call minimask's threads make must see a count of 1 - even when a share
    on another thread has just finished - and the count a user had is back
    afterwards. (Setting and restoring it inside each share broke this:
    a training run's weights then depended on thread timing.)"""
    import ctypes
    import time
    state, get, set_count = _openblas_count_functions()
    seen = []
    real = state["sgemm"]

    def spy(*args):                  # wait, so the other thread's share ends meanwhile
        time.sleep(0.003)
        seen.append(get())
        return real(*args)

    proto = ctypes.CFUNCTYPE(None, *([ctypes.c_int] * 6), ctypes.c_float, ctypes.c_void_p,
                             ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_float,
                             ctypes.c_void_p, ctypes.c_int)
    spy_pointer = proto(spy)
    monkeypatch.setitem(_blas._state, "sgemm", spy)
    monkeypatch.setitem(_blas._state, "sgemm_ptr", spy_pointer)
    rng = np.random.default_rng(8)
    before = set_count(2)            # as a user (or SciPy) may have left it
    try:
        if batch:
            a = rng.standard_normal((8, 32, 64)).astype(np.float32)
            b = rng.standard_normal((8, 64, 96)).astype(np.float32)
            out = np.empty((8, 32, 96), np.float32)
            _blas.gemm_batch(a, b, out, threads=2)
            expect = np.einsum("kij,kjl->kil", a.astype(np.float64), b)
        else:
            a = rng.standard_normal((64, 200)).astype(np.float32)
            b = rng.standard_normal((200, 800)).astype(np.float32)
            out = _blas.gemm(a, b, threads=2)
            expect = a.astype(np.float64) @ b
        after = get()
    finally:
        set_count(before)
    assert len(seen) >= 4 and set(seen) == {1}, seen
    assert after == 2
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-4)


def test_threaded_multiplies_match_one_thread_bit_for_bit_after_openblas_was_set_to_two():
    """The whole effect, on results: with OpenBLAS's count left at 2 by
    someone else, a multiply and a batch on two of minimask's threads give
    exactly the one-thread bits, call after call."""
    state, get, set_count = _openblas_count_functions()
    rng = np.random.default_rng(9)
    a = rng.standard_normal((64, 96)).astype(np.float32)
    b = rng.standard_normal((96, 4096)).astype(np.float32)
    A = rng.standard_normal((16, 32, 64)).astype(np.float32)
    B = rng.standard_normal((16, 64, 392)).astype(np.float32)
    before = set_count(2)
    try:
        one = _blas.gemm(a, b, threads=1)
        one_batch = _blas.gemm_batch(A, B, np.empty((16, 32, 392), np.float32), threads=1)
        for _ in range(20):
            assert np.array_equal(_blas.gemm(a, b, threads=2), one)
            assert np.array_equal(
                _blas.gemm_batch(A, B, np.empty((16, 32, 392), np.float32), threads=2), one_batch)
    finally:
        set_count(before)


def test_the_pieces_of_a_multiply_do_not_follow_the_load(two_threads, monkeypatch):
    """A large multiply is cut into ``fixed_pieces`` pieces - at least
    Numba's thread count - whatever thread count the load check gives it."""
    cuts = []
    real = _threads.run_shares
    monkeypatch.setattr(_threads, "run_shares",
                        lambda share, n, threads, pieces=None: (cuts.append(pieces),
                                                                real(share, n, threads, pieces)))
    a = np.ones((64, 300), np.float32)
    b = np.ones((300, 1000), np.float32)
    for threads in (1, 2):
        _blas.gemm(a, b, threads=threads)
    assert cuts == [_threads.fixed_pieces(_blas.GEMM_PIECES)] * 2
    assert _threads.fixed_pieces(1) == numba.get_num_threads() == 2
    assert _threads.fixed_pieces(_blas.GEMM_PIECES) == max(_blas.GEMM_PIECES, 2)
