"""The sharded overlap hook: optimizer state split across ranks (ZeRO-1), updated in backward.

Per bucket, as soon as its gradients are communicated, each rank updates only its share of the
bucket, keeping optimizer state only for that share, and the updated parameters are gathered
back to every rank, while later buckets are still communicating:

- element-wise optimizers (:class:`~overlap_sgd.hooks.layout.ElementLayout`): the bucket's
  gradients are reduce-scattered (summed), each rank updates its element range with one fused
  or multi-tensor kernel per param group (the averaging folded in; float16 buckets are averaged
  before the sum, as DDP does, whose range a sum could overflow), and the updated ranges are
  all-gathered into the bucket buffer and copied into the parameters (on CUDA on a stream of
  their own, so that a copy waiting for its all-gather does not hold up later updates).
  Reduce-scatter and all-gather move the bytes of one all-reduce (on gloo over CPU, which has no
  reduce-scatter of its own, an all-reduce stands in: half as many bytes again); each rank's
  update work and state drop to 1/N.
- whole-tensor optimizers (Adafactor, Muon, the generic path) and per-parameter norm clipping
  (:class:`~overlap_sgd.hooks.layout.ParamLayout`): the bucket is all-reduced (averaged),
  each rank updates the parameters it owns, and they are all-gathered from their owners
  (half as many bytes again as one all-reduce).

The all-gathers run on a process group of their own, issued in bucket order on every rank by a
:class:`~overlap_sgd.hooks.collectives.Sequencer`, since buckets finish their updates in any
order. The future handed back to DDP completes once the bucket's parameters hold their new
values on this rank (on CUDA: on the update's stream, after the copy).

``.grad`` after backward: the averaged gradient, for each parameter whose gradient this rank
holds whole (every parameter with whole-parameter sharding; with element ranges, the
parameters entirely inside its range); ``None`` for the others (they exist only as pieces on
several ranks). Parameters no rank used keep their ``.grad``, as DDP leaves them.

Example (inside an initialised process group; most users call ``overlap(..., shard=True)``)::

    hook, state = make_shard_hook([FunctionalAdamW.bind(opt)], process_group=ddp.process_group,
                                  gather_group=dist.new_group(), params=list(ddp.parameters()))
    ddp.reducer._set_optimizer_in_backward()    # DDP must not copy the buckets into .grad
    ddp.register_comm_hook(state, hook)
"""

# No "from __future__ import annotations": DDP checks the hook's annotations at runtime.

import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from ..functional import FunctionalOptimizer
from .bucket import BucketPlan, Part, clip_inputs
from . import faults
from .collectives import Sequencer, Waiter, all_gather, all_reduce, broadcast, reduce_scatter
from .executor import Executor, StreamExecutor
from .futures import Completion, gather, labelled, when_all
from .layout import ElementLayout, ParamLayout, flat
from .shard_state import ElementHome, Home, OwnerHome, StateShards
from .state import HookState
from .used import UsedLaunch

__all__ = ["ShardHookState", "build_layout", "make_shard_hook", "shard_hook"]

Layout = Union[ElementLayout, ParamLayout]


