"""Race detectors: every collective's result arrives late, and is garbage until it does.

World size 1 on NCCL makes an all-reduce an identity and an all-gather a no-op, and a fast
gloo collective on CPU lands before anything can read it early: a missing wait goes unseen
there. The detectors delay the *producer* instead. Each collective the overlap issues (its
own all-reduce, the sharded reduce-scatter, all-gather, broadcast and flag reductions) and
the ``scramble`` comm hook run the real collective, then scramble its result in place and
restore it later:

- on CPU, a thread restores it after :data:`DELAY_S` and only then completes the future;
- on CUDA, a private stream restores it behind ``torch.cuda._sleep`` and the future (created
  with the device) is completed on that stream, so it carries the restore's event.

Whatever reads a result without waiting for its future (on CUDA: for the future's events)
reads scrambled values, and the parity test against post-backward training fails. Each
detector is shown failing with the matching :mod:`overlap_sgd.hooks.faults` switch on
(``tests/test_races.py``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.futures import Future

from overlap_sgd.hooks import faults, shard_hook, update_hook
from overlap_sgd.hooks.futures import tensor_of

__all__ = ["DELAY_S", "SLEEP_CYCLES", "delayed", "detectors", "late_and_scrambled", "scramble_allreduce"]

#: How long a CPU result stays scrambled before its future completes.
DELAY_S = 0.02
#: Cycles a CUDA restore sleeps before it writes (tens of milliseconds).
SLEEP_CYCLES = 50_000_000

_streams: dict[torch.device, "torch.cuda.Stream"] = {}


def _restore_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


def late_and_scrambled(out: Tensor) -> Future:
    """A future of ``out`` that completes late; until it does, ``out`` holds garbage.

    ``out`` must hold its final value on the current stream (CUDA) when this is called."""
    truth = out.clone()
    out.mul_(-3.0).add_(1.0)
    if out.is_cuda:
        stream = _restore_stream(out.device)
        stream.wait_stream(torch.cuda.current_stream(out.device))
        with torch.cuda.stream(stream):
            torch.cuda._sleep(SLEEP_CYCLES)
            out.copy_(truth)
            truth.record_stream(stream)
            restored: Future = Future(devices=[out.device])
            restored.set_result(out)
        return restored
    restored = Future()

    def restore() -> None:
        time.sleep(DELAY_S)
        out.copy_(truth)
        restored.set_result(out)

    threading.Thread(target=restore, daemon=True).start()
    return restored


def delayed(collective: Callable[..., Future]) -> Callable[..., Future]:
    """``collective`` whose future completes late, its result scrambled until then."""

    def run(*args: Any, **kwargs: Any) -> Future:
        landed = collective(*args, **kwargs)
        return late_and_scrambled(tensor_of(landed.wait()))  # wait(): ordered on CUDA

    return run


#: The collectives the overlap issues, by module: what :func:`detectors` wraps.
_COLLECTIVES = {
    update_hook: ("all_reduce",),
    shard_hook: ("all_reduce", "all_gather", "broadcast", "reduce_scatter"),
}


@contextlib.contextmanager
def detectors(*switches: str) -> Iterator[None]:
    """Delay and scramble every collective the overlap issues while inside, with the
    :mod:`~overlap_sgd.hooks.faults` ``switches`` on."""
    saved = [(module, name, getattr(module, name)) for module, names in _COLLECTIVES.items() for name in names]
    for module, name, collective in saved:
        setattr(module, name, delayed(collective))
    faults.ACTIVE.update(switches)
    try:
        yield
    finally:
        faults.ACTIVE.difference_update(switches)
        for module, name, collective in saved:
            setattr(module, name, collective)


def scramble_allreduce(state, bucket):  # unannotated: DDP inspects hook annotations
    """A comm hook: the averaged all-reduce, whose result arrives late and scrambled
    (``state``: the process group)."""
    import torch.distributed as dist

    buffer = bucket.buffer()
    dist.all_reduce(buffer, group=state, async_op=True).get_future().wait()
    buffer.div_(dist.get_world_size(state))
    return late_and_scrambled(buffer)
