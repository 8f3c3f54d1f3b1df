"""Memory-bandwidth bound of an optimizer step: a triad kernel and the step's byte count.

An element-wise optimizer step is memory bound: it reads every parameter, gradient and state
tensor once and writes the parameter and state back. :func:`step_traffic` counts those bytes;
:func:`triad` measures what the machine sustains for ``a = b + s * c`` over tensors of the same
total footprint, so the two GB/s figures can be put side by side. Triad bytes follow the STREAM
convention (two reads, one write; the cache-line fill before writing ``a`` is not counted), so an
optimizer step, whose writes go to lines it has just read, can report a little above triad.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(1000))
    >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    >>> w.grad = torch.ones(1000); opt.step()
    >>> step_traffic(opt)
    {'footprint_bytes': 12000, 'moved_bytes': 20000}
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["step_traffic", "triad"]


def step_traffic(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes one step of ``optimizer`` touches, counting each tensor once.

    ``footprint_bytes``: parameters, gradients and parameter-shaped state tensors.
    ``moved_bytes``: all of them read, plus parameters and state written back. Scalar state
    (step counters) is ignored. Call it after a first step, once the state exists.
    """
    footprint = moved = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            nbytes = p.numel() * p.element_size()
            states = [
                t for t in optimizer.state.get(p, {}).values()
                if isinstance(t, Tensor) and t.numel() == p.numel() and t.numel() > 1
            ]
            state_bytes = sum(t.numel() * t.element_size() for t in states)
            footprint += 2 * nbytes + state_bytes
            moved += 3 * nbytes + 2 * state_bytes
    return {"footprint_bytes": footprint, "moved_bytes": moved}


def triad(
    footprint_bytes: int,
    device: torch.device,
    repeats: int = 10,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Sustained bandwidth of ``a = b + s * c`` over three float32 tensors of ``footprint_bytes`` in all.

    Each repeat moves ``3 * n * 4`` bytes (two reads, one write). Returns GB/s (1e9 bytes/s)
    for the median and the best repeat, and the bytes moved per repeat.
    """
    n = max(1, footprint_bytes // (3 * 4))
    a = torch.empty(n, device=device)
    b = torch.rand(n, device=device)
    c = torch.rand(n, device=device)
    moved = 3 * n * 4
    torch.add(b, c, alpha=3.0, out=a)  # touch every page before timing
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(b, c, alpha=3.0, out=a)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {
        "gbs": moved / median / 1e9,
        "best_gbs": moved / times[0] / 1e9,
        "moved_bytes": float(moved),
        "median_s": median,
    }
