"""Distributed checkpoints (:mod:`torch.distributed.checkpoint`, DCP) of overlapped optimizers.

With ``overlap(..., shard=True)`` each rank keeps the optimizer state of only its share of every
bucket, and ``state_dict()`` gathers the whole state onto every rank: for a moment each rank
holds as much as an unsharded optimizer would. With DCP instead each rank writes only its share,
all ranks in parallel, and reads back only what its share needs, on any number of ranks:

- :func:`optimizer_state_dict` is the optimizer's state dict to hand to
  :func:`torch.distributed.checkpoint.save`, with this rank's share only (no communication);
- :func:`load_optimizer_state_dict` loads such a checkpoint into the optimizer, on this or any
  other number of ranks.

The format is torch's own for a DDP model, as
:func:`torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` writes it: state and
param groups keyed by parameter name (the DDP model's ``module``'s parameter names), not by
position, plus the optimizer class of each param group, which loading checks::

    {"state": {"body.0.weight": {"step": ..., "exp_avg": ..., "exp_avg_sq": ...}, ...},
     "param_groups": [{"lr": ..., ..., "params": ["body.0.weight", ...]}, ...],
     "param_group_classes": ["torch.optim.adamw.AdamW", ...]}

What each rank puts in it, by where the state lives (:mod:`overlap_sgd.hooks.shard_state`):

- state split by element ranges: each element-wise tensor (``exp_avg``, ``momentum_buffer``,
  ...) as a :class:`~torch.distributed._shard.sharded_tensor.ShardedTensor` of the parameter's
  shape whose local shards are this rank's range, cut into rectangular blocks
  (:mod:`overlap_sgd.blocks`) that are views of the state, not copies; the parameter's other
  state (``step``, non-tensor values) from the rank holding its first element;
- state held whole by one rank (whole-tensor optimizers, per-parameter norm clipping): that
  rank's tensors;
- state every rank holds whole (no sharding, or before the first backward): plain tensors,
  which DCP writes once, spread over the ranks.

Loading reads the checkpoint's metadata, works out where the next backward will look for each
parameter's state on this rank (the homes the sharded hook builds from DDP's current buckets;
building them reads DDP's bucket list, which costs a transient zero-filled copy of the
gradient buckets), and asks DCP for exactly those pieces, which DCP reads from whatever chunks
the saving ranks wrote. Nothing is gathered and no rank holds more than its share.

What loads into what: a checkpoint written from a sharded, an unsharded or a plain torch
optimizer loads into any of them, on any number of ranks; an unsharded or plain one reads the
whole state on every rank, as it must. Because the format is torch's, a checkpoint of a plain
optimizer written with ``get_optimizer_state_dict`` loads here, and one written here loads with
torch's ``get_optimizer_state_dict`` / ``dcp.load`` / ``set_optimizer_state_dict`` into a plain
optimizer. State values nested in containers (no torch optimizer keeps any) are saved whole by
the rank holding the parameter's first element and loaded whole by every rank holding a piece
of it. Model state is the caller's to save: under DDP it is replicated, and DCP writes each
tensor once.

Torch marks ``ShardedTensor`` deprecated in favour of ``DTensor``, whose placements cannot
describe arbitrary element ranges; DCP reads and writes it as before (loading silences the
warning torch gives when DCP touches one).

Example (every rank of a ``torchrun`` job; ``model`` the DDP model)::

    import torch.distributed.checkpoint as dcp
    from overlap_sgd.dcp import load_optimizer_state_dict, optimizer_state_dict

    opt = overlap_sgd.overlap(model, torch.optim.AdamW(model.parameters()), shard=True)
    ...
    dcp.save({"model": model.module.state_dict(), "optimizer": optimizer_state_dict(model, opt)},
             checkpoint_id=path)

    # later, on any number of ranks, before or after the first backward
    state = {"model": model.module.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.module.load_state_dict(state["model"])
    load_optimizer_state_dict(model, opt, path)     # reads the "optimizer" entry
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from .blocks import RangeBlocks
from .attached import STATE_ATTR
from .hooks.shard_state import ElementHome, Home, OwnerHome
from .optimizer import OverlappedOptimizer
from .registry import resolve

__all__ = ["load_optimizer_state_dict", "optimizer_state_dict"]

_STATE, _GROUPS, _CLASSES = "state", "param_groups", "param_group_classes"
_SHARDED_TENSOR_DEPRECATED = "Please use DTensor instead"
_SINGLE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"

Optimizers = Union[Optimizer, Sequence[Optimizer]]


def optimizer_state_dict(model: nn.Module, optimizers: Optimizers) -> dict[str, Any]:
    """The state dict of ``optimizers`` for :func:`torch.distributed.checkpoint.save`, holding
    only this rank's share of a sharded optimizer's state (see the module docs).

    No communication: every rank calls it, then ``dcp.save`` (a collective). The tensors in it
    are the optimizer's own (or views of them): save before the next update.

    Args:
        model: the DDP model the optimizers train (or its ``module``); parameter names come
            from ``model.module.named_parameters()``.
        optimizers: an :class:`~overlap_sgd.OverlappedOptimizer` (sharded or not), a plain
            ``torch.optim`` optimizer, or a list of them over disjoint parameters, as
            ``overlap`` returned them.

    Raises:
        TypeError: an optimizer is not a ``torch.optim.Optimizer``.
        ValueError: an optimizer holds a parameter the model does not have, or was overlapped
            on another model.

    Example (every rank)::

        dcp.save({"optimizer": optimizer_state_dict(model, opt)}, checkpoint_id="ckpt/step-100")
    """
    holders, names = _holders(model, optimizers)
    state: dict[str, Any] = {}
    groups: list[dict[str, Any]] = []
    classes: list[str] = []
    for h in holders:
        packed = h.inner.state_dict()
        for index, entry in packed[_STATE].items():
            p = h.params[index]
            mine = _share_to_save(h, p, entry)
            if mine:
                state[names[id(p)]] = mine
        for group in packed[_GROUPS]:
            groups.append({**group, "params": [names[id(h.params[i])] for i in group["params"]]})
            classes.append(_class_name(h.inner))
    return {_STATE: state, _GROUPS: groups, _CLASSES: classes}


def load_optimizer_state_dict(
    model: nn.Module,
    optimizers: Optimizers,
    checkpoint_id: str | os.PathLike[str] | None = None,
    *,
    key: str | None = "optimizer",
    storage_reader: dcp.StorageReader | None = None,
) -> None:
    """Load the optimizer state that :func:`optimizer_state_dict` saved with DCP (or torch's
    ``get_optimizer_state_dict`` did) into ``optimizers``, each rank reading only its share.

    A collective over the model's process group: every rank calls it. Works on any number of
    ranks, sharded or not, before or after the first backward; a sharded optimizer's state
    lands where its next backward looks for it. Hyperparameters come from the checkpoint, as
    with ``load_state_dict``. Everything is checked before anything is modified.

    Args:
        model: the DDP model (or its ``module``), as for :func:`optimizer_state_dict`.
        optimizers: as for :func:`optimizer_state_dict`, holding the same parameters in the
            same param groups as the optimizers that wrote the checkpoint.
        checkpoint_id: the checkpoint's directory (for DCP's file system reader).
        key: where the optimizer's state dict sits in the saved state dict (``"a.b"`` for
            ``{"a": {"b": ...}}``); ``None`` when it was saved at the top level.
        storage_reader: a DCP storage reader, instead of reading ``checkpoint_id`` from the
            file system.

    Raises:
        ValueError: the checkpoint holds nothing under ``key``, or was written for another
            optimizer class, other parameters or param groups, or parameters of another shape.

    Example (one process, a plain optimizer; under ``torchrun`` every rank runs the same)::

        >>> import tempfile, torch, torch.distributed.checkpoint as dcp
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = torch.optim.AdamW(net.parameters())
        >>> net(torch.ones(1, 3)).sum().backward()
        >>> opt.step()
        >>> path = tempfile.mkdtemp()
        >>> _ = dcp.save({"optimizer": optimizer_state_dict(net, opt)}, checkpoint_id=path)
        >>> sorted(optimizer_state_dict(net, opt)["state"])
        ['bias', 'weight']
        >>> fresh = torch.optim.AdamW(net.parameters())
        >>> load_optimizer_state_dict(net, fresh, path)
        >>> int(fresh.state[net.weight]["step"])
        1
    """
    holders, names = _holders(model, optimizers)
    if storage_reader is None:
        if checkpoint_id is None:
            raise ValueError("load_optimizer_state_dict needs a checkpoint_id or a storage_reader")
        storage_reader = dcp.FileSystemReader(checkpoint_id)
    elif checkpoint_id is not None:
        storage_reader.reset(checkpoint_id)
    where = str(checkpoint_id) if checkpoint_id is not None else "the checkpoint"
    params = {names[id(p)]: (h, p) for h in holders for p in h.params}
    saved = _Saved.read(storage_reader.read_metadata(), key, where, params)
    group = _group(model, holders)

    # 1. Read the param groups and their classes, and check them and the state's shapes.
    request: dict[str, Any] = {flat_key: _blank(md) for flat_key, (_, md) in saved.groups.items()}
    if saved.classes is not None:
        request[saved.classes] = None
    _read(request, checkpoint_id, storage_reader, group)
    groups = _rebuild_groups(saved, request)
    _check_groups(where, holders, names, groups, None if saved.classes is None else request[saved.classes])
    for fqn, entries in saved.state.items():
        h, p = params[fqn]
        if h.elementwise:
            _check_shapes(where, fqn, p, entries)

    # 2. Read this rank's share of each parameter's state, where the next backward looks for it.
    homes = _planned_homes(holders)
    request = {}
    loads: dict[str, _Load] = {}
    for fqn, entries in saved.state.items():
        h, p = params[fqn]
        load = _Load.plan(p, homes.get(id(p)), h.rank, h.group, entries)
        if load is not None:
            loads[fqn] = load
            request.update(load.request)
    _read(request, checkpoint_id, storage_reader, group)

    # 3. Hand each optimizer its share.
    at = 0
    for h in holders:
        local: dict[str, Any] = {_STATE: {}, _GROUPS: []}
        index = 0
        for param_group in h.inner.param_groups:
            n = len(param_group["params"])
            local[_GROUPS].append({**groups[at], "params": list(range(index, index + n))})
            index += n
            at += 1
        for i, p in enumerate(h.params):
            load = loads.get(names[id(p)])
            if load is not None:
                local[_STATE][i] = load.entry(request)
        h.optimizer.load_state_dict(local)
        if h.sharded:
            h.hook_state.shards.adopt([(p, homes[id(p)]) for p in h.params if id(p) in homes])


# -- the optimizers --------------------------------------------------------------------------


@dataclass
class _Holder:
    """One optimizer, as the checkpoint sees it."""

    optimizer: Optimizer
    inner: Optimizer
    params: list[Tensor]
    hook_state: Any = None
    ddp: DistributedDataParallel | None = None

    @property
    def sharded(self) -> bool:
        return self.hook_state is not None

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.hook_state.process_group if self.sharded else None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.sharded else 0

    def home(self, param: Tensor) -> Home | None:
        return self.hook_state.shards.home(param) if self.sharded else None

    @functools.cached_property
    def elementwise(self) -> bool:
        """Whether the optimizer's update is element-wise: its state tensors have the parameter's shape."""
        try:
            return bool(resolve(type(self.inner)).functional.elementwise)
        except TypeError:  # a class overlap() refuses
            return False


def _holders(model: nn.Module, optimizers: Optimizers) -> tuple[list[_Holder], dict[int, str]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (the DDP model), got {type(model).__name__}")
    opts = [optimizers] if isinstance(optimizers, Optimizer) else list(optimizers)
    if not opts:
        raise ValueError("no optimizer given")
    module = model.module if isinstance(model, DistributedDataParallel) else model
    names = {id(p): name for name, p in module.named_parameters()}
    holders, seen = [], {}
    for i, opt in enumerate(opts):
        if not isinstance(opt, Optimizer):
            raise TypeError(f"optimizer {i} must be a torch.optim.Optimizer, got {type(opt).__name__}")
        wrapper = next((w for w in getattr(getattr(model, STATE_ATTR, None), "wrapped", []) if w.optimizer is opt), None)
        h = _Holder(opt if wrapper is None else wrapper, opt, [])
        opt = h.optimizer
        if isinstance(opt, OverlappedOptimizer):
            h.inner, h.ddp = opt.optimizer, opt._model
            if h.ddp is not None and model is not h.ddp and model is not h.ddp.module:
                raise ValueError(f"optimizer {i} was overlapped on another model than the one given")
            if opt._sharded:
                h.hook_state = opt.hook_state
        h.params = [p for group in h.inner.param_groups for p in group["params"]]
        for p in h.params:
            if id(p) not in names:
                raise ValueError(
                    f"optimizer {i} holds a parameter of shape {tuple(p.shape)} that is not a "
                    "parameter of the model"
                )
            if id(p) in seen:
                raise ValueError(f"parameter {names[id(p)]!r} is held by optimizers {seen[id(p)]} and {i}")
            seen[id(p)] = i
        holders.append(h)
    return holders, names


def _class_name(optimizer: Optimizer) -> str:
    cls = type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _group(model: nn.Module, holders: list[_Holder]) -> dist.ProcessGroup | None:
    for h in holders:
        if h.sharded:
            return h.group
    return model.process_group if isinstance(model, DistributedDataParallel) else None


def _read(request: dict[str, Any], checkpoint_id: Any, reader: dcp.StorageReader,
          group: dist.ProcessGroup | None) -> None:
    """``dcp.load`` into ``request`` (a collective, unless torch.distributed is not initialized)."""
    with warnings.catch_warnings():
        # DCP reads ShardedTensors through the torch-function API that torch marks deprecated.
        warnings.filterwarnings("ignore", _SHARDED_TENSOR_DEPRECATED, FutureWarning)
        warnings.filterwarnings("ignore", _SINGLE_PROCESS, UserWarning)
        dcp.load(request, checkpoint_id=checkpoint_id, storage_reader=reader, process_group=group,
                 no_dist=not _distributed())


def _planned_homes(holders: list[_Holder]) -> dict[int, Home]:
    """Where the next backward of each sharded model looks for each parameter's state."""
    homes: dict[int, Home] = {}
    done: set[int] = set()
    for h in holders:
        if not h.sharded or id(h.hook_state) in done:
            continue
        done.add(id(h.hook_state))
        buckets = h.ddp.reducer._get_zeros_like_grad_buckets()
        for p, home in h.hook_state.planned_homes(buckets):
            homes[id(p)] = home
        del buckets
    return homes


