"""Training recipes, chosen by the config's top-level ``recipe`` key (schemas in ``config.SCHEMAS``)."""

from __future__ import annotations


def recipe(name: str):
    """The ``train(cfg, *, base_val_reward=None, accelerator=None) -> RunResult`` of recipe ``name``."""
    from mmalign.recipes import branch_rl, kto, preference, rwr, tpo

    return {
        "preference": preference.train,
        "rwr": rwr.train,
        "tpo": tpo.train,
        "kto": kto.train,
        "branch_rl": branch_rl.train,
    }[name]
