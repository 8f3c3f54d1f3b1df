"""The benchmark modes: one DDP model instance each, all built from the same initial weights.

- ``floor``: DDP, backward only, no optimizer: the physical limit of any overlap.
- ``post``: DDP, then ``optimizer.step()`` after backward with torch's default kernels.
- ``post-fused``: the same with the fastest post-backward kernel (fused or foreach).
- ``upstream``: ``DistributedDataParallel._register_fused_optim``, PyTorch's own overlap
  (SGD, Adam and AdamW only; it takes no custom comm hook, so no simulated link).
- ``overlap``: :func:`overlap_sgd.overlap`.

With a simulated link every communicating mode sends its buckets through the same
:func:`~benchmarks.link.link_hook` wrapper.

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
from collections.abc import Callable
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
from .link import LinkHookState, SimulatedLink, link_hook
from .workloads import loss_fn, make_optimizer, optimizer_spec

__all__ = ["MODES", "Mode", "ModeContext", "StepRecord", "build_mode", "pick_fast_kernel"]

MODES: tuple[str, ...] = ("floor", "post", "post-fused", "upstream", "overlap")

_UPSTREAM_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass
class StepRecord:
    """Times of one training step, in seconds (host clock on CPU, CUDA events on CUDA)."""

    total: float
    #: Forward plus backward (for ``overlap`` and ``upstream`` this includes the updates).
    backward: float
    #: ``optimizer.step()`` alone (post-backward modes only).
    opt_step: float | None = None
    #: ``overlap`` on CPU only: time spent in bucket updates, summed over buckets.
    update_busy: float | None = None
    #: ``overlap`` only: time buckets waited between communication and update, summed.
    update_wait: float | None = None
    #: ``overlap`` only: from the last bucket's communication completing to backward returning.
    tail: float | None = None


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


@dataclass
class Mode:
    """One mode's model and optimizer, or why the mode is skipped."""

    name: str
    model: DistributedDataParallel | None = None
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
        t0 = time.perf_counter()
        mark(0)
        with self._forward_context():
            loss = loss_fn(self.model(x), y)
        loss.backward()
        mark(1)
        t1 = time.perf_counter()
        opt_s = None
        if self.optimizer is not None:
            self.optimizer.step()
            mark(2)
            if self.name.startswith("post"):
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

    def close(self) -> None:
        if self.optimizer is not None and hasattr(self.optimizer, "hook_state"):
            self.optimizer.hook_state.close()
        self._pending.clear()
        self.model = None
        self.optimizer = None


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
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)}")
    mode = Mode(name, sync=ctx.sync, autocast=ctx.autocast, device=ctx.device)
    if name == "upstream":
        return _build_upstream(mode, ctx)
    ddp = _ddp(ctx)
    mode.model = ddp
    link_state = LinkHookState(ctx.link, process_group=ddp.process_group) if ctx.link else None
    if name == "overlap":
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
        mode.optimizer = overlap_sgd.overlap(ddp, opt, hook, state, executor=executor)
        mode.executor = executor
        mode.kernel = "bucket " + ("fused" if ctx.overlap_kernel.get("fused") else "foreach")
        return mode
    if link_state is not None:
        ddp.register_comm_hook(link_state, link_hook)
    if name == "post":
        mode.optimizer = make_optimizer(ctx.optimizer, ddp.parameters())
        mode.kernel = _default_kernel(list(ddp.parameters()))
    elif name == "post-fused":
        mode.optimizer = make_optimizer(ctx.optimizer, ddp.parameters(), **ctx.fast_kernel)
        mode.kernel = _kernel_name(ctx.fast_kernel)
    else:
        mode.kernel = "no optimizer"
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
    mode.kernel = "per-param step in the comm callback"
    return mode


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
