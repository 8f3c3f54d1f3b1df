"""Crash-safe checkpoints for DDP training with an overlapped (or plain) optimizer.

Three calls cover a training loop that survives being killed at any moment::

    state = checkpoint_state(ddp_model, opt, sched, step=step)
    save_checkpoint(checkpoint_path(run_dir, step), state)    # every rank calls it
    ...
    path = latest_checkpoint(run_dir)                         # on (re)start
    if path is not None:
        step = load_checkpoint(path, ddp_model, opt, sched)["step"]

Why one writer and a barrier, rather than :mod:`torch.distributed.checkpoint`: under DDP every
rank holds the same parameters and the same optimizer state (each rank applies the same averaged
gradients), and that state is small enough for one process to write. Sharded, parallel writes buy
nothing here, while a single file written by rank 0 to a temporary name, flushed, fsynced and
then renamed over the final name gives all-or-nothing semantics for free: a process killed at any
point leaves either the previous checkpoint or the new one, never a torn file. The other ranks
wait at a barrier so that no rank runs ahead and, for instance, reads a checkpoint that is not
there yet. Every rank must be able to read the directory (one node, or a shared file system).

With ``overlap(..., shard=True)`` each rank holds only its share of the optimizer state, and a
checkpoint is a directory instead (``ckpt-00000042.dcp``, next to where :func:`checkpoint_path`
points): every rank writes its share of the optimizer state with
:mod:`torch.distributed.checkpoint` (:mod:`overlap_sgd.dcp`), in parallel, and rank 0 the rest
(model, scheduler, ``extra``) into ``state.pt``; all of it goes to a temporary directory that
rank 0 renames into place once every rank has finished, so a killed job again leaves the
previous checkpoint or the new one. Loading reads each rank's share only, on any number of
ranks, into a sharded, unsharded or plain optimizer.

With an FSDP2 model (``fully_shard``) the model and the optimizer state are both sharded: the
checkpoint is a ``.dcp`` directory again, in which every rank writes its shards of both with
:mod:`torch.distributed.checkpoint` (torch's ``get_state_dict`` / ``set_state_dict``, so a
checkpoint resumes on another number of ranks), and rank 0 the rest into ``state.pt``.

Loading validates before it touches anything: a checkpoint written for another optimizer class
or another parameter layout raises :class:`ValueError` and leaves model, optimizer and scheduler
as they were.

Example (one process, no process group needed)::

    >>> import tempfile, torch
    >>> from overlap_sgd.checkpoint import (checkpoint_path, checkpoint_state, latest_checkpoint,
    ...                                     load_checkpoint, save_checkpoint)
    >>> net = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    >>> run_dir = tempfile.mkdtemp()
    >>> save_checkpoint(checkpoint_path(run_dir, 5), checkpoint_state(net, opt, step=5))
    >>> load_checkpoint(latest_checkpoint(run_dir), net, opt)["step"]
    5
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from .attached import is_fsdp

__all__ = [
    "checkpoint_path",
    "checkpoint_state",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

#: Complete checkpoints are named ``ckpt-<step>.pt`` (a file) or ``ckpt-<step>.dcp`` (a directory,
#: sharded optimizer state); temporary ones start with a dot.
_NAME = re.compile(r"^ckpt-(\d+)\.(pt|dcp)$")
#: In a sharded checkpoint directory: rank 0's part, and the optimizers' DCP checkpoint.
_STATE_FILE, _OPTIMIZER_DIR = "state.pt", "optimizer"
#: In an FSDP2 checkpoint directory: the model's and the optimizers' shards, one DCP checkpoint.
_FSDP_DIR = "model_and_optimizer"
_FORMAT = 1


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    """The path of the checkpoint for ``step`` in ``directory`` (``ckpt-00000042.pt``)."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return Path(directory) / f"ckpt-{step:08d}.pt"


