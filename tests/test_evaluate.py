"""Evaluation statistics: clustered standard errors, paired win rates, the summary keys."""

import math

import torch
from conftest import EVAL_KEYS

from mmalign.recipes import evaluate


def scored(rewards, prompts, mistakes=None) -> evaluate.Scored:
    n = len(rewards)
    return evaluate.Scored(
        prompts,
        list(range(n)),
        torch.tensor(rewards, dtype=torch.float64),
        None if mistakes is None else torch.tensor(mistakes),
        torch.zeros(n, 3, 2, 2),
    )


def test_clustered_mean_uses_per_prompt_means():
    """Prompt a: 0.2, 0.4 → 0.3; prompt b: 0.8, 1.0 → 0.9. Mean 0.6; SE = std([0.3, 0.9]) / √2 = 0.3."""
    mean, se = evaluate.clustered_mean(
        torch.tensor([0.2, 0.4, 0.8, 1.0], dtype=torch.float64), ["a", "a", "b", "b"]
    )
    assert math.isclose(mean, 0.6, abs_tol=1e-12)
    assert math.isclose(se, math.sqrt(0.18) / math.sqrt(2), abs_tol=1e-12)


def test_wins_count_ties_as_half():
    w = evaluate.wins(torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.5, 0.5, 0.3]))
    assert w.tolist() == [1.0, 0.5, 0.0]


def test_prompt_seeds_are_shared_and_paired():
    prompts, seeds = evaluate.prompt_seeds(["x", "y"], 3)
    assert prompts == ["x", "x", "x", "y", "y", "y"]
    assert seeds == [1000, 1001, 1002, 1000, 1001, 1002]


def test_summary_has_design_keys_and_correct_numbers():
    prompts = ["a", "a", "b", "b"]
    base = scored([0.5, 0.5, 0.5, 0.5], prompts, [True, False, True, False])
    aligned = scored([0.6, 0.4, 0.7, 0.6], prompts, [False, False, True, False])
    control = scored([0.4, 0.5, 0.5, 0.4], prompts, [True, True, True, False])
    s = evaluate.summarize(base, {"aligned": aligned, "control": control})
    for key in EVAL_KEYS:
        assert key in s
    assert s["num_samples"] == 4
    assert math.isclose(s["aligned_reward_mean"], 0.575)
    assert math.isclose(s["win_rate"], 0.75)  # 0.6 > 0.5, 0.4 < 0.5, 0.7 > 0.5, 0.6 > 0.5
    assert math.isclose(s["control_win_rate"], 0.25)  # two losses and two ties
    assert s["base_error_rate"] == 0.5 and s["aligned_error_rate"] == 0.25 and s["control_error_rate"] == 0.75


def test_table_and_checks_render():
    prompts = ["a", "a", "b", "b"]
    base = scored([0.5] * 4, prompts, [True, False, True, False])
    aligned = scored([0.6, 0.55, 0.7, 0.65], prompts, [False] * 4)
    s = evaluate.summarize(base, {"aligned": aligned})
    table = evaluate.format_table(s, ["aligned"])
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    # base: 0.5 everywhere, half mistakes; aligned: per-prompt means 0.575 and 0.675 → 0.625, clustered
    # SE = std([0.575, 0.675]) / √2 = 0.05 (95% CI ± 0.098); gains 0.075 and 0.175 → 0.125 / 0.05 = +2.5 SE
    assert rows["base"] == ["base", "0.500", "±", "0.000", "—", "0.500"]
    assert rows["aligned"] == ["aligned", "0.625", "±", "0.098", "+2.5", "1.000", "±", "0.000", "0.000"]
    checks = evaluate.format_checks(s).splitlines()
    assert checks[0].split() == [
        "[ok]",
        "mistake",
        "rate",
        "aligned",
        "/",
        "base",
        "=",
        "0.00",
        "target",
        "≤",
        "0.60",
    ]
    assert checks[1].startswith("  [ok] win rate vs base = 1.000")
    assert checks[2].startswith("  [MISS] reward gain = +0.1250 (+2.5 clustered SE)")  # below +3 SE


def test_checks_against_a_supervised_fine_tuning_control_ask_for_a_win_rate_margin():
    """TPO's control (plain fine-tuning on the captioned images) may improve on the base; the aligned model
    must beat it by 0.05 in win rate instead of the control having to stay at the base."""
    prompts = ["a", "a", "b", "b"]
    base = scored([0.5] * 4, prompts, [True, False, True, False])
    aligned = scored([0.6, 0.55, 0.7, 0.65], prompts, [False] * 4)  # wins all four
    sft = scored([0.6, 0.4, 0.7, 0.65], prompts, [False] * 4)  # wins three: 0.75
    s = evaluate.summarize(base, {"aligned": aligned, "control": sft})
    checks = evaluate.format_checks(s, control="sft").splitlines()
    assert len(checks) == 4
    assert checks[3].split("target")[0].split() == [
        "[ok]",
        "aligned",
        "−",
        "control",
        "(supervised",
        "fine-tuning)",
        "win",
        "rate",
        "=",
        "+0.250",
        "(control",
        "win",
        "0.750)",
    ]
    assert checks[3].rstrip().endswith("target ≥ +0.05")
    close = evaluate.summarize(base, {"aligned": sft, "control": sft})
    assert (
        evaluate.format_checks(close, control="sft").splitlines()[3].startswith("  [MISS] aligned − control")
    )
    no_labels = evaluate.format_checks(s).splitlines()
    assert len(no_labels) == 5 and "no better than base" in no_labels[3]
