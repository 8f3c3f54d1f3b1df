"""The update executors on their own: which thread runs each update, in which order, when."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch
from torch.futures import Future

from overlap_sgd.hooks import InlineExecutor, ThreadExecutor
from overlap_sgd.hooks.executor import lower_priority


def _recorder(log: list, label: str):
    def update(result: torch.Tensor, flags) -> None:
        log.append((label, threading.current_thread().name))
        result.add_(1)

    return update


def _completing_thread(fut: Future, value: torch.Tensor) -> None:
    t = threading.Thread(target=fut.set_result, args=(value,), name="comm-thread")
    t.start()
    t.join()


def _drain(ex: ThreadExecutor) -> None:
    """Return once the worker has run everything queued so far (it runs its queue in order)."""
    done = threading.Event()
    ex._queue.put(done.set)
    assert done.wait(timeout=30), "the update worker did not get through its queue"


def test_updates_wait_for_release_and_the_last_runs_where_its_communication_landed():
    ex = ThreadExecutor(name="update-worker")
    log: list = []
    try:
        ex.hold()  # backward starts producing buckets
        comms = [Future() for _ in range(3)]
        outs = [ex.after(c, None, _recorder(log, f"b{i}")) for i, c in enumerate(comms)]
        _completing_thread(comms[0], torch.zeros(2))
        _drain(ex)  # an update that was not held back would have run by now
        assert log == [], "an update ran while backward was still producing buckets"
        ex.release()  # the last bucket was handed to communication
        _completing_thread(comms[1], torch.zeros(2))
        assert torch.equal(outs[1].wait(), torch.ones(2))
        # The last communication to land: its update is the critical path and runs at once on
        # the thread that completed it, not queued behind the background worker.
        _completing_thread(comms[2], torch.zeros(2))
        assert torch.equal(outs[2].wait(), torch.ones(2))
        assert torch.equal(outs[0].wait(), torch.ones(2))
        where = dict(log)
        assert where["b0"] == where["b1"] == "update-worker"
        assert where["b2"] == "comm-thread"
    finally:
        ex.close()


def test_without_defer_updates_run_while_backward_is_still_producing():
    ex = ThreadExecutor(defer=False)
    log: list = []
    try:
        ex.hold()
        comm = Future()
        out = ex.after(comm, None, _recorder(log, "b0"))
        ex.after(Future(), None, _recorder(log, "never"))  # a later bucket still in flight
        comm.set_result(torch.zeros(1))
        assert torch.equal(out.wait(), torch.ones(1))
        assert [label for label, _ in log] == ["b0"]
    finally:
        ex.close()


@pytest.mark.parametrize("make", [ThreadExecutor, lambda: InlineExecutor("cpu")], ids=["thread", "inline"])
def test_an_update_error_fails_the_returned_future(make):
    ex = make()

    def broken(result, flags):
        raise ValueError("update exploded")

    try:
        if isinstance(ex, ThreadExecutor):
            ex.hold()
            ex.release()
        comm = Future()
        out = ex.after(comm, None, broken)
        comm.set_result(torch.zeros(1))
        with pytest.raises(Exception, match="update exploded"):
            out.wait()
    finally:
        ex.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux behaviour")
def test_the_worker_runs_at_the_lowest_priority():
    probe: dict = {}

    def check() -> None:
        probe["lowered"] = lower_priority()
        probe["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=check)
    t.start()
    t.join()
    if not probe["lowered"]:
        pytest.skip("this system refuses nice 19 for a thread")
    assert probe["nice"] == 19
    me = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert me != 19, "lowering leaked to the calling thread"

    ex = ThreadExecutor()
    seen: dict = {}

    def update(result, flags):
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        ex.hold()
        comms = [Future(), Future()]
        outs = [ex.after(comms[0], None, update), ex.after(comms[1], None, lambda r, f: None)]
        ex.release()
        comms[0].set_result(torch.zeros(1))  # not the last to land: the background worker
        outs[0].wait()
        assert seen["nice"] == 19
        comms[1].set_result(torch.zeros(1))
        outs[1].wait()
    finally:
        ex.close()