# -- saving ----------------------------------------------------------------------------------


def _share_to_save(h: _Holder, p: Tensor, entry: dict[str, Any]) -> dict[str, Any] | None:
    """What this rank saves of ``p``'s state ``entry`` (see the module docs)."""
    home = h.home(p)
    if home is None:
        return dict(entry)
    rank = h.rank
    if isinstance(home, OwnerHome):
        return dict(entry) if home.rank == rank else None
    piece = home.piece(rank)
    if piece is None:
        return None
    out: dict[str, Any] = {}
    geometry = _Geometry(p, home, rank, h.group)
    for k, value in entry.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            out[k] = geometry.sharded(value.dtype, geometry.mine.views(value))
        elif rank == home.lead:
            out[k] = value
    return out


class _Geometry:
    """Every rank's blocks of a parameter whose state is split by element ranges."""

    def __init__(self, p: Tensor, home: ElementHome, rank: int, group: dist.ProcessGroup | None):
        self.shape = p.shape
        #: (global rank, its blocks) for every rank holding a piece.
        self.ranks: list[tuple[int, RangeBlocks]] = []
        for r in range(home.world):
            piece = home.piece(r)
            if piece is not None:
                cut = RangeBlocks(p, *piece)
                self.ranks.append((r if group is None else dist.get_global_rank(group, r), cut))
                if r == rank:
                    #: This rank's blocks.
                    self.mine = cut

    def sharded(self, dtype: torch.dtype, local: list[Tensor]) -> ShardedTensor:
        """A ShardedTensor of the parameter's shape whose local shards are ``local`` (this
        rank's blocks, in order; copied where not contiguous)."""
        device = local[0].device
        metas, shards = [], []
        for global_rank, cut in self.ranks:
            mds = [ShardMetadata(list(b.offsets), list(b.sizes), f"rank:{global_rank}/{device}") for b in cut.blocks]
            metas.extend(mds)
            if cut is self.mine:
                shards = [Shard(t if t.is_contiguous() else t.contiguous(), md) for t, md in zip(local, mds)]
        properties = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                                      memory_format=torch.contiguous_format, pin_memory=False)
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, ShardedTensorMetadata(metas, self.shape, properties)
        )


