"""overlap-sgd: hide the optimizer step of DDP training inside gradient communication.

The one-line change::

    optimizer = overlap_sgd.overlap(ddp_model, optimizer)

after which each DDP bucket's parameters are updated the moment that bucket's all-reduce lands,
while later buckets are still communicating.
"""

from .functional import (
    FunctionalAdam,
    FunctionalAdamW,
    FunctionalOptimizer,
    FunctionalSGD,
    KernelChoice,
)
from .hooks import NonFiniteGradientError, OverlapHookState, make_overlap_hook, overlap_hook
from .optimizer import OverlappedOptimizer
from .drop_in import overlap, trainable_parameters
from .registry import Registration, lookup, register, registered, unregister

__version__ = "0.1.0"

__all__ = [
    "FunctionalAdam",
    "FunctionalAdamW",
    "FunctionalOptimizer",
    "FunctionalSGD",
    "KernelChoice",
    "NonFiniteGradientError",
    "OverlapHookState",
    "OverlappedOptimizer",
    "Registration",
    "lookup",
    "make_overlap_hook",
    "overlap",
    "overlap_hook",
    "register",
    "registered",
    "trainable_parameters",
    "unregister",
]
