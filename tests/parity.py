"""The parity machinery: train a reference DDP model (post-backward step) and an overlapped one
side by side on every rank, then check parameters, gradients and optimizer state agree and that
the parameters moved. Scenarios are plain dataclass rows; one body runs them all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as powersgd
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from tests.models import Net, batch, twin

__all__ = ["Rounding", "Scenario", "parity_body", "parity_many", "check_moved"]


@dataclass(frozen=True)
class Rounding:
    """How far the overlapped side may differ from the reference, and why it is not bit-exact.

    A scenario without one must match bit for bit: both sides run the same kernel on the same
    averaged gradients (with 2 ranks, DDP's halving before the sum and the overlap's halving
    after it are both exact).
    """

    rtol: float
    atol: float
    why: str

#: ``make(model, scenario) -> list of optimizers`` over the DDP model's parameters.
Maker = Callable[[torch.nn.Module, "Scenario"], list[torch.optim.Optimizer]]


@dataclass
class Scenario:
    name: str = ""
    make: Any = None  # an optimizer factory: params -> Optimizer (picklable), or a Maker via `multi`
    multi: Any = None  # a Maker returning several optimizers
    world_size: int = 2
    steps: int = 6
    bucket_cap_mb: float = 0.002  # ~500 floats: many buckets
    net: dict[str, Any] = field(default_factory=dict)
    ddp: dict[str, Any] = field(default_factory=dict)
    comm: str | None = None
    executor: str = "auto"
    accumulate: int = 1
    groups: bool = False
    scheduler: bool = False
    partial_optimizer: bool = False
    branch_rule: str = "none"
    swap_state_at: int | None = None
    autocast: bool = False
    clip_value: float | None = None
    #: Race detectors (:mod:`tests.races`): every collective of the overlap lands late and
    #: scrambled until then, with these :mod:`overlap_sgd.hooks.faults` switches on.
    race: bool = False
    faults: tuple[str, ...] = ()
    #: Per-parameter norm clipping (``clip_grad_norm_per_param``).
    clip_norm: float | None = None
    #: Global-norm clipping (``clip_grad_norm``): the reference calls
    #: ``clip_grad_norm_(model.parameters(), clip_global)`` after backward.
    clip_global: float | None = None
    #: ``ClipGradNorm``'s policy for ``clip_global``.
    clip_policy: str = "auto"
    #: ``ClipGradNorm``'s norm type for ``clip_global``.
    clip_norm_type: float = 2.0
    #: Clip through ``opt.clip_grad_norm_(clip_global)`` after backward instead of in ``step()``.
    clip_method: bool = False
    slice_mb: float | str | None = "auto"
    #: Lowers ``slice_mb="auto"``'s minimum slice, so that the test's small buckets are cut.
    auto_min_slice_mb: float | None = None
    #: After each step: "none" (zero_grad() to None), "zeros" (zero_grad(set_to_none=False)),
    #: "model" (the DDP model's zero_grad(), to None, not the optimizer's) or "keep" (never
    #: zeroed: gradients accumulate across synchronised steps).
    zero: str = "none"
    grad_views: bool = True
    #: ``None``: bit-identical to the reference. Otherwise the tolerance and its reason.
    rounding: Rounding | None = None
    #: "step" (StepLR) or "cosine" (CosineAnnealingLR), used with ``scheduler=True``.
    schedule: str = "step"
    #: ``overlap(..., shard=True)``: each rank keeps the state of its share of every bucket.
    shard: bool = False
    #: Where the models live ("cuda": the rank's current CUDA device).
    device: str = "cpu"
    #: The parameters' (and inputs') dtype, e.g. "bfloat16"; ``None`` keeps float32.
    dtype: str | None = None


def _params(model: DDP, scenario: Scenario) -> Any:
    named = [(n, p) for n, p in model.module.named_parameters() if p.requires_grad]
    if scenario.partial_optimizer:
        return [p for n, p in named if not n.startswith("head")]
    if not scenario.groups:
        return [p for _, p in named]
    body = [p for n, p in named if n.startswith("body")]
    rest = [p for n, p in named if not n.startswith("body")]
    return [{"params": body, "lr": 0.02, "weight_decay": 0.05}, {"params": rest}]


def _optimizers(model: DDP, scenario: Scenario) -> list[torch.optim.Optimizer]:
    if scenario.multi is not None:
        return scenario.multi(model, scenario)
    return [scenario.make(_params(model, scenario))]


def bf16_allreduce(state, bucket):  # unannotated: DDP inspects hook annotations
    """torch's bf16 compression hook under another name: DDP refuses the original off CUDA."""
    return default_hooks.bf16_compress_hook(state, bucket)


