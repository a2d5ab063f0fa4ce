"""Exception types for user errors.

Everything raised for bad *input* (a broken file, an inconsistent config, a
missing checkpoint) derives from :class:`MERTError`. Command-line entry points
catch it and print one line instead of a traceback; anything else is a bug and
keeps its traceback.
"""


class MERTError(Exception):
    """A user-facing error: the message names the input and the reason."""


class AudioError(MERTError, ValueError):
    """Audio could not be read or is unusable (empty, non-finite, too short, ...)."""


class ConfigError(MERTError, ValueError):
    """A model configuration is unknown, inconsistent or unsupported."""


class CheckpointError(MERTError, OSError):
    """A checkpoint is missing, unreadable, untrusted or does not match the config."""


def run_cli(body, interrupted: str = "error: interrupted") -> int:
    """Run a command-line entry point's ``body()`` and map failures to exit codes.

    User errors (:class:`MERTError`) -> one ``error: ...`` line, exit 2; file-system
    errors (unwritable output folder, full disk) -> one line, exit 1; Ctrl-C -> 130.
    Anything else is a bug and keeps its traceback.
    """
    import sys

    try:
        return body()
    except MERTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
