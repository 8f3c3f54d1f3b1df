"""A simulated network link, applied to DDP communication as a comm-hook wrapper.

This is a *simulation*: the real all-reduce still runs (over loopback on one machine); its result
is then held back on one serialized "link" thread per rank for ``bytes * 8 / bandwidth``
seconds before the bucket's future completes. The link carries one bucket at a time, in the
order their all-reduces finish, so buckets queue behind each other as on a saturated network.
The link thread sleeps while holding a bucket, so the simulation spends no CPU time.

The wrapper is an ordinary DDP comm hook, so every communicating benchmark mode uses it the same
way::

    link = SimulatedLink(gbps=2.0)
    state = LinkHookState(link, process_group=ddp.process_group)
    ddp.register_comm_hook(state, link_hook)                                   # post-backward
    overlap_sgd.overlap(ddp, opt, comm_hook=link_hook, comm_state=state)       # overlapped

Sharded training communicates without a comm hook, so it goes on the link another way, with the
same accounting. An all-reduce of ``B`` bytes is charged ``B`` bytes (what each of two ranks
sends in a ring all-reduce); a ring all-reduce is a reduce-scatter followed by an all-gather,
each sending half of it, so a reduce-scatter or an all-gather over a ``B``-byte buffer is charged
``B / 2``, and together they cost exactly the all-reduce they replace:

- :class:`LinkedCollectives`, around a sharded overlap mode's backward, holds each collective of
  the sharded hook (reduce-scatters, all-gathers, and the small all-reduces and broadcasts of a
  bucket's last few elements) on the link after the real collective completes, as
  :func:`link_hook` holds an all-reduce. It swaps the collective launchers the hook module
  calls for wrapped ones while the context is open; the package itself is unchanged.
- :class:`LinkedFSDPCollectives`, around an FSDP2 mode's forward and backward, holds FSDP's
  all-gathers and reduce-scatters on the link the same way, each charged half its full buffer's
  bytes. FSDP2 calls them through the ``torch.distributed`` namespace at call time
  (``dist.all_gather_single``/``dist.reduce_scatter_single`` in torch 2.13,
  ``dist.all_gather_into_tensor``/``dist.reduce_scatter_tensor`` in 2.9), so the context swaps
  those attributes of ``torch.distributed`` for wrapped ones while it is open; torch itself calls
  the originals (the deprecated names forward to the new ones inside ``distributed_c10d``, not
  through the namespace), so nothing is charged twice.
- ``ZeroRedundancyOptimizer.step()`` broadcasts every rank's updated parameters to the others
  after its local step: an all-gather of the parameters, charged half their bytes with
  :meth:`SimulatedLink.carry` once the step has run. Its gradients are all-reduced by DDP
  through :func:`link_hook` as in every other mode.
"""

# No "from __future__ import annotations": DDP checks a comm hook's annotations at runtime.

import inspect
import queue
import threading
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.futures import Future

__all__ = ["SimulatedLink", "LinkHookState", "LinkedCollectives", "LinkedFSDPCollectives", "link_hook",
           "tensor_bytes"]

CommHook = Callable[[Any, dist.GradBucket], Future]


class SimulatedLink:
    """One serialized link of ``gbps`` Gbit/s, driven by a daemon thread.

    :meth:`hold` returns a future that completes with ``fut``'s value once ``fut`` has
    completed *and* the link has spent ``nbytes * 8 / (gbps * 1e9)`` seconds carrying it after
    every earlier bucket. Timing uses deadlines, so sleep overshoot does not accumulate.

    Example:
        >>> import torch
        >>> link = SimulatedLink(gbps=8.0)
        >>> done = torch.futures.Future(); done.set_result(torch.ones(1))
        >>> link.hold(done, nbytes=1000).wait()   # held for 1 microsecond
        tensor([1.])
        >>> link.close()
    """

    def __init__(self, gbps: float, name: str = "simulated-link"):
        if not gbps > 0:
            raise ValueError(f"link bandwidth must be positive, got {gbps} Gbit/s")
        self.gbps = float(gbps)
        self.bytes_carried = 0
        self.busy_s = 0.0
        self._queue: "queue.SimpleQueue[Optional[tuple[Future, Future, int, float]]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def seconds(self, nbytes: int) -> float:
        """How long the link takes to carry ``nbytes``."""
        return nbytes * 8.0 / (self.gbps * 1e9)

    def hold(self, fut: Future, nbytes: int) -> Future:
        """A future completing with ``fut``'s result after the link has carried ``nbytes``."""
        out: Future = Future()
        fut.add_done_callback(lambda f: self._queue.put((f, out, nbytes, time.perf_counter())))
        return out

    def carry(self, nbytes: int) -> None:
        """Block until the link has carried ``nbytes`` more, after every earlier transfer."""
        done: Future = Future()
        done.set_result(None)
        self.hold(done, nbytes).wait()

    def _loop(self) -> None:
        free_at = 0.0
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, out, nbytes, arrived = item
            duration = self.seconds(nbytes)
            free_at = max(free_at, arrived) + duration
            delay = free_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.bytes_carried += nbytes
            self.busy_s += duration
            try:
                value = fut.value()
            except Exception as exc:  # the inner communication failed: pass it on
                out.set_exception(exc)
            else:
                out.set_result(value)

    def close(self) -> None:
        """Stop the link thread once the buckets already queued have been carried."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)


class LinkHookState:
    """State of :func:`link_hook`: the link and the inner hook whose result it holds.

    Args:
        link: the simulated link.
        inner: the real communication hook; ``None`` means an averaged all-reduce.
        inner_state: ``inner``'s state; for the default all-reduce, the process group.
        process_group: the process group of the default all-reduce.
    """

    def __init__(
        self,
        link: SimulatedLink,
        inner: Optional[CommHook] = None,
        inner_state: Any = None,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
    ):
        self.link = link
        self.inner = inner if inner is not None else default_hooks.allreduce_hook
        self.inner_state = inner_state if inner is not None else process_group


def link_hook(state: LinkHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: communicate ``bucket`` with ``state.inner``, then hold it on the link."""
    buffer = bucket.buffer()
    fut = state.inner(state.inner_state, bucket)
    return state.link.hold(fut, buffer.numel() * buffer.element_size())


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes of ``t``'s elements."""
    return t.numel() * t.element_size()


