"""How much of the update stream's GPU time ran beside default-stream kernels, from a profiler trace.

Reads the Chrome trace that ``torch.profiler.profile(...).export_chrome_trace`` writes (``.json``
or ``.json.gz``) with plain Python, no torch. Of that format (kineto's, torch 2.9 to 2.13) it uses:

- kernels: ``"ph": "X"``, ``"cat": "kernel"`` (``"Kernel"`` in older traces), ``ts`` and ``dur``
  in microseconds, ``args.stream`` (older traces: ``tid`` ``"stream 7"``) and
  ``args.correlation``;
- the CUDA runtime or driver call that launched each kernel (``"cat": "cuda_runtime"`` or
  ``"cuda_driver"``), with the same ``args.correlation``, on the launching thread (``pid``,
  ``tid``);
- ``record_function`` ranges (``"cat": "user_annotation"``): each bucket update
  (``bucket<i>/update``, ``bucket<i>/update@<offset>``) and each training step (``step<k>``).

Update kernels are those launched inside an update range, on that range's thread. The main
stream is the stream with the most busy time among the other kernels (NCCL's own kernels left
aside); the side streams are the other streams that ran update kernels. Per step:

- ``overlap_share = |side busy ∩ main busy| / |side busy|``, the busy times being unions of
  kernel intervals: 1 means every update kernel ran while the main stream was busy too;
- ``tail``: from the end of the last main-stream kernel that started before the step's last
  update kernel ended (backward's last kernel: the main stream waits for the side stream at the
  end of backward, so nothing later on it starts earlier) to the end of that update kernel;
  0 when backward's last kernel ends after it.

Example:
    >>> trace = {"traceEvents": [
    ...     {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0.0, "dur": 100.0,
    ...      "pid": 0, "tid": 7, "args": {"stream": 7, "correlation": 1}},
    ...     {"ph": "X", "cat": "kernel", "name": "adam", "ts": 80.0, "dur": 40.0,
    ...      "pid": 0, "tid": 20, "args": {"stream": 20, "correlation": 2}},
    ... ]}
    >>> r = analyze(trace, main_stream=7, side_streams=[20])
    >>> r["overlap_share"], r["tail_us"]["median"]
    (0.5, 20.0)
"""

from __future__ import annotations

import bisect
import gzip
import json
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "STEP_PATTERN",
    "UPDATE_PATTERN",
    "Kernel",
    "analyze",
    "intersect",
    "kernels",
    "load_trace",
    "total",
    "union",
]

#: Names of the update ranges: the package's ``bucket<i>/update[@offset]``, the benchmark's own.
UPDATE_PATTERN = r"/update(@\d+)?$"
#: Names of the per-step ranges the benchmark records around each traced step.
STEP_PATTERN = r"^step\d+$"

_KERNEL_CATS = {"kernel"}
_LAUNCH_CATS = {"cuda_runtime", "cuda_driver", "runtime"}
_RANGE_CATS = {"user_annotation"}

Interval = tuple[float, float]


@dataclass(frozen=True)
class Kernel:
    """One kernel execution: stream, start and end in microseconds, launch correlation id."""

    name: str
    stream: int
    start: float
    end: float
    correlation: int | None = None


@dataclass(frozen=True)
class _Range:
    name: str
    thread: tuple[Any, Any]
    start: float
    end: float


