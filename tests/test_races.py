"""The race detectors on CPU: they pass as the code stands, and fail with one wait removed.

:mod:`tests.races` makes every collective of the overlap land late, its result scrambled
until then; :mod:`overlap_sgd.hooks.faults` removes one wait at a time. Each row trains
against post-backward DDP twice: with the detectors alone (parity holds: every read waited),
then with the row's wait removed, where the test demands that parity breaks, reported by the
parity check itself (``[row name] ...``), not by a crash or a hang. ``tests/test_cuda.py``
runs the same detectors on a GPU, where the waits are stream waits.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch

from overlap_sgd.hooks import faults
from tests.distributed import DistributedFailure, run_distributed
from tests.parity import Scenario, check_moved, parity_many

SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True)
ADAMW = partial(torch.optim.AdamW, lr=0.01, weight_decay=0.1, foreach=True)
RMSPROP = partial(torch.optim.RMSprop, lr=0.01)  # not element-wise: sharded by whole parameters

#: (row, the wait the fault switch removes)
ROWS = [
    (Scenario("own-allreduce", SGD, slice_mb=None, steps=3), faults.COMM_WAIT),
    (Scenario("own-allreduce-sliced", SGD, bucket_cap_mb=0.01, slice_mb=0.001, steps=3), faults.COMM_WAIT),
    (Scenario("comm-hook", ADAMW, comm="scramble", steps=3), faults.COMM_WAIT),
    (Scenario("unused", ADAMW, net={"branch": True}, branch_rule="mixed", slice_mb=None,
              ddp={"find_unused_parameters": True}, steps=4), faults.COMM_WAIT),
    (Scenario("shard-reduce-scatter", ADAMW, shard=True, steps=3), faults.COMM_WAIT),
    (Scenario("shard-all-gather", ADAMW, shard=True, steps=3), faults.GATHER_WAIT),
    (Scenario("shard-by-params-allreduce", RMSPROP, shard=True, steps=3), faults.COMM_WAIT),
    (Scenario("shard-by-params-all-gather", RMSPROP, shard=True, steps=3), faults.GATHER_WAIT),
]


def test_detectors_pass_where_every_read_waits() -> None:
    rows = [replace(row, race=True) for row, _ in ROWS]
    for per_rank in run_distributed(parity_many, 2, rows, timeout=240):
        for r in per_rank:
            check_moved(r)


@pytest.mark.parametrize("row,switch", ROWS, ids=[f"{row.name}-without-{switch}" for row, switch in ROWS])
def test_detector_fails_without_the_wait(row: Scenario, switch: str) -> None:
    with pytest.raises(DistributedFailure, match=rf"\[{row.name}\]"):
        run_distributed(parity_many, 2, [replace(row, race=True, faults=(switch,))], timeout=120)


def test_switches_are_off_by_default() -> None:
    assert not faults.ACTIVE
