"""overlap_sgd.checkpoint: atomic writes that survive SIGKILL, validation before loading."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import overlap_sgd
from overlap_sgd.checkpoint import (
    checkpoint_path,
    checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

from .distributed import run_distributed
from .models import Net, assert_identical, batch


def _groups(model: nn.Module, split: bool = True) -> list[dict]:
    if not split:
        return [{"params": list(model.parameters())}]
    return [
        {"params": [p for p in model.parameters() if p.dim() >= 2]},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]


def _trained(opt_class=torch.optim.SGD, split: bool = True, width: int = 16, steps: int = 3, **kw):
    """A Net with optimizer state and a scheduler that has moved, after a few plain steps."""
    torch.manual_seed(0)
    model = Net(width=width)
    kw.setdefault("lr", 0.1)
    if opt_class is torch.optim.SGD:
        kw.setdefault("momentum", 0.9)
    opt = opt_class(_groups(model, split), **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(steps):
        x, y = batch(step, 0)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def _snapshot(model, opt, sched):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(opt.state_dict()),
        copy.deepcopy(sched.state_dict()) if sched is not None else None,
    )


# -- round trip and lookup --------------------------------------------------------------------


def test_round_trip_restores_model_optimizer_scheduler_and_extras(tmp_path):
    model, opt, sched = _trained(torch.optim.AdamW)
    save_checkpoint(checkpoint_path(tmp_path, 3), checkpoint_state(model, opt, sched, step=3, tag="x"))
    saved = _snapshot(model, opt, sched)

    fresh_model, fresh_opt, fresh_sched = _trained(torch.optim.AdamW, steps=0)
    ckpt = load_checkpoint(latest_checkpoint(tmp_path), fresh_model, fresh_opt, fresh_sched)
    assert ckpt["step"] == 3 and ckpt["tag"] == "x"
    assert_identical(_snapshot(fresh_model, fresh_opt, fresh_sched), saved)


def _two_optimizers(steps: int = 3):
    """A Net trained by SGD (matrices) and Adam (vectors), each with its own scheduler."""
    torch.manual_seed(0)
    model = Net(width=16)
    opts = [
        torch.optim.SGD([p for p in model.parameters() if p.dim() >= 2], lr=0.1, momentum=0.9),
        torch.optim.Adam([p for p in model.parameters() if p.dim() < 2], lr=0.01),
    ]
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in opts]
    for step in range(steps):
        x, y = batch(step, 0)
        nn.functional.mse_loss(model(x), y).backward()
        for o, s in zip(opts, scheds):
            o.step()
            s.step()
            o.zero_grad()
    return model, opts, scheds


def _snapshot_all(model, opts, scheds):
    return [_snapshot(model, o, s) for o, s in zip(opts, scheds)]


def test_several_optimizers_and_schedulers_round_trip_as_lists(tmp_path):
    path = tmp_path / "two.pt"
    model, opts, scheds = _two_optimizers()
    save_checkpoint(path, checkpoint_state(model, opts, scheds, step=3))
    saved = _snapshot_all(model, opts, scheds)
    assert saved[0][1]["state"] and saved[1][1]["state"]

    fresh = _two_optimizers(steps=0)
    assert load_checkpoint(path, *fresh)["step"] == 3
    assert_identical(_snapshot_all(*fresh), saved)

    # One optimizer for a list, a list for one, or another count: refused, nothing touched.
    fresh = _two_optimizers(steps=0)
    before = _snapshot_all(*fresh)
    model, opts, scheds = fresh
    with pytest.raises(ValueError, match="holds a list of optimizer states, but one was given"):
        load_checkpoint(path, model, opts[0], scheds[0])
    with pytest.raises(ValueError, match="holds the state of 2 optimizers, but 1 were given"):
        load_checkpoint(path, model, opts[:1], scheds[:1])
    with pytest.raises(ValueError, match="holds the state of 2 schedulers, but 1 were given"):
        load_checkpoint(path, model, opts, scheds[:1])
    with pytest.raises(ValueError, match=r"torch\.optim\.sgd\.SGD optimizer, but the optimizer to load it into is a torch\.optim\.adam\.Adam"):
        load_checkpoint(path, model, opts[::-1], scheds[::-1])
    assert_identical(_snapshot_all(*fresh), before)
    single = tmp_path / "one.pt"
    m, o, s = _trained()
    save_checkpoint(single, checkpoint_state(m, o, s))
    with pytest.raises(ValueError, match="holds one optimizer state, but a list was given"):
        load_checkpoint(single, m, [o], [s])


def test_latest_checkpoint_picks_highest_complete_step(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 20, 100):
        checkpoint_path(tmp_path, step).write_bytes(b"")
    (tmp_path / "ckpt-999999999.pt").write_bytes(b"")  # wider than the padding: still a number
    (tmp_path / ".ckpt-000001000.pt.abc123.tmp").write_bytes(b"")  # a writer's temporary file
    (tmp_path / "ckpt-2000.pt.old").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-999999999.pt"
    with pytest.raises(ValueError):
        checkpoint_path(tmp_path, -1)


def test_save_overwrites_atomically_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "sub" / "final.pt"
    save_checkpoint(path, {"v": torch.ones(3)})
    save_checkpoint(path, {"v": torch.zeros(3)})
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["final.pt"]


def test_failed_write_keeps_previous_file_and_removes_temporary(tmp_path):
    path = checkpoint_path(tmp_path, 1)
    save_checkpoint(path, {"v": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        save_checkpoint(path, {"v": 2, "bad": Unpicklable()})
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# -- a writer killed with SIGKILL -------------------------------------------------------------

# The child saves a large checkpoint and stalls at a chosen point of the write, after touching
# the marker file; the test then kills it with SIGKILL, which allows no cleanup at all.
_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from overlap_sgd.checkpoint import save_checkpoint

    where, path, marker = sys.argv[1:4]

    def stall():
        open(marker, "w").close()
        time.sleep(600)

    class StallWhilePickled:
        def __reduce__(self):
            stall()
            return (int, ())

    class StallHalfway:
        # A file that stalls once half of the bytes are written, in the middle of the tensor.
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            out = self.f.write(b)
            self.n += len(b)
            if self.n > 8_000_000:
                self.f.flush()
                os.fsync(self.f.fileno())
                stall()
            return out
        def __getattr__(self, name):
            return getattr(self.f, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    obj = {"version": 2, "big": torch.arange(4_000_000, dtype=torch.float32)}  # 16 MB
    if where == "pickling":
        obj["stall"] = StallWhilePickled()
    elif where == "writing":
        fdopen = os.fdopen
        os.fdopen = lambda *a, **k: StallHalfway(fdopen(*a, **k))
    elif where == "renaming":
        os.replace = lambda *a, **k: stall()
    save_checkpoint(path, obj)
    """
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "where, same_path",
    [("pickling", False), ("writing", False), ("renaming", False), ("writing", True)],
)
def test_writer_killed_mid_write_leaves_previous_checkpoint_intact(tmp_path, where, same_path):
    previous = checkpoint_path(tmp_path, 5)
    save_checkpoint(previous, {"version": 1, "w": torch.full((4,), 7.0)})
    target = previous if same_path else checkpoint_path(tmp_path, 10)
    marker = tmp_path.parent / f"{tmp_path.name}.stalled"

    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, where, str(target), str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.stdout.read().decode()
            assert time.monotonic() < deadline, "the writer never reached the stall point"
            time.sleep(0.05)
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(temps) == 1, sorted(p.name for p in tmp_path.iterdir())
        if where != "pickling":
            assert temps[0].stat().st_size > 8_000_000  # killed with most of the data on disk
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    # The previous checkpoint is untouched and is still the newest complete one.
    assert latest_checkpoint(tmp_path) == previous
    loaded = torch.load(previous, weights_only=True)
    assert loaded["version"] == 1 and torch.equal(loaded["w"], torch.full((4,), 7.0))
    assert not checkpoint_path(tmp_path, 10).exists()

    # The stray temporary file does not get in the way of the next save.
    save_checkpoint(checkpoint_path(tmp_path, 10), {"version": 3})
    assert torch.load(latest_checkpoint(tmp_path), weights_only=True) == {"version": 3}


