"""The benchmark's outputs: a JSON file, a terminal table and, with matplotlib, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["format_table", "fsdp_lines", "mode_memory", "plot", "sharding_lines", "trace_line", "write_json"]

JSON_NAME = "overlap_bench.json"


def write_json(result: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``result`` to ``out_dir/overlap_bench.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_NAME
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return path


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.1f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _load(x: list[float] | None) -> str:
    return "-" if not x else "/".join(f"{v:.1f}" for v in x)


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def _mb1(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def mode_memory(m: dict[str, Any]) -> dict[str, int | None]:
    """A mode's memory in bytes, the largest over ranks: ``state`` (the optimizer state the rank
    holds, tensors with dimensions and 0-dim scalars, counted exactly), ``setup`` (what building
    the mode and its warm-up steps left allocated: model, buckets, optimizer state), ``step``
    (the peak of its steps above what was allocated before them) and ``peak``: on CUDA the
    allocator's peak during its steps, other modes' resident memory included; on CPU the mode's
    own resident memory at its peak, ``setup + step``. CUDA figures where the run was on CUDA,
    resident-set figures otherwise."""
    mem = m.get("memory", {})
    cuda = "cuda_transient" in mem
    key = "cuda" if cuda else "rss"

    def largest(values: Any) -> int | None:
        vals = [v for v in values if v is not None]
        return max(vals) if vals else None

    setup = largest((g or {}).get(key) for g in mem.get("setup_growth", []))
    step = largest(mem.get(f"{key}_transient", []))
    if cuda:
        peak = largest(mem.get("cuda_peak", []))
    else:
        peak = None if setup is None or step is None else setup + step
    state = largest((r["tensors"] + r["scalars"]) for r in mem.get("optimizer_state", []) if r)
    return {"state": state, "setup": setup, "step": step, "peak": peak, "cuda": cuda}


def trace_line(run: dict[str, Any]) -> str | None:
    """One line on the run's profiled overlap steps: the update streams against the main one."""
    trace = run.get("trace")
    if not trace:
        return None
    if "error" in trace:
        return f"trace: failed: {trace['error']}"
    a = trace.get("streams")
    if a is None:
        return f"trace: {trace.get('path')} (no stream analysis: {trace.get('streams_error')})"
    share = a.get("overlap_share")
    busy = a["side_busy_per_step_us"]["median"]
    tail = a["tail_us"]
    return (
        f"trace ({len(a['steps'])} overlap steps): update stream busy {_us_ms(busy)} ms/step, "
        f"{'-' if share is None else f'{share:.0%}'} of it beside default-stream kernels; tail after "
        f"backward's last kernel {_us_ms(tail['median'])} ms (max {_us_ms(tail['max'])}); streams: "
        f"main {a['main_stream']}, side {a['side_streams']} ({a['side_streams_from']})"
        + (f"; {a['update_kernels_on_main_stream']} update kernels ran on the main stream"
           if a.get("update_kernels_on_main_stream") else "")
    )


