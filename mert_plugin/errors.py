"""Exception types for user errors.

Everything raised for bad *input* (a broken file, an inconsistent config, a
missing checkpoint) derives from :class:`MERTError`. Command-line entry points
catch it and print one line instead of a traceback; anything else is a bug and
keeps its traceback.
"""
from typing import Optional


class MERTError(Exception):
    """A user-facing error: the message names the input and the reason."""


class AudioError(MERTError, ValueError):
    """Audio could not be read or is unusable (empty, non-finite, too short, ...)."""


class ConfigError(MERTError, ValueError):
    """A model configuration is unknown, inconsistent or unsupported."""


class CheckpointError(MERTError, OSError):
    """A checkpoint is missing, unreadable, untrusted or does not match the config."""


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM while :func:`run_cli` runs with ``terminated`` set."""


def run_cli(body, interrupted: str = "error: interrupted", *, user_error_status: int = 2,
            terminated: Optional[str] = None) -> int:
    """Run a command-line entry point's ``body()`` and map failures to exit codes; the one
    mapper of every console script.

    User errors (:class:`MERTError`) -> one ``error: ...`` line, exit ``user_error_status``
    (2; ``mert-export-onnx`` and the s3prl launcher document 1); file-system errors
    (unwritable output folder, full disk) -> one line, exit 1; Ctrl-C -> ``interrupted``,
    exit 130. With ``terminated`` given, SIGTERM (a cluster's pre-emption) unwinds like
    Ctrl-C (``finally`` blocks run) -> that line, exit 143. Anything else is a bug and
    keeps its traceback.
    """
    import signal
    import sys
    import threading

    previous = None
    if terminated is not None and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return body()
    except MERTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return user_error_status
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Terminated:
        print(terminated, file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    raise Terminated()
