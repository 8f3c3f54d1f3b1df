"""
Train the character-level GPT of examples/train_gpt.py with Hugging Face Accelerate, the
optimizer step hidden inside gradient communication (needs the `accelerate` extra):

    torchrun --standalone --nproc-per-node 2 examples/train_accelerate.py
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py   # the same

(`accelerate launch --multi_gpu` starts the processes with torchrun, also on a machine without a
GPU, where the script's Accelerator(cpu=True) then uses gloo; `--cpu` would start one process.)

The same loop without the overlap, for comparison; then continue a run from its saved state:

    torchrun --standalone --nproc-per-node 2 examples/train_accelerate.py --mode post
    torchrun --standalone --nproc-per-node 2 examples/train_accelerate.py --resume runs/accelerate --steps 120

On CPU the ranks use gloo (Accelerator(cpu=True)); with GPUs, NCCL.
"""

import argparse
import math

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

import overlap_sgd

from gpt_model import GPT, GPTConfig
from text_data import load_corpus

# -----------------------------------------------------------------------------------------------
# settings
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--mode", choices=["overlap", "post"], default="overlap", help="overlap: step inside backward; post: optimizer.step() after backward")
parser.add_argument("--steps", type=int, default=60, help="optimizer steps (a resumed run continues up to it)")
parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per optimizer step (accelerator.accumulate)")
parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per micro-batch")
parser.add_argument("--block-size", type=int, default=64, help="context length in characters")
parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
parser.add_argument("--clip", type=float, default=1.0, help="clip the global gradient norm to this (through the overlap; 0: off)")
parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="Accelerate's mixed precision (fp16 needs a gradient scaler, which the overlap refuses)")
parser.add_argument("--save-dir", default="runs/accelerate", help="accelerator.save_state() writes the final state here")
parser.add_argument("--resume", default=None, help="accelerator.load_state() from this folder first")
parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the batches")
args = parser.parse_args()

# -----------------------------------------------------------------------------------------------
# 1. The Accelerator joins the launcher's process group; cpu=True selects gloo when no GPU is
#    present (on a CPU-only machine it would otherwise fall back to a single process).
accelerator = Accelerator(
    cpu=not torch.cuda.is_available(),
    mixed_precision=args.mixed_precision,
    gradient_accumulation_steps=args.accumulate,
    kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=1.0)],
)
rank, world_size = accelerator.process_index, accelerator.num_processes
overlap_sgd.exit_process_on_error()  # an uncaught error ends the rank with status 1, not an abort at exit
torch.manual_seed(args.seed)
if accelerator.device.type == "cpu":
    torch.set_num_threads(1)

corpus = load_corpus(max_chars=1_000_000)
net = GPT(GPTConfig(corpus.vocab_size, args.block_size))
decay = [p for p in net.parameters() if p.dim() >= 2]
no_decay = [p for p in net.parameters() if p.dim() < 2]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.95), fused=True)
# A prepared scheduler is stepped once per process at every optimizer step (Accelerate's
# convention for data sharded over processes): warm-up and cosine decay span steps x processes.
ticks = args.steps * world_size
scheduler = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda t: min(1.0, (t + 1) / (10 * world_size)) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, t / ticks))))

# 2. prepare() wraps the model in DDP and the optimizer in an AcceleratedOptimizer. overlap()
#    accepts both: it overlaps the torch optimizer inside and returns the same
#    AcceleratedOptimizer, which then skips step() and zero_grad() on accumulation micro-steps
#    as before. The global gradient norm is clipped through the overlap (clip_grad_norm):
#    accelerator.clip_grad_norm_ after backward would come too late (step() warns).
model, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
if args.mode == "overlap":
    optimizer = overlap_sgd.overlap(model, optimizer, clip_grad_norm=args.clip or None)

# 3. Resume: model, optimizer (the same state dict with or without the overlap), scheduler, RNG.
step = 0
if args.resume:
    accelerator.load_state(args.resume)
    step = torch.load(f"{args.resume}/step.pt", weights_only=True)
    accelerator.print(f"resumed from step {step} from {args.resume}")
accelerator.print(f"training: mode {args.mode} | {world_size} ranks on {accelerator.device.type} "
                  f"| {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters | steps {step} -> {args.steps}")

# -----------------------------------------------------------------------------------------------
# training loop
while step < args.steps:
    for micro in range(args.accumulate):
        x, y = corpus.batch("train", args.seed, step, rank, micro, args.batch_size, args.block_size)
        with accelerator.accumulate(model):  # no_sync() on all but the last micro-batch
            _, loss = model(x.to(accelerator.device), y.to(accelerator.device))
            accelerator.backward(loss)  # overlap: the last micro-batch's backward updates
            if args.mode == "post" and args.clip and accelerator.sync_gradients:
                # The global norm; the overlapped optimizer's step() does the same (clip_grad_norm).
                accelerator.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    step += 1
    if step % 10 == 0 or step == args.steps:
        mean = accelerator.reduce(loss.detach(), reduction="mean")
        accelerator.print(f"step {step:4d} | loss {mean.item():.4f} | lr {scheduler.get_last_lr()[0]:.2e}")

# 4. Save everything Accelerate knows about, plus the step counter.
accelerator.save_state(args.save_dir)
if accelerator.is_main_process:
    torch.save(step, f"{args.save_dir}/step.pt")
accelerator.wait_for_everyone()
accelerator.end_training()

# 5. Leave the job and exit without finalising the interpreter: with gloo, torch's worker threads
#    may still be releasing the last collectives while it finalises, which aborts a process that
#    trained correctly (see overlap_sgd/shutdown.py for the evidence).
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
overlap_sgd.exit_process()
