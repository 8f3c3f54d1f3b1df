"""
Train a small MLP with DDP, its optimizer step hidden inside gradient communication:

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py

The same training with the ordinary post-backward optimizer.step(), for comparison:

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --mode post

Checkpoint every 20 steps, kill rank 1 before step 50, and let torchrun restart the job, which
resumes from step 40 and ends bit-identical to a run that never crashed:

    torchrun --standalone --nproc-per-node 2 --max-restarts 1 examples/train_ddp.py \\
        --checkpoint-dir runs/demo --checkpoint-every 20 --crash-at-step 50

The same job as two nodes of one process each (here both on this machine; on a cluster, run
the command on each node with its --node-rank and the first node's address):

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint 127.0.0.1:29400 examples/train_ddp.py      # and --node-rank 1

A checkpoint resumes on any number of ranks (every rank holds the whole optimizer state):
rerun with another --nproc-per-node and the same --checkpoint-dir.

Each rank keeping the optimizer state of only its share of the model (ZeRO-1), updated inside
backward all the same; checkpoints then hold each rank's share, written in parallel, and resume
on any number of ranks too:

    torchrun --standalone --nproc-per-node 2 examples/train_ddp.py --shard --checkpoint-dir runs/shard

Runs on CPU with gloo, or on CUDA with NCCL when a GPU is present (--device).
"""

import argparse
import math
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
from ddp_launch import crash_if_asked, start
from overlap_sgd.checkpoint import (
    checkpoint_path,
    checkpoint_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

# -----------------------------------------------------------------------------------------------
# settings
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--mode", choices=["overlap", "post"], default="overlap", help="overlap: step inside backward; post: optimizer.step() after backward")
parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="cuda (NCCL) if available under auto, else cpu (gloo)")
parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="SGD with momentum, or AdamW")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 0.5 for sgd, 3e-3 for adamw)")
parser.add_argument("--schedule", choices=["cosine", "step"], default="cosine", help="LR schedule, stepped once per step: cosine decay, or halving every third of the run")
parser.add_argument("--steps", type=int, default=200, help="total optimizer steps of the run (a resumed run continues up to it)")
parser.add_argument("--batch-size", type=int, default=64, help="samples per rank per step")
parser.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
parser.add_argument("--depth", type=int, default=4, help="hidden layers of the MLP")
parser.add_argument("--bucket-cap-mb", type=float, default=0.25, help="DDP bucket size; small buckets give the overlap something to hide behind")
parser.add_argument("--executor", choices=["auto", "thread", "inline"], default="auto", help="where overlapped updates run (auto: a worker thread on CPU, a side stream on CUDA)")
parser.add_argument("--shard", action="store_true", help="with --mode overlap: each rank keeps the optimizer state of only its share of every bucket (ZeRO-1); checkpoints then hold each rank's share")
parser.add_argument("--clip", type=float, default=0.0, help="clip the global gradient norm to this (0: off): clip_grad_norm_ after backward, or through the overlap")
parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the data")
parser.add_argument("--log-every", type=int, default=10, help="print loss and step time every this many steps")
parser.add_argument("--warmup", type=int, default=5, help="steps left out of the mean step time in the summary")
parser.add_argument("--checkpoint-dir", default=None, help="resume from the newest checkpoint here, and write new ones here")
parser.add_argument("--checkpoint-every", type=int, default=0, help="write a checkpoint every this many steps (0: only at the end)")
parser.add_argument("--save-final", default=None, help="write {model, optimizer, step} here at the end (torch.save)")
parser.add_argument("--pg-timeout", type=float, default=None, help="seconds a collective may wait for a peer before it fails with an error (default: torch's, 30 min for gloo)")
parser.add_argument("--crash-at-step", type=int, default=None, help="fault injection: rank 1 SIGKILLs itself just before this step, on the first attempt only")
parser.add_argument("--stall-at-step", type=int, default=None, help="fault injection: rank 1 stops responding for 3 x --pg-timeout (60 s without) just before this step, on the first attempt only")
args = parser.parse_args()
if args.shard and args.mode != "overlap":
    parser.error("--shard shards the overlapped optimizer: use it with --mode overlap")
if args.pg_timeout is not None and not args.pg_timeout > 0:
    parser.error(f"--pg-timeout must be a positive number of seconds, got {args.pg_timeout}")

# -----------------------------------------------------------------------------------------------
# 1. Process group and device: torchrun's environment, gloo on CPU or NCCL on CUDA, a key-value
#    store prefix of its own for each restart of the job, and --pg-timeout for the collectives
#    from then on (see examples/ddp_launch.py).
launch = start(args.device, "train_ddp", args.pg_timeout)
rank, world_size, device, attempt = launch.rank, launch.world_size, launch.device, launch.attempt
use_cuda, log = launch.cuda, launch.log

# 2. Determinism: one intra-op thread and fixed seeds make every step a pure function of the
#    weights, the optimizer state and the batch. The overlapped update runs on a worker thread,
#    but each bucket's update is an elementwise function of that bucket alone, so the order in
#    which buckets finish does not change the result.
torch.set_num_threads(1)
torch.manual_seed(args.seed)

# -----------------------------------------------------------------------------------------------
# model and data
IN, OUT = 32, 8


