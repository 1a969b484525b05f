"""Wall time and peak memory per stage of a run (extract, transfer, fine-tune, evaluate).

Stages nest: time spent in an inner stage is not counted again in the outer one, so the stage times of a
record add up to the run's wall time. Peak memory is the process's resident set size sampled in a background
thread (CPU), plus the CUDA allocator's peak when CUDA is in use.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; elsewhere the process's peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_memory() -> None:
    """Hand freed memory back before the next model loads: Python's cycles, glibc's free lists (which otherwise
    keep a dropped model's pages in the process), and the CUDA cache."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    cuda = _cuda()
    if cuda is not None:
        cuda.empty_cache()


def _cuda():
    torch = sys.modules.get("torch")  # never import torch just to measure
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


@dataclass
class StageStats:
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_cuda_mb: float | None = None


class StageMeter:
    """Measures stages; `on_stage(name)` (optional) hears of each stage entered and, on leaving, of the stage
    that goes on (None at the end), so that a progress line can name what runs."""

    def __init__(self, sample_every_s: float = 0.01, on_stage: Callable[[str | None], None] | None = None):
        self.on_stage = on_stage
        self.stats: dict[str, StageStats] = {}
        self._stack: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._every = sample_every_s

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        with self._lock:
            if self._stack:  # pause the outer stage's clock
                outer, started = self._stack[-1]
                self._stats(outer).wall_s += now - started
            self._stack.append((name, now))
        stats = self._stats(name)
        if self.on_stage is not None:
            self.on_stage(name)
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample, args=(stats, stop), daemon=True)
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()
            stats.peak_rss_mb = max(stats.peak_rss_mb, rss_bytes() / 2**20)
            cuda = _cuda()
            if cuda is not None:
                stats.peak_cuda_mb = max(stats.peak_cuda_mb or 0.0, cuda.max_memory_allocated() / 2**20)
            now = time.perf_counter()
            with self._lock:
                _, started = self._stack.pop()
                stats.wall_s += now - started
                if self._stack:  # resume the outer stage's clock
                    self._stack[-1] = (self._stack[-1][0], now)
                outer = self._stack[-1][0] if self._stack else None
            if self.on_stage is not None:
                self.on_stage(outer)

    def _stats(self, name: str) -> StageStats:
        return self.stats.setdefault(name, StageStats())

    def _sample(self, stats: StageStats, stop: threading.Event) -> None:
        while True:
            stats.peak_rss_mb = max(stats.peak_rss_mb, rss_bytes() / 2**20)
            if stop.wait(self._every):
                return

    def as_dict(self) -> dict[str, dict[str, float | None]]:
        return {name: {"wall_s": round(s.wall_s, 4), "peak_rss_mb": round(s.peak_rss_mb, 1),
                       "peak_cuda_mb": None if s.peak_cuda_mb is None else round(s.peak_cuda_mb, 1)}
                for name, s in self.stats.items()}
