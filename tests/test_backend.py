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


def _malloc_tuned_in_subprocess(env_value):
    import os
    import subprocess
    import sys
    env = dict(os.environ)
    env.pop("MINIMASK_MALLOPT", None)
    if env_value is not None:
        env["MINIMASK_MALLOPT"] = env_value
    out = subprocess.run([sys.executable, "-c", "import minimask; print(minimask.MALLOC_TUNED)"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_malloc_tuning_applies_on_glibc_and_can_be_switched_off():
    import platform
    assert _malloc_tuned_in_subprocess("0") == "False"
    expected = "True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False"
    assert _malloc_tuned_in_subprocess(None) == expected
