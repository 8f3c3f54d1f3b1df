"""What the examples share: joining the torchrun job, surviving its restarts, injecting faults,
and ending cleanly.

``start("auto", "train_gpt")`` joins the process group torchrun describes in its environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) with gloo on CPU or NCCL on CUDA, and returns
where this rank runs. ``crash_if_asked`` kills rank 1 with SIGKILL, or stalls it, before a given
step, on the first attempt only, so that a restarted job gets past the step. ``Launch.close``
leaves the job and ends the process without finalising the interpreter (see
:mod:`overlap_sgd.shutdown`); an uncaught error ends it with status 1 and its traceback.

Example (inside ``torchrun --nproc-per-node 2 script.py``)::

    launch = start("auto", "my_script")
    launch.log("printed by rank 0 only")
    for step in range(steps):
        crash_if_asked(launch, step, crash_at_step)
        ...
    launch.close()
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import overlap_sgd

__all__ = ["Launch", "crash_if_asked", "start"]


@dataclass
class Launch:
    rank: int
    world_size: int
    device: torch.device
    attempt: int  # torchrun restarts of the job so far (0 on the first attempt)
    pg_timeout: float | None = None  # seconds a collective may wait for a peer

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def log(self, *parts: object, **kwargs) -> None:
        """Print on rank 0 only."""
        if self.master:
            print(*parts, flush=True, **kwargs)

    def close(self) -> None:
        """Leave the job and end the process (status 0), without finalising the interpreter:
        with gloo, torch 2.13's worker threads may still be releasing the last collectives (and
        Python objects in them) while the interpreter finalises, which aborts a process that
        trained correctly (see overlap_sgd/shutdown.py for the evidence)."""
        dist.destroy_process_group()
        overlap_sgd.exit_process()


def start(device: str, name: str, pg_timeout: float | None = None) -> Launch:
    """Join the torchrun job: NCCL on CUDA (``device`` "cuda", or "auto" with a GPU), else gloo.

    torchrun counts restarts of the job in TORCHELASTIC_RESTART_COUNT and keeps one key-value
    store alive across them (TORCHELASTIC_USE_AGENT_STORE), where the keys of the previous
    attempt, such as the addresses of ranks that no longer exist, would be read as current
    ones: each attempt gets its own key prefix, ``name/attempt_<n>``. ``pg_timeout``: seconds a
    collective may wait for a peer before failing with an error, from the end of start-up on
    (ranks may start seconds apart).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    backend, where = "gloo", torch.device("cpu")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        backend, where = "nccl", torch.device("cuda", local_rank)
    device_id = where if use_cuda else None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        world_size = int(os.environ["WORLD_SIZE"])
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False)
        store = dist.PrefixStore(f"{name}/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world_size, device_id=device_id)
    else:
        dist.init_process_group(backend, device_id=device_id)
    # An uncaught error (such as a collective that timed out) ends this rank with status 1 and
    # its traceback, rather than an abort at exit.
    overlap_sgd.exit_process_on_error()
    if pg_timeout is not None:
        dist.group.WORLD.set_timeout(datetime.timedelta(seconds=pg_timeout))
    return Launch(dist.get_rank(), dist.get_world_size(), where, attempt, pg_timeout)


def crash_if_asked(launch: Launch, step: int, crash_at_step: int | None, stall_at_step: int | None = None) -> None:
    """Fault injection, on the first attempt only: rank 1 SIGKILLs itself before
    ``crash_at_step`` (a hard kill, with no chance to clean up), or stops responding before
    ``stall_at_step`` for three process-group timeouts (60 s without one), which the other ranks
    see only as a collective that does not complete."""
    if launch.rank != 1 or launch.attempt != 0:
        return
    if crash_at_step is not None and step == crash_at_step:
        print(f"rank 1: crashing (SIGKILL) before step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if stall_at_step is not None and step == stall_at_step:
        print(f"rank 1: stalling before step {step}", flush=True)
        time.sleep(3 * launch.pg_timeout if launch.pg_timeout is not None else 60)
