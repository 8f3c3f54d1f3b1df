"""
Train a small character-level GPT on the Python standard library's own source code with DDP,
its optimizer step hidden inside gradient communication:

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py

Train the same initial model twice on the same batches, with the overlap and with the ordinary
post-backward optimizer.step(), and compare loss curves and step times (CSV, PNG, summary):

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --mode both

Your own text instead (a file, or a folder of text files), Muon for the hidden matrices,
gradient accumulation and bf16 autocast:

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --data notes/ \\
        --optimizer muon --accumulate 4 --bf16

Checkpoint every 50 steps, kill rank 1 before step 120, let torchrun restart the job, which
resumes from step 100 and ends bit-identical to a run that never crashed:

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 examples/train_gpt.py \\
        --checkpoint-dir runs/gpt-ckpt --checkpoint-every 50 --crash-at-step 120

The global gradient norm is clipped to 1.0 (--clip, 0 turns it off), exactly, with the
updates still inside backward: steps that clip are corrected in step().

The same with FSDP2 (fully_shard on each block and on the root) instead of DDP: each block's
parameters are updated as soon as its reduce-scatter lands:

    torchrun --standalone --nproc-per-node 2 examples/train_gpt.py --fsdp --mode both

Runs on CPU with gloo, or on CUDA with NCCL when a GPU is present (--device).
"""

import argparse
import copy
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from overlap_sgd.checkpoint import checkpoint_path, checkpoint_state, latest_checkpoint, load_checkpoint, save_checkpoint

from compare_modes import MODES, Comparison, plot
from ddp_launch import crash_if_asked, start
from gpt_model import GPT, GPTConfig
from text_data import load_corpus

