"""`ProcessSampler`: this process's own figures, sampled once per push.

    sampler = ProcessSampler(metrics, service="gateway", instance="3fa0c2d19b7e")
    sampler.sample()        # the reporter calls it before each drain

Resident memory, open file descriptors, start time, CPU seconds, garbage
collections and build info, with the standard library only: `/proc/self`
where it exists (Linux), `time.process_time` and `gc.get_stats` everywhere.
A figure the platform cannot give is left out, never guessed. A sample is a
few syscalls (tests/test_process_metrics.py measures it: well under 1 ms).

CPU seconds and collections are totals since the process started; the
registry carries counter deltas, so the sampler records the growth since its
last sample, and the metrics service's sum is the process's total.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from importlib import metadata
from pathlib import Path

from shared.metrics.families import (
    BUILD_INFO,
    PROCESS_CPU,
    PROCESS_OPEN_FDS,
    PROCESS_RESIDENT_MEMORY,
    PROCESS_START_TIME,
    PYTHON_GC_COLLECTIONS,
)
from shared.metrics.registry import Metrics

__all__ = ["ProcessSampler", "package_version"]

_PROC = Path("/proc/self")
_GENERATIONS = ("0", "1", "2")


class ProcessSampler:
    """Records the process families of `shared/metrics/families.py` into a registry."""

    def __init__(self, metrics: Metrics, *, service: str, instance: str, proc: Path = _PROC) -> None:
        self._labels = {"service": service, "instance": instance}
        self._proc = proc
        self._rss = metrics.gauge(PROCESS_RESIDENT_MEMORY)
        self._fds = metrics.gauge(PROCESS_OPEN_FDS)
        self._cpu = metrics.counter(PROCESS_CPU)
        self._gc = metrics.counter(PYTHON_GC_COLLECTIONS)
        self._page = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096
        self._cpu_seen = 0.0
        self._gc_seen = [0] * len(_GENERATIONS)
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        metrics.gauge(BUILD_INFO).set(1, **self._labels, version=package_version(), python=python)
        started = _start_time(proc)
        if started is not None:  # a gauge keeps its value: set once, sent with every batch
            metrics.gauge(PROCESS_START_TIME).set(started, **self._labels)

    def sample(self) -> None:
        """Set the gauges to their current values; add the counters' growth since the last sample."""
        rss = self._resident_bytes()
        if rss is not None:
            self._rss.set(rss, **self._labels)
        fds = self._open_fds()
        if fds is not None:
            self._fds.set(fds, **self._labels)
        cpu = time.process_time()
        self._cpu.inc(cpu - self._cpu_seen, **self._labels)  # a zero delta records nothing
        self._cpu_seen = max(cpu, self._cpu_seen)
        for index, stats in enumerate(gc.get_stats()[:len(_GENERATIONS)]):
            count = stats["collections"]
            self._gc.inc(count - self._gc_seen[index], **self._labels, generation=_GENERATIONS[index])
            self._gc_seen[index] = max(count, self._gc_seen[index])

    def _resident_bytes(self) -> int | None:
        try:  # statm: size resident shared ... (in pages)
            return int((self._proc / "statm").read_bytes().split()[1]) * self._page
        except (OSError, IndexError, ValueError):
            return None

    def _open_fds(self) -> int | None:
        try:
            return len(os.listdir(self._proc / "fd"))
        except OSError:
            return None


def package_version() -> str:
    """The installed inferswarm package's version, or "unknown" (folded into "other")."""
    try:
        return metadata.version("inferswarm")
    except metadata.PackageNotFoundError:
        return "unknown"


def _start_time(proc: Path) -> float | None:
    """Epoch seconds the process started: boot time plus its start in clock ticks since boot."""
    try:
        stat = (proc / "stat").read_bytes()
        ticks = int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22; the name may hold spaces
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return None
