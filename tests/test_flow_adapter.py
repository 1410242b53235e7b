"""Contracts of the rectified-flow adapter and Flow-DPO, on tiny real SD3 / Flux / Wan / LTX pipelines.

What Flow-DPO (Liu et al., arXiv 2501.13918) needs and these tests pin:

- x_t = (1 − σ)·x0 + σ·ε and the velocity target ε − x0, as diffusers' own scheduler defines them;
- σ from the configured density with the scheduler's shift; both members of a pair, and the policy and the
  reference, see the same σ, noise and caption;
- score = −½ · mean over every non-batch dimension, so images and videos are scored alike;
- β constant or β·(1 − t)²;
- every family trains a LoRA from a folder on disk, and the export loads in the family's diffusers pipeline
  with ``load_lora_weights`` and reproduces the trained policy.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os

import pytest
import tiny_flow
import torch
from conftest import TOY, run_overrides
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from mmalign import adapters
from mmalign.adapters import flow
from mmalign.config import load_config
from mmalign.errors import UserError
from mmalign.losses import dpo
from mmalign.recipes import preference, runtime

FAMILIES = ("sd3", "flux", "wan", "ltx")


@pytest.fixture(scope="session")
def flow_pipelines(tmp_path_factory) -> dict[str, str]:
    """Each tiny family saved to disk once per session."""
    root = tmp_path_factory.mktemp("flow")
    return {family: tiny_flow.save(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def video_pairs(tmp_path_factory) -> dict[str, str]:
    """VideoGen-RewardBench CSVs of GIF clips sized for the Wan and LTX tiny models."""
    root = tmp_path_factory.mktemp("videos")
    return {
        family: tiny_flow.write_videogen_csv(root / family, frames=tiny_flow.MEDIA[family][0], size=32)
        for family in ("wan", "ltx")
    }


def load_adapter(path: str, family: str, *overrides: str):
    cfg = load_config(None, [TOY, f"model.path={path}", *tiny_flow.media_overrides(family), *overrides])
    return adapters.load(cfg.model, timesteps=cfg.timesteps), cfg


@pytest.fixture
def kept_pipelines(monkeypatch) -> list:
    """The pipelines each ``train`` call loads — the real objects, kept so the trained network can be read."""
    real = flow.load_pipeline
    kept = []

    def load_and_keep(path, **kwargs):
        pipe = real(path, **kwargs)
        kept.append(pipe)
        return pipe

    monkeypatch.setattr(flow, "load_pipeline", load_and_keep)
    return kept


def random_lora(network, targets, *, scale: float = 0.1) -> None:
    """A LoRA whose up-projections are random (peft starts them at zero), so that policy ≠ reference."""
    torch.manual_seed(1)
    network.requires_grad_(False)
    from mmalign.adapters.base import add_peft_lora

    add_peft_lora(network, rank=4, alpha=4.0, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def latents_of(adapter, batch: int, seed: int = 0) -> torch.Tensor:
    shape = adapter.family.latent_shape(adapter.pipe, adapter.media_shape())
    return torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))


def draws(adapter, count: int, latent_shape) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [adapter.draw(torch.Generator().manual_seed(100 + i), latent_shape) for i in range(count)]
    return torch.stack([n for n, _ in pairs]), torch.stack([t for _, t in pairs])


# ---------------------------------------------------------------------------------- 1. x_t and the target


def test_noisy_latents_and_velocity_target_match_the_scheduler(flow_pipelines):
    adapter, _ = load_adapter(flow_pipelines["sd3"], "sd3")
    scheduler = adapter.scheduler
    assert scheduler.config.shift == 3.0
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = scheduler.timesteps[torch.tensor([0, 100, 500, 999])]  # (4,) on the scheduler's own table
    ours = adapter.noisy(x0, noise, timesteps)
    theirs = scheduler.scale_noise(x0, timesteps, noise)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    # Euler steps along the exact velocity ε − x0 pass through x_t at every σ of the schedule and end at x0.
    scheduler.set_timesteps(4)
    latents = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        torch.testing.assert_close(latents, adapter.noisy(x0, noise, t.expand(4)), rtol=0, atol=1e-5)
        latents = scheduler.step(noise - x0, t, latents).prev_sample
        assert i < 4
    torch.testing.assert_close(latents, x0, rtol=0, atol=1e-5)


def test_sigma_is_drawn_from_the_density_with_the_schedulers_shift(flow_pipelines):
    shape = (4, 8, 8)
    uniform, _ = load_adapter(flow_pipelines["sd3"], "sd3", "timesteps.density=uniform")
    generator = torch.Generator().manual_seed(7)
    noise, t = uniform.draw(generator, shape)
    replay = torch.Generator().manual_seed(7)
    assert torch.equal(noise, torch.randn(shape, generator=replay))
    u = torch.rand(1, generator=replay)
    assert float(t) == pytest.approx(1000 * float(3 * u / (1 + 2 * u)), rel=1e-6)  # shift 3

    # logit-normal(0.5, 0.7) with the shift overridden to 1: logit(σ) has that mean and std
    logit, _ = load_adapter(
        flow_pipelines["sd3"],
        "sd3",
        "timesteps.logit_mean=0.5",
        "timesteps.logit_std=0.7",
        "timesteps.shift=1.0",
    )
    sigmas = torch.stack([logit.draw(torch.Generator().manual_seed(i), shape)[1] for i in range(2000)]) / 1000
    values = torch.logit(sigmas.double())
    assert float(values.mean()) == pytest.approx(0.5, abs=0.05)
    assert float(values.std()) == pytest.approx(0.7, abs=0.05)

    # Flux's scheduler shifts by the resolution: σ' = time_shift(μ(sequence length), u)
    flux, _ = load_adapter(flow_pipelines["flux"], "flux", "timesteps.density=uniform")
    latent_shape = (4, 8, 8)
    generator = torch.Generator().manual_seed(3)
    _, t = flux.draw(generator, latent_shape)
    replay = torch.Generator().manual_seed(3)
    torch.randn(latent_shape, generator=replay)
    u = torch.rand(1, generator=replay)
    mu = calculate_shift(16, 256, 4096, 0.5, 1.15)  # (8/2)·(8/2) = 16 packed tokens
    expected = math.exp(mu) / (math.exp(mu) + (1 / float(u) - 1))
    assert float(t) / 1000 == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------- 2. pair sharing, score


class Calls:
    """The (hidden_states, timestep) of every forward of ``network``, in order, and whether its LoRA was on."""

    def __init__(self, network):
        self.calls = []
        self.handle = network.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        lora = [m for m in module.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")]
        self.calls.append(
            {
                "x": bound.arguments["hidden_states"].detach().clone(),
                "t": bound.arguments["timestep"].detach().clone(),
                "text": bound.arguments["encoder_hidden_states"].detach().clone(),
                "lora_active": not lora[0].disable_adapters if lora else None,
            }
        )


def test_pair_members_and_reference_share_sigma_noise_and_caption(flow_pipelines, tmp_path):
    adapter, _ = load_adapter(flow_pipelines["wan"], "wan")
    network = adapter.network
    random_lora(network, tiny_flow.LORA_TARGETS["wan"])
    size = 3
    chosen, rejected = latents_of(adapter, size, 1), latents_of(adapter, size, 2)  # (B, C, F, h, w)
    noise, timesteps = draws(adapter, size, chosen.shape[1:])
    assert len(set(timesteps.tolist())) == size
    batch = {
        "captions": ["a red square", "a dog", ""],
        "chosen": chosen,
        "rejected": rejected,
        "label": torch.ones(size),
        "noise": noise,
        "timesteps": timesteps,
    }
    cfg = load_config(None, [TOY, "loss.beta=100"])
    recorder = Calls(network)
    try:
        stats = preference.preference_step(
            adapter, network, functools.partial(runtime.reference_of, network, None), batch, cfg
        )
    finally:
        recorder.handle.remove()
    assert len(recorder.calls) == 2
    reference, policy = recorder.calls  # the reference first
    assert reference["lora_active"] is False and policy["lora_active"] is True
    for key in ("x", "t", "text"):
        assert torch.equal(reference[key], policy[key]), key
    x0 = torch.cat([chosen, rejected])
    assert torch.equal(policy["t"][:size], policy["t"][size:])
    assert torch.equal(policy["t"][:size], timesteps)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1, 1).repeat(2, 1, 1, 1, 1)
    recovered = (policy["x"] - (1 - sigma) * x0) / sigma  # invert x_t = (1 − σ)·x0 + σ·ε
    torch.testing.assert_close(recovered[:size], noise, atol=1e-4, rtol=0)
    torch.testing.assert_close(recovered[size:], noise, atol=1e-4, rtol=0)
    assert torch.equal(policy["text"][:size], policy["text"][size:])
    assert not torch.allclose(stats["ref_err_w"], stats["policy_err_w"])


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_score_is_minus_half_velocity_error_over_every_non_batch_dim(flow_pipelines, family):
    adapter, _ = load_adapter(flow_pipelines[family], family)
    network = adapter.network.eval()
    x0 = latents_of(adapter, 3)
    noise, timesteps = draws(adapter, 3, x0.shape[1:])
    condition = adapter.encode_prompts(["a red square", "a dog", ""])
    with torch.no_grad():
        noisy = (1 - timesteps.view(-1, *[1] * (x0.dim() - 1)) / 1000) * x0 + timesteps.view(
            -1, *[1] * (x0.dim() - 1)
        ) / 1000 * noise
        prediction = adapter.family.predict(adapter.pipe, network, noisy, timesteps, condition)
        dims = tuple(range(1, x0.dim()))  # (C, H, W) or (C, F, H, W)
        expected = (prediction - (noise - x0)).pow(2).mean(dim=dims)
        got = adapters.score_of(adapter.errors(network, x0, noise, timesteps, condition))
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, -0.5 * expected, rtol=1e-5, atol=1e-6)
    assert len(set(got.tolist())) == 3, "one score per sample"
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        shuffled = adapter.errors(
            network, x0[order], noise[order], timesteps[order], {k: v[order] for k, v in condition.items()}
        )
    torch.testing.assert_close(-0.5 * shuffled, got[order], rtol=1e-5, atol=1e-6)


def test_constant_and_weighted_beta(flow_pipelines):
    """β·(1 − σ)² per pair for the weighted form; the constant form is plain DPO with β."""
    adapter, _ = load_adapter(flow_pipelines["sd3"], "sd3")
    network = adapter.network
    random_lora(network, tiny_flow.LORA_TARGETS["sd3"], scale=0.3)
    chosen, rejected = latents_of(adapter, 4, 1), latents_of(adapter, 4, 2)
    noise, timesteps = draws(adapter, 4, chosen.shape[1:])
    batch = {
        "captions": ["a red square"] * 4,
        "chosen": chosen,
        "rejected": rejected,
        "label": torch.ones(4),
        "noise": noise,
        "timesteps": timesteps,
    }
    reference = functools.partial(runtime.reference_of, network, None)
    out = {}
    for schedule in ("constant", "weighted"):
        cfg = load_config(None, [TOY, "loss.beta=100", f"loss.beta_schedule={schedule}"])
        out[schedule] = preference.preference_step(adapter, network, reference, batch, cfg)
    stats = out["constant"]
    pw, pl = -0.5 * stats["policy_err_w"], -0.5 * stats["policy_err_l"]
    rw, rl = -0.5 * stats["ref_err_w"], -0.5 * stats["ref_err_l"]
    sigma = timesteps / 1000
    torch.testing.assert_close(
        stats["loss"].detach(), dpo(pw, pl, rw, rl, beta=100.0).loss, rtol=1e-5, atol=1e-7
    )
    weighted = dpo(pw, pl, rw, rl, beta=100.0 * (1 - sigma) ** 2).loss
    torch.testing.assert_close(out["weighted"]["loss"].detach(), weighted, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out["weighted"]["loss"], stats["loss"], atol=1e-4)


# ------------------------------------------------------------------------- 3. training and export per family


def family_overrides(family: str, pipelines: dict, video_pairs: dict, pairs_parquet: str, out) -> list[str]:
    data = video_pairs.get(family, pairs_parquet)
    overrides = [
        *run_overrides(pipelines[family], data, out),
        *tiny_flow.media_overrides(family),
        "lora.target_modules=[" + ",".join(tiny_flow.LORA_TARGETS[family]) + "]",
        "lora.rank=4",
        "loss.beta=100",
        "optim.max_steps=3",
        "optim.batch_size=2",
        "optim.lr=1e-2",
        "log.every=1",
    ]
    if family in video_pairs:
        overrides += ["data.format=videogen_csv", "data.dimension=VQ"]
    return overrides


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_a_lora_and_its_export_loads_in_the_diffusers_pipeline(
    family, flow_pipelines, video_pairs, pairs_parquet, tmp_path, kept_pipelines
):
    cfg = load_config(
        None, family_overrides(family, flow_pipelines, video_pairs, pairs_parquet, tmp_path / "run")
    )
    result = preference.train(cfg)
    trained = kept_pipelines[-1].transformer.eval()

    base = (
        tiny_flow.PIPELINES[family]
        .from_pretrained(flow_pipelines[family], local_files_only=True, **_absent(flow_pipelines[family]))
        .transformer
    )
    lora = {name: p for name, p in trained.named_parameters() if "lora_" in name}
    assert lora and any(float(p.detach().abs().max()) > 0 for name, p in lora.items() if "lora_B" in name)
    frozen = {n.replace(".base_layer", ""): p for n, p in trained.named_parameters() if "lora_" not in n}
    base_params = dict(base.named_parameters())
    assert frozen.keys() == base_params.keys()
    assert all(torch.equal(p, base_params[name]) for name, p in frozen.items()), "a base weight moved"

    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the start
    assert all(math.isfinite(row["loss"]) for row in rows)

    # the export, loaded by the family's own pipeline, is the trained policy
    pipe = tiny_flow.PIPELINES[family].from_pretrained(
        flow_pipelines[family], local_files_only=True, **_absent(flow_pipelines[family])
    )
    pipe.load_lora_weights(result.final_dir)
    adapter, _ = load_adapter(flow_pipelines[family], family)
    x0 = latents_of(adapter, 2, seed=5)
    noise, timesteps = draws(adapter, 2, x0.shape[1:])
    condition = adapter.encode_prompts(["a red square", "a blue circle"])
    with torch.no_grad():
        ours = adapter.errors(trained, x0, noise, timesteps, condition)
        loaded = adapter.errors(pipe.transformer.eval(), x0, noise, timesteps, condition)
        plain = adapter.errors(base.eval(), x0, noise, timesteps, condition)
    torch.testing.assert_close(loaded, ours, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, ours, atol=1e-5), "the LoRA should change the predictions"


def _absent(path: str) -> dict:
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    return {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_sampler_matches_the_diffusers_pipeline(flow_pipelines, family):
    """Our Euler loop with classifier-free guidance is the family pipeline's own, from the same noise."""
    adapter, _ = load_adapter(flow_pipelines[family], family)
    prompts, seeds = ["a red square", "a dog"], [11, 12]
    _, ours = adapter.sample(prompts, seeds, steps=3, guidance_scale=2.0, return_latents=True)
    shape = adapter.family.latent_shape(adapter.pipe, adapter.media_shape())
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    size = adapter.media_shape()
    options = {"num_frames": size[0]} if len(size) == 3 else {}
    theirs = adapter.pipe(
        prompt=prompts,
        negative_prompt=[""] * 2,
        height=size[-2],
        width=size[-1],
        latents=noise,
        num_inference_steps=3,
        guidance_scale=2.0,
        output_type="latent",
        **({"max_sequence_length": adapter.pipe.tokenizer.model_max_length} if family == "wan" else {}),
        **options,
    )
    theirs = theirs.frames if family == "wan" else theirs.images
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------- 4. bad input


