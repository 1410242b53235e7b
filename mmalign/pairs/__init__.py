"""Pair construction from scored samples: best vs worst of N, offline (toy data) or online (a pool)."""

from mmalign.pairs.best_worst import best_and_worst, sample_best_worst_pairs
from mmalign.pairs.online import OnlinePool, OnlineSamples

__all__ = ["OnlinePool", "OnlineSamples", "best_and_worst", "sample_best_worst_pairs"]