# -- loading ---------------------------------------------------------------------------------


@dataclass
class _Saved:
    """What the checkpoint's metadata says about the optimizer state under one key."""

    #: fqn -> path inside the parameter's state entry -> (flat DCP key, storage metadata).
    state: dict[str, dict[tuple[Any, ...], tuple[str, Any]]] = field(default_factory=dict)
    #: flat DCP key -> (path inside the param group list, storage metadata).
    groups: dict[str, tuple[tuple[Any, ...], Any]] = field(default_factory=dict)
    #: The flat DCP key of the param groups' classes, if saved.
    classes: str | None = None

    @classmethod
    def read(cls, metadata: Metadata, key: str | None, where: str, params: dict[str, Any]) -> "_Saved":
        prefix: tuple[Any, ...] = tuple(key.split(".")) if key else ()
        saved = cls()
        paths = metadata.planner_data
        if not isinstance(paths, dict):
            raise ValueError(
                f"{where} does not record where its values sit in the saved state dict (DCP's "
                "default planner records it, with flatten_state_dict=True)"
            )
        tops = set()
        for flat_key, md in metadata.state_dict_metadata.items():
            path = paths.get(flat_key, (flat_key,))
            tops.add(str(path[0]))
            if tuple(str(x) for x in path[: len(prefix)]) != prefix or len(path) <= len(prefix):
                continue
            kind, rest = path[len(prefix)], tuple(path[len(prefix) + 1 :])
            if kind == _CLASSES and not rest:
                saved.classes = flat_key
            elif kind == _GROUPS and rest:
                saved.groups[flat_key] = (rest, md)
            elif kind == _STATE and len(rest) >= 2:
                fqn = str(rest[0])
                if fqn not in params:
                    raise ValueError(
                        f"{where} holds optimizer state for parameter {fqn!r}, which none of the "
                        f"optimizers holds ({len(params)} parameters, e.g. {sorted(params)[:3]})"
                    )
                saved.state.setdefault(fqn, {})[rest[1:]] = (flat_key, md)
        if not saved.groups:
            raise ValueError(
                f"{where} holds no optimizer state dict under key {key!r} (top-level keys: "
                f"{sorted(tops)}); pass the key it was saved under"
            )
        return saved


