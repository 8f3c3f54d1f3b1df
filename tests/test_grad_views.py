"""``.grad`` as bucket views: after backward each gradient is a view into DDP's communication
bucket (DDP's copy of the buckets into ``.grad`` is skipped), with the values post-backward
training has, and each view is replaced by a copy of its own before the model's next forward."""

from __future__ import annotations

import warnings

import pytest
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


def _reducer_copies(rank: int, world_size: int) -> list[int]:
    # DDP's reducer records each copy of a bucket into .grad; with views it makes none.
    counts = []
    for grad_views in (True, False):
        torch.manual_seed(0)
        model = DDP(Net(), bucket_cap_mb=0.002)
        opt = overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                  grad_views=grad_views)
        for step in range(2):
            x, y = batch(step, rank)
            with torch.profiler.profile() as prof:
                F.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        counts.append(sum("copy_bucket_to_grad" in e.name for e in prof.events()))
    return counts


def test_ddp_copies_no_bucket_into_grad() -> None:
    for with_views, without in run_distributed(_reducer_copies, 2):
        assert with_views == 0 and without > 0, (with_views, without)


class _Strided(torch.nn.Module):
    """A channels_last convolution and a transposed (non-contiguous, dense) matrix: DDP lays
    out their gradients in the bucket with the parameters' own strides. And a matrix with gaps
    between its elements (not dense), whose gradient DDP lays out row-major: torch's fused
    kernels, which index a parameter and its gradient by the same memory offsets, cannot
    update it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        self.mat = torch.nn.Parameter(torch.randn(4, 6).t())  # shape (6, 4), strides (1, 6)
        self.gap = torch.nn.Parameter(torch.randn(6, 8)[:, ::2])  # shape (6, 4), strides (8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x.to(memory_format=torch.channels_last))).mean(dim=(2, 3))
        return h @ self.mat.t() + torch.tanh(h @ self.gap.t())


def _strided_parity(rank: int, world_size: int, optimizer: str) -> int:
    torch.manual_seed(0)
    net = _Strided()
    assert not net.mat.is_contiguous() and not net.conv.weight.is_contiguous()
    assert net.gap.stride() == (8, 2)
    ref, ovl = DDP(twin(net), bucket_cap_mb=25), DDP(net, bucket_cap_mb=25)
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    }[optimizer]
    ref_opt = make(ref.parameters())
    opt = overlap_sgd.overlap(ovl, make(ovl.parameters()))
    initial = [p.detach().clone() for p in ovl.parameters()]
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):
        x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 6, generator=g)
        for model, o in ((ref, ref_opt), (ovl, opt)):
            F.mse_loss(model(x), y).backward()
        for p, q in zip(ovl.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        for o in (ref_opt, opt):
            o.step()
            o.zero_grad()
    for p, q, p0 in zip(ovl.parameters(), ref.parameters(), initial):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach(), p0)
    return len(initial)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_parameters_with_their_own_strides_keep_parity(optimizer: str) -> None:
    assert run_distributed(_strided_parity, 2, optimizer) == [4, 4]


def _clip_then_eval(rank: int, world_size: int) -> list[str]:
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=25)
    opt = overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = batch(0, rank)
    F.mse_loss(model(x), y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # too late: already updated
    with torch.no_grad():
        model(x)  # the gradients get copies of their own; the change must still be seen
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return [str(w.message) for w in caught]


def test_a_late_gradient_change_is_seen_across_an_eval_forward() -> None:
    for messages in run_distributed(_clip_then_eval, 2):
        assert any("modified in place after backward" in m for m in messages), messages


def _zeroed_in_place_forward_called_directly(rank: int, world_size: int) -> bool:
    # model.forward(x) skips module hooks, the pre-hook that un-aliases gradients included;
    # zero_grad(set_to_none=False) gives the gradients zeros of their own, so nothing aliases a
    # bucket when DDP copies the next gradients in.
    torch.manual_seed(0)
    net = Net()
    ref, ovl = DDP(twin(net), bucket_cap_mb=0.002), DDP(net, bucket_cap_mb=0.002)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    opt = overlap_sgd.overlap(ovl, torch.optim.AdamW(ovl.parameters(), lr=0.01))
    initial = [p.detach().clone() for p in ovl.parameters()]
    for step in range(4):
        x, y = batch(step, rank)
        for model, o in ((ref, ref_opt), (ovl, opt)):
            F.mse_loss(model.forward(x), y).backward()
            o.step()
        for p, q in zip(ovl.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        for o in (ref_opt, opt):
            o.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad._is_view() and not p.grad.any()
                   for p in ovl.parameters())
    for p, q, p0 in zip(ovl.parameters(), ref.parameters(), initial):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach(), p0)
    return True


def test_zero_grad_in_place_needs_no_forward_hook() -> None:
    assert run_distributed(_zeroed_in_place_forward_called_directly, 2) == [True, True]
