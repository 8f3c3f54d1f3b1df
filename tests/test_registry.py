"""The optimizer registry: lookup through the MRO, user entries, errors, and use by overlap()."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import overlap_sgd
from overlap_sgd import (
    FunctionalAdam,
    FunctionalAdamW,
    FunctionalOptimizer,
    FunctionalSGD,
    Registration,
    lookup,
    register,
    register_global,
    registered,
    resolve,
    unregister,
)
from overlap_sgd.registry import default_hook_factory

from .distributed import run_distributed
from .models import Net, PlainSGD, batch, twin

BUILTINS = {
    torch.optim.SGD: FunctionalSGD,
    torch.optim.Adam: FunctionalAdam,
    torch.optim.AdamW: FunctionalAdamW,
}


# Classes used by the tests. None of them is registered at import time: every test that registers
# one undoes it (see the ``restore_registry`` fixture and ``counting_body``).


class MySGD(torch.optim.SGD):
    """A user optimizer with SGD's algorithm."""


class MyAdamW(torch.optim.AdamW):
    pass


class Unrelated(PlainSGD):
    pass


class CountingSGD(FunctionalSGD):
    """FunctionalSGD that counts its bucket updates."""

    torch_optimizer = MySGD
    updates = 0

    def update(self, group_index, params, grads, cache=None, grad_scale=None):
        type(self).updates += 1
        super().update(group_index, params, grads, cache, grad_scale)


@pytest.fixture
def restore_registry():
    """Put the registry back exactly as it was, whatever the test registered or removed."""
    before = registered()
    try:
        yield
    finally:
        now = registered()
        for cls in now:
            if cls not in before or now[cls] != before[cls]:
                unregister(cls)
        for cls, entry in before.items():
            if cls not in registered():
                if entry.functional is None:
                    register_global(cls, entry.reason)
                else:
                    register(cls, entry.functional, hook_factory=entry.hook_factory)
        assert registered() == before


# -- built-ins and the MRO -------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer,functional",
    [
        (torch.optim.SGD, FunctionalSGD),
        (torch.optim.Adam, FunctionalAdam),
        (torch.optim.AdamW, FunctionalAdamW),  # AdamW subclasses Adam but has its own entry
        (MySGD, FunctionalSGD),  # through the MRO
        (MyAdamW, FunctionalAdamW),
    ],
    ids=lambda c: c.__name__,
)
def test_lookup_resolves(optimizer, functional):
    entry = lookup(optimizer)
    assert entry.functional is functional
    assert entry.hook_factory is default_hook_factory
    # An instance resolves as its class does.
    instance = optimizer([nn.Parameter(torch.zeros(2))], lr=0.1)
    assert lookup(instance) is entry
    # And the functional class can bind it.
    bound = entry.functional.bind(instance)
    assert bound.optimizer is instance


def test_builtins_are_registered_under_their_own_class():
    entries = registered()
    for optimizer, functional in BUILTINS.items():
        assert entries[optimizer] == Registration(optimizer, functional, default_hook_factory)
    assert lookup(torch.optim.AdamW).functional is not FunctionalAdam
    # Every entry that can be overlapped names a functional class built for that optimizer.
    for optimizer, entry in entries.items():
        assert entry.optimizer is optimizer
        if entry.functional is not None:
            assert issubclass(entry.functional, FunctionalOptimizer)
            assert entry.functional.torch_optimizer is optimizer, optimizer
        else:
            assert entry.reason
    # registered() is a snapshot: changing it changes nothing.
    entries.clear()
    assert set(BUILTINS) <= set(registered())


# -- user registrations ----------------------------------------------------------------------


def test_register_as_decorator(restore_registry):
    @register(MySGD)
    class FunctionalMySGD(FunctionalSGD):
        torch_optimizer = MySGD

    assert FunctionalMySGD.__name__ == "FunctionalMySGD"  # the decorator returns the class
    assert lookup(MySGD).functional is FunctionalMySGD
    assert lookup(torch.optim.SGD).functional is FunctionalSGD  # the parent is unaffected

    class SubOfMine(MySGD):
        pass

    assert lookup(SubOfMine).functional is FunctionalMySGD  # nearest entry in the MRO wins


