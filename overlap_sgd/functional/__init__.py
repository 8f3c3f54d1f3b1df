"""Functional optimizers: gradients are passed to the step explicitly."""

from .adam import FunctionalAdam, FunctionalAdamW
from .base import FunctionalOptimizer, KernelChoice
from .generic import StepRestricted, restricted
from .others import (
    FunctionalAdadelta,
    FunctionalAdafactor,
    FunctionalAdagrad,
    FunctionalAdamax,
    FunctionalASGD,
    FunctionalMuon,
    FunctionalNAdam,
    FunctionalRAdam,
    FunctionalRMSprop,
    FunctionalRprop,
    FunctionalSparseAdam,
)
from .sgd import FunctionalSGD

__all__ = [
    "FunctionalASGD",
    "FunctionalAdadelta",
    "FunctionalAdafactor",
    "FunctionalAdagrad",
    "FunctionalAdam",
    "FunctionalAdamW",
    "FunctionalAdamax",
    "FunctionalMuon",
    "FunctionalNAdam",
    "FunctionalOptimizer",
    "FunctionalRAdam",
    "FunctionalRMSprop",
    "FunctionalRprop",
    "FunctionalSGD",
    "FunctionalSparseAdam",
    "KernelChoice",
    "StepRestricted",
    "restricted",
]
