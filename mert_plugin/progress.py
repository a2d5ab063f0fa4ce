"""Progress bars that suit both a terminal and a log file.

On a terminal, :func:`progress_bar` is a plain ``tqdm`` bar. When the stream is not
a terminal (``make demo > log``, a batch job), tqdm would still redraw its bar
with a carriage return every 0.1 s, which fills a log with megabytes of frames;
here it prints one plain line (``desc:  40%|####  | 400/1000 [00:10<00:15, ...]``)
at most every ``LOG_INTERVAL`` seconds, plus the first and the final state.
"""
from __future__ import annotations

import re
import sys
from typing import Iterable, Optional, TextIO

LOG_INTERVAL = 10.0  # seconds between two progress lines in a log file
LOG_COLUMNS = 100
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # cursor moves tqdm uses for nested bars


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


class LineWriter:
    """Stream wrapper that turns tqdm's carriage-return frames into whole lines:
    each non-blank frame becomes one line; the blanking writes tqdm uses to clear
    its bar are dropped."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        for frame in re.split(r"[\r\n]", _CONTROL.sub("", text)):
            frame = frame.rstrip()
            if frame:
                self.stream.write(frame + "\n")
        return len(text)

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()

    def isatty(self) -> bool:
        return False


def progress_bar(iterable: Optional[Iterable] = None, *, file: Optional[TextIO] = None,
             interval: Optional[float] = None, **kwargs):
    """A ``tqdm`` progress bar (same arguments) on ``file`` (default stderr).

    ``disable=None`` means shown (tqdm's own ``None`` hides the bar when the
    stream is not a terminal); pass ``disable=True`` to hide it. Off a terminal
    the bar prints a plain line every ``interval`` seconds (default
    :data:`LOG_INTERVAL`) instead of a frame per update.
    """
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    kwargs["disable"] = bool(kwargs.get("disable"))
    if _isatty(stream):
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, file=stream, **kwargs)
    kwargs.update(file=LineWriter(stream), mininterval=LOG_INTERVAL if interval is None else interval,
                  dynamic_ncols=False, ncols=kwargs.get("ncols") or LOG_COLUMNS, ascii=True)
    kwargs["maxinterval"] = max(kwargs["mininterval"], kwargs.get("maxinterval", 10.0))
    return tqdm(iterable, **kwargs)