# -----------------------------------------------------------------------------------------------
# settings
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--mode", choices=["overlap", "post", "both"], default="overlap", help="overlap: step inside backward; post: optimizer.step() after backward; both: the two side by side, compared")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="cuda (NCCL) if available under auto, else cpu (gloo)")
parser.add_argument("--data", default=None, help="a text file or folder to train on (default: the standard library's .py files)")
parser.add_argument("--max-chars", type=int, default=3_000_000, help="read at most this many characters of text")
parser.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
parser.add_argument("--n-head", type=int, default=4, help="attention heads per block")
parser.add_argument("--n-embd", type=int, default=160, help="embedding width")
parser.add_argument("--block-size", type=int, default=64, help="context length in characters")
parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per micro-step")
parser.add_argument("--accumulate", type=int, default=1, help="micro-steps per optimizer step (no_sync on all but the last)")
parser.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="AdamW for everything, or Muon for the blocks' matrices and AdamW for the rest")
parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
parser.add_argument("--muon-lr", type=float, default=0.02, help="peak Muon learning rate (--optimizer muon)")
parser.add_argument("--weight-decay", type=float, default=0.1, help="weight decay of the matrices (vectors get none)")
parser.add_argument("--warmup-steps", type=int, default=20, help="linear learning-rate warm-up, then cosine decay to --min-lr-ratio")
parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of the peak")
parser.add_argument("--steps", type=int, default=250, help="total optimizer steps of the run (a resumed run continues up to it)")
parser.add_argument("--clip", type=float, default=1.0, help="clip the global gradient norm to this (as nanoGPT does; 0: off): clip_grad_norm_ after backward, or overlap(..., clip_grad_norm=...) corrected in step()")
parser.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and backward (parameters and optimizer stay fp32)")
parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP bucket size (DDP's default; this model fits in one bucket; smaller buckets give the overlap something to hide behind, at a fixed cost per bucket)")
parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP: fully_shard on each block and on the root (parameters, gradients and optimizer state sharded)")
parser.add_argument("--executor", choices=["auto", "thread", "inline"], default="auto", help="where overlapped updates run (auto: a worker thread on CPU, a side stream on CUDA)")
parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batches")
parser.add_argument("--eval-every", type=int, default=50, help="validation loss every this many steps (and at the end)")
parser.add_argument("--eval-batches", type=int, default=4, help="validation batches per rank")
parser.add_argument("--log-every", type=int, default=10, help="print a progress line every this many steps (live on a terminal)")
parser.add_argument("--warmup", type=int, default=10, help="steps left out of the step-time statistics")
parser.add_argument("--out-dir", default="runs/gpt", help="--mode both writes both.csv and both.png here")
parser.add_argument("--checkpoint-dir", default=None, help="resume from the newest checkpoint here, and write new ones here")
parser.add_argument("--checkpoint-every", type=int, default=0, help="write a checkpoint every this many steps (0: only at the end)")
parser.add_argument("--save-final", default=None, help="write {model, optimizer, step} here at the end (torch.save)")
parser.add_argument("--crash-at-step", type=int, default=None, help="fault injection: rank 1 SIGKILLs itself just before this step, on the first attempt only")
args = parser.parse_args()
if args.fsdp and args.optimizer == "muon":
    parser.error("--fsdp trains AdamW (Muon's update needs whole matrices, FSDP shards them)")
if args.mode == "both" and (args.checkpoint_dir or args.save_final or args.crash_at_step is not None):
    parser.error("--checkpoint-dir, --save-final and --crash-at-step apply to --mode overlap or post")
if args.clip < 0:
    parser.error(f"--clip must be 0 (off) or positive, got {args.clip}")
for name in ("steps", "batch_size", "accumulate", "block_size", "eval_every", "eval_batches", "log_every"):
    if getattr(args, name) < 1:
        parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

# -----------------------------------------------------------------------------------------------
# 1. Process group and device: torchrun's environment, gloo on CPU or NCCL on CUDA, and a
#    key-value store prefix of its own for each restart of the job (see examples/ddp_launch.py).
launch = start(args.device, "train_gpt")
rank, world_size, device, log = launch.rank, launch.world_size, launch.device, launch.log

# 2. Determinism: one intra-op thread per rank on CPU (each rank has a core) and fixed seeds make
#    every step a pure function of the weights, the optimizer state and the batch.
if device.type == "cpu":
    torch.set_num_threads(1)
torch.manual_seed(args.seed)
autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext

# 3. Data: every rank reads the same files in the same order (see examples/text_data.py) and
#    checks that the others got the same text; each rank then draws its own batches.
corpus = load_corpus(args.data, args.max_chars)
fingerprint = torch.tensor([corpus.fingerprint(), -corpus.fingerprint()], dtype=torch.float64)
agreed = fingerprint.clone()
dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
if not torch.equal(agreed, fingerprint):
    raise RuntimeError(f"rank {rank} read other text than another rank (checksum {corpus.fingerprint()})")
log(f"data: {len(corpus.train_files)} train files ({len(corpus.train):,} chars), {len(corpus.val_files)} "
    f"validation files ({len(corpus.val):,} chars) from {corpus.root}, vocabulary {corpus.vocab_size}")


def batch(split, step, micro):
    x, y = corpus.batch(split, args.seed, step, rank, micro, args.batch_size, args.block_size)
    return x.to(device), y.to(device)


# -----------------------------------------------------------------------------------------------
# model and optimizers
config = GPTConfig(corpus.vocab_size, args.block_size, args.n_layer, args.n_head, args.n_embd)
initial = GPT(config).to(device)
n_params = sum(p.numel() for p in initial.parameters())


def lr_factor(step):
    """Linear warm-up, then cosine decay to --min-lr-ratio of the peak."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build(mode):
    """A DDP model (a copy of the same initial weights), its optimizers and their schedulers.

    4. Weight decay on matrices only. With Muon, the blocks' 2-D weights go to Muon and the rest
       (embeddings, norms) to AdamW: two optimizers over disjoint parameters, overlapped by one
       overlap() call. fused=True: the post-backward step runs the fastest AdamW kernel too.
    """
    if args.fsdp:
        # 4b. FSDP2: each block is one parameter group, reduce-scattered (and, overlapped,
        #     updated) on its own; the root takes the embeddings and the final norm.
        model = net = copy.deepcopy(initial)
        for block in net.blocks:
            fully_shard(block)
        fully_shard(net)
    else:
        model = DDP(copy.deepcopy(initial), device_ids=[device.index] if launch.cuda else None, bucket_cap_mb=args.bucket_cap_mb)
        net = model.module
    params = list(net.parameters())  # the tied embedding / output weight once
    hidden = {id(p) for p in net.hidden_matrices()} if args.optimizer == "muon" else set()
    rest = [p for p in params if id(p) not in hidden]
    adamw = torch.optim.AdamW(
        [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
         {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=True,
    )
    optimizers = [adamw]
    if hidden:
        muon = torch.optim.Muon([p for p in params if id(p) in hidden], lr=args.muon_lr, weight_decay=args.weight_decay)
        optimizers = [muon, adamw]
    if mode == "overlap":
        # 5. The one-line change: each bucket's parameters are updated inside backward, as soon
        #    as the bucket's all-reduce lands. The returned optimizers replace the originals.
        #    With --clip the global gradient norm is clipped exactly as clip_grad_norm_ would.
        optimizers = overlap_sgd.overlap(model, optimizers, executor=args.executor, clip_grad_norm=args.clip or None)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in optimizers]
    return model, optimizers, schedulers


modes = list(MODES) if args.mode == "both" else [args.mode]
runs = {mode: build(mode) for mode in modes}

# 6. Resume from the newest complete checkpoint: weights, optimizer state, schedulers and step.
#    The step is also the data position: batch() depends on it alone.
step = 0
ckpt = latest_checkpoint(args.checkpoint_dir) if args.checkpoint_dir else None
if ckpt is not None:
    model, optimizers, schedulers = runs[args.mode]
    step = load_checkpoint(ckpt, model, optimizers, schedulers)["step"]
    log(f"resumed from step {step} (restart attempt {launch.attempt}) from {ckpt}")
elif launch.attempt > 0:
    log(f"restart attempt {launch.attempt}: no checkpoint to resume from, starting from step 0")
first_step = step
tokens_per_step = world_size * args.accumulate * args.batch_size * args.block_size
log(f"training: mode {args.mode} | {args.optimizer} | {world_size} ranks on {device.type} | {n_params / 1e6:.2f}M parameters "
    f"| {args.n_layer} layers, {args.n_head} heads, width {args.n_embd} | {tokens_per_step:,} tokens per step | steps {step} -> {args.steps}")

# -----------------------------------------------------------------------------------------------
# training loop: the same code for every mode


def train_step(mode, step):
    """One optimizer step of `mode`: accumulate over micro-batches, synchronise on the last."""
    model, optimizers, schedulers = runs[mode]
    total = torch.zeros((), device=device)
    for micro in range(args.accumulate):
        x, y = batch("train", step, micro)
        last = micro == args.accumulate - 1
        if args.fsdp:
            model.set_requires_gradient_sync(last)  # FSDP's no_sync
        with nullcontext() if last or args.fsdp else model.no_sync():  # no communication, no update
            with autocast():
                _, loss = model(x, y)
            (loss / args.accumulate).backward()  # overlap: the update runs in the last backward
        total += loss.detach()
    norm = None
    if args.clip:
        # The usual line; with the overlap, the optimizer's own clip_grad_norm_ takes its place.
        if mode == "overlap":
            norm = optimizers[0].clip_grad_norm_(args.clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        clipped[mode] += bool(norm > args.clip)
    for opt, sched in zip(optimizers, schedulers):
        opt.step()  # overlap: updates nothing, only closes the step; post: the whole update
        sched.step()
        opt.zero_grad(set_to_none=True)
    return total / args.accumulate, norm


@torch.no_grad()
def validation_loss(mode):
    """Mean loss over --eval-batches fixed validation batches per rank, averaged over ranks."""
    net = runs[mode][0] if args.fsdp else runs[mode][0].module
    total = torch.zeros((), device=device)
    for i in range(args.eval_batches):
        x, y = batch("val", i, 0)
        with autocast():
            total += net(x, y)[1].float()
    total /= args.eval_batches * world_size
    dist.all_reduce(total)
    return total.item()


def save(step):
    """Every rank calls it; rank 0 writes atomically while the others wait (see overlap_sgd.checkpoint)."""
    model, optimizers, schedulers = runs[args.mode]
    save_checkpoint(checkpoint_path(args.checkpoint_dir, step), checkpoint_state(model, optimizers, schedulers, step=step))
    return step


live = launch.master and sys.stdout.isatty()  # a progress line redrawn in place on a terminal
comparison = Comparison(warmup=args.warmup)
seconds = {mode: [] for mode in modes}
clipped = {mode: 0 for mode in modes}  # steps whose gradient norm was clipped
norms = {}
val = {}
saved_at, t_start, loss = first_step, time.perf_counter(), None
if step < args.steps:  # where the run starts from, for the validation curve
    val = {mode: validation_loss(mode) for mode in modes}
    comparison.add_val(step, val)
    log(f"step {step:5d}/{args.steps} | val {' / '.join(f'{val[m]:.4f}' for m in modes)}")
while step < args.steps:
    crash_if_asked(launch, step, args.crash_at_step)

    # 7. In --mode both the two runs take turns, the first one alternating from step to step,
    #    so that drifts in machine speed affect both alike.
    order = modes if step % 2 == 0 else modes[::-1]
    losses, took = {}, {}
    for mode in order:
        t0 = time.perf_counter()
        losses[mode], norms[mode] = train_step(mode, step)
        if launch.cuda:
            torch.cuda.synchronize()
        took[mode] = time.perf_counter() - t0
        seconds[mode].append(took[mode])
    step += 1

    # One small all-reduce outside the timed region: the mean loss over ranks, per mode.
    mean = torch.stack([losses[m] for m in modes]) / world_size
    dist.all_reduce(mean)
    loss = dict(zip(modes, mean.tolist()))
    if args.mode == "both":
        comparison.add(step, loss, took)
    if step % args.eval_every == 0 or step == args.steps:
        val = {mode: validation_loss(mode) for mode in modes}
        comparison.add_val(step, val)

    # 8. Progress: step, loss, step time, tokens/s and time left.
    if launch.master and (live or step % args.log_every == 0 or step == args.steps):
        recent = {m: seconds[m][-args.log_every:] for m in modes}
        per_step = sum(sum(v) / len(v) for v in recent.values())
        eta = per_step * (args.steps - step)
        parts = [f"step {step:5d}/{args.steps}"]
        parts += [f"loss {' / '.join(f'{loss[m]:.4f}' for m in modes)}"]
        if args.clip:
            parts += [f"norm {' / '.join(f'{float(norms[m]):.3f}' for m in modes)}"]
        parts += [f"{' / '.join(f'{1e3 * sum(recent[m]) / len(recent[m]):6.1f}' for m in modes)} ms"]
        parts += [f"{' / '.join(f'{tokens_per_step * len(recent[m]) / sum(recent[m]):6,.0f}' for m in modes)} tok/s"]
        parts += [f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"]
        if step in comparison.val:
            parts += [f"val {' / '.join(f'{val[m]:.4f}' for m in modes)}"]
        line = " | ".join(parts) + (f"   ({' / '.join(modes)})" if len(modes) > 1 else "")
        keep = step % args.log_every == 0 or step == args.steps
        if live:
            print("\r\033[K" + line, end="\n" if keep else "", flush=True)
        else:
            print(line, flush=True)
    if args.checkpoint_dir and args.checkpoint_every and step % args.checkpoint_every == 0:
        saved_at = save(step)

# 9. Wrap up: a last checkpoint (a rerun then resumes at the end), the final state, a summary.
if args.checkpoint_dir and saved_at != step:
    saved_at = save(step)
if args.save_final:
    model, optimizers, _ = runs[args.mode]
    if args.fsdp:  # sharded: every rank writes its shards, into args.save_final with .dcp
        save_checkpoint(args.save_final, checkpoint_state(model, optimizers, step=step))
    else:
        states = [o.state_dict() for o in optimizers]
        save_checkpoint(args.save_final, {"model": model.module.state_dict(), "optimizer": states[0] if len(states) == 1 else states, "step": step})

if loss is None:
    log(f"summary: mode {args.mode} | nothing to do, already at step {step}")
elif args.mode != "both":
    timed = sorted(seconds[args.mode][args.warmup:] or seconds[args.mode])
    median = timed[len(timed) // 2]
    log(f"summary: mode {args.mode} | {args.optimizer} | steps {first_step} -> {step} | median step {1e3 * median:.2f} ms "
        f"| {tokens_per_step / median:,.0f} tok/s | final loss {loss[args.mode]:.4f} | validation loss {val[args.mode]:.4f} "
        f"| clipped {clipped[args.mode]} steps | {time.perf_counter() - t_start:.0f} s")
elif launch.master:
    s = comparison.summary()
    out = Path(args.out_dir)
    csv_path = comparison.write_csv(out / "both.csv")
    png_path = plot(comparison, out / "both.png")
    same = "identical at every step" if s["max_loss_diff"] == 0 else (
        "within rounding: a clipped step's correction rounds once more than clipping first")
    print(f"summary: overlap vs post-backward step | {world_size} ranks on {device.type} | {n_params / 1e6:.2f}M parameters "
          f"| {args.optimizer}{' + bf16' if args.bf16 else ''} | {s['steps']} steps of {tokens_per_step:,} tokens "
          f"| {time.perf_counter() - t_start:.0f} s", flush=True)
    print(f"  loss curves:      largest |overlap - post| {s['max_loss_diff']:.3g} over {s['steps']} steps ({same})", flush=True)
    print(f"  validation loss:  overlap {s['val_overlap']:.4f} | post {s['val_post']:.4f}", flush=True)
    if args.clip:
        print(f"  clipping:         max_norm {args.clip:g} | clipped steps overlap {clipped['overlap']} "
              f"| post {clipped['post']} of {s['steps']}", flush=True)
    print(f"  median step:      overlap {s['median_ms_overlap']:.1f} ms | post {s['median_ms_post']:.1f} ms "
          f"| overlap/post {s['ratio']:.3f} (after {args.warmup} warm-up steps)", flush=True)
    if png_path is not None:
        print(f"  plot:             {png_path} (data: {csv_path})", flush=True)
    else:
        print(f"  data:             {csv_path} (install matplotlib, the 'plot' extra, for a PNG of it)", flush=True)
launch.close()
