"""What sharding saves per rank, and the sharded modes' targets, from one run's figures.

The targets are set for one configuration, :data:`TARGET_CONFIG` (the simulated 2 Gbit/s link,
4 MB buckets, two ranks, AdamW); elsewhere the same ratios are reported without a verdict:

- ``overlap-shard`` steps no slower than ``overlap``: sharding costs no step time;
- ``overlap-shard`` steps at most 0.95 x ``zero-post``: the sharded update hides in backward,
  where ZeRO-1's runs after it;
- ``overlap-shard``'s optimizer state per rank is at most 0.55 x ``overlap``'s (half, with two
  ranks, plus the 0-dim scalars every rank holding a piece of a parameter keeps).

State sizes compare the largest rank's state, tensors with dimensions and 0-dim scalars together.

Example:
    >>> state = {"overlap": [{"tensors": 800, "scalars": 8}] * 2,
    ...          "overlap-shard": [{"tensors": 400, "scalars": 8}, {"tensors": 400, "scalars": 4}]}
    >>> s = sharding("adamw", 4.0, 2.0, 2, {"overlap": 0.10, "overlap-shard": 0.09}, state)
    >>> round(s["state_ratio"]["overlap-shard/overlap"], 3), [t["met"] for t in s["targets"]]
    (0.505, [True, None, True])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .stats import ratio

__all__ = ["CLIP_TARGETS", "FSDP_TARGETS", "FSDP_TARGET_CONFIG", "STATE_RATIOS", "TARGETS", "TARGET_CONFIG",
           "clipping", "fsdp", "sharding"]

#: The configuration the targets are set for.
TARGET_CONFIG: dict[str, Any] = {"optimizer": "adamw", "bucket_cap_mb": 4.0, "link_gbps": 2.0, "world_size": 2}

#: (what, ratio, bound): ``what`` is ``"step"`` (median step times) or ``"state"`` (state per rank).
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("step", "overlap-shard/overlap", 1.00),
    ("step", "overlap-shard/zero-post", 0.95),
    ("state", "overlap-shard/overlap", 0.55),
)

#: Sharded mode / its unsharded counterpart (same kernel), for the state each rank keeps.
STATE_RATIOS: tuple[tuple[str, str], ...] = (
    ("overlap-shard", "overlap"),
    ("zero-post", "post-fused"),
    ("zero-upstream", "post-fused"),
)


def _largest(per_rank: Sequence[Mapping[str, int] | None]) -> dict[str, int] | None:
    ranks = [r for r in per_rank if r is not None]
    if not ranks:
        return None
    return {
        "tensors": max(r["tensors"] for r in ranks),
        "scalars": max(r["scalars"] for r in ranks),
        "total": max(r["tensors"] + r["scalars"] for r in ranks),
    }


def sharding(
    optimizer: str,
    bucket_cap_mb: float,
    link_gbps: float | None,
    world_size: int,
    medians: Mapping[str, float | None],
    state: Mapping[str, Sequence[Mapping[str, int] | None]],
) -> dict[str, Any]:
    """The largest rank's optimizer state per mode, the sharded/unsharded state ratios and the
    targets: each with its value, bound and ``met`` (``None`` where the configuration is not
    :data:`TARGET_CONFIG` or a figure is missing).

    ``medians`` are median step times per mode; ``state`` each rank's
    :meth:`~benchmarks.modes.Mode.state_bytes` per mode.
    """
    per_mode = {name: _largest(ranks) for name, ranks in state.items()}
    totals = {name: (s["total"] if s else None) for name, s in per_mode.items()}
    state_ratio = {f"{a}/{b}": ratio(totals.get(a), totals.get(b)) for a, b in STATE_RATIOS}
    config = {"optimizer": optimizer, "bucket_cap_mb": bucket_cap_mb, "link_gbps": link_gbps,
              "world_size": world_size}
    applies = config == TARGET_CONFIG
    targets = []
    for what, name, bound in TARGETS:
        a, b = name.split("/")
        value = ratio(medians.get(a), medians.get(b)) if what == "step" else state_ratio.get(name)
        met = (value <= bound) if applies and value is not None else None
        targets.append({"what": what, "ratio": name, "value": value, "bound": bound, "met": met})
    return {"state_per_rank": per_mode, "state_ratio": state_ratio, "targets": targets,
            "targets_apply": applies, "target_config": TARGET_CONFIG}


#: Global-norm clipping's targets: (clip setting, ratio, bound, needs the simulated link). They
#: apply to AdamW on two ranks with ``overlap+clip``'s default policy (``"auto"``):
#:
#: - clipping never fires, on the simulated link: ``overlap+clip`` costs at most 2% over
#:   ``overlap`` (the norms are taken inside the bucket updates, hidden behind communication)
#:   and steps at most 0.95 x ``post-fused+clip``;
#: - clipping always fires: ``overlap+clip`` (``"auto"`` defers) at most 1.03 x ``post-fused+clip``.
CLIP_TARGETS: tuple[tuple[str, str, float, bool], ...] = (
    ("never", "overlap+clip/overlap", 1.02, True),
    ("never", "overlap+clip/post-fused+clip", 0.95, True),
    ("always", "overlap+clip/post-fused+clip", 1.03, False),
)


def clipping(
    optimizer: str,
    link_gbps: float | None,
    world_size: int,
    setting: str,
    policy: str,
    medians: Mapping[str, float | None],
) -> dict[str, Any]:
    """The clip modes' ratios, and the :data:`CLIP_TARGETS` that apply to this run with their
    verdicts (``met`` is ``None`` where a median is missing).

    Example:
        >>> c = clipping("adamw", 2.0, 2, "never", "auto",
        ...              {"overlap": 0.100, "overlap+clip": 0.101, "post-fused+clip": 0.120})
        >>> [(t["ratio"], round(t["value"], 3), t["met"]) for t in c["targets"]]
        [('overlap+clip/overlap', 1.01, True), ('overlap+clip/post-fused+clip', 0.842, True)]
    """
    applies = optimizer == "adamw" and world_size == 2 and policy == "auto"
    targets = []
    for when, name, bound, linked in CLIP_TARGETS:
        if not applies or when != setting or (linked and not link_gbps):
            continue
        a, b = name.split("/")
        value = ratio(medians.get(a), medians.get(b))
        targets.append({"ratio": name, "value": value, "bound": bound,
                        "met": None if value is None else value <= bound})
    return {"setting": setting, "policy": policy, "targets": targets}


#: The configuration the FSDP2 targets are set for: the simulated 2 Gbit/s link, two ranks,
#: AdamW (FSDP2 has no buckets: it communicates one ``fully_shard`` group at a time).
FSDP_TARGET_CONFIG: dict[str, Any] = {"optimizer": "adamw", "link_gbps": 2.0, "world_size": 2}

#: The FSDP2 targets, as :data:`TARGETS`: ``fsdp-overlap`` steps at most 0.95 x
#: ``fsdp-post-fused`` and at most 0.85 x ``fsdp-per-param-in-backward``, and holds exactly
#: ``fsdp-post-fused``'s optimizer state per rank (FSDP shards it already; the ratio is 1).
FSDP_TARGETS: tuple[tuple[str, str, float], ...] = (
    ("step", "fsdp-overlap/fsdp-post-fused", 0.95),
    ("step", "fsdp-overlap/fsdp-per-param-in-backward", 0.85),
    ("state", "fsdp-overlap/fsdp-post-fused", 1.00),
)


def fsdp(
    optimizer: str,
    link_gbps: float | None,
    world_size: int,
    medians: Mapping[str, float | None],
    state: Mapping[str, Sequence[Mapping[str, int] | None]],
) -> dict[str, Any]:
    """The FSDP2 modes' step and state ratios and :data:`FSDP_TARGETS` with their verdicts
    (``met`` is ``None`` where the configuration is not :data:`FSDP_TARGET_CONFIG` or a figure
    is missing). The state target asks for equality: ``met`` only where the largest rank's
    state is the same number of bytes in both modes.

    Example:
        >>> st = {"fsdp-overlap": [{"tensors": 400, "scalars": 8}] * 2,
        ...       "fsdp-post-fused": [{"tensors": 400, "scalars": 8}] * 2}
        >>> f = fsdp("adamw", 2.0, 2, {"fsdp-overlap": 0.090, "fsdp-post-fused": 0.100,
        ...                            "fsdp-per-param-in-backward": 0.102}, st)
        >>> [(round(t["value"], 3), t["met"]) for t in f["targets"]]
        [(0.9, True), (0.882, False), (1.0, True)]
    """
    per_mode = {name: _largest(ranks) for name, ranks in state.items() if name.startswith("fsdp-")}
    config = {"optimizer": optimizer, "link_gbps": link_gbps, "world_size": world_size}
    applies = config == FSDP_TARGET_CONFIG
    targets = []
    for what, name, bound in FSDP_TARGETS:
        a, b = name.split("/")
        if what == "step":
            value = ratio(medians.get(a), medians.get(b))
            met = (value <= bound) if applies and value is not None else None
        else:
            sa, sb = per_mode.get(a), per_mode.get(b)
            value = ratio(sa["total"], sb["total"]) if sa and sb else None
            met = (sa == sb) if applies and sa and sb else None
        targets.append({"what": what, "ratio": name, "value": value, "bound": bound, "met": met})
    steps = {f"{a}/{b}": ratio(medians.get(a), medians.get(b)) for a, b in (
        ("fsdp-overlap", "fsdp-post-fused"), ("fsdp-overlap", "fsdp-per-param-in-backward"),
        ("fsdp-per-param-in-backward", "fsdp-post-fused"), ("fsdp-overlap", "fsdp-floor"),
        ("fsdp-post-fused", "post-fused"))}
    return {"state_per_rank": per_mode, "step_ratio": steps, "targets": targets, "targets_apply": applies,
            "target_config": FSDP_TARGET_CONFIG}
