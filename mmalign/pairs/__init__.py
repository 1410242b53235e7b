"""Pair construction from scored samples."""

from mmalign.pairs.best_worst import best_and_worst, sample_best_worst_pairs

__all__ = ["best_and_worst", "sample_best_worst_pairs"]
