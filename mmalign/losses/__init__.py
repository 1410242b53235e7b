"""Preference losses: pure functions on per-sample scores, chosen by name in :data:`LOSSES`."""

from __future__ import annotations

from collections.abc import Callable

from mmalign.errors import UserError
from mmalign.losses.kto import KTOLoss, kto, mismatched_reference_point
from mmalign.losses.preference import PairLoss, bco_pair, dpo, hinge, ipo, robust
from mmalign.losses.rwr import rwr, rwr_weights

LOSSES: dict[str, Callable] = {
    "dpo": dpo,
    "ipo": ipo,
    "hinge": hinge,
    "robust": robust,
    "bco_pair": bco_pair,
    "kto": kto,
}

# The losses with the pairwise signature (policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta).
PAIRWISE = ("dpo", "ipo", "hinge", "robust", "bco_pair")


def get_loss(name: str) -> Callable:
    """Return the loss function called ``name``; raise UserError listing the valid names otherwise."""
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


__all__ = [
    "LOSSES",
    "PAIRWISE",
    "KTOLoss",
    "PairLoss",
    "bco_pair",
    "dpo",
    "get_loss",
    "hinge",
    "ipo",
    "kto",
    "mismatched_reference_point",
    "robust",
    "rwr",
    "rwr_weights",
]
