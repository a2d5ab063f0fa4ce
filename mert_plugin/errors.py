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
