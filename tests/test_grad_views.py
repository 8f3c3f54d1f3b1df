"""``.grad`` as bucket views: after backward each gradient is a view into DDP's communication
bucket (DDP's copy of the buckets into ``.grad`` is skipped), with the values post-backward
training has, and each view is replaced by a copy of its own before the model's next forward."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from tests.distributed import run_distributed
from tests.models import Net, batch, twin


def _storages(model: DDP) -> set[int]:
    return {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}


def _views_and_eval_forward(rank: int, world_size: int, grad_views: bool) -> dict:
    torch.manual_seed(0)
    net = Net()
    ref = DDP(twin(net), bucket_cap_mb=25)
    ovl = DDP(net, bucket_cap_mb=25)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    opt = overlap_sgd.overlap(
        ovl, torch.optim.SGD(ovl.parameters(), lr=0.05, momentum=0.9), grad_views=grad_views
    )
    initial = [p.detach().clone() for p in ovl.parameters()]
    storages, copies_kept = [], True
    for step in range(4):
        x, y = batch(step, rank)
        for model in (ref, ovl):
            F.mse_loss(model(x), y).backward()
        storages.append(len(_storages(ovl)))
        for p, q in zip(ovl.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        # An evaluation forward between backward and step (a validation batch, a logging
        # pass): the gradients keep their values, now in storage of their own.
        before = [p.grad.clone() for p in ovl.parameters()]
        with torch.no_grad():
            ovl(x)
        after = [p.grad for p in ovl.parameters()]
        copies_kept &= all(torch.equal(a, b) for a, b in zip(after, before))
        copies_kept &= len(_storages(ovl)) == len(after)
        ref_opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the copies are no in-place change of the gradients
            opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    for p, q, p0 in zip(ovl.parameters(), ref.parameters(), initial):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach(), p0), "a parameter did not move: parity would be trivial"
    params = len(list(ovl.parameters()))
    return {"storages": storages, "params": params, "copies_kept": bool(copies_kept)}


def test_grads_are_views_of_one_bucket_until_the_next_forward() -> None:
    for r in run_distributed(_views_and_eval_forward, 2, True):
        # One 25 MB bucket once DDP has rebuilt its buckets after the first iteration: every
        # gradient is a view into it.
        assert r["storages"][1:] == [1, 1, 1], r
        assert r["copies_kept"], "an evaluation forward changed the gradients"


def test_grad_views_off_keeps_ddp_copies() -> None:
    for r in run_distributed(_views_and_eval_forward, 2, False):
        assert r["storages"] == [r["params"]] * 4, r
        assert r["copies_kept"]


def _views_need_ddp_copy(rank: int, world_size: int) -> list[bool]:
    out = []
    for kwargs in ({"gradient_as_bucket_view": True}, {}):
        model = DDP(Net(), bucket_cap_mb=25, **kwargs)
        opt = overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1))
        out.append(opt.hook_state.grad_views)
    return out


def test_grad_views_only_replace_a_copy_ddp_would_make() -> None:
    # With gradient_as_bucket_view=True DDP's gradients are bucket views already.
    for r in run_distributed(_views_need_ddp_copy, 2):
        assert r == [False, True]
