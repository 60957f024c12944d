"""Peak-memory and timing primitives, used inside a fresh worker process.

CPU memory: peak resident set size minus the resident size right after the inputs were allocated. A
child started by fork+exec can inherit its parent's high-water mark, so the worker resets its own
(`/proc/self/clear_refs` <- "5" resets VmHWM on Linux) and reads VmHWM afterwards. Without that file
it falls back to `ru_maxrss`, which is only right when nothing before the baseline peaked higher (the
result says which method was used). Before the baseline, glibc's malloc_trim returns freed heap memory
to the OS, so that memory freed earlier (input construction, priming) cannot hide later allocations.
CUDA memory: torch.cuda.max_memory_allocated() minus memory_allocated() at the baseline.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import re
import resource
import statistics
import sys
import time

import torch
from triton.testing import do_bench

MB = 1024 * 1024
TIMING_KEYS = ("warmup", "min_repeats", "max_repeats", "budget_s")


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _ru_maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _trim_heap():
    """Give freed heap memory back to the OS (glibc malloc_trim); a no-op elsewhere."""
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """start() records the baseline; peak_mb() is the extra peak since start() or the last reset()."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = 0
        self.method = ""

    def _current(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        kb = _status_kb("VmRSS")
        return kb * 1024 if kb is not None else _ru_maxrss_bytes()

    def start(self):
        gc.collect()
        if self.device != "cuda":
            _trim_heap()
        self.baseline = self._current()
        self.reset()

    def reset(self):
        """Restart the peak without moving the baseline."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "torch.cuda.max_memory_allocated - allocated at baseline"
        elif _reset_hwm() and _status_kb("VmHWM") is not None:
            self.method = "VmHWM (reset via /proc/self/clear_refs) - VmRSS at baseline"
        else:
            self.method = "ru_maxrss - RSS at baseline (high-water mark could not be reset)"

    def peak_mb(self) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            kb = _status_kb("VmHWM") if "VmHWM" in self.method else None
            peak = kb * 1024 if kb is not None else _ru_maxrss_bytes()
        return max(0, peak - self.baseline) / MB


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def job_timing(job: dict) -> dict:
    """The timing options a worker job carries (measure_step's keyword arguments)."""
    return {k: job[k] for k in TIMING_KEYS if k in job}


def measure_step(step, device: str, *, warmup: int = 1, min_repeats: int = 2, max_repeats: int = 7,
                 budget_s: float = 3.0) -> dict:
    """Warm-up, then timed repeats; memory is measured around the same calls.

    CPU: repeats until `budget_s` seconds of timed steps (at least `min_repeats`, at most `max_repeats`),
    time.perf_counter around each synchronised step. CUDA: triton.testing.do_bench (median, L2 flushed)
    after the memory pass. Returns times in ms, the median, the loss and memory peaks in MB: `peak_mb` over
    the whole run (the headline figure), `first_peak_mb` over the warm-up (includes one-time costs such as
    compilation) and `steady_peak_mb` over the later steps."""
    meter = MemoryMeter(device)
    meter.start()
    losses = []
    for _ in range(max(1, warmup)):
        losses.append(step())
    first_peak = meter.peak_mb()
    meter.reset()
    times = []
    if device == "cuda":
        losses.append(step())  # steady-state memory pass
        steady_peak = meter.peak_mb()
        median = do_bench(step, warmup=max(25, warmup), rep=max(100, int(budget_s * 1000 / 4)),
                          return_mode="median")
        times = [median]
    else:
        start = time.perf_counter()
        while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            losses.append(step())
            _sync(device)
            times.append((time.perf_counter() - t0) * 1000)
        steady_peak = meter.peak_mb()
        median = statistics.median(times)
    return {"ms": median, "times_ms": times, "peak_mb": max(first_peak, steady_peak), "first_peak_mb": first_peak,
            "steady_peak_mb": steady_peak, "loss": losses[-1], "memory_method": meter.method}


def loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
