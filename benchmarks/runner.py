"""What each rank runs: every configuration's modes, interleaved round-robin, and the reports' data.

For each configuration (workload, optimizer, bucket size, link), every mode gets its own DDP
model built from the same initial weights and a few warm-up steps. Then, ``rounds`` times, each
mode runs ``steps_per_round`` steps in turn (the order rotating every round), so that drift of
the machine hits every mode alike. Per step the slowest rank's time counts. After the rounds each
rank reads its optimizer state's size in every mode. Rank 0 returns the collected results; the
other ranks return ``None``.

A mode whose building or step raises (``upstream`` on a torch that no longer supports it, a mode
that does not fit in memory beside the others, say) is reported as skipped with the error
instead of ending the run. With a trace requested, a few steps of a fresh overlap mode are
profiled after the measurement, and on CUDA the trace's kernels give the share of the update
stream's busy time that ran beside default-stream kernels and the tail left after backward's
last kernel (:mod:`benchmarks.stream_overlap`).
"""

from __future__ import annotations

import gc
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from .bandwidth import step_traffic, triad
from .link import SimulatedLink
from .memory import MemoryProbe
from .modes import CLIPPED, MODES, Mode, ModeContext, build_mode, pick_fast_kernel
from .stats import compare, step_max, summarize
from .stream_overlap import analyze, load_trace
from .targets import clipping, fsdp, sharding
from .trace import write_trace
from .workloads import Workload, build_model, describe_optimizer, make_batch

#: ``--autocast`` choices: the dtype forward and loss run in (``none``: no autocast).
AUTOCAST: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16}

__all__ = ["BenchJob", "BenchOptions", "RunConfig", "configs", "rank_entry", "run_rank"]


@dataclass
class BenchOptions:
    """Everything the command line sets; see ``python -m benchmarks.overlap_bench --help``."""

    models: list[str] = field(default_factory=lambda: ["mlp"])
    optimizers: list[str] = field(default_factory=lambda: ["sgd"])
    width: int = 1024
    depth: int = 8
    tf_width: int = 256
    tf_depth: int = 4
    tf_heads: int = 4
    seq_len: int = 16
    vocab: int = 50304
    batch: int = 32
    autocast: str = "none"
    bucket_cap_mb: float = 25.0
    link_gbps: float | None = None
    sweep_link: list[float] = field(default_factory=list)
    sweep_bucket: list[float] = field(default_factory=list)
    rounds: int = 5
    steps_per_round: int = 5
    warmup: int = 3
    modes: list[str] = field(default_factory=lambda: list(MODES))
    device: str = "cpu"
    threads: int = 1
    overlap_kernel: str = "auto"
    gradient_as_bucket_view: bool = False
    #: How often the clip modes' ``max_norm`` makes clipping fire, and ``overlap+clip``'s policy.
    clip: str = "sometimes"
    clip_policy: str = "auto"
    trace: str | None = None
    trace_dir: str | None = None
    trace_steps: int = 3
    seed: int = 0
    verbose: bool = True


@dataclass(frozen=True)
class RunConfig:
    """One measured configuration."""

    workload: Workload
    optimizer: str
    bucket_cap_mb: float
    link_gbps: float | None

    def label(self) -> str:
        link = f"link {self.link_gbps:g} Gbit/s" if self.link_gbps else "loopback"
        return f"{self.workload.label()} | {self.optimizer} | bucket {self.bucket_cap_mb:g} MB | {link}"

    def slug(self) -> str:
        """The label as a file name."""
        return re.sub(r"[^A-Za-z0-9.]+", "-", self.label()).strip("-")


def workloads(opts: BenchOptions) -> list[Workload]:
    out = []
    for kind in opts.models:
        if kind == "mlp":
            out.append(Workload("mlp", opts.width, opts.depth, opts.batch))
        elif kind in ("transformer", "gpt"):
            out.append(Workload(kind, opts.tf_width, opts.tf_depth, opts.batch,
                                opts.tf_heads, opts.seq_len, opts.vocab))
        else:
            raise ValueError(f"unknown model {kind!r}; choose 'mlp', 'transformer' or 'gpt'")
    return out


