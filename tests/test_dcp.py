"""Distributed checkpoints of overlapped optimizers (``overlap_sgd.dcp``): a sharded optimizer
saved by two ranks resumes on one, two and three ranks, before or after DDP's bucket rebuild,
with each rank writing and reading only its share; checkpoints move between sharded, unsharded
and plain torch optimizers (torch's own DCP helpers included); a checkpoint that does not match
raises before anything changes.

Every resumed run is compared with two references that trained on the same data:

- the same sharded optimizer given the whole saved state through ``load_state_dict`` (the
  gathered format): the same kernels on the same number of ranks from the same state, so
  bit-identical; on two ranks also the run that saved, never interrupted: bit-identical;
- DDP with a post-backward ``torch.optim`` step, loaded the same way: equal within rounding,
  since the overlapped update runs torch's multi-tensor or fused kernel on gradients that a
  reduce-scatter summed (and divides by the world size inside the kernel), where the reference
  runs the optimizer's default kernel on DDP's averaged all-reduce; over three ranks the two
  sums also add in different orders.
"""

from __future__ import annotations

import copy
import doctest
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.nn.parallel import DistributedDataParallel as DDP

import overlap_sgd
import overlap_sgd.blocks
import overlap_sgd.dcp
from overlap_sgd.blocks import RangeBlocks, blocks
from overlap_sgd.dcp import load_optimizer_state_dict, optimizer_state_dict
from tests.distributed import run_distributed
from tests.models import Net, assert_identical, batch

SAVE_WORLD = 2
AFTER = 3  # steps trained after the checkpoint
BUCKET_MB = 0.004  # ~1000 floats: several buckets, regrouped by DDP after the first iteration