def checkpoint_state(
    model: nn.Module,
    optimizer: Optimizer | Sequence[Optimizer],
    scheduler: Any = None,
    /,
    **extra: Any,
) -> dict[str, Any]:
    """Everything needed to resume: model, optimizer and scheduler state, plus ``extra``.

    ``model`` may be a DDP model (its ``module``'s state dict is stored, without the
    ``module.`` prefix). ``optimizer`` may be an :class:`~overlap_sgd.OverlappedOptimizer`, whose
    state dict is its wrapped optimizer's; the wrapped class's name is stored, so a checkpoint
    resumes with or without the overlap. Several optimizers (``overlap(model, [a, b])``) and
    their schedulers are passed as lists, and stored as lists, in order. ``extra`` (a step
    counter, a data position) must be plain data: ints, floats, strings, tensors, and lists,
    tuples or dicts of them.
    """
    reserved = {"format", "model", "model_shapes", "optimizer", "optimizer_class", "layout", "scheduler",
                "clipping"} & extra.keys()
    if reserved:
        raise ValueError(f"extra keys {sorted(reserved)} are reserved by checkpoint_state()")
    several = isinstance(optimizer, (list, tuple))
    optimizers = list(optimizer) if several else [optimizer]

    def each(f: Any) -> Any:
        values = [f(o) for o in optimizers]
        return values if several else values[0]

    for o in optimizers:  # a clipped step's correction comes before its state is read
        settle = getattr(o, "_settle_clip", None)
        if settle is not None:
            settle()
    sharded = [getattr(o, "_sharded", False) for o in optimizers]
    if any(sharded) and not all(sharded):
        raise ValueError("checkpoint_state() got sharded and unsharded optimizers together")
    if is_fsdp(_module(model)):
        # Model and optimizers sharded by FSDP: every rank writes its shards when saved.
        whole = _FSDPShards(_module(model), optimizers)
        state: dict[str, Any] = {
            "format": _FORMAT,
            "model": whole,
            "model_shapes": {k: list(v.shape) for k, v in _module(model).state_dict().items()
                             if isinstance(v, torch.Tensor)},
            "optimizer": each(lambda o: whole),
            "optimizer_class": each(_class_name),
            "layout": each(_layout),
        }
    else:
        state = {
            "format": _FORMAT,
            "model": _module(model).state_dict(),
            # Sharded: the live optimizers, each rank writing its share when saved (no gathering).
            "optimizer": each(lambda o: _Sharded(model, o) if sharded[0] else o.state_dict()),
            "optimizer_class": each(_class_name),
            "layout": each(_layout),
        }
    clipper = _clipper(optimizers[0])
    if clipper is not None:
        # Global-norm clipping's policy memory: a resumed run speculates or defers as the run
        # that never stopped would (the two round differently).
        state["clipping"] = clipper.state_dict()
    if scheduler is not None:
        if isinstance(scheduler, (list, tuple)):
            state["scheduler"] = [s.state_dict() for s in scheduler]
        else:
            state["scheduler"] = scheduler.state_dict()
    state.update(extra)
    return state


