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
from .hooks.norm_clip import ClipGradNorm
from .optimizer import OverlappedOptimizer
from .consistency import ConsistencyError, check_consistency
from .drop_in import overlap, overlapped_optimizers, trainable_parameters
from .shutdown import exit_process, exit_process_on_error
from .registry import (
    Registration,
    lookup,
    register,
    register_global,
    registered,
    resolve,
    unregister,
)

__version__ = "0.1.0"

__all__ = [
    "ClipGradNorm",
    "ConsistencyError",
    "FunctionalAdam",
    "FunctionalAdamW",
    "FunctionalOptimizer",
    "FunctionalSGD",
    "KernelChoice",
    "NonFiniteGradientError",
    "OverlapHookState",
    "OverlappedOptimizer",
    "Registration",
    "check_consistency",
    "exit_process",
    "exit_process_on_error",
    "lookup",
    "make_overlap_hook",
    "overlap",
    "overlap_hook",
    "overlapped_optimizers",
    "register",
    "register_global",
    "registered",
    "resolve",
    "trainable_parameters",
    "unregister",
]
