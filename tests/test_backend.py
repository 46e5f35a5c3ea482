import pytest

import minimask


def test_default_backend_is_cpu():
    assert minimask.get_backend() in minimask.BACKENDS


def test_using_backend_restores_on_error():
    before = minimask.get_backend()
    with pytest.raises(RuntimeError):
        with minimask.using_backend("numpy"):
            assert minimask.get_backend() == "numpy"
            raise RuntimeError("boom")
    assert minimask.get_backend() == before


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        minimask.set_backend("tpu")


def _run_python(code, env_value=None, **extra_env):
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("MINIMASK_MALLOPT", "OMP_WAIT_POLICY")}
    if env_value is not None:
        env["MINIMASK_MALLOPT"] = env_value
    env.update(extra_env)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_import_changes_nothing_outside_minimask():
    # no environment variable, no malloc tuning: those belong to configure_process()
    code = ("import os; import minimask; "
            "print(minimask.MALLOC_TUNED, os.environ.get('OMP_WAIT_POLICY'))")
    assert _run_python(code) == "False None"


def test_configure_process_sets_passive_waiting_unless_the_user_chose():
    code = ("import os, minimask; r = minimask.configure_process(); "
            "print(os.environ['OMP_WAIT_POLICY'], r['omp_wait_policy'], r['omp_already_started'])")
    assert _run_python(code) == "passive passive False"
    assert _run_python(code, OMP_WAIT_POLICY="active") == "active active False"


def test_malloc_tuning_applies_on_glibc_and_can_be_switched_off():
    import platform
    code = ("import minimask; r = minimask.configure_process(); "
            "print(minimask.MALLOC_TUNED, r['malloc_tuned'])")
    assert _run_python(code, "0") == "False False"
    expected = "True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False"
    assert _run_python(code) == f"{expected} {expected}"


def test_the_command_line_configures_its_process():
    code = ("import os, minimask, minimask.__main__ as cli; cli.main([]); "
            "print(os.environ.get('OMP_WAIT_POLICY'), minimask.MALLOC_TUNED)")
    import platform
    tuned = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert _run_python(code).splitlines()[-1] == f"passive {tuned}"


def test_configure_process_avoids_an_openmp_runtime_started_by_someone_else():
    # libgomp loaded first (as torch does): its wait policy is fixed, so
    # configure_process() asks Numba for the workqueue layer, which sleeps
    code = ("import ctypes, numpy as np, numba; ctypes.CDLL('libgomp.so.1'); "
            "import minimask; r = minimask.configure_process(); "
            "from minimask.layers import relu_forward; relu_forward(np.ones((1, 2, 4, 4), np.float32)); "
            "print(r['omp_already_started'], r['numba_threading_layer'], numba.threading_layer())")
    assert _run_python(code) == "True workqueue workqueue"
    # the user's choice wins
    assert _run_python(code.replace("True workqueue", ""), NUMBA_THREADING_LAYER="omp").split() == \
        ["True", "None", "omp"]
    # nothing loaded before: OpenMP with passive waiting, Numba's own choice
    code = ("import numpy as np, numba, minimask; r = minimask.configure_process(); "
            "from minimask.layers import relu_forward; relu_forward(np.ones((1, 2, 4, 4), np.float32)); "
            "print(r['omp_already_started'], r['numba_threading_layer'], numba.threading_layer())")
    assert _run_python(code) == "False None omp"