def _blank(md: Any) -> Any:
    """Something for DCP to load a saved value into."""
    if isinstance(md, TensorStorageMetadata):
        return torch.empty(md.size, dtype=md.properties.dtype)
    return None


def _check_shapes(where: str, fqn: str, p: Tensor, entries: dict[tuple[Any, ...], tuple[str, Any]]) -> None:
    """An element-wise optimizer's state tensors have their parameter's shape."""
    for path, (_, md) in entries.items():
        if isinstance(md, TensorStorageMetadata) and len(md.size) > 0 and tuple(md.size) != tuple(p.shape):
            raise ValueError(
                f"{where} holds state {path[-1]!r} of parameter {fqn!r} with shape {tuple(md.size)}, "
                f"but the parameter's shape is {tuple(p.shape)}: it was written for another model or optimizer"
            )


@dataclass
class _Load:
    """What this rank asks DCP for of one parameter's state, and how it becomes the entry."""

    #: flat DCP key -> the object DCP loads into.
    request: dict[str, Any]
    #: path in the state entry -> flat DCP key, for values kept as loaded.
    whole: dict[tuple[Any, ...], str]
    #: path in the state entry -> (1-D piece, its block views, the tensors DCP loads into).
    pieces: dict[tuple[Any, ...], tuple[Tensor, list[Tensor], list[Tensor]]]

    @classmethod
    def plan(cls, p: Tensor, home: Home | None, rank: int, group: dist.ProcessGroup | None,
             entries: dict[tuple[Any, ...], tuple[str, Any]]) -> "_Load | None":
        geometry = None
        if isinstance(home, OwnerHome) and home.rank != rank:
            return None
        if isinstance(home, ElementHome):
            if home.piece(rank) is None:
                return None
            geometry = _Geometry(p, home, rank, group)
        load = cls({}, {}, {})
        for path, (flat_key, md) in entries.items():
            tensor = isinstance(md, TensorStorageMetadata)
            if geometry is not None and tensor and len(md.size) > 0 and len(path) == 1:
                cut = geometry.mine
                piece = torch.empty(cut.hi - cut.lo, dtype=md.properties.dtype, device=p.device)
                views = cut.views(piece)
                targets = [v if v.is_contiguous() else torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in views]
                load.request[flat_key] = geometry.sharded(md.properties.dtype, targets)
                load.pieces[path] = (piece, views, targets)
                continue
            if not tensor:
                load.request[flat_key] = None
            elif tuple(md.size) == tuple(p.shape) and len(md.size) > 0:
                load.request[flat_key] = torch.empty_like(p, dtype=md.properties.dtype)
            else:
                device = p.device if len(md.size) > 0 else torch.device("cpu")
                load.request[flat_key] = torch.empty(md.size, dtype=md.properties.dtype, device=device)
            load.whole[path] = flat_key
        return load

    def entry(self, loaded: dict[str, Any]) -> dict[str, Any]:
        """The parameter's state entry, from what DCP loaded."""
        out: dict[str, Any] = {}
        for path, (piece, views, targets) in self.pieces.items():
            for view, target in zip(views, targets):
                if target is not view:
                    view.copy_(target)
            _put(out, path, piece)
        for path, flat_key in self.whole.items():
            _put(out, path, loaded[flat_key])
        return out