def configs(opts: BenchOptions) -> list[RunConfig]:
    """The base point, then the link sweep (at the base bucket size), then the bucket sweep
    (at the base link), for every workload and optimizer, without repeats."""
    points: list[tuple[float, float | None]] = [(opts.bucket_cap_mb, opts.link_gbps)]
    points += [(opts.bucket_cap_mb, g) for g in opts.sweep_link]
    points += [(b, opts.link_gbps) for b in opts.sweep_bucket]
    unique = list(dict.fromkeys(points))
    return [
        RunConfig(w, o, b, g) for w in workloads(opts) for o in opts.optimizers for b, g in unique
    ]


class _Log:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)


def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _gradient_norm(base: torch.nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor) -> float:
    """The total gradient norm of a copy of ``base`` on this rank's batch, averaged over the
    ranks: the scale of the clip modes' ``max_norm``, the same on every rank."""
    import copy

    from .workloads import loss_fn

    model = copy.deepcopy(base)
    loss_fn(model(x), y).backward()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    norm = norm.detach().double().reshape(1)
    dist.all_reduce(norm)
    return float(norm) / dist.get_world_size()


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return summarize(xs)["median"] if xs else None  # type: ignore[return-value]


def _overlap_kernel(choice: str, fast: dict[str, Any]) -> dict[str, Any]:
    if choice == "auto":
        return dict(fast)
    if choice == "fused":
        return {"fused": True}
    if choice == "foreach":
        return {"foreach": True}
    if choice == "default":
        return {}
    raise ValueError(f"--overlap-kernel must be auto, fused, foreach or default, got {choice!r}")


def _guarded(mode: Mode, steps: int, x: torch.Tensor, y: torch.Tensor, log: _Log) -> bool:
    """Run ``steps`` steps of ``mode`` and settle them; on an error mark the mode skipped."""
    try:
        for _ in range(steps):
            mode.step(x, y)
        mode.settle()
        return True
    except Exception as exc:  # noqa: BLE001 - reported as the mode's skip reason
        traceback.print_exc(file=sys.stderr)
        mode.skipped = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        log(f"  {mode.name} failed, skipped from now on: {mode.skipped}")
        try:
            mode.close()
        except Exception:  # noqa: BLE001 - already reported
            pass
        return False


def _trace_overlap(ctx: ModeContext, opts: BenchOptions, x: torch.Tensor, y: torch.Tensor,
                   rank: int, device: torch.device, path: str, log: _Log) -> dict[str, Any] | None:
    """Profile a few steps of a fresh, labelled overlap mode; rank 0 returns the trace's path and
    its stream analysis (or why there is none)."""
    traced = build_mode("overlap", replace(ctx, label=True))
    try:
        for _ in range(max(1, opts.warmup)):
            traced.step(x, y)
        traced.settle()
        dist.barrier()
        written = write_trace(path, lambda: traced.step(x, y), opts.trace_steps, device,
                              record=rank == 0)
        traced.settle()
    finally:
        traced.close()
    if written is None:
        return None
    log(f"  trace of {opts.trace_steps} overlap steps written to {written}")
    out: dict[str, Any] = {"path": str(written), "steps": opts.trace_steps}
    try:
        out["streams"] = analyze(load_trace(written))
    except ValueError as exc:
        out["streams_error"] = str(exc)
    return out