# -- validation before loading ----------------------------------------------------------------


def _assert_load_refused(path, model, opt, sched, match):
    before = _snapshot(model, opt, sched)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(path, model, opt, sched)
    assert_identical(_snapshot(model, opt, sched), before)


def test_optimizer_type_mismatch_is_refused_without_changes(tmp_path):
    path = tmp_path / "sgd.pt"
    model, opt, sched = _trained(torch.optim.SGD)
    save_checkpoint(path, checkpoint_state(model, opt, sched, step=3))

    model, opt, sched = _trained(torch.optim.Adam, lr=0.01)
    _assert_load_refused(path, model, opt, sched, r"torch\.optim\.sgd\.SGD optimizer.*torch\.optim\.adam\.Adam")

    # AdamW subclasses Adam, yet its state is not Adam's: the class must match exactly.
    save_checkpoint(path, checkpoint_state(model, opt, sched))
    model, opt, sched = _trained(torch.optim.AdamW, lr=0.01)
    _assert_load_refused(path, model, opt, sched, r"Adam optimizer, but the optimizer to load it into is a torch\.optim\.adamw\.AdamW")


def test_parameter_shape_mismatch_is_refused_without_changes(tmp_path):
    path = tmp_path / "c.pt"
    model, opt, sched = _trained(width=16)
    save_checkpoint(path, checkpoint_state(model, opt, sched))
    model, opt, sched = _trained(width=8)
    _assert_load_refused(path, model, opt, sched, r"another parameter layout\. Checkpoint: .*\(16, 8\).*Optimizer: .*\(8, 8\)")


