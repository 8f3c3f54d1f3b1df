"""python wheel_smoke.py [--expect SOURCE_PACKAGE_DIR]   (run from outside the checkout)

A smoke test of an installed overlap-sgd, as a user gets it from the wheel: `tools/wheel_smoke.sh`
installs the wheel into a fresh venv and runs this file from a temporary directory, so that
`import overlap_sgd` cannot pick up the source tree.

1. Every module of the package imports, from site-packages. With `--expect`, the modules are
   those of the source package at that path (the checkout's `overlap_sgd/`), so a module left
   out of the wheel fails here even when nothing imports it eagerly.
2. Two gloo ranks on 127.0.0.1 train a small MLP for a few steps twice from the same weights
   on the same batches: `overlap(ddp, torch.optim.AdamW(...))`, and DDP with the post-backward
   `AdamW.step()`. The parameters must be equal bit for bit (with two ranks both sides average
   exactly and run the same kernel) and must have moved.

Exits 0 and prints `wheel smoke: ok` when both hold.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import multiprocessing as mp
import pkgutil
import sys
import tempfile
from pathlib import Path

WORLD_SIZE = 2  # ranks, one gloo process each
STEPS = 5  # training steps per mode
TIMEOUT_S = 120  # a rank that takes longer fails the smoke test


def check_imports(expect: Path | None) -> list[str]:
    """Import every module of the installed package; return their names."""
    import overlap_sgd

    here = Path(overlap_sgd.__file__).resolve().parent
    if expect is not None and here == expect.resolve():
        sys.exit(f"overlap_sgd was imported from the source tree ({here}), not the installed wheel")
    installed = {m.name for m in pkgutil.walk_packages(overlap_sgd.__path__, "overlap_sgd.")}
    wanted = {"overlap_sgd", *installed}
    if expect is not None:
        wanted |= {
            ".".join(("overlap_sgd", *p.relative_to(expect).with_suffix("").parts)).removesuffix(".__init__")
            for p in expect.rglob("*.py")
        }
    for name in sorted(wanted):
        importlib.import_module(name)  # raises ModuleNotFoundError for a module the wheel lacks
    return sorted(wanted)


def _rank(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import overlap_sgd

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, WORLD_SIZE, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=timeout)

    def model() -> DistributedDataParallel:
        torch.manual_seed(0)  # the same weights for both modes and on every rank
        net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        return DistributedDataParallel(net, bucket_cap_mb=0.001)  # several buckets

    overlapped, post = model(), model()
    start = [p.detach().clone() for p in post.parameters()]
    # Both sides name the same kernel (fused), so that equal gradients give equal updates.
    opt = overlap_sgd.overlap(overlapped, torch.optim.AdamW(overlapped.parameters(), lr=1e-2, fused=True))
    post_opt = torch.optim.AdamW(post.parameters(), lr=1e-2, fused=True)
    for step in range(STEPS):
        g = torch.Generator().manual_seed(1000 * step + rank)  # each rank its own batch
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        torch.nn.functional.mse_loss(overlapped(x), y).backward()  # updated in here
        opt.step()
        opt.zero_grad()
        torch.nn.functional.mse_loss(post(x), y).backward()
        post_opt.step()
        post_opt.zero_grad()
    pairs = [(a.detach(), b.detach()) for a, b in zip(overlapped.parameters(), post.parameters())]
    result = {
        "equal": all(torch.equal(a, b) for a, b in pairs),
        "largest_difference": max(float((a - b).abs().max()) for a, b in pairs),
        "moved": all(not torch.equal(s, b) for s, (_, b) in zip(start, pairs)),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
    overlap_sgd.exit_process()  # no interpreter finalisation: see overlap_sgd.shutdown


def check_training() -> list[dict]:
    """Run the two ranks; return each rank's comparison."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # bound: a free port
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        ranks = [ctx.Process(target=_rank, args=(r, store.port, out)) for r in range(WORLD_SIZE)]
        for p in ranks:
            p.start()
        for p in ranks:
            p.join(TIMEOUT_S)
        for r, p in enumerate(ranks):
            if p.is_alive():
                p.kill()
                sys.exit(f"rank {r} did not finish within {TIMEOUT_S} s")
            if p.exitcode != 0:
                sys.exit(f"rank {r} failed with exit status {p.exitcode}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--expect", type=Path, help="the source package whose modules must all be installed")
    args = parser.parse_args()

    import overlap_sgd
    import torch

    modules = check_imports(args.expect)
    print(f"wheel smoke: overlap_sgd {overlap_sgd.__version__} from {Path(overlap_sgd.__file__).parent}, "
          f"torch {torch.__version__}; {len(modules)} modules import")
    results = check_training()
    for r, res in enumerate(results):
        print(f"wheel smoke: rank {r}: overlap == post-backward AdamW: {res['equal']} "
              f"(largest difference {res['largest_difference']:.3g}), parameters moved: {res['moved']}")
    if not all(res["equal"] and res["moved"] for res in results):
        sys.exit("wheel smoke: FAILED: the overlapped training differs from the post-backward step")
    print("wheel smoke: ok")


if __name__ == "__main__":
    main()
