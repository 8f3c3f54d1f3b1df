"""Process memory readings: resident set size now and at peak, and CUDA allocator peaks.

All benchmark modes share one process per rank, so a mode's own cost is read as differences:
resident memory before building a mode versus after its warm-up steps (set-up growth), and the
peak reached during its measured steps above the resident memory just before them (the
transient of a step). Peaks are reset between blocks through ``/proc/self/clear_refs`` where
the kernel allows it.

Freed memory often stays resident: glibc keeps freed heap pages, and after a large block is
freed it raises its mmap threshold, so that later large tensors come from the heap too. RSS
would then charge one mode for buffers another mode freed. Each reading therefore first hands
free heap memory back to the system (glibc's ``malloc_trim``, where the C library has it), so
that set-up growth and a block's base count live memory; the peaks still include every
transient a step allocates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import torch

__all__ = ["MemoryProbe", "rss_bytes", "peak_rss_bytes", "reset_peak_rss", "trim_heap"]


def _malloc_trim():  # glibc's malloc_trim, or None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """Return free heap memory to the system (glibc ``malloc_trim(0)``); ``False`` where the C
    library has no such call."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size, or ``None`` where ``/proc`` is missing."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int:
    """Peak resident set size since start (or the last :func:`reset_peak_rss`)."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ``clear_refs``); ``False`` when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Measures memory around a block of work, host RSS and (when on CUDA) device memory."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        #: Peak RSS of the whole run, kept across the per-block resets.
        self.process_peak = peak_rss_bytes()
        self.cuda_peak = 0
        self.can_reset = reset_peak_rss()

    def now(self) -> dict[str, int | None]:
        """Current usage: live host memory (free heap handed back first) and CUDA allocations."""
        trim_heap()
        out: dict[str, int | None] = {"rss": rss_bytes()}
        if self.cuda:
            out["cuda"] = torch.cuda.memory_allocated(self.device)
        return out

    def start_block(self) -> dict[str, int | None]:
        """Reset the peaks and return current usage, the base of :meth:`end_block`."""
        base = self.now()
        if self.can_reset:
            self.process_peak = max(self.process_peak, peak_rss_bytes())
            reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        return base

    def end_block(self, base: dict[str, int | None]) -> dict[str, int | None]:
        """Peak usage since :meth:`start_block` above ``base`` (RSS only when resettable)."""
        out: dict[str, int | None] = {"rss_peak": None, "rss_transient": None}
        if self.can_reset:
            peak = peak_rss_bytes()
            out["rss_peak"] = peak
            out["rss_transient"] = None if base["rss"] is None else max(0, peak - base["rss"])
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            self.cuda_peak = max(self.cuda_peak, peak)
            out["cuda_peak"] = peak
            out["cuda_transient"] = max(0, peak - (base.get("cuda") or 0))
        return out

    def totals(self) -> dict[str, int | None]:
        """Whole-process figures: peak RSS over the run (VmHWM, or ``ru_maxrss`` without
        ``/proc``), current RSS and, on CUDA, the largest per-block allocator peak seen."""
        self.process_peak = max(self.process_peak, peak_rss_bytes())
        out: dict[str, int | None] = {"peak_rss": self.process_peak, "rss": rss_bytes()}
        if self.cuda:
            self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated(self.device))
            out["cuda_max_allocated"] = self.cuda_peak
        return out
