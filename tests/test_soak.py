"""Soak: 2,000 overlapped steps leak nothing per step (futures, state, cached lists, threads).

Marked ``soak``: the default test run skips it; ``.ci/run`` runs it (``pytest -m soak``).
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from benchmarks.memory import trim_heap
from tests.distributed import run_distributed
from tests.models import Net, batch


def _rss_mib() -> float:
    # Free heap goes back to the system first: which thread ran the last update decides which
    # malloc arena holds freed blocks, and that is noise, not growth.
    trim_heap()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _soak(rank: int, world_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = DDP(Net(width=32, depth=4), bucket_cap_mb=0.01)
    opt = overlap_sgd.overlap(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    marks = {}
    for step in range(1, steps + 1):
        x, y = batch(step % 17, rank)  # a few distinct batches: allocation sizes stay stable
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step in (200, steps):
            gc.collect()
            marks[step] = {
                "rss": _rss_mib(),
                "objects": len(gc.get_objects()),
                "threads": threading.active_count(),
                "plans": len(opt.hook_state._plans),
            }
    return marks


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_no_per_step_growth_over_2000_steps() -> None:
    steps = 2000
    for marks in run_distributed(_soak, 2, steps, timeout=540):
        early, late = marks[200], marks[steps]
        assert late["rss"] - early["rss"] < 8.0, marks  # MiB: allocator noise, not 1,800 steps of leaks
        assert late["objects"] - early["objects"] < 200, marks  # nothing accumulates per step
        assert late["threads"] == early["threads"], marks
        assert late["plans"] == early["plans"], marks