def fresh_allreduce(state, bucket):  # unannotated: DDP inspects hook annotations
    """An averaged all-reduce whose result is a new tensor each step, not the bucket buffer."""
    import torch.distributed as dist

    flat = bucket.buffer().clone()
    fut = dist.all_reduce(flat, group=state, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0] / dist.get_world_size(state))


def late_allreduce(state, bucket):  # unannotated: DDP inspects hook annotations
    """An averaged all-reduce whose future another thread completes a few milliseconds after
    the collective finished: whatever waits on it must wait for that thread, not the collective."""
    import threading
    import time

    import torch.distributed as dist

    buffer = bucket.buffer()
    reduced = dist.all_reduce(buffer, group=state, async_op=True).get_future()
    late = torch.futures.Future(devices=[buffer.device] if buffer.is_cuda else None)

    def complete() -> None:
        try:
            with torch.cuda.device(buffer.device) if buffer.is_cuda else nullcontext():
                result = reduced.wait()[0]  # on CUDA: this thread's stream waits for it
                time.sleep(0.005)
                late.set_result(result.div_(dist.get_world_size(state)))
        except Exception as exc:
            late.set_exception(exc)

    threading.Thread(target=complete, daemon=True).start()
    return late


def _comm(scenario: Scenario, process_group: Any) -> tuple[Any, Any]:
    if scenario.comm is None:
        return None, None
    if scenario.comm == "fp16":
        return default_hooks.fp16_compress_hook, process_group
    if scenario.comm == "bf16":
        return bf16_allreduce, process_group
    if scenario.comm == "fresh":
        return fresh_allreduce, process_group
    if scenario.comm == "late":
        return late_allreduce, process_group
    if scenario.comm == "scramble":
        from tests.races import scramble_allreduce

        return scramble_allreduce, process_group
    if scenario.comm == "powersgd":
        state = powersgd.PowerSGDState(
            process_group=process_group, matrix_approximation_rank=1, start_powerSGD_iter=2,
            min_compression_rate=0.5, random_seed=7,
        )
        return powersgd.powerSGD_hook, state
    raise ValueError(scenario.comm)


def _uses_branch(rule: str, step: int, rank: int) -> bool:
    if rule == "mixed":  # some steps one rank, some steps no rank at all
        return step % 4 == rank
    if rule == "rank0":  # every step, on rank 0 only (a static graph allows that)
        return rank == 0
    return False


def _clip_reference(model: DDP, scenario: Scenario) -> None:
    for p in model.parameters():
        if p.grad is None:
            continue
        if scenario.clip_value is not None:
            torch.nn.utils.clip_grad_value_([p], scenario.clip_value)
        if scenario.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], scenario.clip_norm)


