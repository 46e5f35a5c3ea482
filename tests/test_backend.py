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
