"""Exact global-norm gradient clipping with the update still inside backward.

``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)`` scales every gradient by
``min(max_norm / (total_norm + 1e-6), 1)``, where ``total_norm`` needs every bucket of the
model, while the overlap updates a bucket the moment its own communication lands. Two ways
to have both, chosen per step:

- **speculate**: each bucket is updated as it lands with the unclipped gradient, and its
  gradients' norms are kept on the device (no host synchronisation in backward). At
  ``step()`` the total norm is read once; where it exceeds ``max_norm`` every speculative
  update is corrected to what the update with the clipped gradient would have given, from
  what is still at hand: the updated parameter and state, the averaged gradient in the
  bucket and the coefficient (each optimizer's rule:
  :meth:`~overlap_sgd.functional.FunctionalOptimizer.correct_clip`). Where it does not,
  nothing more runs, and training is bit-identical to ``clip_grad_norm_`` followed by the
  post-backward step with the same kernel (torch multiplies by exactly 1.0 then).
- **defer**: the updates of this step wait until the norm is known; ``step()`` then scales
  the gradients and runs every bucket's update, as a post-backward step would. No
  correction, no overlap for that step.

The policy (:class:`ClipGradNorm`'s ``policy``): ``"speculate"``, ``"defer"``, or ``"auto"``.
A correction runs in ``step()``, exposed, and costs ``clip_correction_cost`` updates (about 1.5
for SGD, 3 for Adam: the multi-tensor passes it takes); deferring exposes one whole update. So
``"auto"`` defers the first step (early steps clip most) and then speculates while clipping
fired on fewer than ``1 / cost`` of the last :data:`AUTO_WINDOW` steps: Adam speculates while
fewer than a third of the recent steps clipped, SGD while fewer than two thirds.
Optimizers without a correction rule (Adagrad, RMSprop, Muon, ``amsgrad=True``, the generic
path) always run deferred; ``error_if_nonfinite=True`` and ``check_finite`` do too, since
they promise that no parameter moves when a gradient is not finite.

The norm: in unsharded training each rank has every averaged gradient, and the per-parameter
norms are combined in ``model.parameters()`` order exactly as ``clip_grad_norm_`` combines
them, so the total norm is bit-identical to it. In sharded training each rank holds pieces:
their ``p``-th powers are summed over the ranks with one all-reduce in ``step()``, equal
within rounding. FSDP2 (:meth:`GlobalClipper.observe_shards`) has a shard of every gradient on
every rank and torch reduces DTensor norms per parameter: each parameter's local norm is raised
to the ``p``-th power, the vector of them summed over the ranks with one all-reduce (``MAX`` for
the inf-norm), each root taken, and the roots combined in ``model.parameters()`` order, which
is what ``clip_grad_norm_`` computes on the DTensor gradients (their ``_NormPartial``
reduction) in torch 2.13, bit for bit where the collective sums the ranks in the same order.
Torch 2.9 combines each rank's norms first and reduces that partial norm, adding
``clip_grad_norm_``'s ``1e-6`` before the reduction; on releases before 2.13 that order is
followed (the denominator reduced in the same all-reduce).

Example:
    >>> ClipGradNorm(1.0).policy
    'auto'
    >>> ClipGradNorm(1.0, norm_type="inf").norm_type
    inf
"""

from __future__ import annotations

import collections
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..functional.base import divide

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a build without distributed support: no DTensor gradients either

    class DTensor:  # type: ignore[no-redef]
        pass

__all__ = ["AUTO_WINDOW", "POLICIES", "ClipGradNorm", "GlobalClipper"]

#: Whether ``clip_grad_norm_`` on DTensor gradients reduces each parameter's norm over the
#: ranks before combining them (torch 2.13; checked there and on 2.9.1, which combines this
#: rank's norms first and reduces that partial norm, ``+ 1e-6`` included). Either way the
#: totals agree within rounding; this picks the order that makes them bit-identical.
_DTENSOR_NORMS_PER_PARAMETER = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)

