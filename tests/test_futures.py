"""The ordering contract of every executor (see ``overlap_sgd/hooks/executor.py``), on CPU:
an update runs only once its communication *and* its used flags have landed, and the future
handed back to DDP completes only after the update, with its errors."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.futures import Future

from overlap_sgd.hooks import InlineExecutor, ThreadExecutor, make_executor
from overlap_sgd.hooks.futures import Completion, gather, when_all

EXECUTORS = {
    "thread": lambda: ThreadExecutor(),
    "thread-no-defer": lambda: ThreadExecutor(defer=False),
    "inline": lambda: InlineExecutor("cpu"),
}


def _complete_from_thread(fut: Future, value) -> None:
    t = threading.Thread(target=fut.set_result, args=(value,), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "completing the future blocked its thread (an update waiting there?)"


@pytest.mark.parametrize("kind", list(EXECUTORS))
def test_update_waits_for_the_used_flags_and_the_future_for_the_update(kind: str) -> None:
    ex = EXECUTORS[kind]()
    started, proceed = threading.Event(), threading.Event()
    seen: dict = {}

    def update(result: torch.Tensor, flags: torch.Tensor | None) -> None:
        seen["flags"] = flags
        started.set()
        assert proceed.wait(10), "the test never let the update finish"
        result.add_(1)

    try:
        ex.hold()
        comm, used = Future(), Future()
        out = ex.after(comm, used, update)
        ex.release()
        _complete_from_thread(comm, torch.zeros(2))
        assert not started.is_set(), "the update ran before its used flags landed"
        assert not out.done()
        waiter = threading.Thread(target=used.set_result, args=(torch.ones(2, dtype=torch.int32),))
        waiter.start()  # completes `used`, which starts the update (on this or another thread)
        assert started.wait(10), "the update never ran"
        assert not out.done(), "the future DDP waits on completed before the update finished"
        proceed.set()
        waiter.join(10)
        assert torch.equal(out.wait(), torch.ones(2))
        assert torch.equal(seen["flags"], torch.ones(2, dtype=torch.int32))
    finally:
        proceed.set()
        ex.close()


@pytest.mark.parametrize("kind", list(EXECUTORS))
def test_a_failed_communication_fails_the_future_without_updating(kind: str) -> None:
    ex = EXECUTORS[kind]()
    ran = []
    try:
        ex.hold()
        ex.release()
        comm = Future()
        out = ex.after(comm, None, lambda result, flags: ran.append(result))
        comm.set_exception(ConnectionError("peer vanished"))
        # torch reports an error raised inside a future's callback as a RuntimeError that
        # names the original; DDP raises it from backward() the same way.
        with pytest.raises(RuntimeError, match="ConnectionError: peer vanished"):
            out.wait()
        assert ran == []
    finally:
        ex.close()


def test_gather_completes_after_every_future_with_the_first_error() -> None:
    value = torch.arange(3.0)
    parts = [Future(), Future()]
    whole = gather(parts, value)
    parts[1].set_result(torch.zeros(1))
    assert not whole.done()
    parts[0].set_result(torch.zeros(1))
    assert torch.equal(whole.wait(), value)

    parts = [Future(), Future()]
    whole = gather(parts, value)
    parts[0].set_result(torch.zeros(1))
    done = Completion(torch.device("cpu"))
    done.set_error(KeyError("slice 1"))
    when_all([done.future], lambda: parts[1].set_result(torch.zeros(1)))
    failed = gather([parts[0], done.future], value)
    with pytest.raises(RuntimeError, match="KeyError: 'slice 1'"):
        failed.wait()


@pytest.mark.parametrize("kind", ["thread", ThreadExecutor])
def test_the_thread_executor_is_refused_for_cuda_parameters(kind) -> None:
    # Checked by make_executor before any update: a CPU thread cannot order CUDA streams.
    executor = kind() if callable(kind) else kind
    with pytest.raises(ValueError, match="executor='thread'.*cuda:0.*'stream'"):
        make_executor(executor, torch.device("cuda", 0))


def test_the_stream_executor_is_refused_off_cuda() -> None:
    with pytest.raises(ValueError, match="executor='stream' needs CUDA parameters, got device cpu"):
        make_executor("stream", torch.device("cpu"))


def test_an_inline_executor_is_placed_on_the_parameters_device() -> None:
    ex = make_executor(InlineExecutor(), torch.device("cpu"))
    comm = Future()
    out = ex.after(comm, None, lambda result, flags: result.mul_(2))
    comm.set_result(torch.ones(2))
    assert torch.equal(out.wait(), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="made for cpu, not cuda:0"):
        ex.place(torch.device("cuda", 0))


def test_when_all_of_no_futures_calls_at_once() -> None:
    called = []
    when_all([], lambda: called.append(True))
    assert called == [True]


def test_the_sequencer_launches_in_order_and_past_a_launch_that_raises() -> None:
    from overlap_sgd.hooks.collectives import Sequencer

    seq, log = Sequencer(), []
    seq.reset()

    def broken() -> None:
        log.append(1)
        raise RuntimeError("launch failed")

    seq.submit(2, lambda: log.append(2))
    seq.submit(1, broken)
    assert log == []  # 0 has not been submitted: nothing may go before it
    seq.submit(0, lambda: log.append(0))
    assert log == [0, 1, 2]