def _put(root: Any, path: tuple[Any, ...], value: Any) -> None:
    """Set ``root[path[0]][path[1]]... = value``, creating dicts (lists, for int keys) on the way."""
    node = root
    for step, following in zip(path[:-1], path[1:]):
        child: Any = [] if isinstance(following, int) else {}
        if isinstance(node, list):
            node.extend([None] * (step + 1 - len(node)))
            if node[step] is None:
                node[step] = child
        else:
            node.setdefault(step, child)
        node = node[step]
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


def _rebuild_groups(saved: _Saved, loaded: dict[str, Any]) -> list[dict[str, Any]]:
    holder: dict[str, Any] = {}
    for flat_key, (path, _) in saved.groups.items():
        _put(holder, (_GROUPS, *path), loaded[flat_key])
    return holder[_GROUPS]


def _check_groups(where: str, holders: list[_Holder], names: dict[int, str], groups: list[dict[str, Any]],
                  classes: list[str] | None) -> None:
    current = [(h, g) for h in holders for g in h.inner.param_groups]
    if len(groups) != len(current):
        raise ValueError(
            f"{where} holds {len(groups)} param groups, but the optimizers have {len(current)}"
        )
    if classes is not None:
        have = [_class_name(h.inner) for h, _ in current]
        if list(classes) != have:
            raise ValueError(
                f"{where} holds the state of {sorted(set(classes))} optimizers, but the optimizers "
                f"to load it into are {sorted(set(have))}; build the same optimizer classes as "
                "the run that wrote it"
            )
    for i, (saved, (_, group)) in enumerate(zip(groups, current)):
        want = [names[id(p)] for p in group["params"]]
        got = list(saved.get("params", []))
        if got != want:
            extra = sorted(set(got) - set(want))[:3]
            missing = sorted(set(want) - set(got))[:3]
            raise ValueError(
                f"{where}: param group {i} holds other parameters than the optimizer's: "
                f"{len(got)} in the checkpoint, {len(want)} here; only in the checkpoint: "
                f"{extra}, only here: {missing}" + ("" if extra or missing else " (another order)")
            )
