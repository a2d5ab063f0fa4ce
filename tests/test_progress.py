"""mert_plugin.progress: a tqdm bar on a terminal, periodic plain lines in a log file."""
import io
import re

from mert_plugin.progress import LOG_INTERVAL, progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_a_few_whole_lines_not_a_frame_per_item():
    log = io.StringIO()
    for _ in progress_bar(range(5000), desc="work", unit="file", file=log):
        pass
    text = log.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # The first and the final state; a line in between only if the loop took LOG_INTERVAL seconds.
    assert LOG_INTERVAL >= 5 and 2 <= len(lines) <= 3, lines
    assert lines[0].startswith("work:") and "0/5000" in lines[0]
    assert "5000/5000" in lines[-1] and "100%" in lines[-1]
    assert text.endswith("\n")


def test_log_file_lines_follow_the_interval_and_messages_stay_whole():
    log = io.StringIO()
    bar = progress_bar(total=3, desc="labels", file=log, interval=0)  # interval 0: a line per update
    for i in range(3):
        bar.write(f"failed: clip{i}", file=log)
        bar.update(1)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line for line in lines if line.startswith("failed:")] == ["failed: clip0", "failed: clip1",
                                                                       "failed: clip2"]
    counts = [re.search(r"\| (\d/3) \[", line).group(1) for line in lines if line.startswith("labels:")]
    assert counts[0] == "0/3" and counts[-1] == "3/3" and {"1/3", "2/3"} <= set(counts)
    assert "\r" not in log.getvalue()


def test_disabled_prints_nothing_and_terminal_keeps_the_redrawn_bar():
    log = io.StringIO()
    for _ in progress_bar(range(10), file=log, disable=True):
        pass
    assert log.getvalue() == ""
    term = _Terminal()
    for _ in progress_bar(range(10), file=term, desc="tty"):
        pass
    assert "\r" in term.getvalue() and "10/10" in term.getvalue()
