"""Functional counterparts of the other ``torch.optim`` optimizers with a per-parameter update.

Each runs torch's own algorithm (and so its functional kernel, and every option of the class)
on one bucket at a time, through :mod:`overlap_sgd.functional.generic`. State lives in the
wrapped optimizer under torch's keys, so state dicts interchange with the plain torch class.
Those whose update is element-wise are declared so (sharded training cuts their parameters
into element ranges); Adafactor (factored second moments), Muon (orthogonalised matrix
updates) and SparseAdam are sharded by whole parameters.

Example:
    >>> import torch
    >>> from overlap_sgd.functional.others import FunctionalAdagrad
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = FunctionalAdagrad([w], lr=0.5, initial_accumulator_value=0.0)
    >>> opt.step_param(w, torch.tensor([2.0, -2.0]))
    >>> w.detach()
    tensor([-0.5000,  0.5000])
"""

import torch

from .generic import restricted

__all__ = [
    "FunctionalASGD",
    "FunctionalAdadelta",
    "FunctionalAdafactor",
    "FunctionalAdagrad",
    "FunctionalAdamax",
    "FunctionalMuon",
    "FunctionalNAdam",
    "FunctionalRAdam",
    "FunctionalRMSprop",
    "FunctionalRprop",
    "FunctionalSparseAdam",
]

FunctionalAdagrad = restricted(torch.optim.Adagrad, elementwise=True)
FunctionalAdadelta = restricted(torch.optim.Adadelta, elementwise=True)
FunctionalAdamax = restricted(torch.optim.Adamax, elementwise=True)
FunctionalRMSprop = restricted(torch.optim.RMSprop, elementwise=True)
FunctionalRprop = restricted(torch.optim.Rprop, elementwise=True)
FunctionalNAdam = restricted(torch.optim.NAdam, elementwise=True)
FunctionalRAdam = restricted(torch.optim.RAdam, elementwise=True)
FunctionalASGD = restricted(torch.optim.ASGD, elementwise=True)
FunctionalAdafactor = restricted(torch.optim.Adafactor)
FunctionalMuon = restricted(torch.optim.Muon)
FunctionalSparseAdam = restricted(torch.optim.SparseAdam)
