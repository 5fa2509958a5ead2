"""Measuring beside the code: wall time and peak memory of a phase (calibration, inference)."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux); 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    except OSError:
        return 0


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system (glibc `malloc_trim`; elsewhere
    only the collection), so a resident-memory baseline taken next is not lowered by memory a previous phase
    freed but the process kept: its peak above that baseline is then what the phase itself needs."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int = 0  # CUDA: peak allocated during the phase; CPU: peak resident set size of the process
    kind: str = "cpu-peak-rss"


@contextmanager
def measure(device: torch.device | str = "cpu", interval: float = 0.02):
    """Time a phase and record its peak memory: on CUDA the peak of allocated memory during the phase
    (what a GPU must hold, as papers report it); on CPU the process's peak resident set size, sampled
    every `interval` s (what a machine must hold; it includes the loaded model)."""
    device = torch.device(device)
    m = Measurement(kind="cuda-peak-allocated" if device.type == "cuda" else "cpu-peak-rss")
    stop = threading.Event()
    peak = [rss_bytes()]

    def sample():
        while not stop.wait(interval):
            peak[0] = max(peak[0], rss_bytes())

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        t = threading.Thread(target=sample, daemon=True)
        t.start()
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            m.peak_bytes = int(torch.cuda.max_memory_allocated(device))
        else:
            stop.set()
            t.join()
            peak[0] = max(peak[0], rss_bytes())
            m.peak_bytes = int(peak[0])
        m.seconds = time.perf_counter() - t0