def run_config(cfg: RunConfig, opts: BenchOptions, rank: int, world: int, device: torch.device,
               log: _Log, trace_path: str | None) -> dict[str, Any] | None:
    """Measure every mode of ``cfg``; rank 0 returns the configuration's results."""
    sync = _sync_fn(device)
    base = build_model(cfg.workload, seed=opts.seed).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    x, y = make_batch(cfg.workload, rank, device, seed=opts.seed)
    fast, kernel_times = pick_fast_kernel(cfg.optimizer, list(base.parameters()), device, sync=sync)
    link = SimulatedLink(cfg.link_gbps, name=f"simulated-link-rank{rank}") if cfg.link_gbps else None
    scale = _gradient_norm(base, cfg.workload, x, y) if any(m in CLIPPED for m in opts.modes) else 1.0
    ctx = ModeContext(
        base=base, device=device, optimizer=cfg.optimizer, bucket_cap_mb=cfg.bucket_cap_mb,
        link=link, fast_kernel=fast, overlap_kernel=_overlap_kernel(opts.overlap_kernel, fast),
        gradient_as_bucket_view=opts.gradient_as_bucket_view, sync=sync,
        autocast=AUTOCAST[opts.autocast], clip=opts.clip, clip_scale=scale, clip_policy=opts.clip_policy,
    )
    probe = MemoryProbe(device)
    modes: dict[str, Mode] = {}
    setup_mem: dict[str, dict[str, int | None]] = {}
    for name in opts.modes:
        before = probe.now()
        try:
            mode = build_mode(name, ctx)
        except Exception as exc:  # noqa: BLE001 - reported as the mode's skip reason (out of memory, say)
            traceback.print_exc(file=sys.stderr)
            first = str(exc).splitlines()[0] if str(exc) else ""
            mode = Mode(name, skipped=f"failed to build: {type(exc).__name__}: {first}")
            gc.collect()
        modes[name] = mode
        if mode.active and _guarded(mode, max(opts.warmup, mode.min_warmup), x, y, log):
            mode.records.clear()
        after = probe.now()
        setup_mem[name] = {
            k: after[k] - before[k] if after[k] is not None and before[k] is not None else None
            for k in before
        }
        log(f"  built {name:<13} {'(skipped: ' + mode.skipped + ')' if mode.skipped else mode.kernel}")
    active = [m for m in modes.values() if m.active]
    block_mem: dict[str, list[dict[str, int | None]]] = {m.name: [] for m in active}
    for r in range(opts.rounds):
        shift = r % max(1, len(active))
        order = active[shift:] + active[:shift]
        for mode in order:
            dist.barrier()
            base_mem = probe.start_block()
            if _guarded(mode, opts.steps_per_round, x, y, log):
                block_mem[mode.name].append(probe.end_block(base_mem))
        active = [m for m in active if m.active]
        recent = "  ".join(
            f"{m.name} {1e3 * (_median([s.total for s in m.records[-opts.steps_per_round:]]) or 0):.1f}"
            for m in active
        )
        log(f"  round {r + 1}/{opts.rounds}  ms/step (this rank): {recent}")

    # The post-backward step alone, against the machine's bandwidth, on every rank at once.
    traffic: dict[str, int] = {}
    local_bw: dict[str, Any] = {}
    fused_mode = modes.get("post-fused")
    if fused_mode is not None and fused_mode.active:
        traffic = step_traffic(fused_mode.optimizer)
        dist.barrier()
        local_bw["triad"] = triad(traffic["footprint_bytes"], device, sync=sync)
        opt_s = _median([s.opt_step for s in fused_mode.records])
        local_bw["post_fused_step_s"] = opt_s
        local_bw["post_fused_step_gbs"] = traffic["moved_bytes"] / opt_s / 1e9 if opt_s else None
        ov = modes.get("overlap")
        busy = _median([s.update_busy for s in ov.records]) if ov is not None and ov.active else None
        local_bw["overlap_update_busy_s"] = busy
        local_bw["overlap_update_gbs"] = traffic["moved_bytes"] / busy / 1e9 if busy else None

    local = {
        "rank": rank,
        "records": {m.name: [asdict(s) for s in m.records] for m in active},
        "state_bytes": {m.name: m.state_bytes() for m in active},
        "skipped": {m.name: m.skipped for m in modes.values() if not m.active},
        "kernels": {m.name: m.kernel for m in active},
        "setup_mem": setup_mem,
        "block_mem": block_mem,
        "bandwidth": local_bw,
        "totals": probe.totals(),
        "trace": None,
    }
    overlap_ok = "overlap" in modes and modes["overlap"].active
    for mode in modes.values():
        mode.close()
    if trace_path is not None and overlap_ok:
        gc.collect()
        try:
            local["trace"] = _trace_overlap(ctx, opts, x, y, rank, device, trace_path, log)
        except Exception as exc:  # noqa: BLE001 - the measurement above stands without it
            traceback.print_exc(file=sys.stderr)
            local["trace"] = {"error": f"{type(exc).__name__}: {exc}"}
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, local)
    if link is not None:
        link.close()
    del modes, active, fused_mode, base, ctx
    gc.collect()
    if rank != 0:
        return None
    return _assemble(cfg, opts, n_params, fast, kernel_times, traffic, gathered)