class ShardHookState(HookState):
    """Everything the sharded hook needs, shared by all buckets of one DDP model.

    Takes :class:`~overlap_sgd.hooks.state.HookState`'s arguments, and:

    Args:
        gather_group: a process group over the same ranks as ``process_group``, for the
            all-gathers of updated parameters (see the module docs).
        by_params: shard every bucket by whole parameters (what per-parameter norm clipping
            needs); otherwise buckets whose optimizers are all element-wise are cut into
            element ranges.
    """

    def __init__(
        self,
        optimizers: Sequence[FunctionalOptimizer],
        *,
        gather_group: Optional[dist.ProcessGroup] = None,
        by_params: bool = False,
        **options: Any,
    ):
        super().__init__(optimizers, **options)
        if self.clipper is not None:
            self.clipper.sharded = True  # pieces of gradients: the norm is summed over the ranks
        self.gather_group = gather_group
        self.by_params = by_params
        self.rank = dist.get_rank(self.process_group)
        self.shards = StateShards(self.optimizers, self.process_group)
        self.sequencer = Sequencer()
        self._layouts: dict[int, Layout] = {}
        self._grad_shards: dict[int, Tensor] = {}
        self._waiter: Optional[Waiter] = None
        self._copier: Optional[Executor] = None
        #: (parameter, its .grad, that tensor's version) when step() was last called.
        self._at_step: list[tuple[Tensor, Tensor, int]] = []
        self._warned_unzeroed = False
        #: Parameters that have a gradient in post-backward training (they were used since the
        #: loop last set gradients to None) but whose ``.grad`` is ``None`` here, as this rank
        #: holds only pieces of it: unused in a step, they are stepped with a zero gradient, as
        #: the post-backward step steps an in-place zeroed ``.grad``.
        self._piece_grads: set[int] = set()

    @property
    def waiter(self) -> Waiter:
        """Waits for collectives whose backend gives no future (gloo's reduce-scatter)."""
        if self._waiter is None:
            self._waiter = Waiter()
        return self._waiter

    def layout_for(self, plan: BucketPlan) -> Layout:
        """The layout of ``plan``'s bucket, built (and the state of its parameters moved to its
        new homes: a collective where they had other homes) when the plan is new."""
        layout = self._layouts.get(plan.index)
        if layout is not None and layout.plan is plan:
            return layout
        loads = [0] * self.world_size
        for index, other in self._layouts.items():
            if index != plan.index and isinstance(other, ParamLayout):
                for r, positions in enumerate(other.positions):
                    loads[r] += sum(other.plan.params[pos].numel() for pos in positions)
        layout, homes = build_layout(plan, self.world_size, self.rank, self.by_params, loads)
        if isinstance(layout, ElementLayout):
            self._grad_shards[plan.index] = torch.empty(
                layout.stop - layout.start, dtype=plan.dtype, device=plan.device
            )
        self.shards.claim(homes)
        self._layouts[plan.index] = layout
        return layout

    def planned_homes(self, buckets: Sequence[dist.GradBucket]) -> list[tuple[Tensor, Home]]:
        """The homes the next backward gives the parameters of DDP's ``buckets`` (all of them,
        in index order), when it lays the buckets out afresh (after :meth:`invalidate`).

        Builds nothing the hook keeps and moves no state. A sharded checkpoint load uses it to
        put each rank's share of the state where the hook will look for it.
        """
        loads = [0] * self.world_size
        out: list[tuple[Tensor, Home]] = []
        for bucket in buckets:
            plan = BucketPlan(bucket.index(), bucket.parameters(), bucket.buffer(), self.optimizers,
                              self.owner, self.names)
            out.extend(build_layout(plan, self.world_size, self.rank, self.by_params, loads)[1])
        return out

    def copier(self, device: torch.device, executor: Executor) -> Executor:
        """Where gathered parameters are copied into place: on CUDA a side stream of its own, so
        that a bucket's copy, which waits for its all-gather, does not hold up the updates of
        later buckets queued behind it on the update stream; elsewhere ``executor``."""
        if device.type != "cuda":
            return executor
        if self._copier is None:
            self._copier = StreamExecutor(device)
        return self._copier

    def invalidate(self) -> None:
        super().invalidate()
        self._layouts.clear()
        self._grad_shards.clear()

    def begin_backward(self, executor: Executor) -> None:
        super().begin_backward(executor)
        self.sequencer.reset()
        self._at_step = []

    def acknowledge_step(self, optimizer_index: int) -> None:
        if not self._warned_unzeroed:
            # Parameters an optimizer updates (others keep DDP's accumulating .grad).
            params = [plan.params[pos] for plan in self.book.plans.values() for pos in plan.owned_positions()]
            self._at_step = [(p, p.grad, p.grad._version) for p in params if p.grad is not None]
        super().acknowledge_step(optimizer_index)

    def note_zero_grad(self, params: Sequence[Tensor], set_to_none: bool) -> None:
        if set_to_none:
            self._piece_grads.difference_update(id(p) for p in params)

    def reclaim_grads(self, params: Optional[Sequence[Tensor]] = None, zero: bool = False) -> None:
        at_step, self._at_step = self._at_step, []
        if params is None and any(p.grad is None for p, _, _ in at_step):
            # The loop set gradients to None (model.zero_grad() too): none exists in pieces.
            self._piece_grads.clear()
        if params is None and any(p.grad is g and g._version == v for p, g, v in at_step):
            # A forward after step(), and a gradient still as step() saw it: not zeroed.
            self._warned_unzeroed = True
            warnings.warn(
                "the gradients of the last synchronising backward were not zeroed after step(). "
                "With shard=True each rank keeps only the averaged gradients it holds whole "
                "(the others are None), so gradients cannot accumulate across optimizer steps: "
                "call optimizer.zero_grad() after every step (no_sync() accumulation within a "
                "step is unaffected).",
                stacklevel=3,
            )
        super().reclaim_grads(params, zero)

    def close(self) -> None:
        super().close()
        if self._waiter is not None:
            self._waiter.close()


