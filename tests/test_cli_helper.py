"""conftest's `factory` in this interpreter (``invoke_cli``, what ``run_cli`` runs unless
FACTORY_TESTS_SUBPROCESS=1) says what a `factory` process says: the same help, one-line
errors and exit codes, stdout and stderr apart; a crash is a traceback on stderr; warnings
and logs go to the call's stderr; and the call leaves nothing of itself behind."""

import logging
import os
import sys
import warnings

import pytest

from conftest import invoke_cli, one_line_error, run_cli_process
from factory.errors import FactoryError


def as_a_process(r):
    """``r``'s exit status, stdout and stderr, the program named as the console script is."""
    return r.returncode, r.stdout.replace("python -m cli", "factory"), r.stderr.replace("python -m cli", "factory")


@pytest.mark.parametrize("args", [("--help",), ("build", "--help"), ("schema",)], ids=" ".join)
def test_help_and_schema_are_the_same(args):
    here = invoke_cli(*args)
    assert here.returncode == 0 and here.stderr == "" and here.stdout
    assert as_a_process(here) == as_a_process(run_cli_process(*args))


def test_a_bad_input_is_the_same_one_line_error(tmp_path):
    args = ("build", tmp_path / "nope.yaml", "--out", tmp_path / "o")
    here = invoke_cli(*args)
    one_line_error(here, "nope.yaml: no such file")
    assert here.stdout == ""
    assert as_a_process(here) == as_a_process(run_cli_process(*args))


@pytest.mark.parametrize("args", [(), ("nosuch",), ("build",)], ids=["no command", "unknown command", "no argument"])
def test_usage_errors_have_the_same_exit_code_and_message(args):
    here = invoke_cli(*args)
    assert here.returncode == 2 and "Usage: factory" in here.stdout + here.stderr
    assert as_a_process(here) == as_a_process(run_cli_process(*args))


def test_a_crash_is_a_traceback_on_stderr_and_fails_the_one_line_contract(monkeypatch, tmp_path):
    import factory.config

    def boom(path):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(factory.config, "load_config", boom)
    r = invoke_cli("build", tmp_path / "c.yaml", "--out", tmp_path / "o")
    assert r.returncode == 1 and isinstance(r.exception, RuntimeError) and r.stdout == ""
    assert "Traceback (most recent call last)" in r.stderr and "RuntimeError: kaboom" in r.stderr
    with pytest.raises(AssertionError):
        one_line_error(r, "kaboom", code=None)


def test_warnings_and_logs_go_to_stderr_and_nothing_stays_behind(monkeypatch, tmp_path):
    import factory.config

    def noisy(path):
        warnings.warn("printed by a process", UserWarning, stacklevel=1)
        warnings.warn("hidden by a process", DeprecationWarning, stacklevel=1)
        logging.getLogger("factory.test").warning("a log line")
        logging.getLogger("factory.test").info("below WARNING")
        assert os.environ["FACTORY_SET"] == "x" and os.getcwd() == str(tmp_path)
        raise FactoryError("bad config")

    monkeypatch.setattr(factory.config, "load_config", noisy)
    before = (os.getcwd(), logging.getLogger().handlers[:], logging.getLogger().level, warnings.filters[:])
    r = invoke_cli("build", "c.yaml", "--out", "o", cwd=tmp_path, env={"FACTORY_SET": "x"})
    assert r.returncode == 2 and r.stdout == "" and "error: bad config" in r.stderr
    assert "UserWarning: printed by a process" in r.stderr and "hidden" not in r.stderr
    assert "WARNING factory.test: a log line" in r.stderr and "below WARNING" not in r.stderr
    with pytest.raises(AssertionError):
        one_line_error(r, "bad config")  # a warning is a line too
    after = (os.getcwd(), logging.getLogger().handlers, logging.getLogger().level, warnings.filters)
    assert after == before and "FACTORY_SET" not in os.environ


def test_a_log_handler_added_during_a_call_writes_to_this_process_after_it(monkeypatch, tmp_path):
    """As TrackPy's, made on stdout when it is first imported, maybe during a call."""
    import factory.config

    lib = logging.getLogger("factory.test.lib")

    def load(path):
        lib.addHandler(logging.StreamHandler(sys.stdout))
        lib.warning("during the call")
        raise FactoryError("bad config")

    monkeypatch.setattr(factory.config, "load_config", load)
    try:
        r = invoke_cli("build", tmp_path / "c.yaml", "--out", tmp_path / "o")
        assert "during the call" in r.stdout and "WARNING factory.test.lib: during the call" in r.stderr
        assert [h.stream for h in lib.handlers] == [sys.stdout]  # not the call's, now closed
    finally:
        lib.handlers.clear()


def test_variables_read_at_import_need_a_process():
    with pytest.raises(ValueError, match="run_cli_process"):
        invoke_cli("schema", env={"NUMBA_NUM_THREADS": "1"})
