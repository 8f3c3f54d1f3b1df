"""Streams of the overlap's own and the used-flag bookkeeping, as far as a CPU can check them
(``tests/test_cuda.py`` checks the streams against torch's pool on a GPU)."""

from __future__ import annotations

import pytest
import torch
from torch.futures import Future

from overlap_sgd.hooks.streams import private_stream
from overlap_sgd.hooks.used import UsedLaunch


def test_private_stream_needs_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        private_stream(torch.device("cpu"))


def test_used_flags_are_waited_for_only_where_this_rank_needs_them() -> None:
    reduced = Future()
    everything_here = UsedLaunch([1, 1, 1], reduced)
    assert everything_here.needed is None and everything_here.resolve(None) is None

    one_unused_here = UsedLaunch([1, 0, 1], reduced)
    assert one_unused_here.needed is reduced
    assert one_unused_here.resolve(torch.tensor([1, 1, 1])) is None  # another rank used it
    assert one_unused_here.resolve(torch.tensor([1, 0, 1])) == [1, 0, 1]


def test_known_flags_need_no_communication() -> None:
    known = UsedLaunch([1, 0, 1], None, known=True)
    assert known.needed is None and known.resolve(None) == [1, 0, 1]
    assert UsedLaunch([1, 1], None, known=True).resolve(None) is None