def build_layout(
    plan: BucketPlan, world: int, rank: int, by_params: bool, loads: list[int]
) -> "tuple[Layout, list[tuple[Tensor, Home]]]":
    """The layout of ``plan``'s bucket on ``rank``, and the home of each parameter an optimizer
    updates: by whole parameters (balanced on top of ``loads``, which it updates) where
    ``by_params`` or an optimizer needs whole tensors, by element ranges otherwise."""
    if by_params or not plan.elementwise:
        layout: Layout = ParamLayout(plan, world, rank, loads)
        homes: list[tuple[Tensor, Home]] = [(plan.params[pos], OwnerHome(r)) for pos, r in layout.owner.items()]
        return layout, homes
    layout = ElementLayout(plan, world, rank)
    offsets, offset = [], 0
    for p in plan.params:
        offsets.append(offset)
        offset += p.numel()
    homes = [
        (plan.params[pos], ElementHome(offsets[pos], plan.params[pos].numel(), plan.numel, world))
        for pos in plan.owned_positions()
    ]
    return layout, homes


def shard_hook(state: ShardHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: communicate ``bucket`` and update this rank's share of it; see the module docs."""
    plan, executor = state.start(bucket)
    layout = state.layout_for(plan)
    if isinstance(layout, ElementLayout):
        future = _by_elements(state, bucket, plan, layout, executor)
    else:
        future = _by_params(state, bucket, plan, layout, executor)
    if bucket.is_last():
        executor.release()
    return future


def _future(used: Optional[UsedLaunch]) -> Optional[Future]:
    return None if used is None else used.needed


def _fail_into_step(update: Future, state: "ShardHookState", take_part: Callable[[], None]) -> None:
    """Where ``update`` failed before its update ran (the bucket's communication failed): keep
    the error for the end of backward, which raises it, and still ``take_part()`` in the
    bucket's all-gather with the parameters as they are. The all-gathers of later buckets wait
    for this one's turn, and the other ranks for this rank's part: skipping it would hang them."""

    def check() -> None:
        try:
            update.wait()
        except Exception as exc:
            state.record_error(exc)
            take_part()

    when_all([update], check)


def _by_elements(
    state: ShardHookState, bucket: dist.GradBucket, plan: BucketPlan, layout: ElementLayout, executor: Executor
) -> Future:
    buffer = bucket.buffer()
    world, chunk, tail = layout.world, layout.chunk, layout.tail
    main = world * chunk
    group = state.process_group
    shard = state._grad_shards[plan.index]
    # The local gradients' verdict, read before the collectives below may sum into the bucket.
    flags = plan.non_finite_flags(buffer) if state.finite is not None else None
    scale: Optional[Tensor] = plan.grad_scale(world)
    if plan.dtype == torch.float16:
        # A sum of float16 gradients can overflow its narrow range: average first, as DDP does.
        buffer.div_(world)
        scale = None
    futures = []
    if chunk:
        futures.append(reduce_scatter(shard[:chunk], buffer[:main], group, state.waiter))
    if tail:
        futures.append(all_reduce(buffer[main:], group))
    if flags is not None:  # the verdict must be the same on every rank: reduce it
        futures.append(all_reduce(flags, group, dist.ReduceOp.MAX))
    used = state.launch_used(plan)
    done = Completion(plan.device)
    landed = faults.skip(faults.COMM_WAIT, gather(futures, shard), shard)
    last = layout.rank == world - 1

    def update(result: Tensor, reduced: Optional[Tensor]) -> None:
        used_flags = None
        try:
            with labelled(f"bucket{plan.index}/update"):
                if tail and last:
                    shard[chunk:].copy_(buffer[main:])
                used_flags = state.resolve_used(plan, used, reduced)
                found = None if flags is None else state.finite.verdict_of_flags(plan, flags)
                _update_pieces(state, plan, layout, shard, used_flags, scale, found)
                if state.clipper is not None:
                    state.clipper.after_settle(plan.index, lambda: _regather_elements(state, plan, layout))
        except Exception as exc:
            state.record_error(exc)
        finally:
            # Whatever happened, this rank takes part in the all-gather.
            try:
                _hand_out_pieces(state, plan, layout, shard, buffer, used_flags)
            except Exception as exc:
                state.record_error(exc)
            take_part(used_flags)

    def take_part(used_flags: Optional[list[int]]) -> None:
        try:
            layout.pack(buffer[layout.start : layout.stop], shard)
        except Exception as exc:
            state.record_error(exc)
        state.sequencer.submit(
            plan.index, lambda: _gather_elements(state, plan, layout, buffer, executor, done, used_flags),
            plan.device,
        )

    _fail_into_step(executor.after(landed, _future(used), update), state, lambda: take_part(None))
    return done.future


def _update_pieces(
    state: ShardHookState,
    plan: BucketPlan,
    layout: ElementLayout,
    shard: Tensor,
    used: Optional[list[int]],
    scale: Optional[Tensor],
    found: Optional[Tensor],
) -> None:
    """Update this rank's pieces: one kernel call per (optimizer, param group). ``scale``: the
    shard holds sums, to be divided by it (``None``: averaged already)."""
    grads = layout.grads(shard)
    clip, clipper = state.clip, state.clipper
    if scale is None:
        pass
    elif clip is not None or used is not None or found is not None or clipper is not None:
        shard.div_(scale)  # averaged first: clipping and skipping need the true gradients
        scale = None
    else:  # the fused kernels average the rest; a piece no optimizer updates is averaged here
        rest = [grads[pc.pos] for pc in layout.pieces if pc.pos not in layout.owned]
        if rest:
            torch._foreach_div_(rest, scale)
    if clipper is not None:
        clipper.observe_pieces(_norm_pieces(plan, layout, grads, used))
    for seg in layout.segments:
        params, gs, keys = [], [], []
        for pc, view, key in zip(seg.pieces, seg.params, seg.keys):
            if used is None or used[pc.pos]:
                params.append(view)
                gs.append(grads[pc.pos])
                keys.append(key)
            elif key.grad is not None:  # no rank used it: post-backward steps with the old .grad
                params.append(view)
                gs.append(flat(key.grad)[pc.lo : pc.hi])
                keys.append(key)
            elif id(key) in state._piece_grads:  # its .grad, zeroed in place, exists only in pieces
                params.append(view)
                gs.append(torch.zeros(pc.hi - pc.lo, dtype=shard.dtype, device=shard.device))
                keys.append(key)
        if not params:
            continue
        if clip is not None:
            clip.apply(gs)
        cache = seg.cache if len(params) == len(seg.params) else None
        if clipper is not None:
            clipper.update(seg.optimizer, seg.group_index, params, gs, cache, keys=keys, found_inf=found)
            continue
        options: dict[str, Any] = {"keys": keys}
        if scale is not None:
            options["grad_scale"] = scale
        if found is not None:
            options["found_inf"] = found
        seg.optimizer.update(seg.group_index, params, gs, cache, **options)


def _norm_pieces(
    plan: BucketPlan, layout: ElementLayout, grads: dict[int, Tensor], used: Optional[list[int]]
) -> list[Tensor]:
    """This rank's pieces of the gradients that count towards the global norm: every piece of
    its range (an optimizer's or not), or for a parameter no rank used, its ``.grad``'s piece."""
    out = []
    for pc in layout.pieces:
        if used is None or used[pc.pos]:
            out.append(grads[pc.pos])
        else:
            g = plan.params[pc.pos].grad
            if g is not None:
                out.append(flat(g)[pc.lo : pc.hi])
    return out


def _regather_elements(state: ShardHookState, plan: BucketPlan, layout: ElementLayout) -> None:
    """After ``step()`` corrected or ran this rank's updates of the bucket: gather every
    rank's range of the updated parameters again and copy the others' into place."""
    out = torch.empty(plan.numel, dtype=plan.dtype, device=plan.device)
    layout.pack(out[layout.start : layout.stop], state._grad_shards[plan.index])
    for f in _gather_ranges(state, layout, out):
        f.wait()
    targets, sources = _other_ranges(plan, layout, out)
    if targets:
        torch._foreach_copy_(targets, sources)


def _hand_out_pieces(
    state: ShardHookState, plan: BucketPlan, layout: ElementLayout, shard: Tensor, buffer: Tensor,
    used: Optional[list[int]],
) -> None:
    """``.grad``: the averaged gradient where this rank holds a parameter's whole gradient."""
    whole = {pc.pos: pc for pc in layout.pieces if pc.pos in set(layout.whole)}
    pairs = []
    storage = buffer.untyped_storage().data_ptr()
    for pos, p in enumerate(plan.params):
        if pos not in layout.owned:
            continue  # its .grad comes whole with the all-gather
        if used is not None and not used[pos]:
            # No rank used it: DDP leaves its .grad, unless that is a view of the bucket,
            # which is about to hold parameters.
            if p.grad is not None and p.grad.untyped_storage().data_ptr() == storage:
                p.grad = None
            continue
        pc = whole.get(pos)
        if pc is None:
            p.grad = None
            state._piece_grads.add(id(p))
            continue
        # The shard holds the gradient in the parameter's memory order.
        view = shard.as_strided(p.shape, p.stride(), shard.storage_offset() + pc.at)
        if not state.grad_views:
            view = view.clone()
        else:
            pairs.append((p, view))
        p.grad = view
    state.handout.keep((plan.index, -1), pairs)


def _gather_ranges(state: ShardHookState, layout: ElementLayout, out: Tensor) -> list[Future]:
    """Launch the all-gather of every rank's range of the bucket into ``out`` (whose own
    range this rank has filled)."""
    world, chunk, tail = layout.world, layout.chunk, layout.tail
    main = world * chunk
    futures = []
    if chunk:
        mine = out[layout.start : layout.start + chunk]
        futures.append(all_gather(out[:main], mine, state.gather_group, state.waiter))
    if tail:
        futures.append(broadcast(out[main:], world - 1, state.gather_group))
    return futures


def _other_ranges(plan: BucketPlan, layout: ElementLayout, out: Tensor) -> "tuple[list[Tensor], list[Tensor]]":
    """The parts of updated parameters outside this rank's range, and their values in the
    gathered bucket ``out`` (each parameter in its memory order)."""
    targets, sources = [], []
    offset = 0
    for pos, p in enumerate(plan.params):
        n = p.numel()
        if pos in layout.owned:
            for lo, hi in ((0, min(n, layout.start - offset)), (max(0, layout.stop - offset), n)):
                if lo < hi:
                    targets.append(flat(p)[lo:hi])
                    sources.append(out[offset + lo : offset + hi])
        offset += n
    return targets, sources


def _gather_elements(
    state: ShardHookState, plan: BucketPlan, layout: ElementLayout, buffer: Tensor, executor: Executor,
    done: Completion, used: Optional[list[int]],
) -> None:
    """All-gather the updated ranges into the bucket, then copy them into the parameters."""
    try:
        futures = _gather_ranges(state, layout, buffer)
        views = plan.views(buffer)
        # Only the other ranks' ranges: this rank's update wrote its own into the parameters.
        targets, sources = _other_ranges(plan, layout, buffer)
        unowned = [pos for pos in range(len(plan.params)) if pos not in layout.owned]

        def copy_out(result: Tensor, _flags: Optional[Tensor]) -> None:
            if targets:
                torch._foreach_copy_(targets, sources)
            for pos in unowned:  # no optimizer updates it: the bucket brought its averaged .grad
                p = plan.params[pos]
                if used is not None and not used[pos]:
                    continue  # no rank used it: DDP leaves its .grad alone
                if p.grad is None or not p.grad.is_set_to(views[pos]):
                    p.grad = views[pos].clone()

        gathered = faults.skip(faults.GATHER_WAIT, gather(futures, buffer), buffer)
        copied = state.copier(plan.device, executor).after(gathered, None, copy_out)
        gather([copied], buffer, done)
    except Exception as exc:
        done.set_error(exc)


def _by_params(
    state: ShardHookState, bucket: dist.GradBucket, plan: BucketPlan, layout: ParamLayout, executor: Executor
) -> Future:
    buffer = bucket.buffer()
    buffer.div_(state.world_size)  # averaged, as DDP's default all-reduce hook does
    comm = faults.skip(faults.COMM_WAIT, all_reduce(buffer, state.process_group), buffer)
    used = state.launch_used(plan)
    done = Completion(plan.device)
    part = _owned_part(plan, layout)
    others = [pos for pos, r in layout.owner.items() if r != layout.rank]

    def update(result: Tensor, reduced: Optional[Tensor]) -> None:
        used_flags = None
        try:
            with labelled(f"bucket{plan.index}/update"):
                used_flags = state.resolve_used(plan, used, reduced)
                found = None
                if state.finite is not None:
                    found = state.finite.verdict(plan, result)
                if state.clipper is not None:
                    params, grads = clip_inputs(plan, plan.views(result), used_flags, range(len(plan.params)))
                    if state.clip is not None:
                        state.clip.apply(grads)
                    state.clipper.observe_whole(params, grads)
                    plan.run(result, used_flags, None, part, None, found, state.clipper)
                    state.clipper.after_settle(plan.index, lambda: _regather_params(state, plan, layout))
                elif state.clip is not None and others:
                    # Their owners clip them before their update; so does every rank's .grad.
                    views = plan.views(result)
                    state.clip.apply([views[pos] for pos in others if used_flags is None or used_flags[pos]])
                    plan.run(result, used_flags, state.clip, part, None, found)
                else:
                    plan.run(result, used_flags, state.clip, part, None, found)
        except Exception as exc:
            state.record_error(exc)
        finally:
            # Whatever happened, this rank takes part in the all-gather.
            try:
                if state.grad_views:
                    state.hand_out_grads(plan, result, used_flags, None)
                else:  # DDP's copy is off (its buckets end up holding parameters): copy here
                    _copy_grads(plan, result, used_flags)
            except Exception as exc:
                state.record_error(exc)
            take_part(result)

    def take_part(result: Tensor) -> None:
        try:
            mine = _pack_owned(plan, layout)
        except Exception as exc:
            state.record_error(exc)
            mine = torch.zeros(layout.slot, dtype=plan.dtype, device=plan.device)
        state.sequencer.submit(
            plan.index, lambda: _gather_params(state, plan, layout, mine, result, executor, done), plan.device
        )

    _fail_into_step(executor.after(comm, _future(used), update), state, lambda: take_part(bucket.buffer()))
    return done.future


def _copy_grads(plan: BucketPlan, result: Tensor, used: Optional[list[int]]) -> None:
    """``.grad`` as a copy of each parameter's averaged gradient in ``result`` (parameters no
    rank used keep theirs, as DDP leaves them)."""
    views = plan.views(result)
    for pos, p in enumerate(plan.params):
        if used is None or used[pos]:
            p.grad = views[pos].to(p.dtype, copy=True)


def _owned_part(plan: BucketPlan, layout: ParamLayout) -> Part:
    """A :class:`~overlap_sgd.hooks.bucket.Part` with the segments of this rank's parameters."""
    return plan.subset(layout.mine())


def _pack_owned(plan: BucketPlan, layout: ParamLayout) -> Tensor:
    out = torch.empty(layout.slot, dtype=plan.dtype, device=plan.device)
    offset = 0
    for pos in layout.mine():
        n = plan.params[pos].numel()
        out[offset : offset + n].copy_(flat(plan.params[pos]))
        offset += n
    return out


def _regather_params(state: ShardHookState, plan: BucketPlan, layout: ParamLayout) -> None:
    """After ``step()`` corrected or ran this rank's updates of the bucket: gather the owners'
    parameters again and copy the others' into place."""
    slot = layout.slot
    if not slot:
        return
    everything = torch.empty(slot * layout.world, dtype=plan.dtype, device=plan.device)
    all_gather(everything, _pack_owned(plan, layout), state.gather_group, state.waiter).wait()
    targets, sources = _others(plan, layout, everything)
    if targets:
        torch._foreach_copy_(targets, sources)


def _others(plan: BucketPlan, layout: ParamLayout, everything: Tensor) -> "tuple[list[Tensor], list[Tensor]]":
    """The other ranks' parameters of the bucket, and their values in the all-gathered
    ``everything`` (one slot per rank)."""
    targets, sources = [], []
    for r, positions in enumerate(layout.positions):
        if r == layout.rank:
            continue
        offset = r * layout.slot
        for pos in positions:
            n = plan.params[pos].numel()
            targets.append(flat(plan.params[pos]))
            sources.append(everything[offset : offset + n])
            offset += n
    return targets, sources


def _gather_params(
    state: ShardHookState, plan: BucketPlan, layout: ParamLayout, mine: Tensor, result: Tensor,
    executor: Executor, done: Completion,
) -> None:
    """All-gather the owners' updated parameters, then copy the others' into place."""
    try:
        slot = layout.slot
        everything = torch.empty(slot * layout.world, dtype=plan.dtype, device=plan.device)
        landed = all_gather(everything, mine, state.gather_group, state.waiter) if slot else None
        targets, sources = _others(plan, layout, everything)

        def copy_out(_result: Tensor, _flags: Optional[Tensor]) -> None:
            if targets:
                torch._foreach_copy_(targets, sources)

        if landed is None:  # no parameter of the bucket is updated by anyone
            landed = Future(devices=[plan.device] if plan.device.type == "cuda" else None)
            landed.set_result(result)
        landed = faults.skip(faults.GATHER_WAIT, landed, everything)
        copied = state.copier(plan.device, executor).after(landed, None, copy_out)
        gather([copied], result, done)
    except Exception as exc:
        done.set_error(exc)


def make_shard_hook(
    optimizers: Sequence[FunctionalOptimizer],
    **options: Any,
) -> "tuple[Callable[[ShardHookState, dist.GradBucket], torch.futures.Future[torch.Tensor]], ShardHookState]":
    """Build ``(hook, state)`` for ``DistributedDataParallel.register_comm_hook(state, hook)``.

    ``options`` are :class:`ShardHookState`'s keyword arguments.
    """
    return shard_hook, ShardHookState(optimizers, **options)
