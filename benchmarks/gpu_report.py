"""python -m benchmarks.gpu_report {probe [--device cuda|cpu] | summary OUTDIR}

The two Python ends of ``tools/gpu_check.sh``:

- ``probe``: print the Python, torch, CUDA and NCCL versions and the GPU; exit 3 when
  ``--device cuda`` (the default) and torch sees no CUDA device.
- ``summary OUTDIR``: read what the check's parts left in OUTDIR (``parts.tsv``: each part's
  status and seconds; ``cuda_tests.xml``: the CUDA tests' JUnit report; ``bench-*/
  overlap_bench.json``: the benchmark runs), write ``OUTDIR/gpu_check.json`` and, with
  matplotlib, ``OUTDIR/gpu_check.png``, and print a short table with the targets next to the
  measurements. The targets are for the record; missing one does not fail the check.

Example (the summary of a finished check):
    >>> summary = collect("gpu-check-out")               # doctest: +SKIP
    >>> print(format_summary(summary))                   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .report import mode_memory
from .stream_overlap import kernels, load_trace

__all__ = ["TARGETS", "collect", "format_summary", "main", "plot_summary", "read_parts", "read_junit"]

MODE_ORDER = ("floor", "post", "post-fused", "upstream", "overlap")
#: The FSDP2 modes a part may also run, reported on a line of their own per run.
FSDP_ORDER = ("fsdp-floor", "fsdp-post-fused", "fsdp-per-param-in-backward", "fsdp-overlap")

#: (workload kind, optimizer, comparison key, "<=" or ">=", bound): what the check aims at.
TARGETS: tuple[tuple[str, str, str, str, float], ...] = (
    ("gpt", "adamw", "overlap/post-fused", "<=", 0.97),
    ("gpt", "adamw", "hidden_fraction_vs_fused", ">=", 0.7),
)

_TARGET_NAMES = {
    "overlap/post-fused": "overlap/post-fused",
    "hidden_fraction_vs_fused": "hidden fraction (vs post-fused)",
}


def read_parts(path: Path) -> list[dict[str, Any]]:
    """``parts.tsv``: one line per part, ``name status exit-code seconds limit`` (tab-separated)."""
    parts = []
    if not path.exists():
        return parts
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) != 5:
            continue
        name, status, rc, seconds, limit = fields
        parts.append({"name": name, "status": status, "exit_code": _int(rc),
                      "seconds": _float(seconds), "limit_s": _int(limit)})
    return parts


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_junit(path: Path) -> dict[str, Any] | None:
    """Counts and failing test names of a pytest ``--junitxml`` report; ``None`` when absent."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable JUnit report: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, skipped = [], []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            skip = case.find("skipped")
            if skip is not None:
                skipped.append(f"{name}: {skip.get('message', '')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skipped_tests": skipped}


def _row(run: dict[str, Any], env: dict[str, Any], source: str) -> dict[str, Any]:
    modes = run["modes"]
    trace = run.get("trace") or {}
    streams = trace.get("streams") or {}
    return {
        "source": source,
        "label": run["label"],
        "kind": run["workload"]["kind"],
        "workload": run["workload"],
        "params": run["params"],
        "optimizer": run["optimizer"],
        "optimizer_desc": run["optimizer_desc"],
        "median_s": {n: (m["step"]["median"] if m["status"] == "ok" else None) for n, m in modes.items()},
        "skipped": {n: m["reason"] for n, m in modes.items() if m["status"] != "ok"},
        "kernels": {n: m.get("kernel") for n, m in modes.items() if m["status"] == "ok"},
        "post_fused_kernel": run.get("post_fused_kernel"),
        "memory_bytes": {n: mode_memory(m) for n, m in modes.items() if m["status"] == "ok"},
        "comparison": run["comparison"],
        "overlap_share": streams.get("overlap_share"),
        "tail_us": (streams.get("tail_us") or {}).get("median"),
        "side_busy_us": (streams.get("side_busy_per_step_us") or {}).get("median"),
        "trace": trace.get("path"),
        "streams": streams or None,
        "trace_note": trace.get("error") or trace.get("streams_error"),
        "timing": env.get("timing"),
        "overlap_kernel_option": None,
        "wall_s": run.get("wall_s"),
    }


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for kind, optimizer, key, op, bound in TARGETS:
        row = next((r for r in rows if r["kind"] == kind and r["optimizer"] == optimizer), None)
        value = row["comparison"].get(key) if row else None
        met = None if value is None else (value <= bound if op == "<=" else value >= bound)
        out.append({"workload": kind, "optimizer": optimizer, "metric": key, "op": op,
                    "bound": bound, "value": value, "met": met})
    return out


