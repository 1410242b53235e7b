"""Losses: pure functions on per-sample scores or errors, chosen by name in :data:`LOSSES`.

``LOSSES`` is the one list of loss names: the config's ``loss.name`` choices, the preference recipe and
``docs/algorithms.md`` all read it (``tests/test_docs.py`` checks the docs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmalign.errors import UserError
from mmalign.losses.kto import KTOLoss, kto, mismatched_reference_point
from mmalign.losses.ppo import PPOLoss, ppo_clip
from mmalign.losses.preference import PairLoss, bco_pair, dpo, hinge, ipo, robust
from mmalign.losses.rwr import rwr, rwr_weights, sft


@dataclass(frozen=True)
class LossSpec:
    """What a recipe needs to know to call one loss.

    Attributes:
        fn: the loss function.
        inputs: what it is called on. ``pairs``: the four per-sample scores of a pair
            ``(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta)``, returning a
            :class:`PairLoss`; ``chosen``: the per-sample errors of the chosen member alone; ``unpaired``:
            desirable and undesirable samples on their own (KTO).
        recipes: the training recipes that run it (where it is a value of ``loss.name``).
        options: the ``loss.*`` config keys passed on as keyword arguments of the same name.
        state: keyword arguments the recipe keeps up to date over the run and passes on (``delta``: BCO's
            running reward shift).
    """

    fn: Callable
    inputs: str
    recipes: tuple[str, ...]
    options: tuple[str, ...] = ()
    state: tuple[str, ...] = ()


PAIRED = ("preference", "tpo")  # the recipes that train on pairs: image pairs, or one image and two captions
LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo, "pairs", PAIRED, options=("label_smoothing",)),
    "ipo": LossSpec(ipo, "pairs", PAIRED),
    "hinge": LossSpec(hinge, "pairs", PAIRED),
    "robust": LossSpec(robust, "pairs", PAIRED, options=("label_noise",)),
    "bco_pair": LossSpec(bco_pair, "pairs", ("preference",), state=("delta",)),
    "sft": LossSpec(sft, "chosen", PAIRED),
    "kto": LossSpec(kto, "unpaired", ("tpo", "kto")),
}

# The losses with the pairwise signature (policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta).
PAIRWISE = tuple(name for name, spec in LOSSES.items() if spec.inputs == "pairs")


def names_for(recipe: str) -> tuple[str, ...]:
    """The loss names recipe ``recipe`` accepts, in the order of :data:`LOSSES`."""
    return tuple(name for name, spec in LOSSES.items() if recipe in spec.recipes)


def get_loss(name: str) -> LossSpec:
    """The entry of loss ``name``; raise UserError listing the valid names otherwise."""
    if name not in LOSSES:
        raise UserError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


__all__ = [
    "LOSSES",
    "PAIRWISE",
    "KTOLoss",
    "LossSpec",
    "PPOLoss",
    "PairLoss",
    "bco_pair",
    "dpo",
    "get_loss",
    "hinge",
    "ipo",
    "kto",
    "mismatched_reference_point",
    "names_for",
    "ppo_clip",
    "robust",
    "rwr",
    "rwr_weights",
    "sft",
]
