"""The overlap's state for one FSDP2 model: the hooks, the group bookkeeping, ``step()``.

One post-accumulate-grad hook per trainable sharded parameter records its arrival. FSDP sets
the gradients of one parameter group in one synchronous loop (see :mod:`overlap_sgd.fsdp`), so
a group is complete when every parameter of it has arrived, or, for a group some of whose
parameters got no gradient, when the next group's first parameter arrives or backward ends.
A complete group is handed to the executor as one update: per optimizer param group, one
kernel call over the local shards (:class:`~overlap_sgd.fsdp.local.LocalUpdate`).

With global-norm clipping (:class:`~overlap_sgd.hooks.norm_clip.GlobalClipper`) a step that
speculates updates each group as it lands with the unclipped gradients and keeps the norms of
its local shards; ``step()`` reduces them over the ranks (one collective) and, where clipping
fires, corrects every group's update. A step that defers (the policy's choice, or
``check_finite``) only records the groups, and ``step()`` runs their updates once the verdict
over all ranks is known (one collective), exactly as a post-backward step would.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.futures import Future

from ..functional import FunctionalOptimizer
from ..hooks.executor import Executor, InlineExecutor, ThreadExecutor, make_executor
from ..hooks.finite import NonFiniteGradientError
from ..hooks.norm_clip import ClipGradNorm, GlobalClipper
from ..hooks.steps import StepLedger
from .groups import fsdp_groups
from .local import LocalUpdate, local_of

__all__ = ["FSDPOverlapState", "fsdp_executor"]


def fsdp_executor(kind: str | Executor, device: torch.device) -> Executor:
    """The executor for FSDP updates: on CPU a worker thread that starts each update as soon
    as its group lands (backward keeps running meanwhile), on CUDA a side stream of its own."""
    if isinstance(kind, str) and kind in ("auto", "thread") and device.type == "cpu":
        executor: Executor = ThreadExecutor(name="overlap-sgd-fsdp-update", defer=False)
        executor.place(device)
        return executor
    if device.type == "cuda" and (kind == "inline" or isinstance(kind, InlineExecutor)):
        raise ValueError(
            "executor='inline' would run the updates on FSDP's reduce-scatter stream, delaying "
            "every later reduce-scatter behind them; use executor='stream' (the default on CUDA)"
        )
    return make_executor(kind, device)


class _Arrival:
    """The parameters of one FSDP group whose gradients arrived in this backward."""

    __slots__ = ("index", "params", "stream")

    def __init__(self, index: int, stream: Any):
        self.index = index
        self.params: list[Tensor] = []
        #: On CUDA, the stream current when FSDP called the hooks: its post-reduce stream.
        self.stream = stream


class FSDPOverlapState:
    """Drives the updates of one FSDP2 model; the state an
    :class:`~overlap_sgd.OverlappedOptimizer` talks to (see the module docs).

    Args:
        model: the root ``fully_shard`` module.
        optimizers: functional optimizers over disjoint sets of its sharded parameters.
        names: ``id(param) -> name``.
        executor: ``"auto"``, ``"thread"``, ``"inline"``, ``"stream"`` or an executor.
        check_finite: leave the parameters of groups whose gradients hold inf/NaN on any rank
            untouched and raise :class:`~overlap_sgd.hooks.NonFiniteGradientError` from ``step()``.
        norm_clip: global-norm clipping options, or ``None``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: Sequence[FunctionalOptimizer],
        names: dict[int, str],
        executor: str | Executor = "auto",
        check_finite: bool = False,
        norm_clip: ClipGradNorm | None = None,
    ):
        self.model = model
        self.optimizers = list(optimizers)
        self.updates = [LocalUpdate(f) for f in self.optimizers]
        self.names = names
        first = next(iter(model.parameters()))
        self.device = local_of(first).device
        self.process_group = first.device_mesh.get_group()
        self.check_finite = check_finite
        #: Global-norm clipping over every rank's shards, or ``None``.
        self.clipper: GlobalClipper | None = None
        if norm_clip is not None:
            self.clipper = GlobalClipper(
                norm_clip, list(model.parameters()), self.optimizers, self.process_group,
                force_defer=check_finite,
            )
        self.ledger = StepLedger(len(self.optimizers), require_step=True)
        self.grad_views = False
        self.wrapped: list[Any] = []
        #: The last exception an update raised (also raised from ``step()``).
        self.last_error: BaseException | None = None
        self._executor = fsdp_executor(executor, self.device)
        self._side = getattr(self._executor, "stream", None)  # a StreamExecutor's stream
        self._landed: Future = Future()
        self._landed.set_result(torch.empty(1, device=self.device))
        self._lock = threading.Lock()
        self._hooks: dict[int, Any] = {}
        self._owner: dict[int, int] = {}
        self._group_of: dict[int, int] = {}
        self._sizes: list[int] = []
        # One round: from a synchronising backward's first gradient to the step() after it.
        self._in_backward = False
        self._pending = False
        self._open: _Arrival | None = None
        self._launched: list[Future] = []
        self._errors: list[BaseException] = []
        self._deferred: list[tuple[int, list[Tensor], list[Tensor | None]]] = []
        self._updated: set[int] = set()
        self._build()
        self._forward_hook = model.register_forward_pre_hook(self._before_forward, prepend=True)

    # -- the parameter layout ----------------------------------------------------------------

    def _build(self) -> None:
        """(Re)read the optimizers' parameters and FSDP's groups; hook new parameters."""
        owner = {id(p): i for i, f in enumerate(self.optimizers) for p in f.params()}
        group_of: dict[int, int] = {}
        sizes: list[int] = []
        for gi, group in enumerate(fsdp_groups(self.model)):
            owned = [p for p in group if id(p) in owner and p.requires_grad]
            for p in owned:
                group_of[id(p)] = gi
                if id(p) not in self._hooks:
                    self._hooks[id(p)] = p.register_post_accumulate_grad_hook(self._on_grad)
            sizes.append(len(owned))
        with self._lock:
            self._owner, self._group_of, self._sizes = owner, group_of, sizes

    def invalidate(self) -> None:
        """The param groups changed (``add_param_group``, ``load_state_dict``): re-read them."""
        self._build()

    def check_new_params(self, params: Sequence[Tensor]) -> None:
        """Raise ``ValueError`` unless ``params`` are sharded parameters of the model that no
        overlapped optimizer holds yet."""
        known = {id(p) for p in self.model.parameters()}
        for p in params:
            if id(p) not in known:
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is not a sharded parameter of the FSDP "
                    "model (build param groups from model.parameters() after fully_shard)"
                )
            if id(p) in self._owner:
                raise ValueError(
                    f"parameter {self.names.get(id(p), tuple(p.shape))!r} is already held by "
                    f"overlapped optimizer {self._owner[id(p)]}"
                )

    # -- backward ----------------------------------------------------------------------------

    def _on_grad(self, param: Tensor) -> None:
        """A post-accumulate-grad hook: FSDP has just set ``param.grad`` (its shard)."""
        gi = self._group_of.get(id(param))
        if gi is None:
            return
        with self._lock:
            if not self._in_backward:
                self._begin_backward()
            arrival = self._open
            if arrival is not None and arrival.index != gi:
                self._close(arrival)
                arrival = None
            if arrival is None:
                stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
                arrival = self._open = _Arrival(gi, stream)
            arrival.params.append(param)
            if len(arrival.params) == self._sizes[gi]:
                self._open = None
                self._close(arrival)

    def _begin_backward(self) -> None:
        late = [i for i, waiting in enumerate(self.ledger.awaiting) if waiting]
        if late:
            raise RuntimeError(
                "a second synchronising backward() ran before optimizer.step() was called for "
                f"overlapped optimizer(s) {late}: the previous backward already updated the "
                "parameters. Call step() once per synchronising backward, and use "
                "model.set_requires_gradient_sync(False) for gradient-accumulation micro-steps."
            )
        self.ledger.begin()
        if self.clipper is not None:
            self.clipper.begin()
        self._in_backward = True
        self._pending = True
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        self._executor.hold()

    def _close(self, arrival: _Arrival) -> None:
        """Hand ``arrival``'s group to the executor (or keep it for ``step()``)."""
        params = arrival.params
        grads = [p.grad for p in params]
        self._updated.update(id(p) for p in params)
        clipper = self.clipper
        if clipper.deferring if clipper is not None else self.check_finite:
            self._deferred.append((arrival.index, params, grads))  # waits for step()
            return

        def update(_landed: Tensor, _flags: Any) -> None:
            try:
                if clipper is not None:  # speculating: the norms first, then the update
                    self._observe(params, grads)
                self._apply(params, grads, on_side=self._side is not None, clipper=clipper)
            except BaseException as exc:
                self._errors.append(exc)  # re-raised by step() as it is (a future wraps it)
                raise

        ordered = torch.cuda.stream(arrival.stream) if arrival.stream is not None else contextlib.nullcontext()
        with ordered:  # the update waits for what FSDP enqueued on this stream so far
            self._launched.append(self._executor.after(self._landed, None, update))

    def _end_backward(self) -> None:
        """Autograd's final callback, queued at the first gradient (after FSDP's own)."""
        with self._lock:
            arrival, self._open = self._open, None
            if arrival is not None:
                self._close(arrival)
            self._in_backward = False
        self._executor.release()
        if self._side is not None:
            # Whatever runs after backward on the caller's stream follows the updates.
            torch.cuda.current_stream(self.device).wait_stream(self._side)

    def _observe(self, params: Sequence[Tensor], grads: Sequence[Tensor | None]) -> None:
        """Hand the norms of this rank's shards of ``grads`` to the clipper."""
        assert self.clipper is not None
        pairs = [(p, local_of(g)) for p, g in zip(params, grads) if g is not None]
        self.clipper.observe_shards([p for p, _ in pairs], [g for _, g in pairs])

    def _apply(
        self, params: Sequence[Tensor], grads: Sequence[Tensor | None], on_side: bool = False,
        clipper: GlobalClipper | None = None,
    ) -> None:
        """Update ``params``: one kernel call per optimizer param group they belong to
        (through ``clipper``, which runs it speculatively or keeps it for ``step()``)."""
        split: dict[tuple[int, int], tuple[list[Tensor], list[Tensor]]] = {}
        for p, g in zip(params, grads):
            if g is None:
                continue  # as torch.optim: no gradient, no update
            i = self._owner[id(p)]
            gi = self.optimizers[i].group_index(p)
            if gi is None:
                continue
            ps, gs = split.setdefault((i, gi), ([], []))
            ps.append(p)
            gs.append(g)
        for (i, gi), (ps, gs) in split.items():
            if on_side:
                stream = torch.cuda.current_stream(self.device)
                for g in gs:  # allocated on FSDP's stream: not reused before this update ran
                    local_of(g).record_stream(stream)
            if clipper is not None:
                clipper.update(self.updates[i], gi, ps, gs)
            else:
                self.updates[i](gi, ps, gs)

    def _before_forward(self, _module: nn.Module, _args: Any) -> None:
        """The model's first forward pre-hook: nothing reads a parameter still being updated."""
        self.wait_updates()

    def wait_updates(self) -> int:
        """Wait until the updates launched in this backward have run (on CUDA: order the
        current stream after them); their errors are kept for ``step()``. Returns how many
        group updates this backward launched so far."""
        launched = list(self._launched)
        for f in launched:
            try:
                f.wait()
            except Exception:
                pass  # raised from step()
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        return len(launched)

    # -- step() ------------------------------------------------------------------------------

    def settle_clip(self, max_norm: float | None = None) -> Tensor | None:
        """Finish the last backward's step, once: wait for its updates (re-raising their
        errors), run what waited for ``step()`` (clipping, the finite check, parameters whose
        gradient FSDP did not set in this backward). Returns the total gradient norm with
        clipping, else ``None``."""
        if not self._pending:
            return None if self.clipper is None else self.clipper.total_norm
        self._pending = False
        try:
            self._settle(max_norm)
        except BaseException:
            self.ledger.forgive()  # the loop may not reach the other optimizers' step()
            raise
        finally:
            self._launched, self._deferred, self._errors = [], [], []
            self._updated = set()
        return None if self.clipper is None else self.clipper.total_norm

    def _settle(self, max_norm: float | None) -> None:
        errors = []
        for f in self._launched:
            try:
                f.wait()
            except Exception as exc:
                errors.append(exc)
        if self._side is not None:
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        if errors:
            first = self._errors[0] if self._errors else errors[0]
            self.last_error = first
            raise first
        work = list(self._deferred)
        left = [
            p for f in self.optimizers for p in f.params()
            if id(p) not in self._updated and p.grad is not None
        ]
        if left:  # set before this backward and not since (no zero_grad): torch.optim steps them
            work.append((-1, left, [p.grad for p in left]))
        bad = self._non_finite(work) if self.check_finite else set()
        if bad and self.clipper is not None:
            self.clipper.discard()  # the norm is not finite: nothing moves
        elif self.clipper is not None:
            self._settle_clipped(work, max_norm)
        else:
            for index, params, grads in work:
                if index not in bad:
                    self._apply(params, grads)
        if bad:
            names = [self.names.get(id(p), "?") for index, params, _ in work if index in bad for p in params]
            raise NonFiniteGradientError(names, min(bad))

    def _settle_clipped(self, work: list[tuple[int, list[Tensor], list[Tensor | None]]], max_norm: float | None) -> None:
        """The clipped step: the norms not taken in backward (deferred groups, gradients left
        from before it, parameters no optimizer holds: ``clip_grad_norm_`` counts all of
        ``model.parameters()``), their updates handed to the clipper, then its settle: one
        all-reduce, one read, the corrections or the deferred updates."""
        clipper = self.clipper
        assert clipper is not None
        unheld = [p for p in self.model.parameters() if p.grad is not None and id(p) not in self._owner]
        for _, params, grads in work + [(-1, unheld, [p.grad for p in unheld])]:
            self._observe(params, grads)
        for _, params, grads in work:
            self._apply(params, grads, clipper=clipper)
        clipper.settle(max_norm)

    def _non_finite(self, work: list[tuple[int, list[Tensor], list[Tensor | None]]]) -> set[int]:
        """The groups of ``work`` whose gradients hold inf/NaN on any rank (one all-reduce)."""
        grads = [local_of(g) for _, _, gs in work for g in gs if g is not None]
        if not grads:
            return set()
        flags = torch.stack([(~torch.isfinite(g)).any() for g in grads]).to(torch.float32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        bad, k = set(), 0
        for index, _, gs in work:
            n = sum(g is not None for g in gs)
            if n and bool(flags[k:k + n].any()):
                bad.add(index)
            k += n
        return bad

    def acknowledge_step(self, optimizer_index: int) -> None:
        """``step()`` of overlapped optimizer ``optimizer_index``. One with no synchronising
        backward since its last ``step()`` steps as torch.optim would, with whatever ``.grad``
        holds (what :func:`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`
        relies on to create the state of a fresh optimizer)."""
        if not self.ledger.awaiting[optimizer_index] and not self._in_backward:
            params = [p for p in self.optimizers[optimizer_index].params() if p.grad is not None]
            self._apply(params, [p.grad for p in params])
        self.ledger.acknowledge(optimizer_index)

    # -- what OverlappedOptimizer asks of every hook state -----------------------------------

    def grads_changed_since_backward(self) -> bool:
        return False

    def reclaim_grads(self, params: Sequence[Tensor] | None = None, zero: bool = False) -> None:
        """Gradients are FSDP's own tensors, never views handed out: nothing to reclaim."""

    def note_zero_grad(self, params: Sequence[Tensor], set_to_none: bool) -> None:
        """Nothing to note."""

    def close(self) -> None:
        """Remove the hooks and stop the executor."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._forward_hook.remove()
        self._executor.close()
