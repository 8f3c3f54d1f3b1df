"""``overlap_sgd.checkpoint`` with sharded optimizer state: every rank writes its share (DCP) into
one directory that appears whole or not at all, and a run resumes from it on any number of
ranks, bit-identical to a run that never stopped on the same number."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from overlap_sgd.checkpoint import (
    checkpoint_path,
    checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tests.distributed import run_distributed
from tests.models import Net, batch

STEPS, SAVED_AT = 6, 3


def _train(rank: int, world_size: int, directory: str, resume: bool, shard: bool) -> dict:
    torch.manual_seed(0)
    model = DDP(Net(depth=4), bucket_cap_mb=0.004)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    opt = overlap_sgd.overlap(model, opt, shard=True) if shard else opt
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    start = 0
    if resume:
        start = load_checkpoint(latest_checkpoint(directory), model, opt, sched)["step"]
    for step in range(start, STEPS):
        x, y = batch(step, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step + 1 == SAVED_AT and not resume:
            save_checkpoint(checkpoint_path(directory, step + 1), checkpoint_state(model, opt, sched, step=step + 1))
    params = [p.detach() for p in model.parameters()]
    assert all(torch.isfinite(p).all() for p in params)
    held = sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"params": [p.tolist() for p in params], "held": held, "start": start}


def test_a_sharded_checkpoint_resumes_on_any_number_of_ranks(tmp_path) -> None:
    directory = str(tmp_path)
    uninterrupted = run_distributed(_train, 2, directory, False, True, timeout=120)
    (ckpt,) = os.listdir(directory)
    assert ckpt == "ckpt-00000003.dcp" and sorted(os.listdir(tmp_path / ckpt)) == ["optimizer", "state.pt"]
    # Two ranks again: the same kernels on the same sums, bit for bit.
    resumed = run_distributed(_train, 2, directory, True, True, timeout=120)
    assert [r["start"] for r in resumed] == [SAVED_AT] * 2
    assert resumed[0]["params"] == uninterrupted[0]["params"]
    # Three ranks, sharded, against the plain post-backward optimizer resumed from the same
    # checkpoint: equal within rounding (a sum over three ranks in another order, other kernels).
    three = run_distributed(_train, 3, directory, True, True, timeout=120)
    plain = run_distributed(_train, 3, directory, True, False, timeout=120)
    for a, b in zip(three[0]["params"], plain[0]["params"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    assert sum(r["held"] for r in three) == plain[0]["held"] and max(r["held"] for r in three) < plain[0]["held"]
    # One rank, unsharded, reads the whole state.
    (one,) = run_distributed(_train, 1, directory, True, False, timeout=120)
    assert one["start"] == SAVED_AT


def test_a_half_written_sharded_checkpoint_is_ignored(tmp_path) -> None:
    # What a job killed while writing leaves behind: the temporary directory, never the final one.
    (tmp_path / ".ckpt-00000009.dcp.tmp" / "optimizer").mkdir(parents=True)
    (tmp_path / "ckpt-00000004.dcp").mkdir()
    (tmp_path / "ckpt-00000002.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-00000004.dcp"
