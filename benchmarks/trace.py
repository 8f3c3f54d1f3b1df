"""A Chrome trace of a few overlap-mode steps, each bucket's communication and update labelled.

The package labels its own work while a profiler runs: ``bucket<i>/comm`` from the all-reduce's
launch to its completion and ``bucket<i>/update`` around each update, inside the ``step<k>``
ranges recorded here (behind a simulated link the overlap mode is built with
:func:`~benchmarks.instrument.labelled_hook`, which labels the link's communication alike). Open
the file in ``chrome://tracing`` or https://ui.perfetto.dev (a ``.json.gz`` name writes it
compressed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

__all__ = ["write_trace"]


def _profiler(device: torch.device) -> profile:
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    try:
        # The updates run on overlap-sgd's worker thread: record every thread, not just this one.
        from torch.profiler import _ExperimentalConfig

        config = _ExperimentalConfig(profile_all_threads=True)
        return profile(activities=activities, experimental_config=config)
    except (ImportError, TypeError):
        return profile(activities=activities)


def write_trace(path: str | Path, step: Callable[[], object], steps: int, device: torch.device,
                record: bool = True) -> Path | None:
    """Run ``step`` ``steps`` times; with ``record``, under the profiler, saving a Chrome trace.

    Every rank runs the steps (they communicate); only the ranks with ``record`` profile.
    """
    if not record:
        for _ in range(steps):
            step()
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _profiler(device) as prof:
        for k in range(steps):
            with record_function(f"step{k}"):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # every kernel finished before the profiler stops
    prof.export_chrome_trace(str(path))  # gzip-compressed when the name ends in .gz
    return path