def test_param_group_sizes_mismatch_is_refused_without_changes(tmp_path):
    path = tmp_path / "c.pt"
    model, opt, sched = _trained(split=True)
    save_checkpoint(path, checkpoint_state(model, opt, sched))
    model, opt, sched = _trained(split=False)
    _assert_load_refused(path, model, opt, sched, r"Checkpoint: 10 parameters in param groups of sizes \[5, 5\] .*Optimizer: 10 parameters in param groups of sizes \[10\] ")


def test_model_state_mismatch_is_refused_without_changes(tmp_path):
    path = tmp_path / "c.pt"
    model, opt, sched = _trained()
    save_checkpoint(path, checkpoint_state(model, opt, sched))
    model, opt, sched = _trained()
    model.register_buffer("running", torch.zeros(2))  # same parameters, one more state entry
    _assert_load_refused(path, model, opt, sched, r"does not match the model's state keys: missing \['running'\]")


def test_missing_scheduler_state_and_foreign_files_are_refused(tmp_path):
    model, opt, sched = _trained()
    save_checkpoint(tmp_path / "nosched.pt", checkpoint_state(model, opt))
    _assert_load_refused(tmp_path / "nosched.pt", model, opt, sched, "holds no scheduler state")
    save_checkpoint(tmp_path / "plain.pt", {"model": model.state_dict()})
    _assert_load_refused(tmp_path / "plain.pt", model, opt, sched, "not a checkpoint written by")
    with pytest.raises(ValueError, match="reserved"):
        checkpoint_state(model, opt, model=1)


# -- with DDP and the overlapped optimizer ----------------------------------------------------


def _overlapped_round_trip(rank: int, world_size: int, directory: str) -> str:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ddp = DDP(Net(), bucket_cap_mb=0.001)
    opt = overlap_sgd.overlap(ddp, torch.optim.SGD(_groups(ddp.module), lr=0.1, momentum=0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(3):
        x, y = batch(step, rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    # The writer (rank 0) is slow: rank 1 returns from save_checkpoint, and then sees the
    # file, only if it waited for the write at the barrier.
    if rank == 0:
        import overlap_sgd.checkpoint as checkpoint_module

        write = checkpoint_module._write_atomically

        def slow_write(path: Path, obj: object) -> None:
            time.sleep(1.0)
            write(path, obj)

        checkpoint_module._write_atomically = slow_write
    path = checkpoint_path(directory, 3)
    save_checkpoint(path, checkpoint_state(ddp, opt, sched, step=3))
    assert latest_checkpoint(directory) == path  # visible on every rank once save returns

    # The checkpoint resumes into a plain torch optimizer (the overlapped one's state is its
    # wrapped optimizer's), and is refused by another optimizer class.
    torch.manual_seed(1)
    plain = Net()
    plain_opt = torch.optim.SGD(_groups(plain), lr=0.1, momentum=0.9)
    plain_sched = torch.optim.lr_scheduler.StepLR(plain_opt, step_size=2, gamma=0.5)
    assert load_checkpoint(path, plain, plain_opt, plain_sched)["step"] == 3
    assert_identical(_snapshot(plain, plain_opt, plain_sched), _snapshot(ddp.module, opt, sched))
    adam = torch.optim.Adam(_groups(plain))
    with pytest.raises(ValueError, match="SGD optimizer"):
        load_checkpoint(path, plain, adam)
    return sorted(os.listdir(directory))


@pytest.mark.timeout(120)
def test_overlapped_optimizer_checkpoint_with_two_ranks(tmp_path):
    listings = run_distributed(_overlapped_round_trip, 2, str(tmp_path), timeout=90)
    assert listings == [["ckpt-00000003.pt"]] * 2