def _assemble(cfg: RunConfig, opts: BenchOptions, n_params: int, fast: dict[str, Any],
              kernel_times: dict[str, float], traffic: dict[str, int],
              gathered: list[dict[str, Any]]) -> dict[str, Any]:
    mode_out: dict[str, Any] = {}
    medians: dict[str, float | None] = {}
    first = gathered[0]
    for name in opts.modes:
        if name not in first["records"]:
            reason = first["skipped"].get(name) or "not built"
            mode_out[name] = {"status": "skipped", "reason": reason}
            medians[name] = None
            continue
        per_rank = [g["records"][name] for g in gathered]
        totals = step_max([[s["total"] for s in recs] for recs in per_rank])
        stats = summarize(totals)
        medians[name] = stats.get("median")  # type: ignore[assignment]
        entry: dict[str, Any] = {"status": "ok", "kernel": first["kernels"][name], "step": stats,
                                 "step_times": totals}
        for part in ("backward", "opt_step", "update_busy", "update_wait", "tail", "link_busy"):
            values = [s[part] for recs in per_rank for s in recs if s[part] is not None]
            if values:
                entry[part] = summarize(values)
        entry["memory"] = _mode_memory(name, gathered)
        mode_out[name] = entry
    bandwidth = _bandwidth(gathered, traffic)
    state = {name: entry["memory"]["optimizer_state"] for name, entry in mode_out.items()
             if entry["status"] == "ok"}
    return {
        "label": cfg.label(),
        "workload": cfg.workload.as_dict(),
        "params": n_params,
        "optimizer": cfg.optimizer,
        "optimizer_desc": describe_optimizer(cfg.optimizer),
        "bucket_cap_mb": cfg.bucket_cap_mb,
        "link_gbps": cfg.link_gbps,
        "clip": {"setting": opts.clip, "policy": opts.clip_policy},
        "post_fused_kernel": "fused" if fast.get("fused") else "foreach",
        "post_fused_kernel_times_s": kernel_times,
        "modes": mode_out,
        "comparison": compare(medians),
        "sharding": sharding(cfg.optimizer, cfg.bucket_cap_mb, cfg.link_gbps, len(gathered), medians, state),
        "fsdp": fsdp(cfg.optimizer, cfg.link_gbps, len(gathered), medians, state),
        "clipping": clipping(cfg.optimizer, cfg.link_gbps, len(gathered), opts.clip, opts.clip_policy, medians),
        "bandwidth": bandwidth,
        "memory": {
            "per_rank": [g["totals"] for g in gathered],
        },
        "trace": first.get("trace"),
    }


def _mode_memory(name: str, gathered: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"setup_growth": [g["setup_mem"].get(name) for g in gathered],
                           "optimizer_state": [g["state_bytes"].get(name) for g in gathered]}
    blocks = [g["block_mem"].get(name, []) for g in gathered]
    for key in ("rss_transient", "rss_peak", "cuda_transient", "cuda_peak"):
        values = [max((b[key] for b in rank_blocks if b.get(key) is not None), default=None)
                  for rank_blocks in blocks]
        if any(v is not None for v in values):
            out[key] = values
    return out