class LinkedCollectives:
    """A context in which the sharded overlap hook's collectives are held on ``link``.

    Each reduce-scatter and all-gather is held for half its full buffer's bytes, each all-reduce
    for its bytes and each broadcast for half its bytes, counted from the moment the real
    collective completes (see the module docs). Enter it around the forward and backward of a
    model trained with ``overlap(..., shard=True)``: the hook launches every collective of a
    backward pass within it, and backward returns only after they have all completed. (Buckets
    sharded by whole parameters, for whole-tensor optimizers or per-parameter norm clipping,
    are all-reduced by torch's default hook, which this does not hold; the benchmark's
    optimizers are all element-wise.)

    Example (inside an initialised process group)::

        collectives = LinkedCollectives(link)
        with collectives:
            loss_fn(model(x), y).backward()
    """

    #: The names the sharded hook module calls its collective launchers by.
    NAMES = ("reduce_scatter", "all_gather", "all_reduce", "broadcast")

    def __init__(self, link: SimulatedLink):
        self.link = link

    def _wrapped(self, originals: dict[str, Callable[..., Future]]) -> dict[str, Callable[..., Future]]:
        hold = self.link.hold

        def reduce_scatter(out: torch.Tensor, inp: torch.Tensor, *args: Any) -> Future:
            return hold(originals["reduce_scatter"](out, inp, *args), tensor_bytes(inp) // 2)

        def all_gather(out: torch.Tensor, inp: torch.Tensor, *args: Any) -> Future:
            return hold(originals["all_gather"](out, inp, *args), tensor_bytes(out) // 2)

        def all_reduce(t: torch.Tensor, *args: Any) -> Future:
            return hold(originals["all_reduce"](t, *args), tensor_bytes(t))

        def broadcast(t: torch.Tensor, *args: Any) -> Future:
            return hold(originals["broadcast"](t, *args), tensor_bytes(t) // 2)

        return {"reduce_scatter": reduce_scatter, "all_gather": all_gather,
                "all_reduce": all_reduce, "broadcast": broadcast}

    def __enter__(self) -> "LinkedCollectives":
        from overlap_sgd.hooks import shard_hook

        self._originals = {name: getattr(shard_hook, name) for name in self.NAMES}
        for name, fn in self._wrapped(self._originals).items():
            setattr(shard_hook, name, fn)
        return self

    def __exit__(self, *exc: Any) -> None:
        from overlap_sgd.hooks import shard_hook

        for name, fn in self._originals.items():
            setattr(shard_hook, name, fn)


class LinkedFSDPCollectives:
    """A context in which FSDP2's all-gathers and reduce-scatters are held on ``link``.

    Each is charged half its full buffer's bytes (an all-gather its output, a reduce-scatter its
    input), counted from the moment the real collective completes, as :class:`LinkedCollectives`
    charges the sharded hook's (see the module docs). On CPU FSDP2 issues them synchronously on
    the calling thread (forward's and backward's all-gathers, backward's reduce-scatters), so the
    caller is held until the link has carried them, as a blocking gloo collective over a slower
    network would hold it; an asynchronous one (``async_op=True``) is waited for and held at once.
    On CUDA the host is held, not the streams: the simulation is meant for CPU ranks.

    Example (inside an initialised process group, around a ``fully_shard`` model)::

        with LinkedFSDPCollectives(link):
            loss_fn(model(x), y).backward()
    """

    #: The ``torch.distributed`` functions FSDP2 calls, with the argument whose bytes are
    #: charged: the first two are torch 2.13's names, the last two 2.9's (still present there).
    NAMES: dict[str, str] = {
        "all_gather_single": "output_tensor",
        "reduce_scatter_single": "input",
        "all_gather_into_tensor": "output_tensor",
        "reduce_scatter_tensor": "input",
    }

    def __init__(self, link: SimulatedLink):
        self.link = link
        self._originals: dict[str, Callable[..., Any]] = {}

    def _wrapped(self, original: Callable[..., Any], charged: str) -> Callable[..., Any]:
        signature = inspect.signature(original)
        carry = self.link.carry

        def held(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            work = original(*args, **kwargs)
            if work is not None and hasattr(work, "wait"):
                work.wait()
            carry(tensor_bytes(bound.arguments[charged]) // 2)
            return work

        return held

    def __enter__(self) -> "LinkedFSDPCollectives":
        for name, charged in self.NAMES.items():
            original = getattr(dist, name, None)
            if original is not None:
                self._originals[name] = original
                setattr(dist, name, self._wrapped(original, charged))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}