class Strided(torch.nn.Module):
    """A channels_last convolution and a transposed matrix: state split by ranges of memory
    that is not row-major in the parameters' own dims."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
        self.mat = torch.nn.Parameter(torch.randn(4, 8).t())  # shape (8, 4), strides (1, 8)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x.to(memory_format=torch.channels_last))).mean(dim=(2, 3))
        return self.head(torch.tanh(h @ self.mat))


@dataclass(frozen=True)
class Case:
    name: str
    optimizers: str = "adamw"
    net: str = "mlp"
    #: Steps trained before saving: 1 saves before DDP regroups its buckets.
    save_at: int = 4
    #: (world size, steps trained on other data before loading) of each resumed run.
    loads: tuple[tuple[int, int], ...] = ((3, 0),)
    atol: float = 1e-6
    rtol: float = 1e-5
    device: str = "cpu"


CASES = [
    Case("adamw-before-rebuild", save_at=1, loads=((2, 0), (3, 3))),
    Case("adamw-after-rebuild", save_at=4, loads=((1, 0), (2, 3), (3, 0))),
    # Whole-tensor optimizers keep each parameter's state whole on one rank.
    Case("adafactor", "adafactor", save_at=3, loads=((3, 2), (1, 0))),
    Case("muon-and-adamw", "muon+adamw", save_at=3, loads=((3, 0),), atol=1e-5, rtol=1e-4),
    Case("strided-sgd", "sgd", net="strided", save_at=2, loads=((3, 0), (2, 2))),
    # A weight used twice has one name; a frozen layer's parameters, held but never stepped,
    # have no state.
    Case("tied-and-frozen", net="tied-frozen", save_at=3, loads=((3, 0),)),
]


def _net(case: Case) -> torch.nn.Module:
    if case.net == "strided":
        return Strided().to(case.device)
    tied = case.net == "tied-frozen"
    return Net(reverse=True, depth=4, tied=tied, frozen=tied).to(case.device)


def _data(case: Case, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    if case.net != "strided":
        x, y = batch(step, rank)
    else:
        g = torch.Generator().manual_seed(step * 1009 + rank)
        x, y = torch.randn(6, 3, 8, 8, generator=g), torch.randn(6, 4, generator=g)
    return x.to(case.device), y.to(case.device)


def _optimizers(kind: str, model: torch.nn.Module) -> list[torch.optim.Optimizer]:
    params = list(model.parameters())
    if kind == "adamw":
        return [torch.optim.AdamW(params, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)]
    if kind == "sgd":
        return [torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True)]
    if kind == "adafactor":
        return [torch.optim.Adafactor(params, lr=0.01)]
    module = model.module if isinstance(model, DDP) else model
    named = list(module.named_parameters())
    matrices = [p for n, p in named if p.dim() == 2 and n.startswith("body")]
    rest = [p for n, p in named if not any(p is m for m in matrices)]
    return [torch.optim.Muon(matrices, lr=0.02, momentum=0.9), torch.optim.AdamW(rest, lr=0.01)]


def _sharded(case: Case, seed: int) -> tuple[DDP, list]:
    torch.manual_seed(seed)
    model = DDP(_net(case), bucket_cap_mb=BUCKET_MB)
    return model, overlap_sgd.overlap(model, _optimizers(case.optimizers, model), shard=True)


def _train(model: DDP, opts: list, steps: range, rank: int, case: Case) -> None:
    for step in steps:
        x, y = _data(case, step, rank)
        F.mse_loss(model(x), y).backward()
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad()


def _held(opts: list) -> int:
    """Elements of state tensors (with dimensions) this rank holds."""
    return sum(v.numel() for o in opts for st in o.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _whole(state_dicts: list[dict]) -> int:
    return sum(v.numel() for sd in state_dicts for st in sd["state"].values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0)


def _moved(model: DDP) -> int:
    return model._overlap_sgd_state.shards.moved


class _CountingReader(dcp.FileSystemReader):
    """Counts the elements of optimizer state tensors (with dimensions) DCP is asked to read."""

    elements = 0

    def read_data(self, plan, planner):
        for item in plan.items:
            if item.type == LoadItemType.TENSOR and item.dest_index.fqn.startswith("optimizer.state."):
                if len(item.lengths) > 0:
                    self.elements += item.lengths.numel()
        return super().read_data(plan, planner)


def _load_model(model: DDP, path: Path) -> None:
    state = {"model": model.module.state_dict()}
    dcp.load(state, checkpoint_id=path)
    model.module.load_state_dict(state["model"])


# -- the ranks' bodies -----------------------------------------------------------------------


def _save(rank: int, world: int, case: Case, root: Path) -> dict:
    model, opts = _sharded(case, seed=0)
    _train(model, opts, range(case.save_at), rank, case)
    dcp.save({"model": model.module.state_dict(), "optimizer": optimizer_state_dict(model, opts)},
             checkpoint_id=root / "dcp")
    held = _held(opts)
    whole = [o.state_dict() for o in opts]  # gathered: a collective
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "optimizers": whole}, root / "whole.pt")
    _train(model, opts, range(case.save_at, case.save_at + AFTER), rank, case)
    if rank == 0:
        torch.save(model.module.state_dict(), root / "uninterrupted.pt")
    return {"held": held, "whole": _whole(whole), "moved": _moved(model)}


def _resume(rank: int, world: int, case: Case, root: Path, before: int) -> dict:
    saved = torch.load(root / "whole.pt", weights_only=True)
    # The DCP-loaded run; `before` steps on other data first lay out (and regroup) the buckets.
    model, opts = _sharded(case, seed=1)
    _train(model, opts, range(100, 100 + before), rank, case)
    moved = _moved(model)
    _load_model(model, root / "dcp")
    reader = _CountingReader(root / "dcp")
    load_optimizer_state_dict(model, opts, root / "dcp", storage_reader=reader)
    held = _held(opts)
    assert reader.elements == held, (reader.elements, held)  # read exactly its share
    names = {id(p): n for n, p in model.module.named_parameters()}
    # Parameters with saved state of which this rank holds none.
    without = sorted(names[id(p)] for o, sd in zip(opts, saved["optimizers"])
                     for i, p in enumerate(q for g in o.param_groups for q in g["params"])
                     if i in sd["state"] and p not in o.state)
    for o, want in zip(opts, saved["optimizers"]):
        assert_identical(want, o.state_dict(), "loaded state")

    # The references: the whole state through load_state_dict, sharded (after the same steps
    # on other data: DDP's bucket layout decides the order a reduce-scatter over three ranks
    # sums in) and post-backward.
    ref, ref_opts = _sharded(case, seed=2)
    _train(ref, ref_opts, range(100, 100 + before), rank, case)
    post = DDP(_net(case), bucket_cap_mb=BUCKET_MB)
    post_opts = _optimizers(case.optimizers, post)
    for m, os_ in ((ref, ref_opts), (post, post_opts)):
        m.module.load_state_dict(saved["model"])
        for o, sd in zip(os_, saved["optimizers"]):
            o.load_state_dict(copy.deepcopy(sd))
    start = [p.detach().clone() for p in model.parameters()]
    steps = range(case.save_at, case.save_at + AFTER)
    for m, os_ in ((model, opts), (ref, ref_opts), (post, post_opts)):
        _train(m, os_, steps, rank, case)

    for p, q, r, p0 in zip(model.parameters(), ref.parameters(), post.parameters(), start):
        assert torch.equal(p, q), "differs from the run loaded with load_state_dict"
        torch.testing.assert_close(p, r, atol=case.atol, rtol=case.rtol)
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), p0) != p.requires_grad, "trained if and only if not frozen"
    for o, o_ref in zip(opts, ref_opts):
        assert_identical(o_ref.state_dict(), o.state_dict(), "state after training")
    if world == SAVE_WORLD:
        uninterrupted = torch.load(root / "uninterrupted.pt", weights_only=True)
        assert_identical(uninterrupted, model.module.state_dict(), "uninterrupted run")
    if before:  # the state was loaded where the next backward looked for it: nothing moved
        assert _moved(model) == moved, (moved, _moved(model))
    else:  # ... and moved only when DDP regrouped its buckets, as the reference's did
        assert _moved(model) == _moved(ref), (_moved(model), _moved(ref))
    return {"held": held, "whole": _whole(saved["optimizers"]), "without": without}


# -- tests -----------------------------------------------------------------------------------


def _written_per_rank(path: Path) -> dict[int, int]:
    """Elements of optimizer state tensors (with dimensions) each rank wrote, from the
    checkpoint's metadata (rank r writes the files ``__r_*.distcp``)."""
    md = dcp.FileSystemReader(path).read_metadata()
    out: dict[int, int] = {}
    for key, tmd in md.state_dict_metadata.items():
        if not key.startswith("optimizer.state.") or not isinstance(tmd, TensorStorageMetadata):
            continue
        if len(tmd.size) == 0:
            continue
        for i, chunk in enumerate(tmd.chunks):
            info = md.storage_data[MetadataIndex(key, chunk.offsets, i)]
            rank = int(info.relative_path.split("_")[2])
            out[rank] = out.get(rank, 0) + chunk.sizes.numel()
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_sharded_checkpoint_resumes_on_any_number_of_ranks(case: Case, tmp_path: Path) -> None:
    saved = run_distributed(_save, SAVE_WORLD, case, tmp_path, timeout=120)
    whole = saved[0]["whole"]
    # Each rank held part of the state and wrote exactly that part.
    written = _written_per_rank(tmp_path / "dcp")
    assert written == {r: s["held"] for r, s in enumerate(saved)}, (written, saved)
    assert all(0 < s["held"] < whole for s in saved) and sum(written.values()) == whole
    if case.net != "strided":
        assert saved[0]["moved"] > 0  # DDP regrouped its buckets: states moved
    for world, before in case.loads:
        resumed = run_distributed(_resume, world, case, tmp_path, before, timeout=120)
        assert sum(r["held"] for r in resumed) == whole
        if world > 1:
            assert all(0 < r["held"] < whole for r in resumed), [r["held"] for r in resumed]
        if world == 3 and case.optimizers in ("adamw", "sgd"):
            # Some parameter has no piece on some rank: that rank holds no state for it.
            assert any(r["without"] for r in resumed)


