"""``check_finite``: a bucket whose gradients hold inf/NaN is left untouched and reported.

``"backward"`` (the CPU default) raises from ``backward()``; ``"step"`` (the CUDA default) keeps
each bucket's verdict on the device, lets torch's fused kernels skip the bucket there, and
raises from ``step()``. Both must leave exactly the bad bucket untouched and train every other
bucket as a post-backward step would; the next iteration trains normally. These tests run the
device-verdict path on CPU, where the same kernels take ``found_inf``.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from overlap_sgd.functional import adam as functional_adam
from overlap_sgd.functional import base as functional_base
from overlap_sgd.functional import sgd as functional_sgd
from tests.distributed import run_distributed
from tests.models import Net, batch, twin

OPTIMIZERS = {
    # Unset kernels: the bucket update picks torch's fused kernel, which skips on the device.
    "sgd-momentum": partial(torch.optim.SGD, lr=0.05, momentum=0.9),
    "adamw": partial(torch.optim.AdamW, lr=0.01),
    "sgd-fused": partial(torch.optim.SGD, lr=0.05, momentum=0.9, fused=True),
    "adamw-fused": partial(torch.optim.AdamW, lr=0.01, fused=True),
    # Kernels without found_inf: the update reads the verdict on the host instead.
    "sgd-foreach": partial(torch.optim.SGD, lr=0.05, momentum=0.9, foreach=True),
    "adam-single": partial(torch.optim.Adam, lr=0.01, foreach=False),
    "adagrad-generic": partial(torch.optim.Adagrad, lr=0.05),
}
POISONED_STEP = 2


def _snapshot(params, opt) -> list[torch.Tensor]:
    out = [p.detach().clone() for p in params]
    for p in params:
        out += [v.clone() for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return out


def _bad_bucket_training(rank: int, world_size: int, name: str, where: str, shard: bool = False) -> dict:
    torch.manual_seed(0)
    net = Net()
    ref, ovl = DDP(twin(net), bucket_cap_mb=0.002), DDP(net, bucket_cap_mb=0.002)
    ref_opt = OPTIMIZERS[name](ref.parameters())
    opt = overlap_sgd.overlap(ovl, OPTIMIZERS[name](ovl.parameters()), check_finite=where, shard=shard)
    initial = [p.detach().clone() for p in ovl.parameters()]
    host_reads = []
    out: dict = {}
    for step in range(POISONED_STEP + 3):
        x, y = batch(step, rank)
        poison = step == POISONED_STEP
        handle = None
        if poison and rank == 0:  # NaN in one parameter's gradient, every rank after the all-reduce
            handle = ovl.module.head.bias.register_hook(lambda g: g + float("nan"))
        F.mse_loss(ref(x), y).backward()
        reads = [0]
        real = functional_base.skip_on_host

        def counting(found_inf):
            reads[0] += found_inf is not None
            return real(found_inf)

        readers = (functional_base, functional_sgd, functional_adam)
        for module in readers:
            module.skip_on_host = counting
        try:
            if poison:
                plans = opt.hook_state._plans.values()
                (bad,) = [p for p in plans if any(q is ovl.module.head.bias for q in p.params)]
                bad_params = [bad.params[i] for i in bad.owned_positions()]
                before = _snapshot(bad_params, opt)
                if where != "step":
                    with pytest.raises(overlap_sgd.NonFiniteGradientError) as info:
                        F.mse_loss(ovl(x), y).backward()
                else:
                    F.mse_loss(ovl(x), y).backward()  # no error, no host read of the verdict
                    out["reads_in_backward"] = reads[0]
                    with pytest.raises(overlap_sgd.NonFiniteGradientError) as info:
                        opt.step()
                out["message"] = str(info.value)
                out["untouched"] = all(
                    torch.equal(a, b) for a, b in zip(before, _snapshot(bad_params, opt))
                )
                # The reference skips exactly that bucket, as if its gradients had been None.
                ref_bad = {id(q) for q, p in zip(ref.parameters(), ovl.parameters()) if any(p is b for b in bad_params)}
                for q in ref.parameters():
                    if id(q) in ref_bad:
                        q.grad = None
            else:
                F.mse_loss(ovl(x), y).backward()
                opt.step()
            if step > 0:
                host_reads.append(reads[0])
        finally:
            for module in readers:
                module.skip_on_host = real
            if handle is not None:
                handle.remove()
        ref_opt.step()
        for o in (ref_opt, opt):
            o.zero_grad()
    for p, q, p0 in zip(ovl.parameters(), ref.parameters(), initial):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(p).all()
        assert not torch.equal(p.detach(), p0)
    out["host_reads"] = host_reads
    return out


@pytest.mark.parametrize("where", ["backward", "step"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_bad_bucket_is_left_untouched_and_reported(name: str, where: str) -> None:
    for r in run_distributed(_bad_bucket_training, 2, name, where, timeout=90):
        assert "'head.bias'" in r["message"] and "left untouched" in r["message"], r
        assert r["untouched"], "the bad bucket's parameters or optimizer state changed"
        if where == "step":
            fused = name in ("sgd-momentum", "adamw", "sgd-fused", "adamw-fused")
            # With a fused kernel the verdict never reaches the host inside backward; other
            # kernels read it there (one read per segment update).
            assert (r["reads_in_backward"] == 0) == fused, r
            assert (max(r["host_reads"]) == 0) == fused, r
        else:
            assert max(r["host_reads"]) == 0, "the host verdict path passed found_inf"


@pytest.mark.parametrize("where", ["backward", "step"])
@pytest.mark.parametrize("name", ["sgd-fused", "adamw-fused", "sgd-momentum", "adagrad-generic"])
def test_a_bad_bucket_is_left_untouched_when_sharded(name: str, where: str) -> None:
    # Each rank checks its local gradients and the verdicts are reduced over the ranks, so
    # every rank skips the same bucket and reports the same parameters.
    for r in run_distributed(_bad_bucket_training, 2, name, where, True, timeout=90):
        assert "'head.bias'" in r["message"] and "left untouched" in r["message"], r
        assert r["untouched"], "the bad bucket's parameters or optimizer state changed"
        if where == "step":
            # Sharded ranges on CPU take the fused kernel only where the group asks for it (an
            # unset kernel runs the multi-tensor one there): only it skips on the device.
            assert (r["reads_in_backward"] == 0) == name.endswith("-fused"), r


def test_check_finite_true_reports_from_backward_on_cpu() -> None:
    # True picks the place that costs no wait for the device: backward() on CPU.
    for r in run_distributed(_bad_bucket_training, 2, "sgd-momentum", True, timeout=90):
        assert "'head.bias'" in r["message"] and r["untouched"]
