"""How a bucket is cut into communication slices (``slice_mb``), checked on plain plans."""

from __future__ import annotations

import pytest
import torch

from overlap_sgd.hooks import OverlapHookState, update_hook
from overlap_sgd.hooks.bucket import BucketPlan

MIB = 2**20


def _plan(sizes_mib: list[float], device: str = "cpu") -> BucketPlan:
    params = [torch.nn.Parameter(torch.empty(int(s * MIB) // 4, device=device)) for s in sizes_mib]
    buffer = torch.empty(sum(p.numel() for p in params), device=device)
    return BucketPlan(0, params, buffer, [], lambda p: None, {})


def _slices(plan: BucketPlan, slice_mb) -> list[float]:
    numel = OverlapHookState([], slice_mb=slice_mb).slice_numel(plan)
    if not numel:
        return [plan.numel * 4 / MIB]
    return [(part.stop - part.start) * 4 / MIB for part in plan.parts(numel)]


def test_auto_cuts_a_default_sized_bucket_in_two() -> None:
    # DDP's 25 MiB cap over 4 MiB layers: a 28 MiB bucket, cut at the layer nearest its middle.
    assert _slices(_plan([4.0] * 7), "auto") == [16.0, 12.0]


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([4.0] * 5, [20.0]),  # under two minimum slices: whole
        ([1.0] * 24, [12.0, 12.0]),
        ([1.0] * 48, [12.0] * 4),
        ([1.0] * 47, [16.0, 16.0, 15.0]),  # 47 MiB holds three 12 MiB slices, not four
    ],
)
def test_auto_slices_are_equal_and_at_least_the_minimum(sizes, expected) -> None:
    assert _slices(_plan(sizes), "auto") == expected
    assert update_hook.AUTO_MIN_SLICE_MB == 12.0


def test_explicit_slice_size_and_none() -> None:
    assert _slices(_plan([1.0] * 10), 4.0) == [4.0, 4.0, 2.0]
    assert _slices(_plan([1.0] * 10), None) == [10.0]
    assert _slices(_plan([1.0] * 4), 4.0) == [4.0]  # no larger than one slice: whole