def load_trace(path: str | Path) -> dict[str, Any]:
    """The trace at ``path`` (gzip-compressed when the name ends in ``.gz``)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _events(trace: dict[str, Any] | list[Any]) -> list[dict[str, Any]]:
    events = trace.get("traceEvents") if isinstance(trace, dict) else trace
    if not isinstance(events, list):
        raise ValueError(
            "not a Chrome trace: expected a 'traceEvents' list (or a list of events), got "
            f"{type(events).__name__}"
        )
    return [e for e in events if isinstance(e, dict)]


def _cat(event: dict[str, Any]) -> str:
    return str(event.get("cat", "")).lower()


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _stream(event: dict[str, Any]) -> int | None:
    args = event.get("args") or {}
    for value in (args.get("stream"), event.get("tid")):
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            digits = re.search(r"-?\d+", value)
            if digits:
                return int(digits.group())
    return None


def _correlation(event: dict[str, Any]) -> int | None:
    value = (event.get("args") or {}).get("correlation")
    return value if isinstance(value, int) else None


def _interval(event: dict[str, Any]) -> Interval | None:
    ts, dur = _number(event.get("ts")), _number(event.get("dur"))
    if ts is None or dur is None:
        return None
    return ts, ts + max(0.0, dur)


def kernels(trace: dict[str, Any] | list[Any]) -> list[Kernel]:
    """Every GPU kernel of ``trace``, in start order."""
    out = []
    for e in _events(trace):
        if e.get("ph") != "X" or _cat(e) not in _KERNEL_CATS:
            continue
        span, stream = _interval(e), _stream(e)
        if span is None or stream is None:
            continue
        out.append(Kernel(str(e.get("name", "")), stream, span[0], span[1], _correlation(e)))
    out.sort(key=lambda k: (k.start, k.end))
    return out


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of ``intervals`` as sorted, disjoint intervals.

    >>> union([(5, 7), (0, 2), (1, 3), (7, 8)])
    [(0, 3), (5, 8)]
    """
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def intersect(a: Sequence[Interval], b: Sequence[Interval]) -> list[Interval]:
    """The intersection of two sorted, disjoint interval lists (as :func:`union` returns).

    >>> intersect([(0, 3), (5, 8)], [(2, 6)])
    [(2, 3), (5, 6)]
    """
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def total(intervals: Iterable[Interval]) -> float:
    """The summed length of disjoint ``intervals``."""
    return sum(end - start for start, end in intervals)


def _ranges(events: list[dict[str, Any]], pattern: str) -> list[_Range]:
    regex = re.compile(pattern)
    out = []
    for e in events:
        if e.get("ph") != "X" or _cat(e) not in _RANGE_CATS:
            continue
        name = str(e.get("name", ""))
        span = _interval(e)
        if span is not None and regex.search(name):
            out.append(_Range(name, (e.get("pid"), e.get("tid")), span[0], span[1]))
    out.sort(key=lambda r: r.start)
    return out


def _launches(events: list[dict[str, Any]]) -> dict[int, tuple[tuple[Any, Any], float]]:
    """correlation id -> (launching thread, launch time)."""
    out = {}
    for e in events:
        if _cat(e) in _LAUNCH_CATS:
            corr, ts = _correlation(e), _number(e.get("ts"))
            if corr is not None and ts is not None:
                out[corr] = ((e.get("pid"), e.get("tid")), ts)
    return out


def _within(ranges: list[_Range], launch: tuple[tuple[Any, Any], float], same_thread: bool) -> bool:
    thread, ts = launch
    return any(
        r.start <= ts <= r.end and (not same_thread or r.thread == thread) for r in ranges
    )


def _update_kernels(ks: list[Kernel], updates: list[_Range],
                    launches: dict[int, tuple[tuple[Any, Any], float]]) -> tuple[set[int], str]:
    """Indices into ``ks`` of the kernels launched inside an update range, and how they were found."""
    if not updates or not launches:
        return set(), "none"
    for same_thread, how in ((True, "update ranges, same thread"), (False, "update ranges, any thread")):
        found = {
            i for i, k in enumerate(ks)
            if k.correlation in launches and _within(updates, launches[k.correlation], same_thread)
        }
        if found:
            return found, how
    return set(), "none"


def _is_nccl(k: Kernel) -> bool:
    return "nccl" in k.name.lower()


def _busiest(ks: Iterable[Kernel]) -> int | None:
    busy: dict[int, list[Interval]] = {}
    for k in ks:
        busy.setdefault(k.stream, []).append((k.start, k.end))
    if not busy:
        return None
    return max(busy, key=lambda s: total(union(busy[s])))


