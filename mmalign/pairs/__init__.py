"""Pair construction: best vs worst of N scored samples, offline (toy data) or online (a pool), and TPO's
mismatched captions (a caption perturbed so that it no longer describes its image)."""

from mmalign.pairs.best_worst import best_and_worst, sample_best_worst_pairs
from mmalign.pairs.online import OnlinePool, OnlineSamples
from mmalign.pairs.tpo import LLMPerturber, Perturbation, RulePerturber, perturb_all, validate_output

__all__ = [
    "LLMPerturber",
    "OnlinePool",
    "OnlineSamples",
    "Perturbation",
    "RulePerturber",
    "best_and_worst",
    "perturb_all",
    "sample_best_worst_pairs",
    "validate_output",
]
