"""python -m benchmarks.overlap_bench [--nproc 2] [--link-gbps 2 --bucket-cap-mb 4] [--out bench-out]
python -m benchmarks.overlap_bench --device cuda --nproc 1 --model gpt --autocast bf16 --trace-dir T

Measures, in one run, the DDP step time of eight modes, interleaved round-robin so that drift of
the machine hits each alike (every mode has its own DDP model, built from the same weights):

  floor          DDP backward only, no optimizer: the limit of any overlap
  post           optimizer.step() after backward, torch's default kernels
  post-fused     optimizer.step() after backward, the faster of fused=True / foreach=True
  upstream       DistributedDataParallel._register_fused_optim, PyTorch's own overlap
  overlap        overlap_sgd.overlap: each bucket updated as soon as its all-reduce lands
  post-fused+clip  post-fused with torch.nn.utils.clip_grad_norm_(foreach=True) before the step
  overlap+clip   overlap with global-norm clipping (clip_grad_norm=, opt.clip_grad_norm_);
                 --clip never|sometimes|always sets how often max_norm makes it fire
  zero-post      ZeroRedundancyOptimizer (state sharded), step() after backward: ZeRO-1
  zero-upstream  ZeroRedundancyOptimizer(overlap_with_ddp=True) + hook_with_zero_step_interleaved,
                 PyTorch's own sharded overlap (NCCL only: skipped on gloo)
  overlap-shard  overlap_sgd.overlap(..., shard=True): each rank updates its share of each
                 bucket as it lands, keeping the optimizer state of that share only

and, named with --modes only, four FSDP2 modes (fully_shard on each block and on the root):

  fsdp-floor     FSDP2 backward only, no optimizer
  fsdp-post-fused  optimizer.step() after backward over the sharded parameters, post-fused's kernel
  fsdp-per-param-in-backward  one optimizer per sharded parameter, stepped from its
                 post-accumulate-grad hook as FSDP2 sets its .grad (other libraries' in-backward step)
  fsdp-overlap   overlap_sgd.overlap(fsdp_root, opt): each FSDP group updated as its reduce-scatter lands

and reports median step time with p10/p90 and IQR, the ratios overlap/post, overlap/post-fused,
overlap/upstream and overlap-shard/overlap, /zero-post and /zero-upstream, the hidden fraction
(post - overlap) / (post - floor), each mode's optimizer state per rank and peak memory, the
sharded modes' targets, and the optimizer step's achieved GB/s next to a triad kernel's. Writes
OUT/overlap_bench.json, PNG plots when matplotlib is importable, and prints a table.

Ranks: without torchrun the tool spawns --nproc gloo ranks (NCCL with --device cuda, one GPU
each) on a free 127.0.0.1 port; under ``torchrun --nproc-per-node N benchmarks/overlap_bench.py
...`` it runs as the launched rank. On CUDA each step is timed with CUDA events, and
--trace/--trace-dir also report, from the trace's kernels, the share of the update stream's busy
time that ran beside default-stream kernels and the tail left after backward's last kernel.

--link-gbps X *simulates* a slower network: each bucket's real all-reduce result is held on one
serialized link thread per rank for bytes*8/X ns before its future completes (the thread sleeps,
spending no CPU). All modes that communicate through a DDP comm hook use the same wrapper;
upstream cannot take a custom comm hook and is reported as skipped. overlap-shard's
reduce-scatters and all-gathers are held on the same link, each for half its buffer's bytes (the
two halves of a ring all-reduce), as are the FSDP2 modes' all-gathers and reduce-scatters, and
zero-post carries its parameter broadcast there (half the
parameters' bytes, an all-gather's worth) after its step.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.launch import launched_by_torchrun, run_torchrun, spawn  # noqa: E402
from benchmarks.modes import ALL_MODES, CLIP_SETTINGS, MODES  # noqa: E402
from benchmarks.runner import AUTOCAST, BenchJob, BenchOptions, rank_entry  # noqa: E402
from benchmarks.workloads import KINDS, OPTIMIZERS  # noqa: E402

__all__ = ["main", "parse_args"]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def _names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.overlap_bench",
        description=doc.split("\n", 1)[1] if "\n" in doc else doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = BenchOptions()
    g = p.add_argument_group("ranks")
    g.add_argument("--nproc", type=int, default=2, help="ranks to spawn without torchrun (default 2)")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: gloo ranks; cuda: nccl ranks, one GPU each (default cpu)")
    g.add_argument("--threads", type=int, default=d.threads, help="torch threads per rank (default 1)")
    g.add_argument("--timeout", type=float, default=600.0, help="process-group timeout, s")
    g = p.add_argument_group("workload")
    g.add_argument("--model", type=_names(KINDS), default=d.models,
                   help="mlp, transformer (encoder stack) and/or gpt (GPT-2-style causal decoder "
                        "with embeddings and a tied LM head), comma-separated (default mlp)")
    g.add_argument("--optim", type=_names(tuple(OPTIMIZERS)), default=d.optimizers,
                   help="sgd (momentum 0.9), adamw, adam; comma-separated (default sgd)")
    g.add_argument("--width", type=int, default=d.width, help="MLP width (default 1024)")
    g.add_argument("--depth", type=int, default=d.depth, help="MLP layers (default 8)")
    g.add_argument("--tf-width", type=int, default=d.tf_width,
                   help="transformer / gpt d_model (default 256; GPT-2 small: 768)")
    g.add_argument("--tf-depth", type=int, default=d.tf_depth,
                   help="transformer / gpt layers (default 4; GPT-2 small: 12)")
    g.add_argument("--tf-heads", type=int, default=d.tf_heads,
                   help="attention heads (default 4; GPT-2 small: 12)")
    g.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="transformer / gpt sequence length (default 16)")
    g.add_argument("--vocab", type=int, default=d.vocab, help="gpt vocabulary size (default 50304)")
    g.add_argument("--batch", type=int, default=d.batch, help="batch size per rank (default 32)")
    g.add_argument("--autocast", default=d.autocast, choices=list(AUTOCAST),
                   help="run forward and loss under torch.autocast with this dtype (default none)")
    g = p.add_argument_group("communication")
    g.add_argument("--bucket-cap-mb", type=float, default=d.bucket_cap_mb,
                   help="DDP bucket_cap_mb (default 25)")
    g.add_argument("--link-gbps", type=float, default=None,
                   help="simulate a link of this many Gbit/s (default: none, plain loopback)")
    g.add_argument("--sweep-link", type=_floats, default=[], metavar="G1,G2,..",
                   help="also run at these simulated link speeds (at --bucket-cap-mb)")
    g.add_argument("--sweep-bucket", type=_floats, default=[], metavar="MB1,MB2,..",
                   help="also run at these bucket sizes (at --link-gbps)")
    g.add_argument("--gradient-as-bucket-view", action="store_true", help="DDP gradient_as_bucket_view=True")
    g.add_argument("--clip", default=d.clip, choices=list(CLIP_SETTINGS),
                   help="how often the clip modes' max_norm makes global-norm clipping fire (default sometimes: "
                        "every fourth step)")
    g.add_argument("--clip-policy", default=d.clip_policy, choices=["auto", "speculate", "defer"],
                   help="overlap+clip's ClipGradNorm policy (default auto)")
    g = p.add_argument_group("measurement")
    g.add_argument("--modes", type=_names(ALL_MODES), default=list(MODES),
                   help=f"modes to run (default {','.join(MODES)}; also {','.join(ALL_MODES[len(MODES):])})")
    g.add_argument("--rounds", type=int, default=d.rounds, help="round-robin rounds (default 5)")
    g.add_argument("--steps-per-round", type=int, default=d.steps_per_round,
                   help="steps per mode per round (default 5)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps per mode (default 3)")
    g.add_argument("--overlap-kernel", default=d.overlap_kernel,
                   choices=["auto", "fused", "foreach", "default"],
                   help="overlap's optimizer kernel: auto = post-fused's pick; default = the optimizer's "
                        "defaults, i.e. foreach bucket updates (default auto)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("output")
    g.add_argument("--out", default="bench-out", help="output directory (default bench-out/)")
    g.add_argument("--trace", default=None, metavar="PATH",
                   help="write a Chrome trace of a few overlap steps of the first configuration, "
                        "each bucket's comm and update labelled (rank 0's view)")
    g.add_argument("--trace-dir", default=None, metavar="DIR",
                   help="write such a trace for every configuration, DIR/<configuration>.json.gz")
    g.add_argument("--trace-steps", type=int, default=d.trace_steps, help="steps in the trace (default 3)")
    g.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[BenchJob, argparse.Namespace]:
    """The job described by ``argv`` and the parsed namespace."""
    a = build_parser().parse_args(argv)
    for name in ("nproc", "rounds", "steps_per_round", "threads", "batch", "width", "depth",
                 "tf_width", "tf_depth", "tf_heads", "seq_len", "vocab", "trace_steps"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    opts = BenchOptions(
        models=a.model, optimizers=a.optim, width=a.width, depth=a.depth, tf_width=a.tf_width,
        tf_depth=a.tf_depth, tf_heads=a.tf_heads, seq_len=a.seq_len, vocab=a.vocab,
        batch=a.batch, autocast=a.autocast,
        bucket_cap_mb=a.bucket_cap_mb, link_gbps=a.link_gbps, sweep_link=a.sweep_link,
        sweep_bucket=a.sweep_bucket, rounds=a.rounds, steps_per_round=a.steps_per_round,
        warmup=a.warmup, modes=a.modes, device=a.device, threads=a.threads,
        overlap_kernel=a.overlap_kernel, gradient_as_bucket_view=a.gradient_as_bucket_view,
        clip=a.clip, clip_policy=a.clip_policy, trace=a.trace, trace_dir=a.trace_dir, trace_steps=a.trace_steps, seed=a.seed,
        verbose=not a.quiet,
    )
    return BenchJob(opts, out_dir=a.out, plot=not a.no_plot), a


def main(argv: list[str] | None = None) -> int:
    job, a = parse_args(argv)
    if launched_by_torchrun():
        run_torchrun(rank_entry, a.device, job, a.timeout)
        return 0
    return spawn(rank_entry, a.nproc, a.device, job, timeout_s=a.timeout)


if __name__ == "__main__":
    # A rank under torchrun ends without finalising the interpreter (see overlap_sgd.shutdown).
    from overlap_sgd import exit_process, exit_process_on_error

    exit_process_on_error()
    exit_process(main())
