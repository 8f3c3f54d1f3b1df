"""Each optimizer's clipping correction on its own: an update with the unclipped gradient,
corrected for the coefficient ``c``, against torch's optimizer stepping on ``c * g``, over
several steps (fresh state first, then running state), every option the rule covers."""

from __future__ import annotations

import pytest
import torch

from overlap_sgd.functional import FunctionalAdam, FunctionalAdamW, FunctionalSGD
from overlap_sgd.functional import adam as adam_module

SGD_OPTIONS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(momentum=0.8, dampening=0.2, weight_decay=0.05, maximize=True),
    dict(momentum=0.9, fused=True),
    dict(momentum=0.9, foreach=True, weight_decay=0.01),
]
ADAM_OPTIONS = [
    (torch.optim.Adam, dict()),
    (torch.optim.Adam, dict(weight_decay=0.05)),  # coupled decay: needs the pre-step parameter
    (torch.optim.Adam, dict(maximize=True, foreach=False)),
    (torch.optim.Adam, dict(fused=True, betas=(0.8, 0.99))),
    (torch.optim.AdamW, dict(weight_decay=0.1)),
    (torch.optim.AdamW, dict(weight_decay=0.1, foreach=True, maximize=True)),
    (torch.optim.AdamW, dict(weight_decay=0.1, fused=True, lr=torch.tensor(0.01))),
]
FUNCTIONAL = {torch.optim.Adam: FunctionalAdam, torch.optim.AdamW: FunctionalAdamW, torch.optim.SGD: FunctionalSGD}


def _run(cls, options: dict, coefs: list[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    shapes = [(8, 5), (7,), (3, 4)]
    init = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = cls(ours, lr=options.pop("lr", 0.01), **options)
    ref_opt = cls(ref, lr=opt.param_groups[0]["lr"], **options)
    functional = FUNCTIONAL[cls].bind(opt)
    cache: dict = {"fast": False}
    for c in coefs:
        grads = [torch.randn(s) for s in shapes]
        with torch.no_grad():
            before = functional.before_speculation(0, ours, cache, None)
            functional.update(0, ours, [g.clone() for g in grads], cache)
            functional.correct_clip(0, ours, grads, c, before)
        for p, g in zip(ref, grads):
            p.grad = g * torch.tensor(c)
        ref_opt.step()
    return ours, ref


COEFS = [0.3, 0.05, 1.0, 0.7, 0.01, 0.5]


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=[str(o) for o in SGD_OPTIONS])
def test_sgd_correction_equals_the_clipped_step(options: dict) -> None:
    ours, ref = _run(torch.optim.SGD, dict(options), COEFS)
    for a, b in zip(ours, ref):
        assert not torch.equal(b, torch.zeros_like(b))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, options", ADAM_OPTIONS, ids=[f"{c.__name__}-{o}" for c, o in ADAM_OPTIONS])
def test_adam_correction_equals_the_clipped_step(cls, options: dict) -> None:
    ours, ref = _run(cls, dict(options), COEFS)
    for a, b in zip(ours, ref):
        # A few roundings of a step of lr = 0.01 over 6 steps.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_a_dropped_bias_correction_is_caught(monkeypatch) -> None:
    monkeypatch.setattr(adam_module, "_bc2_sqrt", lambda beta2, t: 1.0)
    ours, ref = _run(torch.optim.AdamW, dict(weight_decay=0.1), COEFS)
    assert max(float((a - b).detach().abs().max()) for a, b in zip(ours, ref)) > 1e-4


def test_device_bias_corrections_equal_the_host_ones() -> None:
    # The path for step counts kept on the device (capturable, fused on CUDA), run on CPU tensors.
    steps = [torch.tensor(float(t)) for t in (1, 2, 7, 30)]
    step_size, bc2_sqrt = adam_module._bias_corrections(steps, 0.9, 0.999, 0.01)
    # float32, as torch keeps device step counts: 1 - 0.999**t cancels digits at small t.
    for t, a, b in zip((1, 2, 7, 30), step_size, bc2_sqrt):
        assert float(a) == pytest.approx(0.01 / (1 - 0.9**t), rel=1e-5)
        assert float(b) == pytest.approx((1 - 0.999**t) ** 0.5, rel=1e-4)
    torch.manual_seed(1)
    shapes = [(5,), (2, 3)]
    for wd in (0.0, 0.05):
        tensors = {k: [torch.rand(s) + 0.1 for s in shapes] for k in "pgmv"}
        host = {k: [t.clone() for t in ts] for k, ts in tensors.items()}
        dev = {k: [t.clone() for t in ts] for k, ts in tensors.items()}
        hyper = (0.9, 0.999, 1e-8, wd, 1.0, 0.4)
        t = 7.0
        adam_module._correct(host["p"], host["g"], host["m"], host["v"], 0.01 / (1 - 0.9**t),
                             (1 - 0.999**t) ** 0.5, False, hyper)
        size, root = adam_module._bias_corrections([torch.tensor(t)] * 2, 0.9, 0.999, 0.01)
        adam_module._correct(dev["p"], dev["g"], dev["m"], dev["v"], size, root, None, hyper)
        for k in "pmv":
            for a, b in zip(host[k], dev[k]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
