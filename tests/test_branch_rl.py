"""Online RL (recipe branch_rl): B²-DiffuRL and DDPO on a tiny real UNet pipeline, the sparse toy reward.

The model is a tiny ``UNet2DConditionModel`` pipeline built from config and loaded back from disk; the
sampler, rollout, advantages and loss are the recipe's own functions, never mocks. Counts in docstrings are
derived by hand.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import QUIET_RUN, text_encoder, tiny_unet, word_tokenizer
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from mmalign import adapters
from mmalign.adapters import diffusion, flow
from mmalign.cli import main
from mmalign.config import load_config, to_yaml
from mmalign.recipes import branch_rl, runtime
from mmalign.rewards import build_reward
from mmalign.rl import PromptStats
from mmalign.toy import flow_base, shapes

PROMPTS = [
    "a large red circle on the left",
    "a small blue square on the right",
    "a large green circle at the top",
    "a small red square in the center",
]
STEPS = 6  # DDIM steps of the tiny runs


@pytest.fixture(scope="module")
def rl_pipeline(tmp_path_factory) -> str:
    """A pixel-space 8×8 pipeline whose DDPM schedule the DDIM log-density accepts (no x̂_0 clipping)."""
    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        clip_sample=False,
        prediction_type="epsilon",
    )
    components = diffusion.Components(tiny_unet(3, 8), scheduler, text_encoder(tokenizer), tokenizer)
    path = tmp_path_factory.mktemp("rl") / "pipe"
    diffusion.save_components(components, str(path))
    return str(path)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


def rl_config(pipeline: str, prompts: str, out, *overrides: str):
    return load_config(
        None,
        [
            "recipe=branch_rl",
            f"model.path={pipeline}",
            f"output_dir={out}",
            *QUIET_RUN,
            f"rl.prompts={prompts}",
            "rl.prompts_per_stage=2",
            "rl.branches=3",
            "rl.left=2",
            f"rl.right={STEPS}",
            "rl.reward=toy_shapes",
            "rl.guidance_scale=1.0",
            f"sampling.steps={STEPS}",
            "optim.max_steps=2",
            "optim.lr=1e-2",
            "log.every=1",
            "lora.rank=4",
            "lora.alpha=4",
            *overrides,
        ],
    )


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_lora(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "final", diffusion.LORA_WEIGHTS))


def stage_rollout(cfg, *, stage: int = 0, span: int = 3):
    adapter = adapters.load(cfg.model)
    sampler = adapter.stochastic_sampler(steps=STEPS, noise=None, guidance_scale=cfg.rl.guidance_scale)
    rollout = branch_rl.sample_stage(
        sampler, adapter.network, PROMPTS[:2], cfg=cfg, stage=stage, span=span, device=torch.device("cpu")
    )
    return adapter, sampler, rollout


# ------------------------------------------------------------------------------------------- sampling


def test_branches_share_the_prefix_exactly_and_differ_after_the_split(rl_pipeline, prompts_file, tmp_path):
    """2 prompts × 3 branches, 6 DDIM steps, span 3: the prefix (steps 0–2) runs once per prompt, the branches
    run steps 3–5. Evaluations: 2·3 + 6·3 = 24. The last step of this schedule (ᾱ_prev = 1) is deterministic,
    so the trained steps are 3 and 4."""
    cfg = rl_config(rl_pipeline, prompts_file, tmp_path / "run")
    _, sampler, rollout = stage_rollout(cfg, span=3)
    assert sampler.stochastic == [True] * (STEPS - 1) + [False]
    assert rollout.steps.tolist() == [3, 4]
    assert rollout.evaluations == 24
    assert rollout.groups.tolist() == [0, 0, 0, 1, 1, 1]
    fork = rollout.states[:, 0]  # (6, 3, 8, 8): x_t at the split
    for group in (0, 1):
        members = fork[3 * group : 3 * group + 3]
        assert torch.equal(members[0], members[1]) and torch.equal(members[0], members[2])
        after = rollout.nexts[3 * group : 3 * group + 3, 0]
        assert not torch.allclose(after[0], after[1]) and not torch.allclose(after[1], after[2])
    assert not torch.allclose(fork[0], fork[3]), "two prompts share nothing"
    # the same keys give the same trajectories; DDPO's branches start from noise of their own
    assert torch.equal(stage_rollout(cfg, span=3)[2].nexts, rollout.nexts)
    ddpo = rl_config(rl_pipeline, prompts_file, tmp_path / "ddpo", "rl.algorithm=ddpo")
    _, _, full = stage_rollout(ddpo, span=STEPS)
    assert full.steps.tolist() == [0, 1, 2, 3, 4] and full.evaluations == 6 * STEPS
    assert not torch.allclose(full.states[0, 0], full.states[1, 0])


def test_the_sampler_at_eta_zero_retraces_the_adapters_ddim_sampling(rl_pipeline):
    """η = 0: every step is its mean, so the RL sampler must reproduce ``adapter.sample`` (guided) exactly."""
    adapter = adapters.load(load_config(None, ["toy.enabled=true", f"model.path={rl_pipeline}"]).model)
    sampler = adapter.stochastic_sampler(steps=STEPS, noise=0.0, guidance_scale=1.5)
    assert not any(sampler.stochastic)
    seeds = [3, 4]
    x = sampler.initial(seeds, torch.device("cpu"))
    condition = sampler.condition(PROMPTS[:2])
    with torch.no_grad():
        for i in range(STEPS):
            steps = torch.full((2,), i)
            x = sampler.posterior(sampler.output(adapter.network, x, steps, condition), x, steps).mean
    expected = adapter.sample(
        PROMPTS[:2], seeds, steps=STEPS, guidance_scale=1.5, batch_size=2, relayout=False
    )
    torch.testing.assert_close(sampler.decode(x), expected, rtol=0, atol=1e-5)
    assert sampler.forwards_per_sample == 2


# ------------------------------------------------------------------------------------------- the loss


def test_at_the_first_inner_step_the_ratio_is_one_and_the_loss_is_minus_the_mean_advantage(
    rl_pipeline, prompts_file, tmp_path
):
    cfg = rl_config(rl_pipeline, prompts_file, tmp_path / "run", "rl.thresholds=[0.0,0.0]")
    accelerator = Accelerator()
    adapter = adapters.load(cfg.model)
    policy = runtime.Policy(adapter, cfg, accelerator)
    sampler = adapter.stochastic_sampler(steps=STEPS, noise=None, guidance_scale=1.0)
    rollout = branch_rl.sample_stage(
        sampler, policy.network, PROMPTS[:2], cfg=cfg, stage=0, span=4, device=torch.device("cpu")
    )
    rewards = build_reward("toy_shapes")(rollout.images, rollout.prompts)
    ledger = branch_rl.Ledger(PromptStats(window=8, min_count=1))
    z, keep = branch_rl.advantages_of(rollout, rewards, ledger, cfg, 0)
    assert keep.sum() == 4, "thresholds at 0 keep the best and the worst of each group"
    batch = branch_rl.transitions(rollout, z, keep)
    assert len(batch["steps"]) == 4 * 3  # 4 kept samples × 3 stochastic steps of the last 4
    stats = branch_rl.ppo_step(sampler, policy, batch, torch.arange(12), cfg, torch.device("cpu"))
    torch.testing.assert_close(stats["ratio"], torch.ones(12), rtol=0, atol=1e-5)
    advantages = batch["advantages"].clamp(-5, 5)
    assert stats["loss"].mean().item() == pytest.approx(-advantages.mean().item(), abs=1e-5)
    assert not stats["clipfrac"].any()


# ------------------------------------------------------------------------------------------- whole runs


@pytest.mark.parametrize("algorithm", ["b2_diffurl", "ddpo"])
def test_a_tiny_unet_run_changes_only_the_lora_parameters(
    algorithm, rl_pipeline, prompts_file, tmp_path, monkeypatch
):
    kept = []
    real = diffusion.load_components

    def load_and_keep(path, **kwargs):
        kept.append(real(path, **kwargs))
        return kept[-1]

    monkeypatch.setattr(diffusion, "load_components", load_and_keep)
    cfg = rl_config(
        rl_pipeline, prompts_file, tmp_path / "run", f"rl.algorithm={algorithm}", "rl.thresholds=[0.0,0.0]"
    )
    branch_rl.train(cfg)
    unet = kept[-1].unet
    base = dict(real(rl_pipeline).unet.named_parameters())
    lora = {name: p for name, p in unet.named_parameters() if "lora_" in name}
    lora_b = [name for name in lora if "lora_B" in name]
    assert lora_b and all(lora[name].abs().sum() > 0 for name in lora_b), "LoRA B starts at 0 and must move"
    frozen = {
        name.replace(".base_layer", ""): p for name, p in unet.named_parameters() if "lora_" not in name
    }
    assert frozen.keys() == base.keys()
    assert not [name for name, p in frozen.items() if not torch.equal(p, base[name])]
    rows = [row for row in metrics(cfg.output_dir) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    # hand count, stage 0: b2 trains span 2 + floor(0·5/2) = 2 (prefix 4 steps × 2 prompts, branches 2 × 6);
    # ddpo samples 6 full trajectories of 6 steps
    sampling = {"b2_diffurl": 2 * 4 + 6 * 2, "ddpo": 6 * STEPS}[algorithm]
    assert rows[0]["denoiser_evals_sampling"] == sampling
    assert rows[0]["denoiser_evals"] > sampling and rows[1]["denoiser_evals"] > rows[0]["denoiser_evals"]
    assert rows[0]["split"] == {"b2_diffurl": 2, "ddpo": STEPS}[algorithm]


def test_gradient_accumulation_and_resume_equal_one_run(rl_pipeline, prompts_file, tmp_path):
    """Accumulation 3 cuts every optimizer step into 3 micro-batches whose losses are scaled to the full mean;
    a run stopped after stage 1 and resumed continues with the same reward history and noise."""
    common = ["rl.thresholds=[0.0,0.0]", "checkpoint.every=1", "optim.max_steps=2"]
    straight = rl_config(rl_pipeline, prompts_file, tmp_path / "straight", *common)
    branch_rl.train(straight)
    accumulated = rl_config(
        rl_pipeline, prompts_file, tmp_path / "accumulated", *common, "optim.gradient_accumulation_steps=3"
    )
    branch_rl.train(accumulated)
    out = tmp_path / "resumed"
    branch_rl.train(rl_config(rl_pipeline, prompts_file, out, *common, "optim.max_steps=1", "rl.stages=2"))
    branch_rl.train(rl_config(rl_pipeline, prompts_file, out, *common, "checkpoint.resume=latest"))
    reference = final_lora(straight.output_dir)
    for other in (accumulated.output_dir, out):
        got = final_lora(other)
        assert got.keys() == reference.keys()
        worst = max(float((got[k] - reference[k]).abs().max()) for k in got)
        assert worst < 1e-5, f"{other}: largest difference {worst:.3g}"
    assert metrics(out)[-1]["denoiser_evals"] == metrics(straight.output_dir)[-1]["denoiser_evals"]


# ------------------------------------------------------------------------------------------- bad input


def test_a_constant_sparse_reward_is_warned_once_and_its_stages_skipped_and_counted(
    rl_pipeline, prompts_file, tmp_path
):
    """An untrained 8×8 model never draws the captioned scene: the sparse reward is 0 everywhere."""
    cfg = rl_config(rl_pipeline, prompts_file, tmp_path / "run", "rl.reward=toy_shapes_sparse")
    with pytest.warns(
        UserWarning, match=r"stage 0: every reward of the stage is 0 \(toy_shapes_sparse\)"
    ) as caught:
        branch_rl.train(cfg)
    assert len([w for w in caught if "every reward" in str(w.message)]) == 1
    last = metrics(cfg.output_dir)[-1]
    assert last["stages_skipped_constant"] == 2 and last["loss"] is None and last["kept"] == 0


def test_thresholds_that_select_nothing_are_warned_once_and_counted(rl_pipeline, prompts_file, tmp_path):
    """z-scores of 3 branches lie within ±sqrt(2) of their mean: thresholds ±100 keep nothing."""
    cfg = rl_config(rl_pipeline, prompts_file, tmp_path / "run", "rl.thresholds=[100.0,-100.0]")
    with pytest.warns(UserWarning, match=r"`rl.thresholds` \[100.0, -100.0\] kept no branch") as caught:
        branch_rl.train(cfg)
    assert len([w for w in caught if "kept no branch" in str(w.message)]) == 1
    assert metrics(cfg.output_dir)[-1]["stages_skipped_nothing_kept"] == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rl.thresholds=[-0.5,0.5]", "`rl.thresholds` must be [high, low] with high >= low, got [-0.5, 0.5]"),
        ("rl.right=9", "`rl.left` <= `rl.right` <= sampling.steps (6) must hold, got left 2, right 9"),
        ("rl.prompts_per_stage=5", "`rl.prompts_per_stage` must be <= the 4 prompts of rl.prompts"),
        ("lora.dropout=0.1", "`lora.dropout` must be 0 for recipe branch_rl"),
        ("rl.algorithm=grpo", "`rl.algorithm` must be one of b2_diffurl, ddpo, got 'grpo'"),
    ],
)
def test_bad_rl_settings_exit_2_with_one_line(override, message, rl_pipeline, prompts_file, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(to_yaml(rl_config(rl_pipeline, prompts_file, tmp_path / "run")))
    code = main(["train", str(config), override])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mmalign: error:")]
    assert len(lines) == 1 and message in lines[0], lines


# ------------------------------------------------------------------------------------------- reward


def test_the_sparse_toy_reward_is_one_only_when_colour_shape_and_position_match():
    rng = np.random.default_rng(0)
    scene = shapes.Scene("red", "circle", "left", "large")
    caption = "a large red circle on the left"
    render = (
        torch.from_numpy(shapes.render(scene, rng)).permute(2, 0, 1).float()[None] / 255
    )  # (1, 3, 16, 16)
    wrong = [
        shapes.Scene("blue", "circle", "left", "large"),
        shapes.Scene("red", "square", "left", "large"),
        shapes.Scene("red", "circle", "right", "large"),
    ]
    others = [torch.from_numpy(shapes.render(s, rng)).permute(2, 0, 1).float() / 255 for s in wrong]
    images = torch.cat([render, torch.stack(others), torch.zeros(1, 3, 16, 16)])
    reward = build_reward("toy_shapes_sparse")
    assert reward(images, [caption] * 5).tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert reward.mistake(images, [caption] * 5).tolist() == [False, True, False, False, True]


# ------------------------------------------------------------------------------------------- flow models


@pytest.fixture(scope="module")
def flow_pipeline(tmp_path_factory) -> str:
    """An untrained pixel-space Wan pipeline of the shapes world (one head, one layer)."""
    path = tmp_path_factory.mktemp("flow") / "pipe"
    flow_base.build_untrained(0, world="shapes", heads=1, layers=1).save_pretrained(str(path))
    return str(path)


def test_a_tiny_flow_transformer_run_with_kl_changes_only_the_lora_parameters(
    flow_pipeline, prompts_file, tmp_path, monkeypatch
):
    """The flow SDE (a = 0.7) with the KL to the reference: 2 prompts × 3 branches, 4 Euler–Maruyama steps,
    span 2 at stage 0 → sampling 2·2 + 6·2 = 16 evaluations; every step has σ > 0 (stochastic)."""
    kept = []
    real = flow.load_pipeline

    def load_and_keep(path, **kwargs):
        kept.append(real(path, **kwargs))
        return kept[-1]

    monkeypatch.setattr(flow, "load_pipeline", load_and_keep)
    cfg = rl_config(
        flow_pipeline,
        prompts_file,
        tmp_path / "run",
        "model.kind=flow",
        "model.resolution=16",
        "model.num_frames=1",
        "sampling.steps=4",
        "rl.right=4",
        "rl.kl_coef=0.1",
        "optim.max_steps=1",
        "rl.thresholds=[0.0,0.0]",
        "lora.target_modules=[to_q,to_k,to_v]",
    )
    branch_rl.train(cfg)
    network = kept[-1].transformer
    base = dict(real(flow_pipeline).transformer.named_parameters())
    lora_b = [p for name, p in network.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    frozen = {n.replace(".base_layer", ""): p for n, p in network.named_parameters() if "lora_" not in n}
    assert frozen.keys() == base.keys()
    assert not [name for name, p in frozen.items() if not torch.equal(p, base[name])]
    rows = [row for row in metrics(cfg.output_dir) if "loss" in row]
    assert len(rows) == 1 and rows[0]["denoiser_evals_sampling"] == 16 and rows[0]["split"] == 2
    # the first inner epoch starts at policy = reference (KL 0), the second after one step away from it
    assert 0 < rows[0]["kl"] < 1


# ------------------------------------------------------------------------------------------- benchmark


def test_the_comparison_benchmark_reads_reward_against_evaluations(tmp_path, capsys):
    """DDPO ends at validation reward 0.6 after 3000 evaluations; B²-DiffuRL first reaches 0.6 at its second
    validation, after 1200 evaluations: 1200 / 3000 = 0.4×."""
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    )
    import b2_vs_ddpo

    rows = {
        "b2": [(0, None, 0.4), (2, 600, 0.5), (4, 1200, 0.65), (6, 1800, 0.7)],
        "ddpo": [(0, None, 0.4), (2, 1000, 0.45), (4, 2000, 0.55), (6, 3000, 0.6)],
    }
    for name, points in rows.items():
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.jsonl", "w") as f:
            for step, evaluations, reward in points:
                if evaluations is not None:
                    f.write(json.dumps({"step": step, "loss": 0.0, "denoiser_evals": evaluations}) + "\n")
                f.write(json.dumps({"step": step, "val_reward": reward}) + "\n")
    out = tmp_path / "curve"
    b2_vs_ddpo.main(["--b2", str(tmp_path / "b2"), "--ddpo", str(tmp_path / "ddpo"), "--out", str(out)])
    result = json.loads((tmp_path / "curve.json").read_text())
    assert result["b2_diffurl_evals_to_reach_ddpo_final"] == 1200 and result["evals_ratio"] == pytest.approx(
        0.4
    )
    assert [p["denoiser_evals"] for p in result["curves"]["ddpo"]] == [0, 1000, 2000, 3000]
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert "reached it after 1,200 (0.40×)" in capsys.readouterr().out