def collect(out_dir: str | Path) -> dict[str, Any]:
    """Everything the check's parts left in ``out_dir``, as one summary dictionary."""
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    environment: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for path in sorted(out.glob("bench-*/overlap_bench.json")):
        result = json.loads(path.read_text())
        environment = environment or result.get("environment", {})
        opts = result.get("options", {})
        options[path.parent.name] = opts
        for run in result.get("runs", []):
            row = _row(run, result.get("environment", {}), path.parent.name)
            row["overlap_kernel_option"] = opts.get("overlap_kernel")
            rows.append(row)
    return {
        "tool": "tools/gpu_check.sh",
        "parts": read_parts(out / "parts.tsv"),
        "tests": read_junit(out / "cuda_tests.xml"),
        "sanitizer": read_junit(out / "sanitizer_tests.xml"),
        "environment": environment,
        "options": options,
        "runs": rows,
        "targets": _targets(rows),
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.2f}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _short(row: dict[str, Any]) -> str:
    w = row["workload"]
    if w["kind"] == "mlp":
        return f"mlp {w['depth']}x{w['width']}"
    return f"{w['kind']} {w['depth']}x{w['width']}"


def format_summary(summary: dict[str, Any]) -> str:
    """The short table the check prints at its end."""
    env = summary.get("environment") or {}
    lines = []
    if env:
        lines.append(
            f"{env.get('cuda_device') or env.get('device')}, torch {env.get('torch')}, CUDA "
            f"{env.get('cuda_runtime')}, {env.get('backend')} world size {env.get('world_size')}, "
            f"autocast {env.get('autocast')}, steps timed with {env.get('timing')}"
        )
    parts = summary.get("parts") or []
    if parts:
        lines.append("parts: " + " | ".join(
            f"{p['name']} {p['status']} {_num(p['seconds'], '.1f')} s" for p in parts))
    for key, title in (("tests", "CUDA tests"), ("sanitizer", "CUDA tests under the sanitizer (not counted)")):
        tests = summary.get(key)
        if tests and "error" not in tests:
            line = (f"{title}: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                    f"{tests['skipped']} skipped")
            if tests["failed"]:
                line += " (failed: " + ", ".join(tests["failed"][:6]) + (" ..." if len(tests["failed"]) > 6 else "") + ")"
            lines.append(line)
        elif tests:
            lines.append(f"{title}: {tests['error']}")
    rows = summary.get("runs") or []
    if not rows:
        lines.append("no benchmark results")
        return "\n".join(lines)
    lines.append("")
    header = (f"{'workload':<14}{'optim':<7}" + "".join(f"{m:>11}" for m in MODE_ORDER)
              + f"{'ov/pf':>8}{'ov/post':>8}{'hid(pf)':>8}{'hid(post)':>10}{'beside':>8}{'tail ms':>8}")
    lines.append(header)
    for r in rows:
        c = r["comparison"]
        cells = "".join(
            f"{_ms(r['median_s'].get(m)) if r['median_s'].get(m) is not None else 'skip':>11}"
            for m in MODE_ORDER
        )
        share = r["overlap_share"]
        lines.append(
            f"{_short(r):<14}{r['optimizer']:<7}{cells}{_num(c.get('overlap/post-fused')):>8}"
            f"{_num(c.get('overlap/post')):>8}{_num(c.get('hidden_fraction_vs_fused'), '.2f'):>8}"
            f"{_num(c.get('hidden_fraction'), '.2f'):>10}"
            f"{'-' if share is None else f'{share:.0%}':>8}"
            f"{_num(None if r['tail_us'] is None else r['tail_us'] / 1e3, '.2f'):>8}"
        )
    lines.append(
        "median step, ms; hid(pf) = (post-fused - overlap) / (post-fused - floor), hid(post) the "
        "same against post; beside = share of the update stream's busy time that overlapped "
        "default-stream kernels, tail = from backward's last default-stream kernel to the end of "
        "the last update kernel (both from a profiler trace of a few overlap steps)"
    )
    fused = {r["post_fused_kernel"] for r in rows if r.get("post_fused_kernel")}
    if any(r.get("overlap_kernel_option") == "fused" for r in rows):
        lines.append(
            "overlap: the optimizer handed to overlap was built with fused=True (overlap's own "
            "default for Adam/AdamW on CUDA is foreach); post-fused: the faster of fused / foreach "
            f"(picked: {', '.join(sorted(fused)) or '-'})"
        )
    lines.append("memory per mode, MB (setup: model, buckets and state left after warm-up; "
                 "step: peak of a step above that)")
    for r in rows:
        cells = []
        for m in MODE_ORDER:
            mem = r["memory_bytes"].get(m)
            if mem:
                cells.append(f"{m} {_mb(mem['setup'])}+{_mb(mem['step'])}")
        kind = "CUDA" if any(v.get("cuda") for v in r["memory_bytes"].values()) else "RSS"
        lines.append(f"  {_short(r)} {r['optimizer']} ({kind}): " + ", ".join(cells))
    for r in rows:
        fsdp = {m: r["median_s"][m] for m in FSDP_ORDER if m in r["median_s"]}
        if fsdp:
            pf, ov = fsdp.get("fsdp-post-fused"), fsdp.get("fsdp-overlap")
            ratio = _num(ov / pf) if pf and ov is not None else "-"
            cells = ", ".join(f"{m} {_ms(v) if v is not None else 'skip'}" for m, v in fsdp.items())
            lines.append(f"FSDP2 {_short(r)} {r['optimizer']}: {cells} ms; fsdp-overlap/fsdp-post-fused {ratio}")
    for r in rows:
        for mode, reason in r["skipped"].items():
            lines.append(f"skipped: {_short(r)} {r['optimizer']} {mode}: {reason}")
        if r["trace_note"]:
            lines.append(f"trace: {_short(r)} {r['optimizer']}: {r['trace_note']}")
    for t in summary.get("targets") or []:
        name = _TARGET_NAMES.get(t["metric"], t["metric"])
        verdict = "no measurement" if t["met"] is None else ("met" if t["met"] else "NOT met")
        lines.append(
            f"target ({t['workload']}, {t['optimizer']}): {name} {_num(t['value'])} "
            f"{'≤' if t['op'] == '<=' else '≥'} {t['bound']}: {verdict}"
        )
    return "\n".join(lines)


def _mb(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:.0f}"


def plot_summary(summary: dict[str, Any], path: str | Path) -> Path | None:
    """Step time of every mode relative to post-fused, per run, and the kernels of one traced
    overlap step on the main and side streams. ``None`` without matplotlib or results."""
    rows = summary.get("runs") or []
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timeline = _timeline(rows)
    fig, axes = plt.subplots(2 if timeline else 1, 1, figsize=(10, 7.5 if timeline else 4), squeeze=False)
    ax = axes[0, 0]
    width = 0.8 / len(MODE_ORDER)
    colors = {"floor": "#7f7f7f", "post": "#aec7e8", "post-fused": "#1f77b4", "upstream": "#2ca02c",
              "overlap": "#d62728"}
    for j, mode in enumerate(MODE_ORDER):
        xs, ys = [], []
        for i, r in enumerate(rows):
            ref, value = r["median_s"].get("post-fused"), r["median_s"].get(mode)
            if ref and value is not None:
                xs.append(i + (j - (len(MODE_ORDER) - 1) / 2) * width)
                ys.append(value / ref)
        ax.bar(xs, ys, width=width, label=mode, color=colors[mode])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.97, color="#d62728", linewidth=0.8, linestyle="--", label="target 0.97 (gpt, adamw)")
    ax.set_xticks(range(len(rows)), [f"{_short(r)}\n{r['optimizer']}" for r in rows])
    ax.set_ylabel("median step / post-fused")
    ax.legend(fontsize=7, ncol=3)
    if timeline:
        _plot_timeline(axes[1, 0], *timeline)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _timeline(rows: list[dict[str, Any]]) -> tuple[str, dict[str, Any], list[Any]] | None:
    """The last traced step of the target run (else the first run with a trace): its analysis
    and the trace's kernels on its main and side streams."""
    ordered = sorted(rows, key=lambda r: not (r["kind"] == "gpt" and r["optimizer"] == "adamw"))
    for r in ordered:
        if not r.get("trace") or r.get("overlap_share") is None:
            continue
        try:
            trace = load_trace(r["trace"])
        except (OSError, ValueError):
            continue
        return f"{_short(r)} {r['optimizer']}", r, kernels(trace)
    return None