def _us_ms(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e3:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table per run: per-mode step times, ratios, bandwidth and memory."""
    env = result.get("environment", {})
    lines = [
        f"world {env.get('world_size')} x {env.get('threads_per_rank')} thread(s), "
        f"{env.get('backend')} on {env.get('device')}, torch {env.get('torch')}, "
        f"{env.get('cpu_count')} CPUs, load average {_load(env.get('load_average_start'))} at start, "
        f"{_load(env.get('load_average_end'))} at end"
    ]
    if env.get("cuda_device"):
        lines.append(f"{env['cuda_device']}, CUDA {env.get('cuda_runtime')}; steps timed with "
                     f"{env.get('timing')}; autocast {env.get('autocast')}")
    for run in result["runs"]:
        lines.append("")
        lines.append(f"== {run['label']}  ({run['params'] / 1e6:.2f}M params, {run['optimizer_desc']})")
        cuda = any(mode_memory(m)["cuda"] for m in run["modes"].values() if m["status"] == "ok")
        w = max([14] + [len(name) + 1 for name in run["modes"]])
        lines.append(
            f"{'mode':<{w}}{'median ms':>10}{'p10':>8}{'p90':>8}{'IQR':>7}{'fwd+bwd':>9}"
            f"{'opt.step':>9}{'state MB':>9}{'setup MB':>9}{'step MB':>8}{'peak MB':>8}  kernel / note"
            + (" (memory: CUDA allocator)" if cuda else "")
        )
        for name, m in run["modes"].items():
            if m["status"] != "ok":
                lines.append(f"{name:<{w}}{'skipped':>10}  {m['reason']}")
                continue
            st = m["step"]
            mem = mode_memory(m)
            note = _mode_note(name, run, m)
            lines.append(
                f"{name:<{w}}{_ms(st['median']):>10}{_ms(st['p10']):>8}{_ms(st['p90']):>8}"
                f"{_ms(st['iqr']):>7}{_ms(m.get('backward', {}).get('median')):>9}"
                f"{_ms(m.get('opt_step', {}).get('median')):>9}{_mb1(mem['state']):>9}"
                f"{_mb(mem['setup']):>9}{_mb(mem['step']):>8}{_mb(mem['peak']):>8}  {note}"
            )
        lines.append(
            "memory per rank, the largest rank's: state = optimizer state held (tensors and 0-dim "
            "scalars, exact); setup = growth from building the mode and its warm-up; step = peak "
            "above that during its steps; peak = " + (
                "the CUDA allocator's peak during its steps (other modes' memory included)" if cuda
                else "setup + step (resident set)")
        )
        c = run["comparison"]
        lines.append(
            "overlap/post {}   overlap/post-fused {}   overlap/upstream {}   hidden fraction {} "
            "(vs post-fused {})".format(
                _num(c.get("overlap/post")), _num(c.get("overlap/post-fused")),
                _num(c.get("overlap/upstream")), _num(c.get("hidden_fraction")),
                _num(c.get("hidden_fraction_vs_fused")),
            )
        )
        lines.extend(clipping_lines(run))
        lines.extend(sharding_lines(run))
        lines.extend(fsdp_lines(run))
        linked = link_line(run)
        if linked:
            lines.append(linked)
        bw = run.get("bandwidth") or {}
        if bw:
            triad = bw.get("triad_gbs")
            step = bw.get("post_fused_step_gbs")
            share = f" = {step / triad:.0%} of triad" if step and triad else ""
            lines.append(
                f"optimizer step ({run['post_fused_kernel']}, {bw['moved_bytes'] / 1e6:.0f} MB moved): "
                f"{_ms(bw.get('post_fused_step_s'))} ms, {_num(step, '.1f')} GB/s{share}; "
                f"triad {_num(triad, '.1f')} GB/s (best {_num(bw.get('triad_best_gbs'), '.1f')}, "
                f"{_num(bw.get('triad_write_allocate_gbs'), '.1f')} counting write-allocate); "
                f"overlap bucket updates {_num(bw.get('overlap_update_gbs'), '.1f')} GB/s "
                f"({_ms(bw.get('overlap_update_busy_s'))} ms busy)"
            )
        traced = trace_line(run)
        if traced:
            lines.append(traced)
        peaks = [r.get("peak_rss") for r in run.get("memory", {}).get("per_rank", [])]
        if any(peaks):
            lines.append("peak RSS per rank (MB): " + ", ".join(_mb(p) for p in peaks))
    return "\n".join(lines)


def _mode_note(name: str, run: dict[str, Any], m: dict[str, Any]) -> str:
    kernel = m.get("kernel", "")
    if name in ("overlap", "overlap-shard", "fsdp-overlap") and "update_busy" in m:
        busy = m.get("update_busy", {}).get("median")
        wait = m.get("update_wait", {}).get("median")
        tail = m.get("tail", {}).get("median")
        kernel += f"; updates {_ms(busy)} ms, queued {_ms(wait)} ms, tail after last comm {_ms(tail)} ms"
    return kernel




def clipping_lines(run: dict[str, Any]) -> list[str]:
    """The clip modes' ratios and the clipping targets that apply, with verdicts."""
    modes = run["modes"]
    if not any(name in modes for name in ("post-fused+clip", "overlap+clip")):
        return []
    c = run["comparison"]
    clip = run.get("clipping") or {}
    lines = ["clipping fires {} (overlap+clip policy {}):   overlap+clip/post-fused+clip {}   "
             "overlap+clip/overlap {}".format(
                 clip.get("setting"), clip.get("policy"), _num(c.get("overlap+clip/post-fused+clip")),
                 _num(c.get("overlap+clip/overlap")))]
    for t in clip.get("targets", []):
        verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"  target {t['ratio']} <= {t['bound']:g}: {_num(t['value'])} {verdict}")
    return lines