def test_register_as_call(restore_registry):
    def factory(*args, **kwargs):
        return default_hook_factory(*args, **kwargs)

    assert register(MySGD, CountingSGD, hook_factory=factory) is CountingSGD
    assert lookup(MySGD) == Registration(MySGD, CountingSGD, factory)


def test_duplicate_registration_raises(restore_registry):
    register(MySGD, CountingSGD)
    with pytest.raises(ValueError, match="already registered"):
        register(MySGD, FunctionalSGD)
    with pytest.raises(ValueError, match="already registered"):
        register(MySGD)(FunctionalSGD)
    with pytest.raises(ValueError, match="SGD is already registered"):
        register(torch.optim.SGD, CountingSGD)
    assert lookup(MySGD).functional is CountingSGD  # the first entry stands
    assert lookup(torch.optim.SGD).functional is FunctionalSGD


def test_register_over_a_global_declaration_raises_value_error(restore_registry):
    before = registered()
    with pytest.raises(ValueError, match="LBFGS is already registered"):
        register(torch.optim.LBFGS, CountingSGD)
    assert registered() == before


def test_unknown_optimizer_lists_the_known_ones(restore_registry):
    register(MySGD, CountingSGD)

    class Local(torch.optim.Optimizer):
        pass

    for unknown in (Unrelated, Local):
        with pytest.raises(TypeError) as info:
            lookup(unknown)
        message = str(info.value)
        assert message.startswith(unknown.__qualname__ + " has no functional counterpart"), message
        known = message.split("registered optimizers: ")[1].split(". ")[0].split(", ")
        for name in ("SGD", "Adam", "AdamW", "MySGD"):
            assert name in known
        assert "LBFGS" not in known  # declared as impossible to overlap
        # resolve() instead takes the generic path for it.
        generic = resolve(unknown)
        assert generic.optimizer is unknown
        assert issubclass(generic.functional, FunctionalOptimizer)
        assert generic.functional.torch_optimizer is unknown


def test_lbfgs_is_refused_with_its_reason():
    for find in (lookup, resolve):
        with pytest.raises(TypeError, match="LBFGS cannot be overlapped: .*closure"):
            find(torch.optim.LBFGS)
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        resolve(int)


def test_register_global(restore_registry):
    class GlobalNorm(MySGD):
        pass

    register_global(GlobalNorm, "it rescales by the norm of all gradients")
    for find in (lookup, resolve):
        with pytest.raises(TypeError, match="GlobalNorm cannot be overlapped: it rescales"):
            find(GlobalNorm)

    class Sub(GlobalNorm):  # the declaration is inherited
        pass

    with pytest.raises(TypeError, match="Sub cannot be overlapped: it rescales"):
        resolve(Sub)
    with pytest.raises(ValueError, match="already registered"):
        register_global(GlobalNorm, "again")
    with pytest.raises(TypeError, match="reason"):
        register_global(MySGD, "")
    with pytest.raises(TypeError, match="Optimizer subclass"):
        register_global(object, "no")
    assert MySGD not in registered()
    entry = unregister(GlobalNorm)
    assert entry.functional is None and entry.reason.startswith("it rescales")
    assert resolve(GlobalNorm).functional is FunctionalSGD  # back to MySGD's parent, SGD


@pytest.mark.parametrize(
    "call,fragment",
    [
        (lambda: register(int, FunctionalSGD), "Optimizer subclass"),
        (lambda: register(torch.optim.SGD([nn.Parameter(torch.zeros(1))]), FunctionalSGD),
         "Optimizer subclass"),
        (lambda: register(FunctionalSGD, FunctionalSGD), "Optimizer subclass"),
        (lambda: register(MySGD, torch.optim.SGD), "FunctionalOptimizer subclass"),
        (lambda: register(MySGD, object), "FunctionalOptimizer subclass"),
        (lambda: register(MySGD)(FunctionalSGD([nn.Parameter(torch.zeros(1))])),
         "FunctionalOptimizer subclass"),
        (lambda: register(MySGD, FunctionalSGD, hook_factory="hook"), "hook_factory"),
    ],
    ids=["int", "optimizer-instance", "functional-as-optimizer", "torch-as-functional",
         "object-as-functional", "functional-instance", "hook-factory"],
)
def test_register_rejects_wrong_types(restore_registry, call, fragment):
    before = registered()
    with pytest.raises(TypeError, match=fragment):
        call()
    assert registered() == before