#: The clipping policies: see the module docs.
POLICIES = ("auto", "speculate", "defer")
#: ``"auto"`` looks back this many steps.
AUTO_WINDOW = 8


@dataclass(frozen=True)
class ClipGradNorm:
    """Global-norm clipping options, as ``torch.nn.utils.clip_grad_norm_`` takes them.

    Args:
        max_norm: the largest total gradient norm; larger gradients are scaled down to it.
        norm_type: the p of the p-norm (``2.0``; ``float("inf")`` or ``"inf"`` for the max-norm).
        error_if_nonfinite: raise ``RuntimeError`` from ``step()`` when the total norm is
            inf/NaN, with no parameter moved (runs every step deferred to keep that promise).
        policy: ``"auto"``, ``"speculate"`` or ``"defer"`` (see the module docs).
    """

    max_norm: float
    norm_type: float = 2.0
    error_if_nonfinite: bool = False
    policy: str = "auto"

    def __post_init__(self) -> None:
        check_max_norm(self.max_norm, "clip_grad_norm")
        norm_type = self.norm_type
        if isinstance(norm_type, str) and norm_type.lower() in ("inf", "infinity"):
            norm_type = math.inf
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
            raise TypeError(f"norm_type must be a number or 'inf', got {self.norm_type!r}")
        if not norm_type > 0:
            raise ValueError(f"norm_type must be positive, got {self.norm_type!r}")
        object.__setattr__(self, "norm_type", float(norm_type))
        if not isinstance(self.error_if_nonfinite, bool):
            raise TypeError(f"error_if_nonfinite must be a bool, got {type(self.error_if_nonfinite).__name__}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")

    @classmethod
    def of(cls, value: "float | ClipGradNorm | None") -> "ClipGradNorm | None":
        """``value`` as options: a number is ``max_norm``, ``None`` is no clipping."""
        if value is None or isinstance(value, ClipGradNorm):
            return value
        return cls(value)


