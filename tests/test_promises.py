"""What the README promises about the API, each checked against DDP + post-backward torch.optim.

Every body trains an overlapped model beside a reference DDP model that steps after backward,
both naming the same kernel (``fused=True``), so that with 2 ranks they must agree bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from overlap_sgd.hooks import ThreadExecutor, make_overlap_hook
from tests.distributed import run_distributed
from tests.models import Net, batch, twin

STEPS = 3


def _sgd(params: Any) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01, fused=True)


def _pair() -> tuple[DDP, DDP, list[torch.Tensor]]:
    torch.manual_seed(0)
    net = Net()
    initial = [p.detach().clone() for p in net.parameters()]
    return DDP(twin(net), bucket_cap_mb=0.002), DDP(net, bucket_cap_mb=0.002), initial


def _loss(model: DDP, step: int, rank: int) -> torch.Tensor:
    x, y = batch(step, rank)
    return F.mse_loss(model(x), y)


def _compare(model: DDP, opt: torch.optim.Optimizer, ref: DDP, ref_opt: torch.optim.Optimizer,
             initial: list[torch.Tensor]) -> dict[str, bool]:
    pairs = list(zip(model.parameters(), ref.parameters()))
    return {
        "moved": all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), initial)),
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        "parity": all(torch.equal(a, b) for a, b in pairs),
        "state_parity": all(
            torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])
            for a, b in pairs
        ),
    }


def _assert_trained_as_post_backward(results: list[dict[str, Any]]) -> None:
    for rank, r in enumerate(results):
        assert r["moved"] and r["finite"], (rank, r)
        assert r["parity"], f"rank {rank}: parameters differ from post-backward"
        assert r["state_parity"], f"rank {rank}: optimizer state differs from post-backward"


# -- the wrapped optimizer's own step() --------------------------------------------------------


def _inner_step(rank: int, world_size: int) -> dict[str, Any]:
    ref, model, initial = _pair()
    ref_opt = _sgd(ref.parameters())
    inner = _sgd(model.parameters())
    opt = overlap_sgd.overlap(model, inner)
    for step in range(STEPS):
        for m, o in ((ref, ref_opt), (model, inner)):  # the loop keeps the original object
            _loss(m, step, rank).backward()
            o.step()
            o.zero_grad()
    return {**_compare(model, opt, ref, ref_opt, initial), "syncs": opt.hook_state.syncs}


def test_the_wrapped_optimizers_own_step_updates_nothing_twice():
    # A loop that still calls the original optimizer's step() gets the overlapped one's: the
    # update ran in backward, and step() only closes the step (no second update, no refusal
    # of the next backward for a missing step()).
    results = run_distributed(_inner_step, 2)
    _assert_trained_as_post_backward(results)
    assert all(r["syncs"] == STEPS for r in results)


# -- step hooks ---------------------------------------------------------------------------------


def _step_hooks(rank: int, world_size: int) -> dict[str, Any]:
    ref, model, initial = _pair()
    ref_opt = _sgd(ref.parameters())
    opt = overlap_sgd.overlap(model, _sgd(model.parameters()))
    calls: list[tuple[str, int]] = []
    seen: list[bool] = []
    step_now = [0]

    def pre(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert optimizer is opt
        calls.append(("pre", step_now[0]))
        # The update already ran inside backward(): the pre hook sees the new parameters.
        seen.append(not torch.equal(model.module.head.weight, snapshot[0]))

    def post(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        assert optimizer is opt
        calls.append(("post", step_now[0]))

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    for step in range(STEPS):
        step_now[0] = step
        snapshot = [model.module.head.weight.detach().clone()]
        for m, o in ((ref, ref_opt), (model, opt)):
            _loss(m, step, rank).backward()
            o.step()
            o.zero_grad()
    return {**_compare(model, opt, ref, ref_opt, initial), "calls": calls, "seen": seen}


def test_step_hooks_run_once_per_step():
    results = run_distributed(_step_hooks, 2)
    _assert_trained_as_post_backward(results)
    for r in results:
        assert r["calls"] == [(kind, s) for s in range(STEPS) for kind in ("pre", "post")]
        assert r["seen"] == [True] * STEPS


# -- an Executor instance -----------------------------------------------------------------------


class CountingExecutor(ThreadExecutor):
    """A ThreadExecutor that counts the updates handed to it."""

    def __init__(self) -> None:
        super().__init__(name="counting-executor", defer=False)
        self.calls = 0

    def after(self, comm, used, update):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().after(comm, used, update)


def _executor_instance(rank: int, world_size: int) -> dict[str, Any]:
    ref, model, initial = _pair()
    ref_opt = _sgd(ref.parameters())
    executor = CountingExecutor()
    opt = overlap_sgd.overlap(model, _sgd(model.parameters()), executor=executor, slice_mb=None)
    for step in range(STEPS):
        for m, o in ((ref, ref_opt), (model, opt)):
            _loss(m, step, rank).backward()
            o.step()
            o.zero_grad()
    buckets = len(opt.hook_state._plans)
    return {**_compare(model, opt, ref, ref_opt, initial), "calls": executor.calls, "buckets": buckets,
            "same": opt.hook_state.executor(torch.device("cpu")) is executor}


def test_an_executor_instance_runs_every_update():
    results = run_distributed(_executor_instance, 2)
    _assert_trained_as_post_backward(results)
    for r in results:
        assert r["same"]
        # Every bucket of every step went through it (the first step's buckets may be fewer:
        # DDP regroups them after it).
        assert r["buckets"] > 1 and r["calls"] >= (STEPS - 1) * r["buckets"] + 1, r


# -- make_overlap_hook by hand ------------------------------------------------------------------


def _by_hand(rank: int, world_size: int) -> dict[str, Any]:
    ref, model, initial = _pair()
    ref_opt = _sgd(ref.parameters())
    sgd = _sgd(model.parameters())
    hook, state = make_overlap_hook([overlap_sgd.FunctionalSGD.bind(sgd)],
                                    process_group=model.process_group, require_step=True)
    model.register_comm_hook(state, hook)
    for step in range(STEPS):
        _loss(ref, step, rank).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        _loss(model, step, rank).backward()  # updates the parameters; no sgd.step()
        state.acknowledge_step(0)
        sgd.zero_grad()
    out = _compare(model, sgd, ref, ref_opt, initial)
    # require_step: a second synchronising backward without acknowledge_step() is refused.
    _loss(model, STEPS, rank).backward()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        _loss(model, STEPS + 1, rank).backward()
        out["refused"] = None
    except RuntimeError as exc:
        out["refused"] = str(exc)
    out["untouched"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return out


def test_make_overlap_hook_by_hand_with_require_step():
    results = run_distributed(_by_hand, 2)
    _assert_trained_as_post_backward(results)
    for r in results:
        assert r["refused"] is not None and "step()" in r["refused"], r["refused"]
        assert r["untouched"], "the refused backward changed parameters"


# -- one kernel call per param group per bucket --------------------------------------------------


def _kernel_calls(rank: int, world_size: int) -> dict[str, Any]:
    from overlap_sgd.functional import sgd as functional_sgd

    calls: list[list[int]] = []
    kernel = functional_sgd.sgd

    def counting(params: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        calls.append(sorted(id(p) for p in params))
        return kernel(params, *args, **kwargs)

    functional_sgd.sgd = counting
    buckets: dict[int, list[int]] = {}

    def recording(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buckets[bucket.index()] = [id(p) for p in bucket.parameters()]
        return default_hooks.allreduce_hook(state, bucket)

    out: dict[str, Any] = {}
    for comm in ("recorded", "default"):
        ref, model, initial = _pair()
        ref_opt = _sgd(_groups(ref))
        opt = overlap_sgd.overlap(model, _sgd(_groups(model)), slice_mb=None,
                                  **({"comm_hook": recording, "comm_state": model.process_group}
                                     if comm == "recorded" else {}))
        for step in range(STEPS):
            calls.clear()
            buckets.clear()
            for m, o in ((ref, ref_opt), (model, opt)):
                _loss(m, step, rank).backward()
                o.step()
                o.zero_grad()
        # The last step's calls: one per (bucket, param group) pair, with exactly those params.
        group_of = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
        if comm == "recorded":
            expected = sorted(
                sorted(i for i in members if group_of[i] == g)
                for members in buckets.values() for g in {group_of[i] for i in members}
            )
            out["expected"] = len(expected)
            out["exact_sets"] = sorted(calls) == expected
            out["buckets"] = len(buckets)
        out[comm] = len(calls)
        out[f"{comm}_compare"] = _compare(model, opt, ref, ref_opt, initial)
    return out


def _groups(model: DDP) -> list[dict[str, Any]]:
    weights = [p for p in model.module.parameters() if p.ndim == 2]
    biases = [p for p in model.module.parameters() if p.ndim == 1]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def test_one_kernel_call_per_param_group_per_bucket():
    for r in run_distributed(_kernel_calls, 2):
        assert r["exact_sets"], r
        # Several buckets, some holding both groups: more calls than buckets, fewer than
        # parameters.
        assert r["recorded"] == r["expected"] == r["default"], r
        assert r["expected"] > r["buckets"] > 1, r
        for comm in ("recorded", "default"):
            _assert_trained_as_post_backward([r[f"{comm}_compare"]])
