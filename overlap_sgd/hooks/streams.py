"""CUDA streams of the overlap's own, never shared with communication.

``torch.cuda.Stream()`` hands out one of a small pool of streams per device and priority,
round-robin (32 each), and ProcessGroupNCCL takes its communication streams from the same
pool, as do the callbacks of ``Future.then`` on CUDA futures. A stream from the pool can
therefore *be* an NCCL stream: an update queued there would hold back every later
collective. :func:`private_stream` creates a stream outside the pool instead (a non-blocking
stream made with the CUDA driver, wrapped as :class:`torch.cuda.ExternalStream`), which
nothing else in the process can be handed.

Where the driver cannot be reached (an unusual installation), it falls back to a pool stream
and says so in :func:`is_private`, so that a check can report it.

Example (on a machine with a GPU)::

    stream = private_stream(torch.device("cuda", 0))
    with torch.cuda.stream(stream):
        ...  # work that no collective is queued behind
"""

from __future__ import annotations

import ctypes
import sys
import threading

import torch

__all__ = ["is_private", "private_stream"]

#: cuStreamCreateWithPriority's flag for a stream that does not synchronise with stream 0.
_CU_STREAM_NON_BLOCKING = 0x1

_lock = threading.Lock()
_driver: "ctypes.CDLL | None" = None
#: Handles of the streams made here (they live as long as the process).
_private: set[int] = set()


def _load_driver() -> ctypes.CDLL:
    global _driver
    if _driver is None:
        _driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    return _driver


def _check(code: int, call: str) -> None:
    if code != 0:
        raise RuntimeError(f"{call} failed with CUDA driver error {code}")


def _driver_stream(index: int, priority: int) -> int:
    """A new non-blocking stream in the primary context of device ``index`` (its handle)."""
    cu = _load_driver()
    _check(cu.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    _check(cu.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    # The runtime (and so torch) works in the device's primary context; retaining it keeps it
    # alive as long as the stream, which lives as long as the process.
    _check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check(cu.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    try:
        handle = ctypes.c_void_p()
        _check(
            cu.cuStreamCreateWithPriority(ctypes.byref(handle), _CU_STREAM_NON_BLOCKING, priority),
            "cuStreamCreateWithPriority",
        )
    finally:
        popped = ctypes.c_void_p()
        cu.cuCtxPopCurrent_v2(ctypes.byref(popped))
    if not handle.value:
        raise RuntimeError("cuStreamCreateWithPriority returned no stream")
    return handle.value


def private_stream(device: torch.device | str | int, priority: int = 0) -> "torch.cuda.Stream":
    """A CUDA stream on ``device`` that is not in torch's stream pool.

    Args:
        device: a CUDA device.
        priority: the stream's priority (lower is more urgent; 0, the default, is what
            ordinary streams get).

    Raises:
        ValueError: ``device`` is not a CUDA device.
    """
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"private_stream needs a CUDA device, got {device}")
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.init()
    with _lock:
        try:
            handle = _driver_stream(index, priority)
        except (OSError, AttributeError, RuntimeError):
            # No driver library to call: a pool stream still works, only without the guarantee.
            return torch.cuda.Stream(device=torch.device("cuda", index), priority=priority)
        _private.add(handle)
    return torch.cuda.ExternalStream(handle, device=torch.device("cuda", index))


def is_private(stream: "torch.cuda.Stream") -> bool:
    """Whether ``stream`` was made by :func:`private_stream` outside torch's pool."""
    return stream.cuda_stream in _private