def check_max_norm(value: Any, name: str) -> float:
    """``value`` as a positive finite float, or ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


def _options(keys: Any = None, found_inf: Any = None, grad_scale: Any = None) -> dict[str, Any]:
    """The keyword arguments of ``FunctionalOptimizer.update`` that are set."""
    given = {"keys": keys, "found_inf": found_inf, "grad_scale": grad_scale}
    return {name: value for name, value in given.items() if value is not None}


#: Optimizer classes already warned about (:func:`_warn_deferred`): once per process.
_WARNED: set[type] = set()


def _warn_deferred(optimizers: Sequence[Any]) -> None:
    """Warn once per optimizer class whose updates cannot be corrected (they run deferred)."""
    for f in optimizers:
        cls = type(f.optimizer)
        if cls in _WARNED or all(f.corrects_clip(gi) for gi in range(len(f.param_groups))):
            continue
        _WARNED.add(cls)
        warnings.warn(
            f"{cls.__name__} has no clipping correction (see overlap_sgd.hooks.norm_clip"
            f"{'; amsgrad cannot be undone' if any(g.get('amsgrad') for g in f.param_groups) else ''}): "
            "with clip_grad_norm its bucket updates wait for the global norm every step and run "
            "in step(), clipped exactly, as a post-backward step would",
            stacklevel=4,
        )


@dataclass
class Entry:
    """One kernel call's worth of a bucket update: what ``step()`` needs to correct it
    (speculated) or to run it (deferred)."""

    optimizer: Any
    group_index: int
    params: list[Tensor]
    grads: list[Tensor]
    cache: dict[str, Any] | None
    keys: list[Tensor] | None
    found_inf: Tensor | None
    deferred: bool
    before: Any = None


@dataclass
class _Step:
    """What one synchronising backward left for ``step()``."""

    deferring: bool
    entries: list[Entry] = field(default_factory=list)
    #: (model-order index, norm) of gradients every rank holds whole.
    whole: list[tuple[int, Tensor]] = field(default_factory=list)
    #: Norms of gradient pieces this rank holds (sharded training).
    pieces: list[Tensor] = field(default_factory=list)
    #: (model-order index, norm) of this rank's shard of gradients every rank holds a shard
    #: of (FSDP2), reduced per parameter over the ranks.
    shards: list[tuple[int, Tensor]] = field(default_factory=list)
    #: (bucket index, callback) run after the corrections or deferred updates (sharded
    #: training: gather the updated pieces to every rank), in bucket order.
    after: list[tuple[int, Callable[[], None]]] = field(default_factory=list)


class GlobalClipper:
    """The global-norm clipping of one overlapped model; see the module docs.

    Args:
        options: the clipping options.
        params: the model's trainable parameters, in ``model.parameters()`` order.
        optimizers: the functional optimizers (to know which groups can be corrected).
        process_group: the model's process group (sharded training sums the norms over it).
        sharded: every rank holds only pieces of some gradients.
        force_defer: run every step deferred (``check_finite``).
    """

    def __init__(
        self,
        options: ClipGradNorm,
        params: Sequence[Tensor],
        optimizers: Sequence[Any],
        process_group: Any = None,
        sharded: bool = False,
        force_defer: bool = False,
    ):
        self.options = options
        self.order = {id(p): i for i, p in enumerate(params)}
        #: id(parameter list) -> (that list, its model-order indices), for lists seen again.
        self._indices: dict[int, tuple[Sequence[Tensor], list[int]]] = {}
        self.params = list(params)
        self.optimizers = list(optimizers)
        self.process_group = process_group
        self.sharded = sharded
        self.force_defer = force_defer or options.error_if_nonfinite or options.policy == "defer"
        #: A non-finite norm skips the whole step (``check_finite``) instead of scaling by it.
        self.skip_nonfinite = force_defer
        self.history: collections.deque[bool] = collections.deque(maxlen=AUTO_WINDOW)
        _warn_deferred(self.optimizers)
        self._lock = threading.Lock()
        self._step: _Step | None = None
        #: The last settled step's total norm (0-dim tensor) and whether it clipped.
        self.total_norm: Tensor | None = None
        self.clipped = False
        #: Steps that clipped, and steps that ran deferred, since the start.
        self.clipped_steps = 0
        self.deferred_steps = 0
        self.corrected_steps = 0

    # -- what a resumed run needs ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The policy's memory (which recent steps clipped) and the counters: a run resumed
        from them chooses speculate or defer as the run that never stopped would, so that it
        rounds alike."""
        return {"history": [bool(f) for f in self.history], "clipped_steps": self.clipped_steps,
                "deferred_steps": self.deferred_steps, "corrected_steps": self.corrected_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        history = state.get("history")
        if not isinstance(history, (list, tuple)) or not all(isinstance(f, bool) for f in history):
            raise ValueError(f"a clipping state needs a 'history' list of bools, got {history!r}")
        self.history = collections.deque(history, maxlen=AUTO_WINDOW)
        for key in ("clipped_steps", "deferred_steps", "corrected_steps"):
            setattr(self, key, int(state.get(key, 0)))

    # -- one backward ------------------------------------------------------------------------

    def begin(self) -> None:
        """A synchronising backward starts: choose speculate or defer for it."""
        self._step = _Step(deferring=self.deferring_next())

    def deferring_next(self) -> bool:
        """Whether the next step runs deferred (the same answer on every rank)."""
        if self.force_defer:
            return True
        if self.options.policy == "speculate":
            return False
        if not self.history:
            return True  # early steps clip most: learn before speculating
        return sum(self.history) * self.correction_cost >= len(self.history)

    @property
    def correction_cost(self) -> float:
        """The dearest correction among the optimizers that have one, in updates."""
        costs = [f.clip_correction_cost for f in self.optimizers
                 if any(f.corrects_clip(gi) for gi in range(len(f.param_groups)))]
        return max(costs, default=1.0)

    def discard(self) -> None:
        """Forget the step (its backward raised: the loop will not reach ``step()``)."""
        self._step = None

    @property
    def deferring(self) -> bool:
        """Whether the updates of the backward under way wait for ``step()``."""
        return self._step is not None and self._step.deferring

    @property
    def pending(self) -> bool:
        """A synchronising backward ran whose clipping ``step()`` has not settled yet."""
        return self._step is not None

    @property
    def norm_type(self) -> float:
        return self.options.norm_type

    def folds(self, plan: Any, world_size: int) -> bool:
        """Whether ``plan``'s bucket, whose gradients are still sums over ``world_size`` ranks,
        may keep them so, for kernels that average while they update (sparing a pass over the
        bucket): the step speculates, every segment's optimizer has a correction (worked out
        once per plan; an update found without one later averages first), and dividing by
        ``world_size`` is exact (a power of two), so that the norm of the sum divided by it is
        bit for bit the norm of the average."""
        step = self._step
        if step is None or step.deferring or world_size & (world_size - 1):
            return False
        if plan.corrects_clip is None:
            plan.corrects_clip = all(seg.optimizer.corrects_clip(seg.group_index) for seg in plan.segments)
        return plan.corrects_clip

    def observe_whole(self, params: list[Tensor], grads: list[Tensor], summed_over: int = 1) -> None:
        """The gradients ``grads`` of ``params`` (whole, identical on every rank): averaged, or
        sums over ``summed_over`` ranks (a power of two; see :meth:`folds`)."""
        step = self._step
        if step is None or not grads:
            return
        norms = torch._foreach_norm(grads, self.norm_type)
        if summed_over != 1:
            torch._foreach_div_(norms, float(summed_over))
        indices = self._indices.get(id(params))
        if indices is None or indices[0] is not params:  # not these very params: look them up
            if len(self._indices) >= 4096:  # lists made afresh each step (unused parameters)
                self._indices.clear()
            indices = self._indices[id(params)] = (params, [self.order.get(id(p), -1) for p in params])
        pairs = list(zip(indices[1], norms))
        with self._lock:
            step.whole.extend(pairs)

    def observe_pieces(self, grads: Sequence[Tensor]) -> None:
        """Pieces of averaged gradients that this rank alone holds (sharded training)."""
        step = self._step
        if step is None or not grads:
            return
        norms = torch._foreach_norm(list(grads), self.norm_type)
        with self._lock:
            step.pieces.extend(norms)

    def observe_shards(self, params: Sequence[Tensor], grads: Sequence[Tensor]) -> None:
        """This rank's shards ``grads`` (plain local tensors) of the gradients of ``params``,
        of which every rank holds a shard (FSDP2): their norms are reduced per parameter over
        the ranks in ``step()``, as torch reduces DTensor norms."""
        step = self._step
        if step is None or not grads:
            return
        norms = torch._foreach_norm(list(grads), self.norm_type)
        pairs = [(self.order.get(id(p), -1), n) for p, n in zip(params, norms)]
        with self._lock:
            step.shards.extend(pairs)

    def after_settle(self, bucket: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the step's corrections or deferred updates have run."""
        step = self._step
        if step is not None:
            with self._lock:
                step.after.append((bucket, callback))

    def update(
        self,
        optimizer: Any,
        group_index: int,
        params: list[Tensor],
        grads: list[Tensor],
        cache: dict[str, Any] | None = None,
        keys: list[Tensor] | None = None,
        found_inf: Tensor | None = None,
        grad_scale: Tensor | None = None,
    ) -> None:
        """A bucket's update of one param group: run it now (speculating) or keep it for
        ``step()`` (deferring, or an optimizer without a correction rule). ``grad_scale``:
        ``grads`` are sums to average (by the kernel, or first where it keeps the update)."""
        step = self._step
        extra = _options(keys, found_inf, grad_scale)
        if step is None:  # not a clipped step (a hook used by hand): plain update
            optimizer.update(group_index, params, grads, cache, **extra)
            return
        deferred = step.deferring or not optimizer.corrects_clip(group_index)
        if deferred and grad_scale is not None:
            divide(grads, grad_scale)
            del extra["grad_scale"]
        entry = Entry(optimizer, group_index, params, grads, cache, keys, found_inf, deferred)
        if not deferred:
            entry.before = optimizer.before_speculation(group_index, params, cache, keys)
            optimizer.update(group_index, params, grads, cache, **extra)
        with self._lock:
            step.entries.append(entry)

    # -- step() ------------------------------------------------------------------------------

    def settle(self, max_norm: float | None = None) -> Tensor | None:
        """Finish the last backward's clipping (once; later calls return the same norm).

        Reads the total norm on the host once; where it exceeds ``max_norm`` (default: the
        configured one) corrects the speculative updates and scales the gradients; runs the
        deferred updates. Returns the total norm as a 0-dim tensor, or ``None`` when no
        synchronising backward ran since the last settle (and none before it).
        """
        step, self._step = self._step, None
        if step is None:
            return self.total_norm
        max_norm = self.options.max_norm if max_norm is None else max_norm
        total, denominator = self._total(step)
        coef = torch.clamp(max_norm / denominator, max=1.0)
        # The step's one read on the host: the norm and the coefficient together.
        norm_value, value = torch.stack([total.detach().float(), coef.detach().float()]).tolist()
        if not math.isfinite(norm_value) and self.skip_nonfinite:
            # check_finite: nothing moves; the non-finite check raises from step().
            self.total_norm, self.clipped = total, False
            return total
        if self.options.error_if_nonfinite and not math.isfinite(norm_value):
            raise RuntimeError(
                f"The total norm of order {self.norm_type} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped; no parameter was updated for this step. "
                "To scale the gradients by the non-finite norm anyway, set "
                "error_if_nonfinite=False"
            )
        fired = not value >= 1.0
        with torch.no_grad():
            if fired:
                for e in step.entries:
                    if not e.deferred:
                        e.optimizer.correct_clip(e.group_index, e.params, e.grads, value, e.before, e.keys)
                self._scale_grads(step, coef)
            for e in step.entries:
                if e.deferred:
                    e.optimizer.update(e.group_index, e.params, e.grads, e.cache, **_options(e.keys, e.found_inf))
            if fired or self._any_deferred(step):
                for _, callback in sorted(step.after, key=lambda pair: pair[0]):
                    callback()
        self.history.append(fired)
        self.total_norm, self.clipped = total, fired
        self.clipped_steps += fired
        self.deferred_steps += self._any_deferred(step)
        self.corrected_steps += fired and any(not e.deferred for e in step.entries)
        return total

    def _any_deferred(self, step: _Step) -> bool:
        """Whether some update of this step ran deferred on some rank (decided alike on all)."""
        if step.deferring:
            return True
        return not all(
            f.corrects_clip(gi) for f in self.optimizers for gi in range(len(f.param_groups))
        )

    def _total(self, step: _Step) -> tuple[Tensor, Tensor]:
        """The total norm, and what ``clip_grad_norm_`` divides ``max_norm`` by (the norm
        plus ``1e-6``)."""
        if step.shards and not _DTENSOR_NORMS_PER_PARAMETER:
            return self._reduce_shards_once(step)
        total = self._total_norm(step)
        return total, total + 1e-6

    def _total_norm(self, step: _Step) -> Tensor:
        p = self.norm_type
        whole = [n for _, n in sorted(step.whole + self._reduce_shards(step), key=lambda pair: pair[0])]
        device = self.params[0].device if self.params else torch.device("cpu")
        if not self.sharded:
            if not whole:
                return torch.zeros((), device=device)
            return torch.linalg.vector_norm(torch.stack([n.to(whole[0].device) for n in whole]), p)
        local = torch.zeros((), dtype=torch.float32, device=device)
        if step.pieces:
            local = torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in step.pieces]), p)
        if p == math.inf:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.process_group)
            total = local
            if whole:
                total = torch.maximum(total, torch.stack([n.to(device, torch.float32) for n in whole]).amax())
            return total
        power = local.pow(p)
        dist.all_reduce(power, group=self.process_group)
        if whole:
            power = power + torch.stack([n.to(device, torch.float32) for n in whole]).pow(p).sum()
        return power.pow(1.0 / p)

    def _reduce_shards(self, step: _Step) -> list[tuple[int, Tensor]]:
        """(model-order index, norm over all ranks) of each parameter of ``step.shards``: one
        all-reduce of the vector of local norms (their ``p``-th powers summed, or the
        maximum), as DTensor's ``_NormPartial`` reduces each norm (``x**p``, sum, ``**(1/p)``).
        Every rank holds a shard of the same parameters' gradients, so the vectors agree in
        length and order."""
        if not step.shards:
            return []
        pairs = sorted(step.shards, key=lambda pair: pair[0])
        norms = torch.stack([n.to(pairs[0][1].device) for _, n in pairs])
        p = self.norm_type
        if p == math.inf:
            dist.all_reduce(norms, op=dist.ReduceOp.MAX, group=self.process_group)
        else:
            norms = norms**p
            dist.all_reduce(norms, group=self.process_group)
            norms = norms ** (1.0 / p)
        return [(i, n) for (i, _), n in zip(pairs, norms.unbind())]

    def _reduce_shards_once(self, step: _Step) -> tuple[Tensor, Tensor]:
        """:meth:`_total` of ``step.shards`` as torch 2.9 reduces DTensor norms: this rank's
        norms combined first (in ``model.parameters()`` order), then that one partial norm
        reduced over the ranks (``x**p``, sum, ``**(1/p)``, or the maximum); ``clip_grad_norm_``
        adds its ``1e-6`` to the partial norm, before the reduction, so the denominator is
        reduced alongside it (one all-reduce of both)."""
        norms = [n for _, n in sorted(step.shards, key=lambda pair: pair[0])]
        p = self.norm_type
        local = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), p)
        if p == math.inf:  # the maximum commutes with adding 1e-6
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.process_group)
            return local, local + 1e-6
        both = torch.stack([local, local + 1e-6]) ** p
        dist.all_reduce(both, group=self.process_group)
        total, denominator = (both ** (1.0 / p)).unbind()
        return total, denominator

    def _scale_grads(self, step: _Step, coef: Tensor) -> None:
        """Leave ``.grad`` (and the bucket gradients the updates read) clipped, as
        ``clip_grad_norm_`` leaves ``.grad``: each distinct memory scaled once."""
        taken: dict[int, list[tuple[int, int]]] = {}
        targets: list[Tensor] = []
        # .grad first: a piece of a gradient (sharded training) lies inside its .grad.
        for t in [p.grad for p in self.params] + [g for e in step.entries for g in e.grads]:
            if t is None or t.is_sparse:
                continue
            if isinstance(t, DTensor):
                t = t.to_local()  # FSDP2: this rank's shard (a view), scaled in place
            storage = t.untyped_storage().data_ptr()
            lo = t.data_ptr()
            hi = lo + t.numel() * t.element_size()
            spans = taken.setdefault(storage, [])
            if any(a <= lo and hi <= b for a, b in spans):
                continue
            spans.append((lo, hi))
            targets.append(t)
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for t in targets:
            by_kind.setdefault((t.device, t.dtype), []).append(t)
        for (device, _), ts in by_kind.items():
            torch._foreach_mul_(ts, coef.to(device))
