"""Step bookkeeping: one ``step()`` per synchronising backward, whose updates already ran.

Example:
    >>> ledger = StepLedger(optimizers=1, require_step=True)
    >>> ledger.begin()
    >>> ledger.acknowledge(0)
    >>> ledger.begin()       # a step() came in between: fine
    >>> ledger.syncs
    2
"""

from __future__ import annotations

__all__ = ["StepLedger"]


class StepLedger:
    """Counts synchronising backward passes and which optimizers' ``step()`` is still owed.

    Args:
        optimizers: how many overlapped optimizers share the model.
        require_step: refuse a synchronising backward that follows one whose update no
            ``step()`` acknowledged (what ``OverlappedOptimizer.step()`` does).
    """

    def __init__(self, optimizers: int, require_step: bool = False):
        self.require_step = require_step
        #: Per optimizer: an update happened that its ``step()`` has not acknowledged yet.
        self.awaiting = [False] * optimizers
        #: Count of synchronising backward passes that ran bucket updates.
        self.syncs = 0

    def begin(self) -> None:
        """A synchronising backward starts (its first bucket is communicated)."""
        late = [i for i, waiting in enumerate(self.awaiting) if waiting]
        if late and self.require_step:
            raise RuntimeError(
                "a second synchronising backward() ran before optimizer.step() was called for "
                f"overlapped optimizer(s) {late}: the previous backward already updated the "
                "parameters. Call step() once per synchronising backward, and use "
                "ddp_model.no_sync() for gradient-accumulation micro-steps."
            )
        self.awaiting = [True] * len(self.awaiting)
        self.syncs += 1

    def acknowledge(self, optimizer_index: int) -> None:
        """Optimizer ``optimizer_index``'s ``step()`` was called for the last backward."""
        self.awaiting[optimizer_index] = False

    def forgive(self) -> None:
        """The last backward raised: the loop will not reach ``step()`` for it."""
        self.awaiting = [False] * len(self.awaiting)
