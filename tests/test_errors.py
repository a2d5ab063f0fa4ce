"""errors.run_cli: the one failure-to-exit-code mapper of every console script."""
import configparser
import importlib
import inspect
import os
import signal
import time
from pathlib import Path

import pytest

from mert_plugin.errors import MERTError, run_cli


def _raise(exc):
    def body():
        raise exc
    return body


def test_user_errors_file_system_errors_and_ctrl_c_map_to_one_line_and_a_code(capsys):
    assert run_cli(lambda: 0) == 0 and run_cli(lambda: 1) == 1
    assert run_cli(_raise(MERTError("a.wav: too short"))) == 2
    assert capsys.readouterr().err == "error: a.wav: too short\n"
    assert run_cli(_raise(MERTError("x")), user_error_status=1) == 1  # mert-export-onnx, the s3prl launcher
    assert capsys.readouterr().err == "error: x\n"
    assert run_cli(_raise(PermissionError(13, "Permission denied", "out/"))) == 1
    assert capsys.readouterr().err.startswith("error: [Errno 13] Permission denied")
    assert run_cli(_raise(KeyboardInterrupt()), interrupted="interrupted: rerun") == 130
    assert capsys.readouterr().err == "interrupted: rerun\n"


def test_bugs_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0)


def test_sigterm_unwinds_like_ctrl_c_when_asked_and_the_handler_is_restored(capsys):
    before = signal.getsignal(signal.SIGTERM)
    cleaned = []

    def body():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # the handler raises first
        finally:
            cleaned.append(True)

    assert run_cli(body, terminated="terminated: rerun") == 143
    assert cleaned == [True] and capsys.readouterr().err == "terminated: rerun\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_every_console_script_maps_errors_through_run_cli():
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    scripts = [line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    assert len(scripts) >= 6
    for name, target in scripts:
        module, func = target.strip().split(":")
        source = inspect.getsource(getattr(importlib.import_module(module), func))
        assert "run_cli(" in source, f"{name.strip()} ({target.strip()}) does not use errors.run_cli"