def _bandwidth(gathered: list[dict[str, Any]], traffic: dict[str, int]) -> dict[str, Any]:
    per_rank = [g["bandwidth"] for g in gathered]
    if not traffic or not all(per_rank):
        return {}

    def mean(key: str) -> float | None:
        vals = [b[key] for b in per_rank if b.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    triads = [b["triad"]["gbs"] for b in per_rank]
    return {
        **traffic,
        "note": "per rank, with every rank running at once; bytes = params + grads + state, "
                "each read once, params and state written once",
        "triad_gbs": sum(triads) / len(triads),
        "triad_best_gbs": sum(b["triad"]["best_gbs"] for b in per_rank) / len(per_rank),
        # The same triad counting the cache-line fill before each write of ``a`` (4 streams).
        "triad_write_allocate_gbs": sum(triads) / len(triads) * 4 / 3,
        "post_fused_step_s": mean("post_fused_step_s"),
        "post_fused_step_gbs": mean("post_fused_step_gbs"),
        "overlap_update_busy_s": mean("overlap_update_busy_s"),
        "overlap_update_gbs": mean("overlap_update_gbs"),
        "per_rank": per_rank,
    }


def run_rank(rank: int, world: int, opts: BenchOptions) -> dict[str, Any] | None:
    """Run every configuration on this rank (the process group is initialised)."""
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    log = _Log(opts.verbose and rank == 0)
    load_start = _loadavg()
    cpus = _cpu_count() or 1
    if load_start and load_start[0] > 0.5 * cpus and rank == 0:
        log(f"note: load average {load_start[0]:.2f} on {cpus} CPUs before starting; other work "
            "on the machine shows up as noise in every mode")
    runs = []
    todo = configs(opts)
    for i, cfg in enumerate(todo):
        log(f"[{i + 1}/{len(todo)}] {cfg.label()} | world {world}")
        trace = opts.trace if (i == 0 and opts.trace) else None
        if opts.trace_dir:
            trace = os.path.join(opts.trace_dir, f"{cfg.slug()}.json.gz")
        started = time.perf_counter()
        runs.append(run_config(cfg, opts, rank, world, device, log, trace))
        if runs[-1] is not None:
            runs[-1]["wall_s"] = time.perf_counter() - started
    if rank != 0:
        return None
    return {
        "tool": "benchmarks.overlap_bench",
        "options": asdict(opts),
        "environment": {
            "world_size": world,
            "backend": dist.get_backend(),
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": _cpu_count(),
            "threads_per_rank": opts.threads,
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cuda_runtime": torch.version.cuda,
            "timing": "CUDA events" if device.type == "cuda" else "host perf_counter",
            "autocast": opts.autocast,
            "load_average_start": load_start,
            "load_average_end": _loadavg(),
        },
        "runs": runs,
    }


def _loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


@dataclass
class BenchJob:
    """What a rank needs besides its rank: the options and where rank 0 writes the reports."""

    options: BenchOptions
    out_dir: str = "bench-out"
    plot: bool = True
    table: bool = True


def rank_entry(rank: int, world: int, job: BenchJob) -> dict[str, Any] | None:
    """A rank's whole run; rank 0 also writes the JSON, the plots and the table."""
    from .report import format_table, plot, write_json

    result = run_rank(rank, world, job.options)
    if rank != 0 or result is None:
        return None
    path = write_json(result, job.out_dir)
    pictures = plot(result, job.out_dir) if job.plot else []
    if job.table:
        print("\n" + format_table(result), flush=True)
    print(f"\nresults: {path}" + "".join(f"\nplot: {p}" for p in pictures), flush=True)
    return result