def _plot_timeline(ax: Any, title: str, row: dict[str, Any], ks: list[Any]) -> None:
    trace_steps = _analysis_steps(row)
    if not trace_steps:
        return
    step = trace_steps[-1]
    end = step["last_update_end_us"]
    span = max(1.0, end - step["first_update_start_us"])
    lo, hi = step["first_update_start_us"] - 0.25 * span, end + 0.1 * span
    streams = row["streams"]
    lanes = [("default stream", [streams["main_stream"]], "#1f77b4"),
             ("update stream", streams["side_streams"], "#d62728")]
    for y, (name, ids, color) in enumerate(lanes):
        bars = [(max(k.start, lo) - lo, min(k.end, hi) - max(k.start, lo))
                for k in ks if k.stream in ids and k.end > lo and k.start < hi]
        ax.broken_barh([(s / 1e3, d / 1e3) for s, d in bars], (y - 0.35, 0.7), color=color)
    ax.set_yticks([0, 1], [lane[0] for lane in lanes])
    if step.get("backward_last_kernel_end_us") is not None:
        ax.axvline((step["backward_last_kernel_end_us"] - lo) / 1e3, color="black", linestyle="--",
                   linewidth=0.8, label="backward's last kernel ends")
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("ms")
    ax.set_title(f"{title}: kernels of traced {step['step']} (tail {_num((step['tail_us'] or 0) / 1e3, '.2f')} ms, "
                 f"{_num(step['overlap_share'], '.0%')} of update time beside default-stream kernels)",
                 fontsize=9)