def sharding_lines(run: dict[str, Any]) -> list[str]:
    """The sharded modes' ratios (step time, state per rank) and the targets, with verdicts
    where the run's configuration is the one they are set for."""
    c = run["comparison"]
    sh = run.get("sharding")
    modes = run["modes"]
    if not sh or not any(name in modes for name in ("zero-post", "zero-upstream", "overlap-shard")):
        return []
    lines = [
        "overlap-shard/overlap {}   overlap-shard/zero-post {}   overlap-shard/zero-upstream {}".format(
            _num(c.get("overlap-shard/overlap")), _num(c.get("overlap-shard/zero-post")),
            _num(c.get("overlap-shard/zero-upstream"))),
        "state per rank: " + "   ".join(f"{k} {_num(v)}" for k, v in sh["state_ratio"].items()),
    ]
    cfg = sh["target_config"]
    where = (f"{cfg['link_gbps']:g} Gbit/s link, {cfg['bucket_cap_mb']:g} MB buckets, "
             f"{cfg['world_size']} ranks, {cfg['optimizer']}")
    parts = []
    for t in sh["targets"]:
        verdict = {True: "met", False: "NOT met", None: ""}[t["met"]]
        parts.append(f"{t['what']} {t['ratio']} {_num(t['value'])} <= {t['bound']:.2f} {verdict}".rstrip())
    head = "targets" if sh["targets_apply"] else f"targets (set for {where}; not this configuration)"
    lines.append(f"{head}: " + "; ".join(parts))
    if any(t["met"] is False and t["what"] == "step" for t in sh["targets"]):
        lines.append(limit_line(run))
    return lines


def fsdp_lines(run: dict[str, Any]) -> list[str]:
    """The FSDP2 modes' step ratios and targets, with verdicts where the run's configuration is
    the one they are set for, and the floor next to them where a step target is missed."""
    f = run.get("fsdp")
    modes = run["modes"]
    if not f or not any(name.startswith("fsdp-") for name in modes):
        return []
    lines = ["FSDP2: " + "   ".join(f"{k} {_num(v)}" for k, v in f["step_ratio"].items() if v is not None)]
    cfg = f["target_config"]
    parts = []
    for t in f["targets"]:
        verdict = {True: "met", False: "NOT met", None: ""}[t["met"]]
        op = "==" if t["what"] == "state" else "<="
        parts.append(f"{t['what']} {t['ratio']} {_num(t['value'])} {op} {t['bound']:.2f} {verdict}".rstrip())
    where = f"{cfg['link_gbps']:g} Gbit/s link, {cfg['world_size']} ranks, {cfg['optimizer']}"
    head = "  targets" if f["targets_apply"] else f"  targets (set for {where}; not this configuration)"
    lines.append(f"{head}: " + "; ".join(parts))
    floor = _median_of(modes.get("fsdp-floor"), "step")
    if floor is not None and any(t["met"] is False and t["what"] == "step" for t in f["targets"]):
        floor_p10 = modes["fsdp-floor"]["step"]["p10"]
        limit = [f"  limit: fsdp-floor {_ms(floor)} ms, p10 {_ms(floor_p10)} (backward and communication, "
                 "no optimizer)"]
        for name in ("fsdp-overlap", "fsdp-post-fused", "fsdp-per-param-in-backward"):
            step = _median_of(modes.get(name), "step")
            if step is not None:
                p10 = modes[name]["step"]["p10"] - floor_p10
                limit.append(f"{name} - floor {_ms(step - floor)} ms, p10 {_ms(p10)}")
        tail = _median_of(modes.get("fsdp-overlap"), "tail")
        if tail is not None:
            limit.append(f"fsdp-overlap's tail after its last reduce-scatter {_ms(tail)} ms")
        lines.append("; ".join(limit))
    return lines


def _median_of(m: dict[str, Any] | None, part: str) -> float | None:
    if not m or m.get("status") != "ok":
        return None
    if part == "step":
        return m["step"].get("median")
    return m.get(part, {}).get("median")


def link_line(run: dict[str, Any]) -> str | None:
    """Under a simulated link: the link's busy time per step, per mode."""
    if not run.get("link_gbps"):
        return None
    busy = {name: _median_of(m, "link_busy") for name, m in run["modes"].items()}
    busy = {k: v for k, v in busy.items() if v is not None}
    if not busy:
        return None
    return ("simulated link busy per step (ms, median): "
            + ", ".join(f"{name} {_ms(v)}" for name, v in busy.items()))


