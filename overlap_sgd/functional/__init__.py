"""Functional optimizers: gradients are passed to the step explicitly."""

from .adam import FunctionalAdam, FunctionalAdamW
from .base import FunctionalOptimizer, KernelChoice
from .sgd import FunctionalSGD

__all__ = [
    "FunctionalAdam",
    "FunctionalAdamW",
    "FunctionalOptimizer",
    "FunctionalSGD",
    "KernelChoice",
]