def save_checkpoint(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically, from rank 0; every rank must call it.

    Rank 0 (or the only process, without a process group) writes ``obj`` with
    :func:`torch.save` to a temporary file in ``path``'s directory, flushes and fsyncs it, renames
    it over ``path`` (:func:`os.replace`, atomic on POSIX) and fsyncs the directory so that the
    rename itself survives a power loss. The other ranks wait at a barrier until it is done. A
    process killed at any point leaves ``path`` either absent, or holding its previous
    complete content, or holding the new one; at worst a stray temporary file, which
    :func:`latest_checkpoint` ignores.

    A :func:`checkpoint_state` of sharded optimizers is written as a directory next to
    ``path``, with the suffix ``.dcp`` (see the module docs); every rank writes its share.
    """
    path = Path(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), _FSDPShards):
        whole = obj["model"]
        plain = {k: v for k, v in obj.items() if k not in ("model", "optimizer")}
        plain["model"] = None
        plain["optimizer"] = [None] * len(obj["optimizer"]) if isinstance(obj["optimizer"], list) else None
        _save_directory(path, plain, _FSDP_DIR, whole.state_dict)
        return
    sharded = _sharded_entries(obj)
    if sharded:
        _save_sharded(path, obj, sharded)
        return
    try:
        if _rank() == 0:
            _write_atomically(path, obj)
    finally:
        # Rank 0 joins the barrier even when writing failed, so that the others do not hang
        # until the process-group timeout; it then raises, which ends the job.
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step in ``directory``, or ``None``.

    Only files named as :func:`checkpoint_path` names them, and directories of sharded
    checkpoints named alike with ``.dcp``, count; a temporary file or directory left by a writer
    that was killed does not. A missing directory has no checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for entry in directory.iterdir():
        m = _NAME.match(entry.name)
        if m and (entry.is_file() if m.group(2) == "pt" else entry.is_dir()):
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, entry)
    return None if best is None else best[1]


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizer | Sequence[Optimizer],
    scheduler: Any = None,
    *,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a :func:`checkpoint_state` checkpoint into ``model``, ``optimizer`` and ``scheduler``.

    ``optimizer`` and ``scheduler`` are lists when the checkpoint was written from lists.
    Returns the whole checkpoint, so the caller can read what it stored as ``extra`` (e.g.
    ``["step"]``). Every rank loads the same file, which keeps DDP replicas identical.

    Raises:
        ValueError: the checkpoint was written for another optimizer class, for parameters of
            another number or shape, for other param-group sizes, for another number of
            optimizers or schedulers, for a model with other state keys or shapes, or without
            the scheduler state asked for. Nothing is modified then.
    """
    path = Path(path)
    shards = path / _OPTIMIZER_DIR if path.is_dir() else None
    fsdp_dir = path / _FSDP_DIR if path.is_dir() and (path / _FSDP_DIR).is_dir() else None
    if fsdp_dir is not None:
        shards = None
    ckpt = torch.load(path / _STATE_FILE if path.is_dir() else path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by overlap_sgd.checkpoint_state()")
    where = str(path)
    optimizers, saved = _pair(where, "optimizer", optimizer, ckpt)
    for opt, entry in zip(optimizers, saved):
        _check_optimizer(where, entry, opt)
    if (fsdp_dir is not None) != is_fsdp(_module(model)):
        raise ValueError(
            f"{where} was written {'from' if fsdp_dir is not None else 'without'} an FSDP2 model, but "
            f"the model to load it into is {'not ' if fsdp_dir is not None else ''}one; the model "
            "must be sharded as in the run that wrote it (any number of ranks)"
        )
    if fsdp_dir is not None:
        _check_shapes(where, ckpt.get("model_shapes") or {}, _module(model))
    else:
        _check_model(where, ckpt, _module(model))
    schedulers, saved_schedulers = [], []
    if scheduler is not None:
        if "scheduler" not in ckpt:
            raise ValueError(f"{where} holds no scheduler state, but a scheduler was given to load it")
        schedulers, saved_schedulers = _pair(where, "scheduler", scheduler, ckpt)
    if fsdp_dir is not None:
        _FSDPShards(_module(model), optimizers).load(fsdp_dir)
    else:
        _module(model).load_state_dict(ckpt["model"])
    if shards is not None:
        from .dcp import load_optimizer_state_dict

        load_optimizer_state_dict(model, optimizers, shards)
    elif fsdp_dir is None:
        for opt, entry in zip(optimizers, saved):
            opt.load_state_dict(entry["optimizer"])
    for sched, state in zip(schedulers, saved_schedulers):
        sched.load_state_dict(state)
    clipper = _clipper(optimizers[0]) if optimizers else None
    if clipper is not None and "clipping" in ckpt:
        clipper.load_state_dict(ckpt["clipping"])
    return ckpt


def _clipper(optimizer: Any) -> Any:
    """The global-norm clipping of an overlapped optimizer (inside an Accelerate wrapper too)."""
    inner = getattr(optimizer, "optimizer", None)
    state = getattr(optimizer, "hook_state", None) or getattr(inner, "hook_state", None)
    return getattr(state, "clipper", None)


# -- sharded optimizer state -----------------------------------------------------------------


class _Sharded:
    """Stands for a sharded optimizer's state in a :func:`checkpoint_state`, until saved."""

    def __init__(self, model: nn.Module, optimizer: Optimizer):
        self.model, self.optimizer = model, optimizer


def _sharded_entries(obj: Any) -> list[_Sharded]:
    if not isinstance(obj, dict):
        return []
    entries = obj.get("optimizer")
    entries = entries if isinstance(entries, list) else [entries]
    return [e for e in entries if isinstance(e, _Sharded)]


def _save_sharded(path: Path, obj: dict[str, Any], sharded: list[_Sharded]) -> None:
    """Write a sharded checkpoint directory atomically (see the module docs); every rank calls it."""
    from .dcp import optimizer_state_dict

    plain = dict(obj)
    plain["optimizer"] = [None] * len(sharded) if isinstance(obj["optimizer"], list) else None

    def shares() -> dict[str, Any]:
        optimizers = [s.optimizer for s in sharded]
        return {"optimizer": optimizer_state_dict(sharded[0].model, optimizers if len(optimizers) > 1 else optimizers[0])}

    _save_directory(path, plain, _OPTIMIZER_DIR, shares)


class _FSDPShards:
    """Stands for an FSDP2 model's and its optimizers' sharded state in a
    :func:`checkpoint_state`, until saved; also loads it."""

    def __init__(self, model: nn.Module, optimizers: Sequence[Optimizer]):
        self.model = model
        # An OverlappedOptimizer's state is its wrapped optimizer's, which torch's helpers read.
        self.optimizers = [o.optimizer if isinstance(getattr(o, "optimizer", None), Optimizer) else o
                           for o in optimizers]

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizers)
        return {"model": model_state, "optimizer": optimizer_state}

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self.state_dict()  # what this rank holds: DCP fills it in place, resharding
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(self.model, self.optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def _save_directory(path: Path, plain: dict[str, Any], subdir: str, shares: Any) -> None:
    """Write a checkpoint directory atomically: rank 0 writes ``plain`` to ``state.pt``, every
    rank its share of ``shares()`` with :mod:`torch.distributed.checkpoint` to ``subdir``, all
    into a temporary directory that rank 0 renames into place (see the module docs)."""
    import shutil

    import torch.distributed.checkpoint as dcp

    final = path.with_suffix(".dcp")
    tmp = final.parent / f".{final.name}.tmp"
    distributed = dist.is_available() and dist.is_initialized()
    failure: BaseException | None = None
    if _rank() == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a writer that was killed
            tmp.mkdir(parents=True)
            _write_atomically(tmp / _STATE_FILE, plain)
        except BaseException as exc:  # noqa: BLE001 - raised after the barrier below
            failure = exc
    wrote = [failure is None]
    if distributed:  # every rank learns whether rank 0 could start: dcp.save is a collective
        dist.broadcast_object_list(wrote, src=0)
    if not wrote[0]:
        raise failure if failure is not None else RuntimeError(f"rank 0 could not start writing {final}")
    if failure is None:
        dcp.save(shares(), checkpoint_id=str(tmp / subdir))  # every rank, its share
        if _rank() == 0:
            try:
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_directory(final.parent)
            except BaseException as exc:  # noqa: BLE001
                failure = exc
    if distributed:
        dist.barrier()
    if failure is not None:
        raise failure


# -- helpers ---------------------------------------------------------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _module(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _class_name(optimizer: Optimizer) -> str:
    # An OverlappedOptimizer's state belongs to the optimizer it wraps.
    inner = getattr(optimizer, "optimizer", None)
    cls = type(inner) if isinstance(inner, Optimizer) else type(optimizer)
    return f"{cls.__module__}.{cls.__qualname__}"


def _layout(optimizer: Optimizer) -> list[list[list[int]]]:
    """Per param group, the shape of each parameter, in optimizer order."""
    return [[list(p.shape) for p in group["params"]] for group in optimizer.param_groups]


def _pair(where: str, key: str, given: Any, ckpt: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """``given`` and the checkpoint's entries for ``key`` as two lists of equal length.

    For ``key="optimizer"`` each saved entry is a dict of its state dict, class and layout.
    """
    several = isinstance(given, (list, tuple))
    items = list(given) if several else [given]
    stored = ckpt.get(key)
    stored_several = isinstance(stored, list)
    if several != stored_several:
        raise ValueError(
            f"{where} holds {'a list of' if stored_several else 'one'} {key} state"
            f"{'s' if stored_several else ''}, but {'a list' if several else 'one'} was given to load"
        )
    if key == "optimizer":
        keys = ("optimizer", "optimizer_class", "layout")
        columns = [ckpt.get(k) if several else [ckpt.get(k)] for k in keys]
        if several and not all(isinstance(c, list) and len(c) == len(stored) for c in columns):
            raise ValueError(f"{where} holds inconsistent optimizer entries")
        entries = [dict(zip(keys, row)) for row in zip(*columns)]
    else:
        entries = stored if several else [stored]
    if len(entries) != len(items):
        raise ValueError(
            f"{where} holds the state of {len(entries)} {key}s, but {len(items)} were given to load it into"
        )
    return items, entries


def _check_optimizer(where: str, saved: dict[str, Any], optimizer: Optimizer) -> None:
    want, have = saved.get("optimizer_class"), _class_name(optimizer)
    if want != have:
        raise ValueError(
            f"{where} holds the state of a {want} optimizer, but the optimizer to load it "
            f"into is a {have}; build the same optimizer class as the run that wrote it"
        )
    layout, current = saved.get("layout"), _layout(optimizer)
    if layout != current:
        raise ValueError(
            f"{where} was written for another parameter layout. Checkpoint: {_describe(layout)}. "
            f"Optimizer: {_describe(current)}"
        )


def _check_model(where: str, ckpt: dict[str, Any], model: nn.Module) -> None:
    model_state = model.state_dict()
    saved_model = ckpt["model"]
    missing = sorted(model_state.keys() - saved_model.keys())
    unexpected = sorted(saved_model.keys() - model_state.keys())
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the model's state keys: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, value in model_state.items():
        old = saved_model[key]
        if isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor) and old.shape != value.shape:
            raise ValueError(
                f"{where} holds {key!r} of shape {tuple(old.shape)}, but the model's "
                f"is {tuple(value.shape)}"
            )


def _check_shapes(where: str, saved: dict[str, list[int]], model: nn.Module) -> None:
    """An FSDP2 checkpoint's model state keys and (global) shapes against ``model``'s."""
    current = {k: list(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    if missing or unexpected:
        raise ValueError(
            f"{where} does not match the model's state keys: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, shape in current.items():
        if saved[key] != shape:
            raise ValueError(f"{where} holds {key!r} of shape {tuple(saved[key])}, but the model's is {tuple(shape)}")


def _describe(layout: Any) -> str:
    if not isinstance(layout, list):
        return "no layout"
    sizes = [len(group) for group in layout]
    shapes = [tuple(s) for group in layout for s in group]
    shown = ", ".join(str(s) for s in shapes[:6]) + (", ..." if len(shapes) > 6 else "")
    return f"{sum(sizes)} parameters in param groups of sizes {sizes} (shapes {shown})"


def _write_atomically(path: Path, obj: Any) -> None:
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename durable. Not every platform or file system lets a directory be opened.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
