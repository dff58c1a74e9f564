"""Work in a child process: results come back, exceptions come back as errors, native crashes as
``ChildCrashed`` naming the signal and where, and the caller lives on."""

from __future__ import annotations

import numpy as np
import pytest

from medflow.isolation import FAULT_ENV, ChildCrashed, ChildFailed, run_isolated


def test_a_result_comes_back_from_the_child():
    assert run_isolated("medflow.isolation:signal_name", {"returncode": -11}) == "SIGSEGV"
    arrays = run_isolated("numpy:stack", {"arrays": [np.ones(3), np.zeros(3)]})
    assert arrays.shape == (2, 3) and arrays[0].sum() == 3


def test_an_exception_in_the_child_is_an_error_with_its_type():
    with pytest.raises(ChildFailed, match="TypeError") as info:
        run_isolated("medflow.isolation:signal_name", {"returncode": "eleven"})
    assert info.value.exc_type == "TypeError"


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGABRT", "SIGBUS"])
def test_a_native_crash_in_the_child_names_the_signal_and_the_caller_goes_on(monkeypatch, sig):
    monkeypatch.setenv(FAULT_ENV, f"medflow.isolation:signal_name={sig}")
    with pytest.raises(ChildCrashed) as info:
        run_isolated("medflow.isolation:signal_name", {"returncode": -11})
    assert info.value.signal_name == sig
    assert info.value.where == "_child (isolation.py)"  # faulthandler's innermost Python frame
    assert sig in str(info.value)
    # the hook names one target: another function in the same environment is untouched
    assert run_isolated("medflow.isolation:crash_site", {"dump": ""}) is None


def test_env_reaches_the_child_only(monkeypatch):
    monkeypatch.delenv("MEDFLOW_PROBE", raising=False)
    got = run_isolated("os:getenv", {"key": "MEDFLOW_PROBE"}, env={"MEDFLOW_PROBE": "child"})
    assert got == "child"
    import os

    assert os.environ.get("MEDFLOW_PROBE") is None


def test_a_hung_child_is_ended_at_the_timeout():
    with pytest.raises(ChildCrashed, match="timeout"):
        run_isolated("subprocess:run", {"args": ["sleep", "30"]}, timeout=2)


def test_a_streamed_child_logs_as_it_goes(capfd):
    assert run_isolated("logging:warning", {"msg": "half way"}, stream=True) is None
    err = capfd.readouterr().err
    assert "| child " in err and "root - half way" in err
    run_isolated("logging:warning", {"msg": "kept"})  # not streamed: kept for a failure's log
    assert "kept" not in capfd.readouterr().err