def _cross(rank: int, world: int, root: Path) -> None:
    """The sharded checkpoint into an unsharded overlap and a plain optimizer (this module's
    loader and torch's own), and a plain torch checkpoint into a sharded overlap."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    case = CASES[1]
    saved = torch.load(root / "whole.pt", weights_only=True)["optimizers"][0]
    torch.manual_seed(3)
    unsharded = DDP(_net(case), bucket_cap_mb=BUCKET_MB)
    u_opt = overlap_sgd.overlap(unsharded, _optimizers(case.optimizers, unsharded)[0])
    load_optimizer_state_dict(unsharded, u_opt, root / "dcp")
    assert_identical(saved, u_opt.state_dict(), "unsharded overlap")
    _train(unsharded, [u_opt], range(case.save_at, case.save_at + 1), rank, case)

    plain = DDP(_net(case), bucket_cap_mb=BUCKET_MB)
    p_opt = _optimizers(case.optimizers, plain)[0]
    load_optimizer_state_dict(plain, p_opt, root / "dcp")
    assert_identical(saved, p_opt.state_dict(), "plain optimizer")

    # torch's helpers read this module's checkpoint: same format.
    theirs = DDP(_net(case), bucket_cap_mb=BUCKET_MB)
    t_opt = _optimizers(case.optimizers, theirs)[0]
    osd = get_optimizer_state_dict(theirs, t_opt)
    state = {"optimizer": osd}
    dcp.load(state, checkpoint_id=root / "dcp")
    set_optimizer_state_dict(theirs, t_opt, state["optimizer"])
    assert_identical(saved, t_opt.state_dict(), "torch's set_optimizer_state_dict")

    # ... and this module reads theirs, written from a plain optimizer by torch's helpers.
    _train(plain, [p_opt], range(case.save_at, case.save_at + 1), rank, case)
    dcp.save({"optimizer": get_optimizer_state_dict(plain, p_opt)}, checkpoint_id=root / "plain")
    sharded, s_opts = _sharded(case, seed=4)
    # (The torch optimizers an overlap wraps stand for it; a storage reader for the directory.)
    load_optimizer_state_dict(sharded, [o.optimizer for o in s_opts],
                              storage_reader=dcp.FileSystemReader(root / "plain"))
    assert 0 < _held(s_opts) < _whole([p_opt.state_dict()])
    assert_identical(p_opt.state_dict(), s_opts[0].state_dict(), "torch's checkpoint, sharded")


def test_checkpoints_move_between_sharded_unsharded_and_plain_optimizers(tmp_path: Path) -> None:
    run_distributed(_save, SAVE_WORLD, CASES[1], tmp_path, timeout=120)
    run_distributed(_cross, 3, tmp_path, timeout=120)


def _mismatch(rank: int, world: int, root: Path) -> list[str]:
    case = CASES[1]
    messages = []

    def refused(model: DDP, opts: list, **kw) -> None:
        before = [copy.deepcopy(o.state_dict()) for o in opts]
        params = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError) as info:
            load_optimizer_state_dict(model, opts, root / "dcp", **kw)
        messages.append(str(info.value))
        for o, sd in zip(opts, before):
            assert_identical(sd, o.state_dict(), "state after a refused load")
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))

    model, opts = _sharded(case, seed=5)
    _train(model, opts, range(2), rank, case)
    refused(model, opts, key="model")  # no optimizer there
    torch.manual_seed(5)
    sgd_model = DDP(_net(case), bucket_cap_mb=BUCKET_MB)
    sgd = overlap_sgd.overlap(sgd_model, [torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)],
                              shard=True)
    _train(sgd_model, sgd, range(2), rank, case)
    refused(sgd_model, sgd)  # another optimizer class
    wide = DDP(Net(width=12, reverse=True, depth=4), bucket_cap_mb=BUCKET_MB)
    refused(wide, overlap_sgd.overlap(wide, [torch.optim.AdamW(wide.parameters(), lr=0.01)], shard=True))
    shallow = DDP(Net(reverse=True, depth=3), bucket_cap_mb=BUCKET_MB)
    refused(shallow, [torch.optim.AdamW(shallow.parameters(), lr=0.01)])  # body.3 is not here
    groups = DDP(Net(reverse=True, depth=4), bucket_cap_mb=BUCKET_MB)
    named = dict(groups.module.named_parameters())
    refused(groups, [torch.optim.AdamW([{"params": [p for n, p in named.items() if n.startswith("body")]},
                                        {"params": [p for n, p in named.items() if not n.startswith("body")]}])])
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        load_optimizer_state_dict(model, [object()], root / "dcp")
    with pytest.raises(ValueError, match="not a parameter of the model"):
        optimizer_state_dict(shallow, [torch.optim.SGD(model.parameters(), lr=0.1)])
    with pytest.raises(ValueError, match="overlapped on another model"):
        optimizer_state_dict(shallow, opts)
    return messages


def test_a_checkpoint_of_another_optimizer_or_model_is_refused_before_anything_changes(tmp_path: Path) -> None:
    run_distributed(_save, SAVE_WORLD, CASES[1], tmp_path, timeout=120)
    for messages in run_distributed(_mismatch, 2, tmp_path, timeout=120):
        key, cls, shape, name, groups = messages
        assert "no optimizer state dict under key 'model'" in key
        assert "torch.optim.adamw.AdamW" in cls and "torch.optim.sgd.SGD" in cls
        assert "shape" in shape and "another model" in shape
        assert "parameter 'body.3." in name
        assert "holds 1 param groups, but the optimizers have 2" in groups


CUDA = Case("cuda", device="cuda", atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_saves_and_loads_on_nccl(tmp_path: Path) -> None:
    # One GPU: one NCCL rank saves and loads (before and after the first backward).
    run_distributed(_save, 1, CUDA, tmp_path, backend="nccl", gpu=0, timeout=180)
    for before in (0, 2):
        run_distributed(_resume, 1, CUDA, tmp_path, before, backend="nccl", gpu=0, timeout=180)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_of_two_gloo_ranks_loads_on_one_nccl_rank(tmp_path: Path) -> None:
    # Two ranks share one GPU over gloo, which NCCL cannot.
    saved = run_distributed(_save, SAVE_WORLD, CUDA, tmp_path, backend="gloo", gpu=0, timeout=180)
    assert _written_per_rank(tmp_path / "dcp") == {r: s["held"] for r, s in enumerate(saved)}
    run_distributed(_resume, 1, CUDA, tmp_path, 0, backend="nccl", gpu=0, timeout=180)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_docstring_examples_run() -> None:
    for module in (overlap_sgd.blocks, overlap_sgd.dcp):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_blocks_cover_an_element_range_of_any_dense_layout() -> None:
    rng = random.Random(0)
    for _ in range(500):
        shape = [rng.randint(1, 4) for _ in range(rng.randint(0, 4))]
        order = list(range(len(shape)))
        rng.shuffle(order)
        # A tensor of `shape` laid out in memory in dims `order` (outermost first).
        t = torch.randn([shape[d] for d in order]).permute([order.index(d) for d in range(len(shape))])
        n = t.numel()
        lo = rng.randint(0, n)
        hi = rng.randint(lo, n)
        cut = RangeBlocks(t, lo, hi)
        memory = t.as_strided((n,), (1,), t.storage_offset())
        views = cut.views(memory[lo:hi])
        assert sum(b.numel for b in cut.blocks) == hi - lo
        assert len(cut.blocks) <= max(1, 2 * len(shape) - 1)
        for b, v in zip(cut.blocks, views):
            region = t[tuple(slice(o, o + s) for o, s in zip(b.offsets, b.sizes))]
            assert torch.equal(region, v), (shape, order, lo, hi, b)
    with pytest.raises(ValueError, match=r"\[3, 13\)"):
        blocks((3, 4), 3, 13)
