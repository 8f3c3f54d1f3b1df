"""DDP communication hooks that update each bucket's parameters as soon as it is communicated."""

from .bucket import BucketPlan, Segment
from .executor import Executor, InlineExecutor, StreamExecutor, ThreadExecutor, make_executor
from .update_hook import NonFiniteGradientError, OverlapHookState, make_overlap_hook, overlap_hook

__all__ = [
    "BucketPlan",
    "Executor",
    "InlineExecutor",
    "NonFiniteGradientError",
    "OverlapHookState",
    "Segment",
    "StreamExecutor",
    "ThreadExecutor",
    "make_executor",
    "make_overlap_hook",
    "overlap_hook",
]
