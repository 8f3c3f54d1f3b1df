"""The record and summary of a ``--mode both`` run of examples/train_gpt.py.

Both modes train the same initial model on the same batches, step by step; :class:`Comparison`
keeps each mode's loss and step time per step and its validation losses, writes them to a CSV
file, summarises them, and plots them when matplotlib (the ``plot`` extra) is installed.

Example::

    >>> c = Comparison(warmup=0)
    >>> c.add(1, {"overlap": 2.0, "post": 2.0}, {"overlap": 0.09, "post": 0.1})
    >>> c.add(2, {"overlap": 1.5, "post": 1.5}, {"overlap": 0.08, "post": 0.1})
    >>> s = c.summary()
    >>> s["max_loss_diff"], round(s["ratio"], 3)
    (0.0, 0.85)
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MODES", "Comparison", "plot"]

#: The two modes, in the order the CSV file and the summary list them.
MODES = ("overlap", "post")


@dataclass
class Comparison:
    warmup: int = 5  # first steps left out of the step-time statistics (compilation, allocation)
    steps: list[int] = field(default_factory=list)
    loss: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    seconds: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in MODES})
    val: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> mode -> val loss

    def add(self, step: int, loss: dict[str, float], seconds: dict[str, float]) -> None:
        """Record one step of both modes: training loss and step time (seconds) of each."""
        self.steps.append(step)
        for m in MODES:
            self.loss[m].append(loss[m])
            self.seconds[m].append(seconds[m])

    def add_val(self, step: int, val: dict[str, float]) -> None:
        self.val[step] = dict(val)

    def timed(self, mode: str) -> list[float]:
        """Step times after the warm-up (all of them if the run is shorter)."""
        return self.seconds[mode][self.warmup:] or self.seconds[mode]

    def summary(self) -> dict[str, float]:
        """Largest loss difference, last validation losses, median step times and their ratio."""
        if not self.steps:
            raise ValueError("no step was recorded")
        diffs = [abs(a - b) for a, b in zip(self.loss["overlap"], self.loss["post"])]
        out = {"max_loss_diff": max(diffs), "steps": len(self.steps)}
        last_val = self.val[max(self.val)] if self.val else {}
        for m in MODES:
            out[f"val_{m}"] = last_val.get(m, float("nan"))
            out[f"median_ms_{m}"] = 1e3 * statistics.median(self.timed(m))
        out["ratio"] = out["median_ms_overlap"] / out["median_ms_post"]
        return out

    def write_csv(self, path: str | Path) -> Path:
        """One row per step: the loss and step time (ms) of each mode, validation loss where taken."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", *(f"loss_{m}" for m in MODES), *(f"ms_{m}" for m in MODES), *(f"val_{m}" for m in MODES)])
            for i, step in enumerate(self.steps):
                val = self.val.get(step, {})
                w.writerow([
                    step,
                    *(repr(self.loss[m][i]) for m in MODES),
                    *(f"{1e3 * self.seconds[m][i]:.3f}" for m in MODES),
                    *(repr(val[m]) if m in val else "" for m in MODES),
                ])
        return path


def plot(comparison: Comparison, path: str | Path) -> Path | None:
    """Loss curves and step-time distributions of both modes as a PNG; ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    colors = {"overlap": "tab:blue", "post": "tab:orange"}
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m, style in zip(MODES, ("-", "--")):
        ax_loss.plot(comparison.steps, comparison.loss[m], style, color=colors[m], lw=1, label=f"{m} (train)")
        if comparison.val:
            steps = sorted(comparison.val)
            ax_loss.plot(steps, [comparison.val[s][m] for s in steps], "o" + style, color=colors[m], ms=4, label=f"{m} (validation)")
    ax_loss.set(xlabel="step", ylabel="loss (cross-entropy, nats/char)", title="loss: overlap vs post-backward step")
    ax_loss.legend()
    timed = {m: [1e3 * t for t in comparison.timed(m)] for m in MODES}
    lo = min(min(v) for v in timed.values())
    hi = max(max(v) for v in timed.values())
    bins = [lo + (hi - lo) * i / 40 for i in range(41)] if hi > lo else 10
    for m in MODES:
        med = statistics.median(timed[m])
        ax_time.hist(timed[m], bins=bins, alpha=0.55, color=colors[m], label=f"{m}: median {med:.1f} ms")
        ax_time.axvline(med, color=colors[m], lw=1.5)
    ax_time.set(xlabel="step time (ms)", ylabel="steps", title=f"step time after {comparison.warmup} warm-up steps")
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
