"""Ending a distributed training process without an abort at exit.

With torch 2.13 and gloo, a process that trained correctly sometimes aborts *after* its last
line, while the interpreter finalises: ``terminate called without an active exception``,
SIGABRT, and torchrun reports the whole job as failed. It needs nothing of this package: a plain
DDP + ``torch.optim.SGD`` script ending in ``destroy_process_group()`` aborted in 4 of 20 runs
launched directly and 10 of 20 under torchrun, on a 2-core machine (the package's own comm-hook
callbacks are released the same way, see 2.). The cause, from ``gdb`` backtraces of aborting
runs and torch's sources:

1. Every gloo collective is an ``AsyncWork`` that gloo's worker thread (``pt_gloo_runloop``)
   runs, completes, and only then releases. The thread that waited for it has already been
   woken, so the worker often drops the last reference to a finished work after the main
   thread has moved on, possibly out of the script and into finalisation.
2. Releasing a work can need the GIL: it holds the communicated tensors, whose Python objects
   it then releases, and a snapshot of the issuing thread's thread-local state
   (``at::ThreadLocalState``, kept by ``ProcessGroupGloo::AsyncWork``). For the all-reduces
   DDP issues during ``backward()`` that snapshot holds the ``contextvars.Context`` that
   ``torch.autograd.graph._engine_run_backward`` stashes for every backward
   (``torch._C._stash_obj_in_tls("context", ...)``), a ``SafePyObject`` whose destructor takes
   the GIL. A Python callback attached with ``Future.then`` is released the same way.
3. ``destroy_process_group()`` does not stop those threads while a DDP model still holds the
   group (a group destroyed with no DDP model in the process joins them; after building a DDP
   model, even ``del model; gc.collect()`` first leaves both ``pt_gloo_runloop`` threads alive).
4. A thread that takes the GIL while the interpreter finalises is ended by CPython 3.11 with
   ``pthread_exit()`` (``take_gil`` -> ``PyThread_exit_thread``). Its forced unwinding runs
   into the ``noexcept`` destructor ``~AsyncWork`` (or torch's callback machinery), and the C++
   runtime calls ``std::terminate()``: the message above, and SIGABRT.

The backtrace of the aborting thread reads, innermost last: ``runLoop`` ->
``~AsyncAllreduceWork`` -> ``~ThreadLocalState`` -> ``SafePyObject`` dispose ->
``gil_scoped_acquire`` -> ``take_gil`` -> ``PyThread_exit_thread`` -> ``_Unwind_ForcedUnwind``
-> ``std::terminate``, while the main thread is in ``Py_FinalizeEx``.

Nothing in a script can wait for gloo's threads to let go (their state is not visible from
Python, and the group cannot be destroyed while DDP holds it), so :func:`exit_process` ends the
process the way :mod:`multiprocessing` ends its workers: it does what finalisation would do that
matters (join the non-daemon threads, run the ``atexit`` handlers, which also stop this
package's update threads, flush standard output and error) and then leaves with
:func:`os._exit`, without finalising the interpreter, so that no thread can be torn down inside
torch's C++ frames. Call it last, once files written by the script are closed.

Example (the last lines of a training script)::

    import overlap_sgd

    overlap_sgd.exit_process_on_error()  # an uncaught error then exits with status 1
    ...  # train
    dist.destroy_process_group()
    overlap_sgd.exit_process()           # the last line
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import traceback
from types import TracebackType
from typing import NoReturn

__all__ = ["exit_process", "exit_process_on_error"]


def exit_process(status: int = 0) -> NoReturn:
    """End the process with ``status`` without finalising the interpreter. Never returns.

    Joins the non-daemon threads, runs the ``atexit`` handlers and flushes standard output and
    error, then ends with :func:`os._exit` (see the module docs for the abort that finalisation
    risks with gloo). Call ``dist.destroy_process_group()`` before it, as usual.
    """
    if not isinstance(status, int) or isinstance(status, bool):
        raise TypeError(f"status must be an int, got {status!r}")
    _leave(status)


def exit_process_on_error() -> None:
    """Make an uncaught exception end the process through :func:`exit_process` (status 1).

    The traceback is printed first, by the ``sys.excepthook`` that was installed before.
    """
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        try:
            previous(kind, value, tb)
        except BaseException:  # a broken hook must not hide the original error
            traceback.print_exception(kind, value, tb)
        _leave(1)

    sys.excepthook = hook


def _leave(status: int) -> NoReturn:
    try:
        current = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not current and not thread.daemon and thread is not threading.main_thread():
                thread.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        os._exit(status)
