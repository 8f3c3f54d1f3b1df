"""Reliability: no hangs when a peer dies or stalls, errors in an update surface from
``backward()``, and drift between ranks is detected and named."""

from __future__ import annotations

import datetime
import os
import re
import signal
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from tests.distributed import run_distributed
from tests.models import Net, batch


def _train_step(model: DDP, opt: torch.optim.Optimizer, step: int, rank: int) -> None:
    x, y = batch(step, rank)
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


PEER_GONE = re.compile(r"Connection (reset|closed) by peer")
# Gloo names the timeout in the collective that times out first; others still in flight then
# fail with the pair it closed, and backward() raises whichever DDP waits for first.
TIMED_OUT = re.compile(r"Timed out waiting 4000ms|Application timeout caused pair closure")


def _peer_fails(rank: int, world_size: int, how: str, directory: str) -> dict | None:
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    _train_step(model, opt, 0, rank)  # one healthy step first
    # From here on a collective waits at most 4 s for a peer (start-up had the harness's 60 s).
    model.process_group.set_timeout(datetime.timedelta(seconds=4))
    failed = os.path.join(directory, "rank0-failed")
    if rank == 1:
        if how == "dies":
            os.kill(os.getpid(), signal.SIGKILL)
        # Stall until rank 0 has given up on this rank (or the harness gives up on the test).
        while not os.path.exists(failed):
            time.sleep(0.05)
        return None
    try:
        _train_step(model, opt, 1, rank)
    except Exception as exc:  # the surviving rank must fail, not hang
        return {"type": type(exc), "error": str(exc)}
    finally:
        open(failed, "w").close()
    return {"type": None, "error": None}


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_surviving_rank_fails_within_the_timeout(how: str, tmp_path) -> None:
    # backward() must raise, naming the lost connection or the process group's timeout, rather
    # than wait forever on the missing peer (the harness's 60 s limit catches a hang).
    results = run_distributed(_peer_fails, 2, how, str(tmp_path), timeout=60, may_die=(1,))
    survivor = results[0]
    assert survivor["type"] is RuntimeError, survivor
    assert (PEER_GONE if how == "dies" else TIMED_OUT).search(survivor["error"]), survivor


def _update_error_surfaces(rank: int, world_size: int, executor: str) -> dict:
    from tests.models import twin

    torch.manual_seed(0)
    net = Net()
    ref = DDP(twin(net), bucket_cap_mb=0.002)
    model = DDP(net, bucket_cap_mb=0.002)
    # Both sides name the fused kernel: after the recovery they must agree bit for bit.
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.1, fused=True)
    opt = overlap_sgd.overlap(model, torch.optim.Adam(model.parameters(), lr=0.1, fused=True),
                              check_finite=True, executor=executor)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0, rank)
    if rank == 0:
        x[0, 0] = float("nan")  # poisons every gradient, on every rank after the all-reduce
    with pytest.raises(overlap_sgd.NonFiniteGradientError) as info:
        F.mse_loss(model(x), y).backward()
    unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    result = {"message": str(info.value), "unchanged": unchanged, "state_empty": len(opt.state) == 0}
    # The pass that raised left DDP in a clean state: the next iterations train normally, as
    # post-backward training that skipped the poisoned batch does.
    opt.zero_grad()
    for step in (1, 2):
        _train_step(ref, ref_opt, step, rank)
        _train_step(model, opt, step, rank)
    pairs = list(zip(model.parameters(), ref.parameters()))
    result["moved"] = not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    result["finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    result["parity"] = all(torch.equal(a, b) for a, b in pairs) and all(
        torch.equal(opt.state[a][k], ref_opt.state[b][k])
        for a, b in pairs for k in ("exp_avg", "exp_avg_sq", "step")
    )
    return result


