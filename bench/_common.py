"""Timing helpers shared by the scripts in ``bench/`` (imported as ``_common``: the scripts run as
``python bench/NAME.py``, which puts this folder on ``sys.path``).

* :func:`timed`: wall and process CPU seconds of one call, with the device synchronised around it;
* :func:`alternate`: several candidates called in turn, round after round, so that load on a
  shared machine hits each alike; returns :class:`Timings` (medians, fastest runs, CPU time);
* :func:`load_average` and :func:`machine_line`: what the figures were measured on.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Tuple


def synchronize(device="cpu") -> None:
    """Wait for queued accelerator work (a no-op on CPU)."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(fn: Callable, device="cpu") -> Tuple[float, float, object]:
    """``(wall s, process CPU s, result)`` of ``fn()``. Process CPU time counts every thread; on
    a shared machine it moves less with the neighbours' load than wall time does."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu, out


class Timings:
    """Per candidate: the wall and CPU seconds and the result of each run, in run order."""

    def __init__(self, names):
        self.wall: Dict[str, List[float]] = {n: [] for n in names}
        self.cpu: Dict[str, List[float]] = {n: [] for n in names}
        self.results: Dict[str, List[object]] = {n: [] for n in names}

    def add(self, name: str, wall: float, cpu: float, result=None) -> None:
        self.wall[name].append(wall)
        self.cpu[name].append(cpu)
        self.results[name].append(result)

    def median(self, name: str) -> float:
        return statistics.median(self.wall[name])

    def best(self, name: str) -> float:
        """The fastest run: the one other processes disturbed least."""
        return min(self.wall[name])

    def median_cpu(self, name: str) -> float:
        return statistics.median(self.cpu[name])

    def runs(self, name: str, digits: int = 2) -> str:
        """The wall times of every run, e.g. ``3.71, 3.80, 3.75``."""
        return ", ".join(f"{t:.{digits}f}" for t in self.wall[name])


def alternate(candidates: Mapping[str, Callable], repeats: int, device="cpu",
              before: Optional[Callable[[str, int], None]] = None, keep_results: bool = False) -> Timings:
    """Time every candidate once per round, ``repeats`` rounds (a, b, a, b, ...), so that load
    on a shared machine hits all of them alike; ``before(name, round)`` runs untimed first.
    Results are dropped (they can be large) unless ``keep_results``."""
    timings = Timings(candidates)
    for round_ in range(repeats):
        for name, fn in candidates.items():
            if before is not None:
                before(name, round_)
            wall, cpu, out = timed(fn, device)
            timings.add(name, wall, cpu, out if keep_results else None)
            del out
    return timings


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``2.1 1.4 0.9`` (figures taken under load
    measure the neighbours too)."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def machine_line(**fields) -> str:
    """``machine: <cpu>, <n> CPUs visible, torch <version>, key=value, ...`` for a result header."""
    import torch

    cpu = " ".join(p for p in (platform.machine(), platform.processor()) if p)
    parts = [cpu, f"{os.cpu_count()} CPUs visible", f"torch {torch.__version__}"]
    return "machine: " + ", ".join(parts + [f"{k}={v}" for k, v in fields.items()])