def limit_line(run: dict[str, Any]) -> str:
    """What no overlap can hide behind a link-bound step: the floor (backward and the link's
    bytes, no optimizer) and how far above it the overlapped modes end, by median and by p10
    (which other work on the machine disturbs less), with their tails (the work left after
    the last communication: the last update, or the copy of the last all-gathered bucket)."""
    modes = run["modes"]
    floor = _median_of(modes.get("floor"), "step")
    floor_p10 = modes["floor"]["step"].get("p10") if floor is not None else None
    parts = [f"limit: floor {_ms(floor)} ms, p10 {_ms(floor_p10)} (backward and communication, no optimizer)"]
    for name in ("overlap", "overlap-shard"):
        step = _median_of(modes.get(name), "step")
        if step is None or floor is None or floor_p10 is None:
            continue
        p10 = modes[name]["step"]["p10"]
        parts.append(f"{name} - floor {_ms(step - floor)} ms, p10 {_ms(p10 - floor_p10)} (tail after its last "
                     f"communication {_ms(_median_of(modes.get(name), 'tail'))} ms)")
    busy = _median_of(modes.get("overlap-shard"), "link_busy")
    if busy is not None:
        parts.append(f"the link carries {_ms(busy)} ms/step in floor, overlap and overlap-shard alike")
    return "; ".join(parts)


def plot(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Bar charts of step time per mode and, for sweeps, hidden fraction curves.

    Returns the written files; nothing when matplotlib is not importable.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [_plot_steps(plt, result, out / "step_times.png")]
    opts = result.get("options", {})
    if opts.get("sweep_link"):
        path = _plot_sweep(plt, result, out / "hidden_vs_link.png", "link_gbps", "simulated link (Gbit/s)",
                           fixed=("bucket_cap_mb", opts.get("bucket_cap_mb")))
        if path:
            written.append(path)
    if opts.get("sweep_bucket"):
        path = _plot_sweep(plt, result, out / "hidden_vs_bucket.png", "bucket_cap_mb", "bucket_cap_mb (MB)",
                           fixed=("link_gbps", opts.get("link_gbps")))
        if path:
            written.append(path)
    return written


def _plot_steps(plt: Any, result: dict[str, Any], path: Path) -> Path:
    runs = result["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.6 * len(runs) + 0.6), squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        names, med, lo, hi = [], [], [], []
        for name, m in run["modes"].items():
            if m["status"] != "ok":
                continue
            st = m["step"]
            names.append(name)
            med.append(1e3 * st["median"])
            lo.append(1e3 * (st["median"] - st["p10"]))
            hi.append(1e3 * (st["p90"] - st["median"]))
        colors = ["#d62728" if n.startswith("overlap") else "#7f7f7f" if n == "floor" else "#1f77b4"
                  for n in names]
        ax.bar(names, med, yerr=[lo, hi], color=colors, capsize=4)
        ax.set_ylabel("ms / step (median, p10-p90)")
        ax.set_title(run["label"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sweep(plt: Any, result: dict[str, Any], path: Path, key: str, xlabel: str,
                fixed: tuple[str, Any]) -> Path | None:
    series: dict[str, list[tuple[float, float, float | None]]] = {}
    for run in result["runs"]:
        if run.get(fixed[0]) != fixed[1] or run.get(key) is None:
            continue
        c = run["comparison"]
        name = f"{run['workload']['kind']} / {run['optimizer']}"
        point = (run[key], c.get("hidden_fraction"), c.get("hidden_fraction_vs_fused"))
        series.setdefault(name, []).append(point)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    lowest = 0.0
    xs_all: set[float] = set()
    for name, pts in series.items():
        pts.sort()
        xs_all.update(p[0] for p in pts)
        lowest = min([lowest] + [v for p in pts for v in p[1:] if v is not None])
        xs = [p[0] for p in pts]
        nan = float("nan")
        ax.plot(xs, [nan if p[1] is None else p[1] for p in pts], marker="o", label=f"{name} vs post")
        ax.plot(xs, [nan if p[2] is None else p[2] for p in pts], marker="x", linestyle="--",
                label=f"{name} vs post-fused")
    ax.set_xscale("log")
    ax.set_xticks(sorted(xs_all), [f"{x:g}" for x in sorted(xs_all)])
    ax.minorticks_off()
    ax.set_ylim(max(lowest, -1.0) - 0.05, 1.05)  # points below -1 (overlap far slower) are clipped
    ax.set_xlabel(xlabel)
    ax.set_ylabel("hidden fraction (post - overlap) / (post - floor)")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