def _close(actual: torch.Tensor, expected: torch.Tensor, scenario: Scenario, what: str) -> None:
    """``actual`` (overlapped) equals ``expected`` (reference): bit for bit, or within the
    scenario's :class:`Rounding`. Both must be finite: two runs that blew up alike prove nothing."""
    for side, t in (("overlapped", actual), ("reference", expected)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AssertionError(f"[{scenario.name}] {what}: the {side} value is not finite")
    r = scenario.rounding
    if r is None:
        if not torch.equal(actual, expected):
            diff = (actual.double() - expected.double()).abs().max().item() if actual.shape == expected.shape else "shape"
            raise AssertionError(
                f"[{scenario.name}] {what}: not bit-identical to the reference (max abs difference {diff})"
            )
        return
    torch.testing.assert_close(
        actual, expected, rtol=r.rtol, atol=r.atol, msg=lambda m: f"[{scenario.name}] {what}: {m}",
    )


def parity_body(rank: int, world_size: int, scenario: Scenario) -> dict[str, Any]:
    """Train ``scenario`` both ways on this rank; raise ``AssertionError`` where they differ."""
    if not (scenario.race or scenario.faults):
        return _parity_body(rank, world_size, scenario)
    from tests.races import detectors

    with detectors(*scenario.faults):
        return _parity_body(rank, world_size, scenario)


def _parity_body(rank: int, world_size: int, scenario: Scenario) -> dict[str, Any]:
    if scenario.auto_min_slice_mb is not None:
        from overlap_sgd.hooks import update_hook

        update_hook.AUTO_MIN_SLICE_MB = scenario.auto_min_slice_mb
    torch.manual_seed(0)
    device = torch.device(scenario.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, scenario.dtype) if scenario.dtype else torch.float32
    net = Net(**scenario.net).to(device, dtype)
    kwargs = dict(bucket_cap_mb=scenario.bucket_cap_mb, **scenario.ddp)
    if device.type == "cuda":
        kwargs["device_ids"] = [device]
    ref = DDP(twin(net), **kwargs)
    ovl = DDP(net, **kwargs)
    hook, hook_state = _comm(scenario, ref.process_group)
    if hook is not None:
        ref.register_comm_hook(hook_state, hook)
    ovl_hook, ovl_hook_state = _comm(scenario, ovl.process_group)

    ref_opts = _optimizers(ref, scenario)
    raw = _optimizers(ovl, scenario)
    wrapped = overlap_sgd.overlap(
        ovl, raw if scenario.multi else raw[0], comm_hook=ovl_hook, comm_state=ovl_hook_state,
        executor=scenario.executor, clip_grad_value=scenario.clip_value,
        clip_grad_norm_per_param=scenario.clip_norm,
        clip_grad_norm=None if scenario.clip_global is None else overlap_sgd.ClipGradNorm(
            scenario.clip_global, norm_type=scenario.clip_norm_type, policy=scenario.clip_policy),
        slice_mb=scenario.slice_mb,
        grad_views=scenario.grad_views, shard=scenario.shard,
    )
    opts = wrapped if scenario.multi else [wrapped]
    assert len(opts) == len(ref_opts)
    assert all(isinstance(o, torch.optim.Optimizer) for o in opts)
    scheds = []
    if scenario.scheduler:
        if scenario.schedule == "cosine":
            scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=scenario.steps, eta_min=1e-3)
                      for o in ref_opts + opts]
        else:
            scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in ref_opts + opts]

    initial = {n: p.detach().clone() for n, p in ovl.module.named_parameters()}
    ref_norms: list[torch.Tensor] = []
    ovl_norms: list[torch.Tensor] = []
    clipped: list[bool] = []
    grad_views = 0
    plans_built: list[int] = []  # after each step
    flag_launches: list[int] = []  # used-flag all-reduces launched so far, after each step
    used_tracker = ovl._overlap_sgd_state.used
    launched = [0]
    if used_tracker is not None:
        launch = used_tracker.launch

        def counted(*args: Any, **kwargs: Any) -> Any:
            launched[0] += 1
            return launch(*args, **kwargs)

        used_tracker.launch = counted
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if scenario.autocast else nullcontext
    for step in range(scenario.steps):
        if scenario.swap_state_at == step:
            # State dicts interchange: each side continues from the other's state.
            sd_ref = [o.state_dict() for o in ref_opts]
            sd = [o.state_dict() for o in opts]
            for o, s in zip(ref_opts, sd):
                o.load_state_dict(s)
            for o, s in zip(opts, sd_ref):
                o.load_state_dict(s)
        last_grads = []
        views = 0
        for model, optimizers in ((ref, ref_opts), (ovl, opts)):
            for micro in range(scenario.accumulate):
                x, y = (t.to(device, dtype) for t in batch(step * scenario.accumulate + micro, rank))
                use = _uses_branch(scenario.branch_rule, step, rank)
                sync = micro == scenario.accumulate - 1
                with (nullcontext() if sync else model.no_sync()):
                    with ctx():
                        out = model(x, use_branch=use)
                    F.mse_loss(out.float(), y).backward()
            if model is ref and (scenario.clip_value or scenario.clip_norm):
                _clip_reference(model, scenario)
            if scenario.clip_global is not None:
                if model is ref:
                    ref_norms.append(torch.nn.utils.clip_grad_norm_(
                        model.parameters(), scenario.clip_global, norm_type=scenario.clip_norm_type))
                elif scenario.clip_method:
                    ovl_norms.append(optimizers[0].clip_grad_norm_(scenario.clip_global))
            last_grads.append({n: None if p.grad is None else p.grad.clone()
                               for n, p in model.module.named_parameters()})
            if model is ovl:
                views = sum(p.grad is not None and p.grad._is_view() for p in ovl.parameters())
            if model is ovl and scenario.clip_global is not None:
                # The gradients are clipped by step() (or the method above): compare them then.
                for o in optimizers:
                    o.step()
                if not scenario.clip_method:
                    ovl_norms.append(optimizers[0].grad_norm)
                clipped.append(optimizers[0].clipped)
                last_grads[-1] = {n: None if p.grad is None else p.grad.clone()
                                  for n, p in model.module.named_parameters()}
            else:
                for o in optimizers:
                    o.step()
            if scenario.zero == "model":
                model.zero_grad()
            for o in optimizers:
                if scenario.zero in ("none", "zeros"):
                    o.zero_grad(set_to_none=scenario.zero == "none")
        grad_views = max(grad_views, views)
        plans_built.append(ovl._overlap_sgd_state.plans_built)
        flag_launches.append(launched[0])
        for s in scheds:
            s.step()
        for n, g in last_grads[0].items():
            g2 = last_grads[1][n]
            if scenario.shard and g2 is None:
                continue  # sharded: .grad only where this rank holds the whole gradient
            assert (g is None) == (g2 is None), f"[{scenario.name}] step {step}: grad of {n} None on one side"
            if g is not None:
                _close(g2, g, scenario, f"step {step} grad {n}")

    moved = {}
    for (n, p_ref), p in zip(ref.module.named_parameters(), ovl.module.parameters()):
        _close(p.detach(), p_ref.detach(), scenario, f"parameter {n}")
        moved[n] = not torch.equal(p.detach(), initial[n])
    for i, (o_ref, o) in enumerate(zip(ref_opts, opts)):
        sd_ref, sd = o_ref.state_dict(), o.state_dict()
        assert sd["param_groups"] == sd_ref["param_groups"], f"[{scenario.name}] param groups"
        assert sd["state"].keys() == sd_ref["state"].keys(), f"[{scenario.name}] state keys"
        for k, st in sd_ref["state"].items():
            assert st.keys() == sd["state"][k].keys()
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    _close(sd["state"][k][key], v, scenario, f"optimizer {i} state {k}/{key}")
                else:
                    assert sd["state"][k][key] == v, f"[{scenario.name}] state {k}/{key}"
    for step, (n_ref, n_ovl) in enumerate(zip(ref_norms, ovl_norms, strict=True)):
        # Unsharded, the per-parameter norms are combined in clip_grad_norm_'s own order: the
        # same bits on the same gradients (once a correction rounded the parameters, the
        # scenario's tolerance). Sharded, pieces' norms are summed over the ranks: rounding.
        if scenario.shard:
            rtol = max(1e-5, scenario.rounding.rtol if scenario.rounding is not None else 0.0)
            torch.testing.assert_close(n_ovl.float(), n_ref.float(), rtol=rtol, atol=0,
                                       msg=lambda m: f"[{scenario.name}] step {step} norm: {m}")
        else:
            _close(n_ovl, n_ref, scenario, f"step {step} total norm")
    fired = [float(torch.clamp(scenario.clip_global / (n + 1e-6), max=1.0)) < 1.0 for n in ref_norms]
    assert clipped == fired, f"[{scenario.name}] clipped {clipped}, the reference {fired}"
    state = ovl._overlap_sgd_state
    held = sum(v.numel() for o in opts for st in o.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)
    whole = sum(v.numel() for o in ref_opts for st in o.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {
        # Elements of optimizer state this rank holds, and a whole (unsharded) state's.
        "state_held": held,
        "state_whole": whole,
        "state_moved": getattr(getattr(state, "shards", None), "moved", 0),
        "name": scenario.name,
        "moved": moved,
        "lrs": [g["lr"] for o in opts for g in o.param_groups],
        "plans_built": plans_built,
        "flag_launches": flag_launches,
        "buckets": len(state._plans),
        "sliced": any(len(plan._parts.get(k, [])) > 1 for plan in state._plans.values() for k in plan._parts),
        "syncs": state.syncs,
        # The most parameters whose .grad was a view after a backward (bucket views handed out).
        "grad_views": grad_views,
        # Steps whose gradients global-norm clipping scaled down, and steps that ran deferred.
        "clipped": sum(clipped),
        "deferred": getattr(getattr(state, "clipper", None), "deferred_steps", 0),
    }


def parity_many(rank: int, world_size: int, scenarios: list[Scenario]) -> list[dict[str, Any]]:
    """Several scenarios in one set of ranks (saves process start-up)."""
    return [parity_body(rank, world_size, s) for s in scenarios]


def check_moved(result: dict[str, Any], frozen: tuple[str, ...] = ()) -> None:
    for name, moved in result["moved"].items():
        if any(name.startswith(f) for f in frozen):
            assert not moved, f"[{result['name']}] {name} should not have moved"
        else:
            assert moved, f"[{result['name']}] {name} did not move: parity would be trivial"