def mlp():
    layers, width = [], IN
    for _ in range(args.depth):
        layers += [nn.Linear(width, args.width), nn.Tanh()]
        width = args.width
    layers.append(nn.Linear(width, OUT))
    return nn.Sequential(*layers)


# The task: regress a fixed random "teacher" function of the input.
teacher = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(args.seed)) / math.sqrt(IN)


def batch(step, rank):
    """The batch of `rank` at `step`: a function of (seed, step, rank) only, so a resumed run
    reads exactly the data the interrupted one would have, and no data-loader state needs saving."""
    g = torch.Generator().manual_seed((args.seed * 1_000_003 + step) * 1_009 + rank)
    x = torch.randn(args.batch_size, IN, generator=g)
    y = torch.tanh(2 * x @ teacher)
    return x.to(device), y.to(device)


model = DDP(mlp().to(device), device_ids=[device.index] if use_cuda else None, bucket_cap_mb=args.bucket_cap_mb)

# 3. The optimizer: decay weights, not biases (two param groups, one update kernel each per
#    bucket). With --mode overlap, overlap() registers the DDP comm hook that updates each
#    bucket as soon as its all-reduce lands; the returned optimizer replaces the original
#    everywhere, the scheduler and checkpoints included.
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
groups = [{"params": decay, "weight_decay": 1e-4 if args.optimizer == "sgd" else 1e-2}, {"params": no_decay, "weight_decay": 0.0}]
if args.optimizer == "sgd":
    optimizer = torch.optim.SGD(groups, lr=args.lr or 0.5, momentum=0.9)
else:
    optimizer = torch.optim.AdamW(groups, lr=args.lr or 3e-3)
if args.mode == "overlap":
    optimizer = overlap_sgd.overlap(model, optimizer, executor=args.executor, shard=args.shard,
                                    clip_grad_norm=args.clip or None)
if args.schedule == "cosine":
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.steps, eta_min=0.1 * optimizer.param_groups[0]["lr"])
else:
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, args.steps // 3), gamma=0.5)

# 4. Resume from the newest complete checkpoint: weights, optimizer state, scheduler and step.
#    The step is also the data position, since batch() depends on it alone. Every rank loads
#    the same file, so the replicas stay identical.
step = 0
ckpt = latest_checkpoint(args.checkpoint_dir) if args.checkpoint_dir else None
if ckpt is not None:
    step = load_checkpoint(ckpt, model, optimizer, scheduler)["step"]
    log(f"resumed from step {step} (restart attempt {attempt}) from {ckpt}")
elif attempt > 0:
    log(f"restart attempt {attempt}: no checkpoint to resume from, starting from step 0")
first_step = step
log(f"training: mode {args.mode} | optimizer {args.optimizer} | {world_size} ranks on {device.type} "
    f"| {sum(p.numel() for p in model.parameters())} parameters | steps {step} -> {args.steps}")

# -----------------------------------------------------------------------------------------------
# training loop: the same code for both modes


def save(step):
    """Every rank calls it; rank 0 writes atomically while the others wait (see overlap_sgd.checkpoint)."""
    save_checkpoint(checkpoint_path(args.checkpoint_dir, step), checkpoint_state(model, optimizer, scheduler, step=step))
    return step


times, loss, saved_at = [], None, first_step
while step < args.steps:
    # 5. Fault injection, on the first attempt only: a hard kill, with no chance to clean up, or a
    #    stall, which the other ranks see only as a collective that does not complete.
    crash_if_asked(launch, step, args.crash_at_step, args.stall_at_step)

    x, y = batch(step, rank)
    t0 = time.perf_counter()
    loss = F.mse_loss(model(x), y)
    loss.backward()  # overlap: each bucket's parameters are updated in here, as its all-reduce lands
    if args.clip and args.mode == "overlap":
        optimizer.clip_grad_norm_(args.clip)  # takes the place of the line below
    elif args.clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optimizer.step()  # overlap: updates nothing, only closes the step; post: the whole update
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if use_cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
    step += 1

    if step % args.log_every == 0 or step == args.steps:
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        log(f"step {step:5d} | loss {mean_loss.item() / world_size:.6f} | lr {scheduler.get_last_lr()[0]:.2e} | {times[-1] * 1e3:7.2f} ms")
    if args.checkpoint_dir and args.checkpoint_every and step % args.checkpoint_every == 0:
        saved_at = save(step)

# 6. Wrap up: a last checkpoint (so that a rerun resumes at the end), the final state, a summary.
if args.checkpoint_dir and saved_at != step:
    saved_at = save(step)
if args.save_final:
    save_checkpoint(args.save_final, {"model": model.module.state_dict(), "optimizer": optimizer.state_dict(), "step": step})
if loss is None:
    log(f"summary: mode {args.mode} | nothing to do, already at step {step}")
else:
    final = loss.detach().clone()
    dist.all_reduce(final)
    timed = times[args.warmup:] or times
    log(f"summary: mode {args.mode} | optimizer {args.optimizer} | steps {first_step} -> {step} "
        f"| mean step {1e3 * sum(timed) / len(timed):.2f} ms over {len(timed)} steps after {len(times) - len(timed)} warm-up "
        f"| final loss {final.item() / world_size:.6f}")

# 7. Leave the job and exit without finalising the interpreter (see examples/ddp_launch.py).
launch.close()
