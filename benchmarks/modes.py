"""The benchmark modes: one DDP model instance each, all built from the same initial weights.

- ``floor``: DDP, backward only, no optimizer: the physical limit of any overlap.
- ``post``: DDP, then ``optimizer.step()`` after backward with torch's default kernels.
- ``post-fused``: the same with the fastest post-backward kernel (fused or foreach).
- ``upstream``: ``DistributedDataParallel._register_fused_optim``, PyTorch's own overlap
  (SGD, Adam and AdamW only; it takes no custom comm hook, so no simulated link).
- ``overlap``: :func:`overlap_sgd.overlap`.
- ``post-fused+clip``: ``post-fused`` with ``torch.nn.utils.clip_grad_norm_(foreach=True)``
  between backward and the step: what every transformer loop does.
- ``overlap+clip``: ``overlap`` with global-norm clipping (``clip_grad_norm=``, the
  ``ClipGradNorm`` policy of :attr:`ModeContext.clip_policy`) and ``opt.clip_grad_norm_``
  between backward and the step. Both clip modes take ``max_norm`` from
  :func:`clip_schedule`: ``"never"`` fires, ``"always"`` fires, or fires on every fourth step
  (``"sometimes"``).
- ``zero-post``: ``torch.distributed.optim.ZeroRedundancyOptimizer`` (each rank keeps the
  optimizer state of its share of the parameters; the post-fused kernel), ``step()`` after
  backward: the usual ZeRO-1 loop, which broadcasts every rank's updated parameters after
  its local step.
- ``zero-upstream``: ``ZeroRedundancyOptimizer(overlap_with_ddp=True)`` with
  ``ddp_zero_hook.hook_with_zero_step_interleaved``, PyTorch's own sharded overlap. NCCL only:
  torch refuses it on gloo, where it may hang, and the mode is reported as skipped. It skips
  the parameter update of the first two or three iterations while DDP settles its buckets, so
  it warms up for at least :data:`ZERO_UPSTREAM_WARMUP` steps.
- ``overlap-shard``: :func:`overlap_sgd.overlap` with ``shard=True`` (ZeRO-1 inside backward).

The FSDP2 modes (:data:`FSDP_MODES`, run only when named in ``--modes``) each build their model
with ``fully_shard`` on every block (the MLP's layers, the transformer's layers, the GPT's
blocks) and on the root, from the same initial weights; each rank holds its shard of every
parameter (a DTensor) and of the optimizer state:

- ``fsdp-floor``: FSDP2, backward only, no optimizer: the physical limit of any overlap.
- ``fsdp-post-fused``: FSDP2, ``optimizer.step()`` after backward over the sharded parameters
  with ``post-fused``'s kernel (``fused=True`` or ``foreach=True``, pinned: torch's default for
  DTensors on CPU is the single-tensor loop), ``foreach=True`` where DTensor has no sharding
  rule for the fused kernel (:func:`dtensor_kernel`).
- ``fsdp-per-param-in-backward``: the optimizer-in-backward of other libraries (torchtune's
  ``OptimizerInBackwardWrapper``, torchtitan's ``OptimizersInBackwardContainer``): one optimizer
  per sharded parameter, same kernel, stepped and its gradient dropped from that parameter's
  ``register_post_accumulate_grad_hook``, which FSDP2 calls right after setting the sharded
  ``.grad`` from the reduce-scatter; the loop's ``step()`` and ``zero_grad()`` do nothing.
- ``fsdp-overlap``: :func:`overlap_sgd.overlap` on the FSDP root: each FSDP group updated, one
  kernel call per optimizer param group, as soon as its reduce-scatter lands (on CPU on a
  worker thread while backward goes on), with ``overlap``'s kernel (the same fallback).

With a simulated link every mode that communicates through a DDP comm hook sends its buckets
through the same :func:`~benchmarks.link.link_hook` wrapper. ``overlap-shard`` communicates
without one: :class:`~benchmarks.link.LinkedCollectives` holds its reduce-scatters and
all-gathers on the same link instead, each charged half its buffer's bytes, and ``zero-post``
carries its parameter broadcast (an all-gather's worth of bytes) on the link after its step (see
:mod:`benchmarks.link`). The FSDP2 modes' all-gathers and reduce-scatters are held on the link
by :class:`~benchmarks.link.LinkedFSDPCollectives`, each charged half its buffer's bytes.
``zero-upstream``'s all-reduces go through the link hook, its parameter broadcasts, issued from
inside its hook, do not: under a link it is favoured.

Every mode reports its optimizer state on each rank (:meth:`Mode.state_bytes`): the bytes of the
state tensors the rank's optimizer holds (of a DTensor, the rank's local shard), tensors with
dimensions and 0-dim scalars (AdamW's ``step``) counted separately.

Timing: on CPU each step is timed on the host (``time.perf_counter``). On CUDA the host only
enqueues work, so each step records CUDA events on the current stream instead (start, end of
backward, end of ``optimizer.step()``, end of the step) and the steps of a block run without a
host synchronisation between them; :meth:`Mode.settle` synchronises once and turns the events
into the step records' times.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import overlap_sgd
from overlap_sgd.hooks import make_executor

from .instrument import InstrumentedExecutor, LabelHookState, labelled_hook
from .link import LinkedCollectives, LinkedFSDPCollectives, LinkHookState, SimulatedLink, link_hook
from .workloads import loss_fn, make_optimizer, optimizer_spec

__all__ = ["ALL_MODES", "CLIPPED", "CLIP_SETTINGS", "FSDP_MODES", "MODES", "SHARDED", "Mode", "ModeContext",
           "StepRecord", "build_mode", "clip_schedule", "dtensor_kernel", "pick_fast_kernel", "state_bytes"]

MODES: tuple[str, ...] = (
    "floor", "post", "post-fused", "upstream", "overlap", "post-fused+clip", "overlap+clip", "zero-post",
    "zero-upstream", "overlap-shard",
)

#: The FSDP2 modes (see the module docs); not in the default set, named with ``--modes``.
FSDP_MODES: tuple[str, ...] = ("fsdp-floor", "fsdp-post-fused", "fsdp-per-param-in-backward", "fsdp-overlap")

#: Every mode :func:`build_mode` knows.
ALL_MODES: tuple[str, ...] = MODES + FSDP_MODES

#: The modes that clip the global gradient norm.
CLIPPED: tuple[str, ...] = ("post-fused+clip", "overlap+clip")
#: ``--clip`` settings: how often ``max_norm`` makes clipping fire (see :func:`clip_schedule`).
CLIP_SETTINGS: tuple[str, ...] = ("never", "sometimes", "always")


def clip_schedule(setting: str, scale: float) -> Callable[[int], float]:
    """``max_norm`` for step ``i`` (counted from the mode's first step): ``scale`` is a typical
    total gradient norm of the workload. ``"never"``: far above any norm; ``"always"``: a
    thousandth of ``scale``; ``"sometimes"``: that on every fourth step, far above otherwise."""
    if setting not in CLIP_SETTINGS:
        raise ValueError(f"clip setting must be one of {CLIP_SETTINGS}, got {setting!r}")
    low, high = 1e-3 * scale, 1e30
    if setting == "never":
        return lambda i: high
    if setting == "always":
        return lambda i: low
    return lambda i: low if i % 4 == 0 else high

#: The modes whose ranks each keep the optimizer state of only their share of the parameters.
SHARDED: tuple[str, ...] = ("zero-post", "zero-upstream", "overlap-shard")

#: Warm-up steps ``zero-upstream`` needs at least: it updates nothing in its first two (three
#: with ``static_graph``) iterations, while DDP settles its buckets.
ZERO_UPSTREAM_WARMUP = 4

_UPSTREAM_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass
class StepRecord:
    """Times of one training step, in seconds (host clock on CPU, CUDA events on CUDA)."""

    total: float
    #: Forward plus backward (for the overlapping modes this includes the updates).
    backward: float
    #: ``optimizer.step()`` alone (post-backward modes only; for ``zero-post`` with its
    #: parameter broadcast and, under a simulated link, the broadcast's time on the link).
    opt_step: float | None = None
    #: ``overlap`` and ``overlap-shard`` on CPU only: time spent in bucket updates, summed
    #: over buckets (for ``overlap-shard`` with each bucket's copy of the gathered parameters).
    update_busy: float | None = None
    #: Those modes only: time buckets waited between communication and update, summed.
    update_wait: float | None = None
    #: Those modes only: from the last communication completing (``overlap-shard``: the last
    #: all-gather) to backward returning.
    tail: float | None = None
    #: Under a simulated link: the time the link spent carrying this step's bytes.
    link_busy: float | None = None


@dataclass
class ModeContext:
    """What every mode of one benchmark configuration is built from."""

    base: nn.Module
    device: torch.device
    optimizer: str
    bucket_cap_mb: float
    link: SimulatedLink | None = None
    #: Kernel options of ``post-fused`` (``{"fused": True}`` or ``{"foreach": True}``).
    fast_kernel: dict[str, Any] = field(default_factory=lambda: {"foreach": True})
    #: Kernel options of the optimizer handed to ``overlap``.
    overlap_kernel: dict[str, Any] = field(default_factory=dict)
    gradient_as_bucket_view: bool = False
    #: Label each overlap bucket's communication and update for the profiler.
    label: bool = False
    sync: Callable[[], None] = lambda: None
    #: Run forward and loss under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
    autocast: torch.dtype | None = None
    #: The clip modes' setting (:data:`CLIP_SETTINGS`) and the workload's typical total
    #: gradient norm, the same on every rank (:func:`clip_schedule`).
    clip: str = "sometimes"
    clip_scale: float = 1.0
    #: ``ClipGradNorm``'s policy for ``overlap+clip``.
    clip_policy: str = "auto"


@dataclass
class Mode:
    """One mode's model and optimizer, or why the mode is skipped."""

    name: str
    #: The DDP model, or for the FSDP2 modes the ``fully_shard`` root.
    model: nn.Module | None = None
    optimizer: Any = None
    skipped: str | None = None
    #: A short description of the update kernel.
    kernel: str = ""
    executor: InstrumentedExecutor | None = None
    sync: Callable[[], None] = lambda: None
    #: Forward and loss run under ``torch.autocast(device.type, dtype=autocast)``.
    autocast: torch.dtype | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    records: list[StepRecord] = field(default_factory=list)
    #: ``optimizer.step()`` runs after backward and is timed on its own.
    post_backward: bool = False
    #: A context entered around forward and backward (``overlap-shard`` under a link).
    comm: Any = None
    #: Run after ``optimizer.step()``, timed with it (``zero-post`` under a link).
    after_step: Callable[[], None] | None = None
    #: Warm-up steps this mode needs at least.
    min_warmup: int = 0
    #: The simulated link this mode's communication is held on, if any.
    link: SimulatedLink | None = None
    #: The state dicts (parameter -> {name: value}) of the optimizers this rank holds.
    states: Callable[[], list[Mapping[Any, Mapping[str, Any]]]] = lambda: []
    #: Clip the global gradient norm after backward to ``clip(step index)`` (clip modes).
    clip: Callable[[int], float] | None = None
    #: CUDA only: records whose events :meth:`settle` has not read yet.
    _pending: list[tuple[StepRecord, list[Any]]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.skipped is None

    @property
    def cuda_events(self) -> bool:
        """Steps are timed with CUDA events (see the module docs)."""
        return self.device.type == "cuda"

    def _forward_context(self) -> Any:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def step(self, x: Tensor, y: Tensor) -> StepRecord:
        """One training step; the record is also appended to :attr:`records`.

        On CUDA the record's times are filled by :meth:`settle`.
        """
        assert self.model is not None
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self.cuda_events else []
        mark = (lambda i: events[i].record()) if events else (lambda i: None)
        busy = self.link.busy_s if self.link is not None else None
        t0 = time.perf_counter()
        mark(0)
        with self.comm if self.comm is not None else contextlib.nullcontext():
            with self._forward_context():
                loss = loss_fn(self.model(x), y)
            loss.backward()
        mark(1)
        t1 = time.perf_counter()
        opt_s = None
        if self.optimizer is not None:
            if self.clip is not None:
                max_norm = self.clip(len(self.records))
                if hasattr(self.optimizer, "clip_grad_norm_"):  # overlapped
                    self.optimizer.clip_grad_norm_(max_norm)
                else:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
            self.optimizer.step()
            if self.after_step is not None:
                self.after_step()
            mark(2)
            if self.post_backward:
                opt_s = time.perf_counter() - t1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            mark(2)
            self.model.zero_grad(set_to_none=True)
        mark(3)
        if not events:
            self.sync()
        t2 = time.perf_counter()
        rec = StepRecord(total=t2 - t0, backward=t1 - t0, opt_step=opt_s)
        if busy is not None:
            rec.link_busy = self.link.busy_s - busy  # the step waited for all its transfers
        if self.executor is not None:
            buckets = self.executor.take()
            # On CUDA the host stamps would time the enqueueing only: leave them out.
            if buckets and not events:
                rec.update_busy = sum(b.update_end - b.update_start for b in buckets)
                rec.update_wait = sum(max(0.0, b.update_start - b.comm_done) for b in buckets)
                rec.tail = max(0.0, t1 - max(b.comm_done for b in buckets))
        if events:
            self._pending.append((rec, events))
        self.records.append(rec)
        return rec

    def settle(self) -> None:
        """Wait for the steps' CUDA work and fill their records from the events (CUDA only)."""
        if not self._pending:
            return
        self._pending[-1][1][-1].synchronize()
        for rec, (start, backward_end, opt_end, end) in self._pending:
            rec.total = start.elapsed_time(end) / 1e3
            rec.backward = start.elapsed_time(backward_end) / 1e3
            if rec.opt_step is not None:
                rec.opt_step = backward_end.elapsed_time(opt_end) / 1e3
        self._pending.clear()

    def state_bytes(self) -> dict[str, int]:
        """This rank's optimizer state: ``tensors`` (bytes of the state tensors with dimensions)
        and ``scalars`` (bytes of the 0-dim ones, such as ``step``)."""
        return state_bytes(self.states())

    def close(self) -> None:
        if self.optimizer is not None and hasattr(self.optimizer, "hook_state"):
            self.optimizer.hook_state.close()
        elif isinstance(self.optimizer, _InBackward):
            self.optimizer.close()
        self._pending.clear()
        self.model = None
        self.optimizer = None


def state_bytes(states: Iterable[Mapping[Any, Mapping[str, Any]]]) -> dict[str, int]:
    """Bytes of the tensors in optimizer state dicts (parameter -> {name: value}), those with
    dimensions (``tensors``) and 0-dim ones (``scalars``) apart; other values are not counted.

    Example:
        >>> import torch
        >>> p = torch.zeros(3)
        >>> state_bytes([{p: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3), "lr": 0.1}}])
        {'tensors': 12, 'scalars': 4}
    """
    out = {"tensors": 0, "scalars": 0}
    for state in states:
        for entry in state.values():
            for value in entry.values():
                if isinstance(value, Tensor):
                    value = _local(value)
                    out["tensors" if value.dim() > 0 else "scalars"] += value.numel() * value.element_size()
    return out


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard; any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _ddp(ctx: ModeContext) -> DistributedDataParallel:
    module = copy.deepcopy(ctx.base).to(ctx.device)
    return DistributedDataParallel(
        module,
        device_ids=[ctx.device] if ctx.device.type == "cuda" else None,
        bucket_cap_mb=ctx.bucket_cap_mb,
        gradient_as_bucket_view=ctx.gradient_as_bucket_view,
    )


def _kernel_name(kernel: dict[str, Any]) -> str:
    if kernel.get("fused"):
        return "fused"
    if kernel.get("foreach"):
        return "foreach"
    if kernel.get("foreach") is False:
        return "for-loop"
    return "default"


def _default_kernel(params: list[Tensor]) -> str:
    """What torch.optim picks with foreach=None, fused=None for these parameters."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    except (ImportError, TypeError):
        return "default"
    return "default (foreach)" if foreach else "default (for-loop)"


def build_mode(name: str, ctx: ModeContext) -> Mode:
    """Build mode ``name`` (one of :data:`MODES`) from ``ctx``; see the module docs."""
    if name not in ALL_MODES:
        raise ValueError(f"unknown mode {name!r}; choose from {', '.join(ALL_MODES)}")
    mode = Mode(name, sync=ctx.sync, autocast=ctx.autocast, device=ctx.device, link=ctx.link)
    if name in FSDP_MODES:
        return _build_fsdp(mode, ctx)
    if name == "upstream":
        return _build_upstream(mode, ctx)
    if name == "zero-upstream":
        return _build_zero_upstream(mode, ctx)
    ddp = _ddp(ctx)
    mode.model = ddp
    link_state = LinkHookState(ctx.link, process_group=ddp.process_group) if ctx.link else None
    if name == "overlap-shard":
        opt = make_optimizer(ctx.optimizer, ddp.parameters(), **ctx.overlap_kernel)
        executor = InstrumentedExecutor(make_executor("auto", ctx.device))
        mode.optimizer = overlap_sgd.overlap(ddp, opt, shard=True, executor=executor)
        mode.executor = executor
        mode.comm = LinkedCollectives(ctx.link) if ctx.link is not None else None
        mode.states = lambda: [opt.state]
        mode.kernel = "bucket shard " + ("fused" if ctx.overlap_kernel.get("fused") else "foreach")
        return mode
    if name in CLIPPED:
        mode.clip = clip_schedule(ctx.clip, ctx.clip_scale)
    if name in ("overlap", "overlap+clip"):
        opt = make_optimizer(ctx.optimizer, ddp.parameters(), **ctx.overlap_kernel)
        # Without a link the package's own all-reduce runs and labels itself in a trace
        # (bucket<i>/comm, bucket<i>/update); a link hook is wrapped to be labelled alike. The
        # executor labels every update too, so that a trace shows them whatever the hook does.
        wrap = ctx.label and link_state is not None
        executor = InstrumentedExecutor(make_executor("auto", ctx.device), label=ctx.label)
        hook: Any = link_hook if link_state is not None else None
        state: Any = link_state
        if wrap:
            hook, state = labelled_hook, LabelHookState(
                hook or default_hooks.allreduce_hook,
                state if state is not None else ddp.process_group,
                executor,
            )
        clip = None
        if name == "overlap+clip":
            clip = overlap_sgd.ClipGradNorm(mode.clip(0), policy=ctx.clip_policy)
        mode.optimizer = overlap_sgd.overlap(ddp, opt, hook, state, executor=executor, clip_grad_norm=clip)
        mode.executor = executor
        mode.states = lambda: [opt.state]
        mode.kernel = "bucket " + ("fused" if ctx.overlap_kernel.get("fused") else "foreach")
        if clip is not None:
            mode.kernel += f" + global clip ({ctx.clip}, policy {ctx.clip_policy})"
        return mode
    if link_state is not None:
        ddp.register_comm_hook(link_state, link_hook)
    mode.post_backward = name != "floor"
    if name == "post":
        mode.optimizer = make_optimizer(ctx.optimizer, ddp.parameters())
        mode.kernel = _default_kernel(list(ddp.parameters()))
    elif name in ("post-fused", "post-fused+clip"):
        mode.optimizer = make_optimizer(ctx.optimizer, ddp.parameters(), **ctx.fast_kernel)
        mode.kernel = _kernel_name(ctx.fast_kernel)
        if name == "post-fused+clip":
            mode.kernel += f" + clip_grad_norm_(foreach=True) ({ctx.clip})"
    elif name == "zero-post":
        zero = _zero(ctx, ddp)
        mode.optimizer = zero
        mode.states = lambda: [zero.optim.state]
        mode.kernel = f"ZeRO local step ({_kernel_name(ctx.fast_kernel)}) + parameter broadcast"
        if ctx.link is not None:
            # Every rank receives the others' updated parameters: an all-gather of them all.
            nbytes = sum(p.numel() * p.element_size() for p in ddp.parameters()) // 2
            link = ctx.link
            mode.after_step = lambda: link.carry(nbytes)
    else:
        mode.kernel = "no optimizer"
    if mode.optimizer is not None and name != "zero-post":
        opt = mode.optimizer
        mode.states = lambda: [opt.state]
    return mode


def _fsdp(ctx: ModeContext) -> nn.Module:
    """A copy of ``ctx.base`` with ``fully_shard`` on each of its blocks and on the root."""
    from torch.distributed.fsdp import fully_shard

    module = copy.deepcopy(ctx.base).to(ctx.device)
    blocks = getattr(module, "layers", None) or getattr(module, "blocks", None)
    if blocks is None and isinstance(module, nn.Sequential):
        blocks = list(module)
    for block in blocks or ():
        fully_shard(block)
    fully_shard(module)
    return module


class _InBackward:
    """The loop's optimizer for ``fsdp-per-param-in-backward``: one optimizer per parameter,
    each stepped, and its gradient dropped, by the parameter's post-accumulate-grad hook;
    ``step()`` and ``zero_grad()`` do nothing (the updates already ran in backward)."""

    def __init__(self, optimizers: dict[Tensor, torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in optimizers]

    def _hook(self, param: Tensor) -> None:
        opt = self.optimizers[param]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


#: The optimizers whose fused kernels DTensor has a sharding rule for (``aten._fused_adam_`` and
#: ``aten._fused_adamw_``, torch 2.9 to 2.13); ``fused=True`` SGD fails on DTensor parameters.
_DTENSOR_FUSED = ("adam", "adamw")


def dtensor_kernel(optimizer: str, kernel: dict[str, Any]) -> dict[str, Any]:
    """``kernel`` for an optimizer over DTensor parameters: ``fused=True`` where DTensor has a
    sharding rule for the optimizer's fused kernel, else ``foreach=True``.

    Example:
        >>> dtensor_kernel("adamw", {"fused": True}), dtensor_kernel("sgd", {"fused": True})
        ({'fused': True}, {'foreach': True})
    """
    if kernel.get("fused") and optimizer not in _DTENSOR_FUSED:
        return {"foreach": True}
    return dict(kernel)


def _build_fsdp(mode: Mode, ctx: ModeContext) -> Mode:
    model = _fsdp(ctx)
    fast = dtensor_kernel(ctx.optimizer, ctx.fast_kernel)
    mode.model = model
    mode.comm = LinkedFSDPCollectives(ctx.link) if ctx.link is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    if mode.name == "fsdp-floor":
        mode.kernel = "FSDP2, no optimizer"
    elif mode.name == "fsdp-post-fused":
        opt = make_optimizer(ctx.optimizer, params, **fast)
        mode.optimizer = opt
        mode.post_backward = True
        mode.states = lambda: [opt.state]
        mode.kernel = f"FSDP2 + {_kernel_name(fast)} step after backward"
    elif mode.name == "fsdp-per-param-in-backward":
        per_param = {p: make_optimizer(ctx.optimizer, [p], **fast) for p in params}
        wrapper = _InBackward(per_param)
        mode.optimizer = wrapper
        mode.states = lambda: [o.state for o in per_param.values()]
        mode.kernel = (f"FSDP2 + per-param {_kernel_name(fast)} step in "
                       f"post-accumulate-grad hooks ({len(params)} optimizers)")
    else:  # fsdp-overlap
        from overlap_sgd.fsdp.state import fsdp_executor

        kernel = dtensor_kernel(ctx.optimizer, ctx.overlap_kernel)
        opt = make_optimizer(ctx.optimizer, params, **kernel)
        if ctx.device.type == "cpu":
            # Per-group timings from the worker thread. On CUDA the overlap keeps its own stream
            # executor: FSDP's path orders the streams through the executor's ``stream``, which a
            # wrapper would hide, and host stamps would time only the enqueueing there.
            executor = InstrumentedExecutor(fsdp_executor("auto", ctx.device), label=ctx.label)
            mode.optimizer = overlap_sgd.overlap(model, opt, executor=executor)
            mode.executor = executor
        else:
            mode.optimizer = overlap_sgd.overlap(model, opt)
        mode.states = lambda: [opt.state]
        mode.kernel = "FSDP2 + group " + ("fused" if kernel.get("fused") else "foreach")
    return mode


def _zero(ctx: ModeContext, ddp: DistributedDataParallel, **options: Any) -> Any:
    """A ``ZeroRedundancyOptimizer`` over ``ddp``'s parameters with the post-fused kernel."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    cls, hyper = optimizer_spec(ctx.optimizer)
    with warnings.catch_warnings(record=True):  # TorchScript deprecation of its functional optimizers
        return ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=cls, process_group=ddp.process_group,
                                       **hyper, **ctx.fast_kernel, **options)


def _build_zero_upstream(mode: Mode, ctx: ModeContext) -> Mode:
    from torch.distributed.algorithms.ddp_comm_hooks.ddp_zero_hook import hook_with_zero_step_interleaved

    backend = dist.get_backend()
    if backend != "nccl":
        mode.skipped = (f"hook_with_zero_step_interleaved needs NCCL: torch refuses {backend} "
                        "(overlapping DDP with ZeRO may hang there)")
        return mode
    ddp = _ddp(ctx)
    try:
        zero = _zero(ctx, ddp, overlap_with_ddp=True)
        if ctx.link is not None:
            state: Any = LinkHookState(ctx.link, process_group=ddp.process_group)
            hook = hook_with_zero_step_interleaved(link_hook, ddp, zero)
        else:
            state, hook = ddp.process_group, hook_with_zero_step_interleaved(
                default_hooks.allreduce_hook, ddp, zero)
        ddp.register_comm_hook(state, hook)
    except (RuntimeError, ValueError, TypeError) as exc:
        mode.skipped = f"ZeroRedundancyOptimizer(overlap_with_ddp=True) failed: {exc}"
        return mode
    mode.model = ddp
    # step() does nothing with overlap_with_ddp (the hook steps): the loop only zeroes gradients.
    mode.states = lambda: [zero.optim.state] if hasattr(zero, "optim") else []
    mode.min_warmup = ZERO_UPSTREAM_WARMUP
    mode.kernel = (f"ZeRO local step ({_kernel_name(ctx.fast_kernel)}) per bucket in the comm callback"
                   + ("; its parameter broadcasts are not held on the link" if ctx.link else ""))
    return mode


def _build_upstream(mode: Mode, ctx: ModeContext) -> Mode:
    cls, hyper = optimizer_spec(ctx.optimizer)
    if ctx.link is not None:
        mode.skipped = "_register_fused_optim takes no custom comm hook, so no simulated link"
        return mode
    if cls not in _UPSTREAM_OPTIMIZERS:
        mode.skipped = f"_register_fused_optim does not support {cls.__name__}"
        return mode
    ddp = _ddp(ctx)
    hyper = dict(hyper)
    lr = hyper.pop("lr")
    try:
        # Its functional optimizers warn about TorchScript, forcing the warning through any
        # "ignore" filter; recording swallows it.
        with warnings.catch_warnings(record=True):
            ddp._register_fused_optim(cls, lr, **hyper)
    except (RuntimeError, ValueError, TypeError) as exc:
        mode.skipped = f"_register_fused_optim failed: {exc}"
        return mode
    mode.model = ddp
    mode.states = lambda: _upstream_states(ddp)
    mode.kernel = "per-param step in the comm callback"
    return mode


def _upstream_states(ddp: DistributedDataParallel) -> list[Mapping[Any, Mapping[str, Any]]]:
    """The state of the functional optimizer ``_register_fused_optim`` put in ``ddp``'s comm
    hook (kept in the hook's closure; nothing, where a torch keeps it elsewhere)."""
    out = []
    for hook, _ in getattr(ddp, "_comm_hooks", []):
        for cell in getattr(hook, "__closure__", None) or ():
            optim = getattr(cell.cell_contents, "functional_optimizer", None)
            if isinstance(getattr(optim, "state", None), Mapping):
                out.append(optim.state)
    return out


def pick_fast_kernel(
    optimizer: str,
    params: list[Tensor],
    device: torch.device,
    repeats: int = 5,
    sync: Callable[[], None] = lambda: None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """The faster post-backward kernel of ``fused=True`` (where supported) and ``foreach=True``.

    Times ``optimizer.step()`` on copies of ``params`` with random gradients, alternating the
    candidates and keeping each one's fastest repeat, so that a burst of other work on the
    machine does not decide. Returns the winning kernel options and the seconds of each
    candidate. Every rank must call it; rank 0's choice is broadcast so that all ranks agree.
    """
    candidates: dict[str, dict[str, Any]] = {"fused": {"fused": True}, "foreach": {"foreach": True}}
    copies = [p.detach().clone().to(device).requires_grad_(True) for p in params]
    for c in copies:
        c.grad = torch.randn_like(c) * 1e-3
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for label, kernel in candidates.items():
        try:
            opt = make_optimizer(optimizer, copies, **kernel)
            opt.step()
        except (RuntimeError, ValueError, TypeError):
            continue  # no fused kernel for this optimizer on this device
        optimizers[label] = opt
    sync()
    timings = {label: float("inf") for label in optimizers}
    for _ in range(repeats):
        for label, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            sync()
            timings[label] = min(timings[label], time.perf_counter() - t0)
    best = min(timings, key=timings.__getitem__)
    if dist.is_initialized():
        choice = [best]
        dist.broadcast_object_list(choice, src=0)
        best = choice[0]
    return candidates[best], timings