def test_unregister_round_trip(restore_registry):
    entry = Registration(MySGD, CountingSGD, default_hook_factory)
    register(MySGD, CountingSGD)
    assert unregister(MySGD) == entry
    assert lookup(MySGD).functional is FunctionalSGD  # back to the parent's entry
    with pytest.raises(KeyError, match="MySGD"):
        unregister(MySGD)
    register(MySGD, CountingSGD)  # and it can be registered again
    assert lookup(MySGD) == entry

    # A built-in entry too; AdamW keeps its own entry when Adam's is gone.
    adam = unregister(torch.optim.Adam)
    assert adam.functional is FunctionalAdam
    with pytest.raises(TypeError, match="Adam has no functional counterpart"):
        lookup(torch.optim.Adam)
    assert lookup(torch.optim.AdamW).functional is FunctionalAdamW
    register(torch.optim.Adam, FunctionalAdam)
    assert lookup(torch.optim.Adam) == adam


def test_registration_is_frozen():
    entry = lookup(torch.optim.SGD)
    with pytest.raises(Exception):
        entry.functional = FunctionalAdam  # type: ignore[misc]
    assert lookup(torch.optim.SGD).functional is FunctionalSGD


# -- a user registration drives overlap() ------------------------------------------------------


STEPS = 4


def counting_body(rank: int, world_size: int) -> dict:
    factory_calls = []

    def factory(*args, **kwargs):
        factory_calls.append(type(args[0][0]).__name__)
        return default_hook_factory(*args, **kwargs)

    before = registered()
    register(MySGD, CountingSGD, hook_factory=factory)
    try:
        torch.manual_seed(0)
        net = Net()
        ref_model = DistributedDataParallel(twin(net))
        model = DistributedDataParallel(net, bucket_cap_mb=0.001)  # several buckets
        initial = [p.detach().clone() for p in net.parameters()]
        # The kernel is named so that both sides run the same one: bit-identical.
        ref_opt = MySGD(ref_model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
        opt = overlap_sgd.overlap(
            model, MySGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, fused=True)
        )
        for step in range(STEPS):
            x, y = batch(step, rank)
            for m, o in ((ref_model, ref_opt), (model, opt)):
                ((m(x) - y) ** 2).mean().backward()
                o.step()
                o.zero_grad()
        params = list(model.parameters())
        result = {
            "updates": CountingSGD.updates,
            "buckets": len(opt.hook_state._plans),
            "factory_calls": factory_calls,
            "equal": all(torch.equal(a, b) for a, b in zip(params, ref_model.parameters())),
            "finite": all(bool(torch.isfinite(p).all()) for p in params),
            "moved": all(not torch.equal(a, b) for a, b in zip(params, initial)),
            "state_equal": all(
                torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"])
                for a, b in zip(params, ref_model.parameters())
            ),
        }
    finally:
        unregister(MySGD)
    # The registration happened in this process: here is where it must have been undone.
    result["registry_restored"] = registered() == before
    return result


def test_user_registration_is_used_by_overlap():
    results = run_distributed(counting_body, 2)
    for rank, r in enumerate(results):
        assert r["factory_calls"] == ["CountingSGD"], rank
        # One update per bucket per step, at least; more than one bucket by construction.
        assert r["buckets"] > 1 and r["updates"] > STEPS, (rank, r["updates"])
        assert r["moved"] and r["finite"], rank
        assert r["equal"], f"rank {rank}: overlapped parameters differ from post-backward"
        assert r["state_equal"], rank
        assert r["registry_restored"], f"rank {rank}: the registration outlived the test"
