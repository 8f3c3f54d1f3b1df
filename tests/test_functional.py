"""Functional optimizers against torch.optim: every option, every stepping entry point.

Each functional optimizer must produce bit-identical parameters and state to the torch optimizer
it reproduces, whichever way it is stepped: one parameter at a time (``step_param``), all at once
(``step``) or bucket by bucket (``step_bucket``), including parameters whose gradient is ``None``.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from overlap_sgd import FunctionalAdam, FunctionalAdamW, FunctionalOptimizer, FunctionalSGD

# A 0-dim, a 1-D, a 2-D and a 3-D parameter.
SHAPES = [(), (7,), (3, 5), (2, 3, 4)]
# Which parameters get a gradient at each step; the rest get None. Parameters 1 and 3 start late
# (their first step has gradient None), parameter 1 later skips a step again.
SCHEDULE = [(0, 2), (1, 3), (0, 1, 2, 3), (0, 2, 3), (0, 1, 2, 3)]
# step_bucket mode: two buckets, in reverse parameter order, mixing early and late parameters.
BUCKETS = [(3, 1), (2, 0)]

KERNELS = {
    "single": {"foreach": False, "fused": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"foreach": False, "fused": True},
}
# Neither set: torch picks the single-tensor loop on CPU, a bucket update the multi-tensor kernel.
DEFAULT_KERNEL = {"foreach": None, "fused": None}


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors are tiny: intra-op threads only add overhead (and flakiness under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)



def make_params(seed: int = 0, shapes=SHAPES) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def make_grads(step: int, schedule=SCHEDULE, shapes=SHAPES) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(1000 + 31 * step)
    # Different signs and scales from step to step.
    scale = (1.0 + step) * (-1.0 if step % 2 else 1.0)
    return [
        torch.randn(s, generator=g) * scale if i in schedule[step] else None
        for i, s in enumerate(shapes)
    ]


def clones(grads):
    return [None if g is None else g.clone() for g in grads]


def torch_step(opt: torch.optim.Optimizer, params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    opt.step()
    for p in params:
        p.grad = None


def by_step_param(f: FunctionalOptimizer, params, grads) -> None:
    for p, g in zip(params, grads):
        f.step_param(p, g)


def by_step(f: FunctionalOptimizer, params, grads) -> None:
    f.step(grads)


def by_step_bucket(f: FunctionalOptimizer, params, grads) -> None:
    for bucket in BUCKETS:
        f.step_bucket([params[i] for i in bucket], [grads[i] for i in bucket])


MODES: dict[str, Callable[..., None]] = {
    "step_param": by_step_param,
    "step": by_step,
    "step_bucket": by_step_bucket,
}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursive bitwise equality of (state dicts of) tensors: dtype, device, layout, values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.device, a.layout, a.shape) == (b.dtype, b.device, b.layout, b.shape), where
        if a.is_sparse:
            a, b = a.coalesce().to_dense(), b.coalesce().to_dense()
        assert torch.equal(a, b), f"{where}: max diff {(a - b).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a)} != {set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def snapshot(params, opt) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


# -- the option tables -----------------------------------------------------------------------


def sgd_cases() -> list[tuple[str, type, type, dict]]:
    cases = []
    for momentum, dampening, weight_decay, nesterov, maximize, kernel in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (0.0, 0.01), (False, True), (False, True), KERNELS
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue  # rejected by torch.optim.SGD (see test_invalid_construction)
        kw = dict(lr=0.1, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                  nesterov=nesterov, maximize=maximize, **KERNELS[kernel])
        cases.append(("SGD", FunctionalSGD, torch.optim.SGD, kw))
    # A Tensor lr, and the default kernel choice.
    for momentum, kernel in itertools.product((0.0, 0.9), [*KERNELS.values(), DEFAULT_KERNEL]):
        kw = dict(lr=torch.tensor(0.05), momentum=momentum, weight_decay=0.01, **kernel)
        cases.append(("SGD", FunctionalSGD, torch.optim.SGD, kw))
    for nesterov, maximize in itertools.product((False, True), (False, True)):
        kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov, maximize=maximize,
                  **DEFAULT_KERNEL)
        cases.append(("SGD", FunctionalSGD, torch.optim.SGD, kw))
    return cases


# betas/eps alternate between the rows of the option cross product.
ADAM_HYPER = [dict(betas=(0.9, 0.999), eps=1e-8), dict(betas=(0.8, 0.95), eps=1e-3)]
ADAMS = [("Adam", FunctionalAdam, torch.optim.Adam), ("AdamW", FunctionalAdamW, torch.optim.AdamW)]


def adam_cases() -> list[tuple[str, type, type, dict]]:
    cases = []
    for i, (amsgrad, maximize, weight_decay, decoupled, kernel) in enumerate(itertools.product(
        (False, True), (False, True), (0.0, 0.05), (False, True), KERNELS
    )):
        kw = dict(lr=0.1, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay,
                  decoupled_weight_decay=decoupled, **ADAM_HYPER[i % 2], **KERNELS[kernel])
        cases.append(("Adam", FunctionalAdam, torch.optim.Adam, kw))
    for i, (amsgrad, maximize, weight_decay, kernel) in enumerate(itertools.product(
        (False, True), (False, True), (0.0, 0.05), KERNELS
    )):
        kw = dict(lr=0.1, amsgrad=amsgrad, maximize=maximize, weight_decay=weight_decay,
                  **ADAM_HYPER[(i // 3) % 2], **KERNELS[kernel])
        cases.append(("AdamW", FunctionalAdamW, torch.optim.AdamW, kw))
    # A Tensor lr (torch rejects it with foreach=True and capturable=False), and the default
    # kernel choice.
    for (name, fcls, tcls), amsgrad, kernel in itertools.product(
        ADAMS, (False, True), [KERNELS["single"], KERNELS["fused"], DEFAULT_KERNEL]
    ):
        kw = dict(lr=torch.tensor(0.05), amsgrad=amsgrad, weight_decay=0.05, **kernel)
        cases.append((name, fcls, tcls, kw))
    for (name, fcls, tcls), amsgrad, maximize in itertools.product(ADAMS, (False, True), (False, True)):
        kw = dict(lr=0.1, amsgrad=amsgrad, maximize=maximize, weight_decay=0.05, **DEFAULT_KERNEL)
        cases.append((name, fcls, tcls, kw))
    return cases


CASES = sgd_cases() + adam_cases()


def case_id(case) -> str:
    name, _, _, kw = case
    parts = []
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v = f"T{v.item():g}"
        parts.append(f"{k}={v}")
    return name + "-" + ",".join(parts)


# -- parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_torch(case):
    _, fcls, tcls, kw = case
    ref_params = make_params()
    ref = tcls(ref_params, **kw)
    initial = [p.detach().clone() for p in ref_params]
    runs = {}
    for mode in MODES:
        params = make_params()
        runs[mode] = (params, fcls(params, **kw))

    for step in range(len(SCHEDULE)):
        grads = make_grads(step)
        torch_step(ref, ref_params, grads)
        for mode, (params, f) in runs.items():
            MODES[mode](f, params, clones(grads))
            assert all(p.grad is None for p in params), f"{mode}: a functional step set .grad"
            assert_same([p.detach() for p in params], [p.detach() for p in ref_params],
                        f"{mode} step {step} params")
            assert_same(f.state_dict(), ref.state_dict(), f"{mode} step {step} state")
            if step == 0:
                # Parameters 1 and 3 had gradient None: untouched, and no state was created.
                for i in (1, 3):
                    assert torch.equal(params[i].detach(), initial[i]), f"{mode}: param {i} moved"
                    assert params[i] not in f.state, f"{mode}: state created for param {i}"

    for i, p in enumerate(ref_params):
        assert not torch.equal(p.detach(), initial[i]), f"torch param {i} did not move"
    if kw.get("momentum", 1) != 0:  # every option set but plain SGD keeps per-parameter state
        for mode, (params, f) in runs.items():
            assert len(f.state) == len(params), mode


def sparse_grad(step: int, rows: int = 6, cols: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(77 + step)
    # Uncoalesced: row 1 appears twice.
    idx = torch.tensor([[1, 4, 1, step % rows]])
    return torch.sparse_coo_tensor(idx, torch.randn(4, cols, generator=g), (rows, cols),
                                   check_invariants=True)


SPARSE_CASES = [
    dict(lr=0.1, momentum=m, dampening=d, nesterov=n, maximize=i % 2 == 1, **k)
    for i, ((m, d, n), k) in enumerate(itertools.product(
        [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.0, True), (0.9, 0.1, False)],
        [KERNELS["single"], KERNELS["foreach"], DEFAULT_KERNEL],
    ))
]


@pytest.mark.parametrize("kw", SPARSE_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sparse_gradients_match_torch_sgd(kw):
    shapes = [(6, 3), (4,)]

    def new_params():
        return make_params(3, shapes)

    ref_params = new_params()
    ref = torch.optim.SGD(ref_params, **kw)
    initial = [p.detach().clone() for p in ref_params]
    runs = {mode: (ps := new_params(), FunctionalSGD(ps, **kw)) for mode in ("step_param", "step")}
    buckets = new_params()
    runs["step_bucket"] = (buckets, FunctionalSGD(buckets, **kw))
    for step in range(3):
        dense = torch.randn(4, generator=torch.Generator().manual_seed(step))
        grads = [sparse_grad(step), dense]
        torch_step(ref, ref_params, grads)
        for mode, (params, f) in runs.items():
            if mode == "step_bucket":
                f.step_bucket([params[1], params[0]], [dense.clone(), sparse_grad(step)])
            else:
                MODES[mode](f, params, [sparse_grad(step), dense.clone()])
            assert_same([p.detach() for p in params], [p.detach() for p in ref_params], mode)
    for mode, (params, f) in runs.items():
        assert_same(f.state_dict(), ref.state_dict(), mode)
    moved = ~torch.isclose(ref_params[0].detach(), initial[0]).all(dim=1)
    assert moved.tolist() == [True, True, True, False, True, False]  # rows 3 and 5 never indexed


# -- grad=None ---------------------------------------------------------------------------------


NONE_CASES = [
    (FunctionalSGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (FunctionalSGD, dict(lr=0.1, momentum=0.9, fused=True)),
    (FunctionalAdam, dict(lr=0.1, amsgrad=True)),
    (FunctionalAdam, dict(lr=0.1, fused=True)),
    (FunctionalAdamW, dict(lr=0.1, foreach=True)),
]


@pytest.mark.parametrize("fcls,kw", NONE_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_grad_none_on_a_new_parameter_creates_no_state(fcls, kw):
    params = make_params()
    f = fcls(params, **kw)
    before = [p.detach().clone() for p in params]
    f.step_param(params[0], None)
    f.step([None] * len(params))
    f.step_bucket([params[2], params[1]], [None, None])
    assert len(f.state) == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    f.step_param(params[0], torch.ones(()))
    assert set(f.state) == {params[0]}
    assert not torch.equal(params[0].detach(), before[0])
    assert all(torch.equal(p.detach(), b) for p, b in zip(params[1:], before[1:]))


# -- validation --------------------------------------------------------------------------------


def _p():
    return [nn.Parameter(torch.ones(3))]


CONSTRUCTION_ERRORS = [
    ("sgd-empty", lambda: FunctionalSGD([], lr=0.1), ValueError, "empty parameter list"),
    ("adam-empty", lambda: FunctionalAdam([]), ValueError, "empty parameter list"),
    ("adamw-empty", lambda: FunctionalAdamW(iter([])), ValueError, "empty parameter list"),
    ("single-tensor", lambda: FunctionalSGD(nn.Parameter(torch.ones(2))), TypeError, "iterable"),
    ("sgd-lr", lambda: FunctionalSGD(_p(), lr=-0.1), ValueError, "-0.1"),
    ("sgd-momentum", lambda: FunctionalSGD(_p(), momentum=-0.5), ValueError, "-0.5"),
    ("sgd-weight-decay", lambda: FunctionalSGD(_p(), weight_decay=-1.0), ValueError, "-1.0"),
    ("sgd-nesterov-no-momentum", lambda: FunctionalSGD(_p(), nesterov=True), ValueError, "Nesterov"),
    ("sgd-nesterov-dampening",
     lambda: FunctionalSGD(_p(), momentum=0.9, dampening=0.1, nesterov=True), ValueError, "Nesterov"),
    ("sgd-fused-foreach", lambda: FunctionalSGD(_p(), foreach=True, fused=True), RuntimeError, "fused"),
    ("adam-lr", lambda: FunctionalAdam(_p(), lr=-0.001), ValueError, "-0.001"),
    ("adam-beta1", lambda: FunctionalAdam(_p(), betas=(1.5, 0.9)), ValueError, "1.5"),
    ("adam-beta2", lambda: FunctionalAdam(_p(), betas=(0.9, -0.25)), ValueError, "-0.25"),
    ("adam-eps", lambda: FunctionalAdam(_p(), eps=-1e-8), ValueError, "-1e-08"),
    ("adam-weight-decay", lambda: FunctionalAdam(_p(), weight_decay=-0.01), ValueError, "-0.01"),
    ("adam-fused-foreach", lambda: FunctionalAdam(_p(), foreach=True, fused=True), RuntimeError, "fused"),
    ("adam-tensor-lr-foreach",
     lambda: FunctionalAdam(_p(), lr=torch.tensor(0.1), foreach=True), ValueError, "lr as a Tensor"),
    ("adamw-lr", lambda: FunctionalAdamW(_p(), lr=-2.0), ValueError, "-2.0"),
    ("adamw-beta1", lambda: FunctionalAdamW(_p(), betas=(-0.1, 0.9)), ValueError, "-0.1"),
    ("bind-differentiable",
     lambda: FunctionalSGD.bind(torch.optim.SGD(_p(), lr=0.1, differentiable=True)),
     ValueError, "differentiable"),
    ("bind-wrong-class", lambda: FunctionalAdam.bind(torch.optim.SGD(_p(), lr=0.1)), TypeError, "SGD"),
    ("bind-adam-as-adamw", lambda: FunctionalAdamW.bind(torch.optim.Adam(_p())), TypeError, "Adam"),
]


@pytest.mark.parametrize("name,make,exc,fragment", CONSTRUCTION_ERRORS, ids=[r[0] for r in CONSTRUCTION_ERRORS])
def test_invalid_construction(name, make, exc, fragment):
    with pytest.raises(exc) as info:
        make()
    assert fragment in str(info.value)


def _sparse_rows():
    return torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones(1, 5), (3, 5), check_invariants=True)


# (name, call(f, params) -> None, error type, message fragment); params have SHAPES.
STEP_ERRORS = [
    ("step-too-few", lambda f, ps: f.step([torch.ones(s) for s in SHAPES[:3]]), ValueError,
     "3 gradients for 4 parameters"),
    ("step-too-many", lambda f, ps: f.step([torch.ones(s) for s in SHAPES] + [None]), ValueError,
     "5 gradients for 4 parameters"),
    ("bucket-length", lambda f, ps: f.step_bucket(ps[:2], [torch.ones(())]), ValueError,
     "2 parameters but 1 gradients"),
    ("shape-param", lambda f, ps: f.step_param(ps[2], torch.ones(5, 3)), ValueError, "(5, 3)"),
    # The first pair is valid: nothing may be updated before the whole bucket is checked.
    ("shape-in-bucket", lambda f, ps: f.step_bucket(ps[:2], [torch.ones(()), torch.ones(6)]),
     ValueError, "(6,)"),
    ("shape-in-step", lambda f, ps: f.step([torch.ones(()), torch.ones(7), torch.ones(3, 5), torch.ones(4)]),
     ValueError, "(4,)"),
    ("foreign-param", lambda f, ps: f.step_param(nn.Parameter(torch.ones(9)), torch.ones(9)),
     ValueError, "not in this"),
    ("param-twice", lambda f, ps: f.step_bucket([ps[1], ps[1]], [torch.ones(7), torch.ones(7)]),
     ValueError, "twice"),
    ("grad-not-tensor", lambda f, ps: f.step_bucket([ps[0], ps[1]], [torch.ones(()), [1.0] * 7]),
     TypeError, "list"),
]
SPARSE_ERROR = ("sparse-grad", lambda f, ps: f.step_param(ps[2], _sparse_rows()), RuntimeError, "sparse")

STEP_ERROR_CASES = [
    (fcls, kw, row)
    for fcls, kw in [
        (FunctionalSGD, dict(lr=0.1, momentum=0.9)),
        (FunctionalAdam, dict(lr=0.1)),
        (FunctionalAdamW, dict(lr=0.1, fused=True)),
    ]
    for row in STEP_ERRORS + ([SPARSE_ERROR] if fcls is not FunctionalSGD else [])
]


@pytest.mark.parametrize(
    "fcls,kw,row", STEP_ERROR_CASES, ids=[f"{c[0].__name__}-{c[2][0]}" for c in STEP_ERROR_CASES]
)
def test_invalid_step_changes_nothing(fcls, kw, row):
    _, call, exc, fragment = row
    params = make_params()
    f = fcls(params, **kw)
    f.step(clones(make_grads(2)))  # some state to protect
    before_params, before_state = snapshot(params, f)
    with pytest.raises(exc) as info:
        call(f, params)
    assert fragment in str(info.value)
    assert_same([p.detach() for p in params], before_params, "params")
    assert_same(f.state_dict(), before_state, "state")


# -- hyperparameters are read at step time -----------------------------------------------------

HYPER_CASES = [
    (FunctionalSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, **KERNELS["foreach"])),
    (FunctionalSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.1, **KERNELS["single"])),
    (FunctionalAdam, torch.optim.Adam, dict(lr=0.1, weight_decay=0.01, foreach=False)),
    (FunctionalAdam, torch.optim.Adam, dict(lr=0.1, amsgrad=True, fused=True)),
    (FunctionalAdamW, torch.optim.AdamW, dict(lr=0.1, foreach=True)),
]

# Changes applied to every group of both optimizers before each step.
SCHEDULE_CHANGES: list[dict[str, Any]] = [
    {},
    {"lr": 0.03},
    {"lr": 0.2, "weight_decay": 0.1},
    {"lr": 0.0},
    {"lr": 0.07, "weight_decay": 0.0, "maximize": True},
]


def two_groups(params: list[nn.Parameter]) -> list[dict[str, Any]]:
    # Per-group lr and weight_decay; the other options come from the defaults.
    return [
        {"params": [params[0], params[3]], "lr": 0.05, "weight_decay": 0.02},
        {"params": [params[1], params[2]], "lr": 0.3},
    ]


@pytest.mark.parametrize("fcls,tcls,kw", HYPER_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
@pytest.mark.parametrize("mode", ["step", "step_bucket"])
def test_hyperparameters_read_at_step_time(fcls, tcls, kw, mode):
    ref_params = make_params()
    ref = tcls(two_groups(ref_params), **kw)
    params = make_params()
    f = fcls(two_groups(params), **kw)
    # Gradients in param-group order: group 0 holds params 0, 3; group 1 holds params 1, 2.
    order = [0, 3, 1, 2]
    initial = [p.detach().clone() for p in params]
    for step, change in enumerate(SCHEDULE_CHANGES):
        for opt in (ref, f):
            for group in opt.param_groups:
                group.update(change)
        grads = make_grads(2)  # same gradient each step: any difference comes from the changes
        grads = [g * (step + 1) for g in grads]
        torch_step(ref, ref_params, grads)
        if mode == "step":
            f.step([grads[i].clone() for i in order])
        else:  # one bucket spanning both groups
            f.step_bucket([params[i] for i in (2, 0, 3, 1)], [grads[i].clone() for i in (2, 0, 3, 1)])
        assert_same([p.detach() for p in params], [p.detach() for p in ref_params], f"step {step}")
        assert_same(f.state_dict(), ref.state_dict(), f"state step {step}")
        if change.get("lr") == 0.0:
            assert all(torch.equal(p.detach(), q) for p, q in zip(params, last)), "lr=0 moved params"
        last = [p.detach().clone() for p in params]
    assert all(not torch.equal(p.detach(), q) for p, q in zip(params, initial))


def test_per_group_hyperparameters_are_honoured():
    # Same gradient, different group lr: the parameters move by amounts in the ratio of the lrs.
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    f = FunctionalSGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.4, "weight_decay": 0.5}])
    f.step_bucket([b, a], [torch.ones(3), torch.ones(3)])
    assert torch.allclose(a.detach(), torch.full((3,), -0.1))
    assert torch.allclose(b.detach(), torch.full((3,), -0.4))
    f.step([torch.zeros(3), torch.zeros(3)])
    assert torch.allclose(a.detach(), torch.full((3,), -0.1))  # no decay in group 0
    assert torch.allclose(b.detach(), torch.full((3,), -0.4 + 0.4 * 0.5 * 0.4))


# -- state dict interchange ------------------------------------------------------------------

SD_CASES = [
    (FunctionalSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, **KERNELS["foreach"])),
    (FunctionalSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, **KERNELS["fused"])),
    (FunctionalAdam, torch.optim.Adam, dict(lr=0.1, amsgrad=True, foreach=True)),
    (FunctionalAdam, torch.optim.Adam, dict(lr=0.1, weight_decay=0.01, fused=True)),
    (FunctionalAdam, torch.optim.Adam, dict(lr=0.1, decoupled_weight_decay=True, weight_decay=0.1)),
    (FunctionalAdamW, torch.optim.AdamW, dict(lr=0.1, amsgrad=True, foreach=False)),
    (FunctionalAdamW, torch.optim.AdamW, dict(lr=0.1, fused=True)),
]
SD_DIRECTIONS = ["functional-to-torch", "torch-to-functional", "torch-bind-functional"]
FIRST, SECOND = range(0, 3), range(2, 5)  # steps before and after the hand-over


def full_grads(step: int) -> list[torch.Tensor]:
    """A gradient for every parameter."""
    return make_grads(step, schedule=[tuple(range(len(SHAPES)))] * (step + 1))


@pytest.mark.parametrize("direction", SD_DIRECTIONS)
@pytest.mark.parametrize("fcls,tcls,kw", SD_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_state_dict_interchange(fcls, tcls, kw, direction):
    # Reference: torch alone, all steps.
    ref_params = make_params()
    ref = tcls(ref_params, **kw)
    for step in [*FIRST, *SECOND]:
        torch_step(ref, ref_params, make_grads(step))

    src_params = make_params()
    src = fcls(src_params, **kw) if direction == "functional-to-torch" else tcls(src_params, **kw)
    for step in FIRST:
        if isinstance(src, FunctionalOptimizer):
            src.step(clones(make_grads(step)))
        else:
            torch_step(src, src_params, make_grads(step))
    saved = copy.deepcopy(src.state_dict())  # as if through a file: no aliasing
    dst_params = [nn.Parameter(p.detach().clone()) for p in src_params]
    if direction == "functional-to-torch":
        dst = tcls(dst_params, **kw)
        dst.load_state_dict(saved)
    elif direction == "torch-to-functional":
        dst = fcls(dst_params, **kw)
        dst.load_state_dict(saved)
    else:
        holder = tcls(dst_params, **kw)
        holder.load_state_dict(saved)
        dst = fcls.bind(holder)
        assert dst.optimizer is holder and dst.state is holder.state
    assert_same(dst.state_dict(), saved, "loaded")
    assert len(dst.state) == len(dst_params)  # parameters 1 and 3 started late but have state
    for step in SECOND:
        # The source keeps going too, unaffected by the copy.
        if isinstance(src, FunctionalOptimizer):
            src.step(clones(make_grads(step)))
        else:
            torch_step(src, src_params, make_grads(step))
        if isinstance(dst, FunctionalOptimizer):
            dst.step(clones(make_grads(step)))
        else:
            torch_step(dst, dst_params, make_grads(step))
    for ps, opt, label in [(src_params, src, "source"), (dst_params, dst, "destination")]:
        assert_same([p.detach() for p in ps], [p.detach() for p in ref_params], label)
        assert_same(opt.state_dict(), ref.state_dict(), label + " state")


@pytest.mark.parametrize("fcls,tcls,kw", SD_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_update_cache_follows_load_state_dict(fcls, tcls, kw):
    """A cache kept across update() calls must not outlive a load_state_dict()."""
    ref_params, params = make_params(), make_params()
    ref, f = tcls(ref_params, **kw), fcls(params, **kw)
    cache: dict[str, Any] = {}
    for step in range(2):
        grads = full_grads(step)
        torch_step(ref, ref_params, grads)
        f.update(0, list(params), clones(grads), cache)
    # Rewind both to a checkpoint taken from a third optimizer a few steps in.
    other_params = make_params()
    other = tcls(other_params, **kw)
    for step in range(3):
        torch_step(other, other_params, full_grads(step + 7))
    checkpoint = other.state_dict()
    ref.load_state_dict(copy.deepcopy(checkpoint))
    f.load_state_dict(copy.deepcopy(checkpoint))
    for step in range(2, 5):
        grads = full_grads(step)
        torch_step(ref, ref_params, grads)
        f.update(0, list(params), clones(grads), cache)
        assert_same([p.detach() for p in params], [p.detach() for p in ref_params], f"step {step}")
        assert_same(f.state_dict(), ref.state_dict(), f"state step {step}")


# -- summed gradients: update(..., grad_scale=world_size) -------------------------------------

SCALE_CASES = [
    (FunctionalSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)),
    (FunctionalSGD, dict(lr=0.1, momentum=0.9, nesterov=True, fused=True)),
    (FunctionalSGD, dict(lr=0.1, momentum=0.9, nesterov=True, foreach=True)),
    (FunctionalSGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (FunctionalSGD, dict(lr=0.1)),
    (FunctionalAdam, dict(lr=0.01, fused=True, amsgrad=True)),
    (FunctionalAdam, dict(lr=0.01, foreach=True)),
    (FunctionalAdamW, dict(lr=0.01, fused=True, weight_decay=0.1)),
    (FunctionalAdamW, dict(lr=0.01, foreach=False)),
]


@pytest.mark.parametrize("fast", [False, True], ids=["as-configured", "fast"])
@pytest.mark.parametrize("fcls,kw", SCALE_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_update_averages_summed_gradients(fcls, kw, fast):
    # grad_scale=3 over the sum of three ranks' gradients: the same step as the averaged
    # gradient, and the gradients are left averaged in place (DDP hands them to .grad).
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in SHAPES]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    initial = [p.detach().clone() for p in params]
    func = fcls(params, **kw)
    torch_opt = fcls.torch_optimizer(ref, **kw)
    cache = {"fast": fast}
    scale = torch.tensor(3.0)
    for _ in range(3):
        grads = [torch.randn(s) for s in SHAPES]
        summed = [g * 3 for g in grads]
        func.update(0, params, summed, cache, grad_scale=scale)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        torch_opt.step()
        for s, g in zip(summed, grads):
            torch.testing.assert_close(s, g, rtol=1e-6, atol=1e-7)
    for p, r, p0 in zip(params, ref, initial):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(p.detach(), p0)


def test_update_averages_for_an_optimizer_without_a_fused_kernel():
    # The base class divides first for an update that cannot fold the division in.
    from overlap_sgd.functional.generic import restricted

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3))]
    ref = [nn.Parameter(params[0].detach().clone())]
    cls = restricted(torch.optim.RMSprop)
    assert not cls.folds_grad_scale
    func = cls(params, lr=0.01, momentum=0.5)
    torch_opt = torch.optim.RMSprop(ref, lr=0.01, momentum=0.5)
    initial = params[0].detach().clone()
    g = torch.randn(4, 3)
    summed = [g * 2]
    func.update(0, params, summed, grad_scale=torch.tensor(2.0))
    ref[0].grad = g.clone()
    torch_opt.step()
    torch.testing.assert_close(summed[0], g)
    torch.testing.assert_close(params[0].detach(), ref[0].detach())
    assert not torch.equal(params[0].detach(), initial)
