"""``check_finite``: keep a bucket whose communicated gradients hold inf or NaN untouched.

Two ways to reach the verdict, the same outcome for the parameters:

- ``"backward"``: each bucket's gradients are checked on the host before its update; a bad
  bucket is not updated and :class:`NonFiniteGradientError` is raised from ``backward()``.
  Free on CPU; on CUDA each check waits for the device.
- ``"step"``: each bucket's verdict stays on the device (one flag per bucket, computed by one
  multi-tensor kernel) and is handed to the update as ``found_inf``: torch's fused kernels
  then skip the update on the device, so backward never waits for the device. The flags are
  read once, by ``step()``, which raises the same error.

Which updates keep a device verdict on the device (no host read inside backward):

- SGD, Adam and AdamW whose group leaves the kernel to torch (``foreach=None, fused=None``):
  on CUDA they run torch's fused kernel, which skips on the device (Adam and AdamW then keep
  their ``step`` counters on the device, as ``fused=True`` does; results differ from torch's
  multi-tensor default by rounding, as with any change of kernel family), and any group
  with ``fused=True``.
- These read the verdict on the host, once per bucket (on CUDA a wait for the device): a
  group that names a non-fused kernel (``foreach=True``, ``foreach=False``) or is
  ``capturable``, complex parameters, every optimizer without a fused kernel (Adagrad,
  RMSprop, NAdam, Muon, the generic path), and the first step of a bucket whose state does
  not exist yet (a skipped first step must not create it).

``True`` chooses ``"step"`` on CUDA where an ``OverlappedOptimizer.step()`` follows each
backward (it is what reads the flags), ``"backward"`` everywhere else.

Example:
    >>> import torch
    >>> NonFiniteGradientError(["head.bias"], 3).names
    ['head.bias']
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .bucket import BucketPlan

__all__ = ["FiniteCheck", "NonFiniteGradientError", "WHERE"]

#: Where a non-finite gradient can be reported: see the module docs.
WHERE = ("backward", "step")


class NonFiniteGradientError(FloatingPointError):
    """A bucket's communicated gradient holds inf or NaN (raised with ``check_finite=True``)."""

    def __init__(self, names: Sequence[str], bucket: int):
        self.names = list(names)
        self.bucket = bucket
        shown = ", ".join(repr(n) for n in self.names[:8])
        more = f" and {len(self.names) - 8} more" if len(self.names) > 8 else ""
        super().__init__(
            f"non-finite gradient in bucket {bucket} for {shown}{more}; "
            "the bucket's parameters and optimizer state were left untouched"
        )


class FiniteCheck:
    """The non-finite check of one overlapped model.

    Args:
        where: ``"backward"``, ``"step"``, or ``"auto"`` (``"step"`` on CUDA when
            ``deferrable``, else ``"backward"``).
        deferrable: a ``step()`` follows every synchronising backward and calls
            :meth:`raise_deferred`.
    """

    def __init__(self, where: str = "auto", deferrable: bool = False):
        if where not in WHERE + ("auto",):
            raise ValueError(f"check_finite must be a bool, 'backward' or 'step', got {where!r}")
        if where == "step" and not deferrable:
            raise ValueError(
                "check_finite='step' needs an optimizer step() to report from; a hook registered "
                "by hand has none: use check_finite='backward'"
            )
        self.where = where
        self._deferrable = deferrable
        self._lock = threading.Lock()
        #: (bucket index, device flag, names of the bad parameters) of the buckets updated since
        #: the last read; the names are worked out only for a bad bucket.
        self._deferred: list[tuple[int, Tensor, Callable[[], list[str]]]] = []

    def on_device(self, plan: BucketPlan) -> bool:
        """Whether ``plan``'s verdict stays on the device until ``step()``."""
        if plan.sparse or not plan.takes_found_inf:
            return False
        if self.where == "auto":
            return self._deferrable and plan.device.type == "cuda"
        return self.where == "step"

    def verdict(self, plan: BucketPlan, result: Tensor) -> Tensor | None:
        """Check the (averaged) gradients of ``plan``'s bucket in ``result``.

        Raises :class:`NonFiniteGradientError` now (host verdict), or returns the device flag
        to pass to the update as ``found_inf`` (device verdict, read by :meth:`raise_deferred`).
        """
        if self.on_device(plan):
            found = plan.non_finite(result)
            names = lambda: plan.check_finite(result) or [plan.names[p] for p in plan.owned_positions()]  # noqa: E731
            with self._lock:
                self._deferred.append((plan.index, found, names))
            return found
        bad = plan.check_finite(result)
        if bad:
            raise NonFiniteGradientError(bad, plan.index)
        return None

    def verdict_of_flags(self, plan: BucketPlan, flags: Tensor) -> Tensor | None:
        """Like :meth:`verdict`, from per-parameter flags already computed (nonzero: that bucket
        parameter's gradient holds inf/NaN), e.g. reduced over the ranks of sharded training."""

        def names() -> list[str]:
            return [plan.names[pos] for pos, bad in enumerate(flags.tolist()) if bad]

        if self.on_device(plan):
            found = flags.amax().to(torch.float32) if flags.numel() else flags.new_zeros((), dtype=torch.float32)
            with self._lock:
                self._deferred.append((plan.index, found, names))
            return found
        bad = names()
        if bad:
            raise NonFiniteGradientError(bad, plan.index)
        return None

    def raise_deferred(self) -> None:
        """Read the device verdicts of the last backward (one wait for the device) and raise
        :class:`NonFiniteGradientError` for the first bad bucket, if any."""
        with self._lock:
            deferred, self._deferred = self._deferred, []
        if not deferred:
            return
        flags = torch.stack([found for _, found, _ in deferred]).tolist()
        for (index, _, names), bad in zip(deferred, flags):
            if bad:
                raise NonFiniteGradientError(names(), index)

    def discard(self) -> None:
        """Forget verdicts nobody read (a backward that raised before its step)."""
        with self._lock:
            self._deferred = []