def _step_of(ks: list[Kernel], steps: list[_Range],
             launches: dict[int, tuple[tuple[Any, Any], float]]) -> list[int]:
    """The index of the step each kernel belongs to: the step range (any thread) its launch
    falls in, else the last step starting before the kernel does; -1 for none."""
    if not steps:
        return [0] * len(ks)
    starts = [s.start for s in steps]
    out = []
    for k in ks:
        launch = launches.get(k.correlation) if k.correlation is not None else None
        at = launch[1] if launch is not None else k.start
        i = bisect.bisect_right(starts, at) - 1
        if launch is not None and i >= 0 and at > steps[i].end:
            i = -1  # launched between steps (warm-up leftovers, the profiler's own work)
        out.append(i)
    return out


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def analyze(
    trace: dict[str, Any] | list[Any],
    *,
    main_stream: int | None = None,
    side_streams: Sequence[int] | None = None,
    update_pattern: str = UPDATE_PATTERN,
    step_pattern: str = STEP_PATTERN,
) -> dict[str, Any]:
    """Overlap share and tail of the update (side) streams against the main stream, per step
    and over all steps; see the module docs. Times are in microseconds, as in the trace.

    ``main_stream`` and ``side_streams`` override the streams found from the trace. Raises
    ``ValueError`` when the trace has no kernels or no side-stream kernels to measure.
    """
    events = _events(trace)
    ks = kernels(events)
    if not ks:
        raise ValueError(
            "no GPU kernel events in the trace (was it recorded with ProfilerActivity.CUDA on a GPU?)"
        )
    launches = _launches(events)
    updates = _ranges(events, update_pattern)
    update_idx, how = _update_kernels(ks, updates, launches)

    if main_stream is None:
        main_stream = _busiest(
            k for i, k in enumerate(ks) if i not in update_idx and not _is_nccl(k)
        )
        if main_stream is None:
            raise ValueError("no kernels outside the updates: cannot tell the main stream")
    if side_streams is not None:
        sides, how = sorted(set(side_streams) - {main_stream}), "given"
    elif update_idx:
        sides = sorted({ks[i].stream for i in update_idx} - {main_stream})
    else:
        sides = sorted({k.stream for k in ks if k.stream != main_stream and not _is_nccl(k)})
        how = "every stream but the main one and NCCL's (no update ranges matched)"
    if not sides:
        on_main = sum(1 for i in update_idx if ks[i].stream == main_stream)
        raise ValueError(
            f"no side-stream kernels: every update kernel found ({on_main}) ran on the main "
            f"stream {main_stream}" if on_main else
            f"no kernels on any stream but the main stream {main_stream} and NCCL's"
        )

    step_ranges = _ranges(events, step_pattern)
    step_index = _step_of(ks, step_ranges, launches)
    per_step = []
    for s in range(max(1, len(step_ranges))):
        mine = [k for k, i in zip(ks, step_index, strict=True) if i == s]
        side = [k for k in mine if k.stream in sides]
        if not side:
            continue
        side_busy = union((k.start, k.end) for k in side)
        main_busy = union((k.start, k.end) for k in mine if k.stream == main_stream)
        both = total(intersect(side_busy, main_busy))
        busy = total(side_busy)
        last_update = max(k.end for k in side)
        before = [k.end for k in mine if k.stream == main_stream and k.start < last_update]
        backward_end = max(before) if before else None
        per_step.append({
            "step": step_ranges[s].name if step_ranges else "all",
            "side_kernels": len(side),
            "side_busy_us": busy,
            "overlapped_us": both,
            "exposed_us": busy - both,
            "overlap_share": both / busy if busy > 0 else None,
            "main_busy_us": total(main_busy),
            "first_update_start_us": min(k.start for k in side),
            "backward_last_kernel_end_us": backward_end,
            "last_update_end_us": last_update,
            "tail_us": max(0.0, last_update - backward_end) if backward_end is not None else None,
        })
    if not per_step:
        raise ValueError(f"no step has kernels on the side streams {sides}")

    busy_all = sum(p["side_busy_us"] for p in per_step)
    both_all = sum(p["overlapped_us"] for p in per_step)
    streams: dict[str, dict[str, float | int]] = {}
    for stream in sorted({k.stream for k in ks}):
        on = [k for k in ks if k.stream == stream]
        streams[str(stream)] = {
            "kernels": len(on),
            "busy_us": total(union((k.start, k.end) for k in on)),
            "nccl": all(_is_nccl(k) for k in on),
        }
    return {
        "main_stream": main_stream,
        "side_streams": sides,
        "side_streams_from": how,
        "update_ranges": len(updates),
        "update_kernels": len(update_idx),
        "update_kernels_on_main_stream": sum(1 for i in update_idx if ks[i].stream == main_stream),
        "steps": per_step,
        "side_busy_us": busy_all,
        "overlapped_us": both_all,
        "overlap_share": both_all / busy_all if busy_all > 0 else None,
        "side_busy_per_step_us": _spread([p["side_busy_us"] for p in per_step]),
        "tail_us": _spread([p["tail_us"] for p in per_step if p["tail_us"] is not None]),
        "streams": streams,
    }