def _analysis_steps(row: dict[str, Any]) -> list[dict[str, Any]]:
    return (row.get("streams") or {}).get("steps") or []


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def probe(device: str) -> int:
    """Print the software and the GPU; 3 when ``device`` is cuda and none is visible."""
    import platform

    import torch

    print(f"python {platform.python_version()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
    print(" | ".join(f"{name} {_version(name)}" for name in ("numpy", "pytest", "pytest-timeout", "matplotlib")))
    missing = _imports()
    for name, why in missing.items():
        print(f"missing: {name} ({why})", file=sys.stderr if name in REQUIRED else sys.stdout)
    available = torch.cuda.is_available()
    print(f"CUDA available: {available} | devices: {torch.cuda.device_count() if available else 0}")
    if available:
        try:
            nccl = torch.cuda.nccl.version()
            nccl_text = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
        except (AttributeError, RuntimeError) as exc:
            nccl_text = f"unavailable ({exc})"
        props = torch.cuda.get_device_properties(0)
        print(f"device 0: {props.name}, {props.total_memory / 2**30:.0f} GiB | NCCL {nccl_text}")
    if device == "cuda" and not available:
        print("no CUDA device visible to torch: the GPU check needs one", file=sys.stderr)
        return 3
    if any(name in REQUIRED for name in missing):
        return 4
    return 0


#: What each part of the GPU check imports: the measurement cannot run without these ...
REQUIRED = ("pytest", "overlap_sgd", "benchmarks.overlap_bench", "benchmarks.gpu_report")
#: ... and these only add to it: the plots (matplotlib), the tests' hard timeouts.
OPTIONAL = {"matplotlib": "no plots", "pytest_timeout": "no per-test time limits", "numpy": "not needed"}


def _imports() -> dict[str, str]:
    """Modules the check needs that do not import here, with what is lost without each."""
    import importlib

    missing = {}
    for name in REQUIRED + tuple(OPTIONAL):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import counts
            missing[name] = f"{type(exc).__name__}: {exc}; " + OPTIONAL.get(name, "required")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report",
                                     description=(__doc__ or "").split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="print versions and the GPU")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    s = sub.add_parser("summary", help="summarise a finished check's OUTDIR")
    s.add_argument("out_dir")
    a = parser.parse_args(argv)
    if a.command == "probe":
        return probe(a.device)
    out = Path(a.out_dir)
    if not out.is_dir():
        parser.error(f"OUTDIR {str(out)!r} is not a directory")
    summary = collect(out)
    picture = plot_summary(summary, out / "gpu_check.png")
    summary["plot"] = str(picture) if picture else None
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(format_summary(summary), flush=True)
    print(f"\nsummary: {out / 'gpu_check.json'}" + (f"\nplot: {picture}" if picture else
                                                     "\nplot: none (matplotlib not importable)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