@pytest.mark.parametrize("executor", ["thread", "inline"])
def test_exception_in_update_reaches_backward(executor: str) -> None:
    for r in run_distributed(_update_error_surfaces, 2, executor, timeout=60):
        assert re.search(r"non-finite gradient in bucket \d+ for '(inp|body|head)\.", r["message"])
        assert "left untouched" in r["message"]
        assert r["unchanged"] and r["state_empty"]
        assert r["moved"] and r["finite"]
        assert r["parity"], "after the failed update, training differs from post-backward"


def _drift(rank: int, world_size: int, what: str) -> str:
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, torch.optim.AdamW(model.parameters(), lr=0.01))
    for step in range(3):
        _train_step(model, opt, step, rank)
    overlap_sgd.check_consistency(model)  # healthy: passes on every rank
    if rank == 1:
        with torch.no_grad():
            if what == "parameter":
                model.module.body[1].bias[3] += 1e-7
            else:
                opt.state[model.module.head.weight]["exp_avg_sq"][0, 0] *= 1.0000001
    with pytest.raises(overlap_sgd.ConsistencyError) as info:
        overlap_sgd.check_consistency(model)
    return str(info.value)


@pytest.mark.parametrize("what", ["parameter", "state"])
def test_drift_is_detected_and_named(what: str) -> None:
    expected = "parameter 'body.1.bias'" if what == "parameter" else "state['head.weight']['exp_avg_sq']"
    for message in run_distributed(_drift, 2, what):
        assert expected in message and "ranks [1]" in message, message


def _periodic_check(rank: int, world_size: int) -> int:
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.002)
    opt = overlap_sgd.overlap(model, torch.optim.SGD(model.parameters(), lr=0.1),
                              check_consistency_every=3)
    for step in range(2):
        _train_step(model, opt, step, rank)
    if rank == 0:
        with torch.no_grad():
            model.module.head.bias[0] += 1.0
    x, y = batch(2, rank)
    F.mse_loss(model(x), y).backward()
    with pytest.raises(overlap_sgd.ConsistencyError, match="head.bias"):
        opt.step()  # the third step runs the check
    return 0


def test_periodic_consistency_check_fires() -> None:
    run_distributed(_periodic_check, 2)


def _failed_update_keeps_averaged_grads(rank: int, world_size: int, where: str) -> dict:
    # The default communication sums and leaves the averaging to the update: when the update
    # fails, before or after dividing, .grad must still be averaged exactly once.
    from overlap_sgd.functional import sgd as functional_sgd
    from tests.models import twin

    torch.manual_seed(0)
    net = Net()
    ref = DDP(twin(net), bucket_cap_mb=0.002)
    model = DDP(net, bucket_cap_mb=0.002)
    kernel = {"foreach": True} if where == "multi-tensor kernel" else {}
    opt = overlap_sgd.overlap(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **kernel)
    )

    def broken(*args, **kwargs):
        raise RuntimeError("update exploded")

    if where == "before the update":
        opt.hook_state.optimizers[0]._update = broken
    else:  # torch's kernel fails after the update divided for a non-fused kernel
        functional_sgd.sgd = broken
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(0, rank)
    F.mse_loss(ref(x), y).backward()
    with pytest.raises(RuntimeError, match="update exploded"):
        F.mse_loss(model(x), y).backward()
    for (name, p_ref), p in zip(ref.module.named_parameters(), model.module.parameters()):
        # Bit for bit: with 2 ranks, halving before the sum (DDP) and after it is exact.
        assert torch.equal(p.grad, p_ref.grad), name
    return {
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters())),
        "summed": any(plan.folds_grad_scale for plan in opt.hook_state._plans.values()),
    }


@pytest.mark.parametrize("where", ["before the update", "fused kernel", "multi-tensor kernel"])
def test_a_failed_update_still_leaves_averaged_gradients(where: str):
    for r in run_distributed(_failed_update_keeps_averaged_grads, 2, where, timeout=60):
        assert r["unchanged"]
        assert r["summed"], "the default communication did not leave the averaging to the update"