def test_a_unet_folder_given_to_the_flow_adapter_names_the_kind(pixel_pipeline):
    with pytest.raises(UserError, match="holds a UNet .*model.kind=diffusion"):
        load_adapter(pixel_pipeline, "sd3")


def test_a_transformer_folder_given_to_the_diffusion_adapter_names_the_kind(flow_pipelines):
    cfg = load_config(None, [TOY, f"model.path={flow_pipelines['wan']}"])
    with pytest.raises(UserError, match="holds a transformer .*model.kind=flow"):
        adapters.load(cfg.model)


def test_explicit_xformers_on_a_cpu_is_an_error_and_auto_falls_back_to_sdpa():
    assert runtime.resolve_attention("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(UserError, match="xformers"):
        runtime.resolve_attention("xformers", torch.device("cpu"))


@pytest.mark.parametrize("backend", ["sdpa", "math", "flash"])
def test_attention_backends_compute_the_same_velocity(flow_pipelines, backend):
    adapter, _ = load_adapter(flow_pipelines["wan"], "wan")
    network = adapter.network.eval()
    x0 = latents_of(adapter, 2)
    noise, timesteps = draws(adapter, 2, x0.shape[1:])
    condition = adapter.encode_prompts(["a red square", "a dog"])
    with torch.no_grad():
        adapter.set_attention(network, "sdpa")
        reference = adapter.errors(network, x0, noise, timesteps, condition)
        adapter.set_attention(network, backend)
        got = adapter.errors(network, x0, noise, timesteps, condition)
        adapter.set_attention(network, "sdpa")
    torch.testing.assert_close(got, reference, rtol=1e-4, atol=1e-6)
