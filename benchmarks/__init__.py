"""Benchmarks of overlap-sgd against post-backward optimizers and PyTorch's own overlap.

Run ``python -m benchmarks.overlap_bench --help`` for the command line.
"""

__all__: list[str] = []
