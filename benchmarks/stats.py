"""Summary statistics and the comparisons the benchmark reports.

Example:
    >>> r = compare({"floor": 0.050, "post": 0.100, "post-fused": 0.080, "overlap": 0.060})
    >>> round(r["hidden_fraction"], 3), round(r["overlap/post"], 3), r["overlap/upstream"]
    (0.8, 0.6, None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["RATIOS", "compare", "hidden_fraction", "percentile", "ratio", "step_max", "summarize"]

#: The ratios reported for every run, as (numerator mode, denominator mode).
RATIOS: tuple[tuple[str, str], ...] = (
    ("overlap", "post"),
    ("overlap", "post-fused"),
    ("overlap", "upstream"),
    ("overlap+clip", "post-fused+clip"),
    ("overlap+clip", "overlap"),
    ("overlap-shard", "overlap"),
    ("overlap-shard", "zero-post"),
    ("overlap-shard", "zero-upstream"),
)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values``, interpolated linearly between the two nearest
    ranks (numpy's default), in plain Python: the GPU check measures on machines without numpy.

    Example:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 25)
        1.75
    """
    a = sorted(float(v) for v in values)
    if not a:
        raise ValueError("percentile() of no values")
    pos = (len(a) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(a) - 1)
    return a[lo] + (a[hi] - a[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> dict[str, float | int]:
    """Median, quartiles, p10/p90, mean, min and max of ``times`` (seconds)."""
    if len(times) == 0:
        return {"n": 0}
    a = [float(t) for t in times]
    p10, q1, median, q3, p90 = (percentile(a, q) for q in (10, 25, 50, 75, 90))
    return {
        "n": len(a),
        "median": float(median),
        "mean": sum(a) / len(a),
        "min": min(a),
        "max": max(a),
        "p10": float(p10),
        "p90": float(p90),
        "q1": float(q1),
        "q3": float(q3),
        "iqr": float(q3 - q1),
    }


def step_max(per_rank: Sequence[Sequence[float]]) -> list[float]:
    """Per step, the slowest rank's time: the job advances at the pace of its slowest rank."""
    if not per_rank:
        return []
    n = min(len(r) for r in per_rank)
    return [max(r[i] for r in per_rank) for i in range(n)]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the divisor is 0."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def hidden_fraction(post: float | None, overlap: float | None, floor: float | None) -> float | None:
    """The share of the post-backward step's cost that overlap hides: ``(post - overlap) / (post - floor)``.

    1 means overlap runs as fast as backward alone (``floor``); 0 means nothing was hidden.
    ``None`` when a time is missing or the optimizer costs nothing measurable (``post <= floor``).
    """
    if post is None or overlap is None or floor is None or post <= floor:
        return None
    return (post - overlap) / (post - floor)


def compare(medians: Mapping[str, float | None]) -> dict[str, float | None]:
    """The ratios of :data:`RATIOS` and the hidden fractions, from per-mode median step times."""
    out: dict[str, float | None] = {
        f"{a}/{b}": ratio(medians.get(a), medians.get(b)) for a, b in RATIOS
    }
    out["hidden_fraction"] = hidden_fraction(
        medians.get("post"), medians.get("overlap"), medians.get("floor")
    )
    out["hidden_fraction_vs_fused"] = hidden_fraction(
        medians.get("post-fused"), medians.get("overlap"), medians.get("floor")
    )
    return out
