"""Contracts of the diffusion adapter and the preference step, on tiny real diffusers / transformers models.

What Diffusion-DPO (Wallace et al., arXiv 2311.12908) needs and these tests pin:

- both members of a pair, and the policy and the reference, see the same timestep, noise and caption;
- the UNet's target is ε, or the scheduler's velocity v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x0;
- score = −½ · mean over (C, H, W) of the squared error, one value per sample;
- training never moves the reference, and the exported LoRA loads in diffusers' own pipeline.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil

import pytest
import torch
from conftest import TOY_BASE, run_overrides, text_encoder, tiny_unet, tiny_vae, word_tokenizer
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from mmalign import checkpoint
from mmalign.adapters import diffusion
from mmalign.config import TrainConfig, load_config
from mmalign.data import PairDataset, read_pairs
from mmalign.errors import UserError
from mmalign.recipes import preference, runtime

LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
CPU = torch.device("cpu")


def add_random_lora(unet: UNet2DConditionModel, *, rank: int, alpha: float, targets=LORA_MODULES) -> None:
    """A LoRA whose up-projections are random (peft starts them at zero), so that it changes the outputs."""
    torch.manual_seed(0)
    diffusion.add_lora(unet, rank=rank, alpha=alpha, dropout=0.0, target_modules=targets)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)


def train_config(pipeline: str, data: str, out_dir, *overrides: str) -> TrainConfig:
    return load_config(None, [*run_overrides(pipeline, data, out_dir), *overrides])


def make_batch(components: diffusion.Components, cfg: TrainConfig, positions: list[int]) -> dict:
    """The recipe's own batch: pairs, shared noise, timesteps and (possibly dropped) captions."""
    dataset = PairDataset(read_pairs("pickapic", cfg.data.path), resolution=components.resolution)
    adapter = diffusion.DiffusionAdapter(components, cfg.model.path)
    cache = preference.LatentCache(dataset, adapter, enabled=True)
    stream = preference.PairStream(len(dataset), cfg.optim.seed)
    return preference.build_batch(stream, cache, positions, cfg, adapter, CPU)


def dpo_step(components: diffusion.Components, unet, frozen, batch: dict, cfg: TrainConfig) -> dict:
    """The recipe's step on ``unet`` (LoRA policy) or with ``frozen`` as the reference (full fine-tuning)."""
    adapter = diffusion.DiffusionAdapter(components, cfg.model.path)
    return preference.preference_step(adapter, unet, lambda: runtime.reference_of(unet, frozen), batch, cfg)


class UNetCalls:
    """Records (sample, timestep, encoder_hidden_states) of every forward call of the given UNets, in order."""

    def __init__(self, *unets: UNet2DConditionModel):
        self.calls: list[dict[str, torch.Tensor]] = []
        self.handles = [unet.register_forward_pre_hook(self._record, with_kwargs=True) for unet in unets]

    def _record(self, module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        self.calls.append(
            {
                "sample": bound.arguments["sample"].detach().clone(),
                "timestep": bound.arguments["timestep"].detach().clone(),
                "hidden": bound.arguments["encoder_hidden_states"].detach().clone(),
                "lora_active": _lora_active(module),
            }
        )

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _lora_active(unet: UNet2DConditionModel) -> bool | None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    return None if not layers else not layers[0].disable_adapters


def policy_and_reference(pipeline: str, mode: str):
    """(components, unet, frozen): a LoRA policy (reference = adapter off) or a full copy (reference = frozen).

    The policy is moved away from the base so that policy and reference errors differ.
    """
    components = diffusion.load_components(pipeline)
    unet = components.unet
    torch.manual_seed(0)
    frozen = None
    if mode == "lora":
        diffusion.add_lora(unet, rank=4, alpha=4.0, dropout=0.0, target_modules=LORA_MODULES)
        moved = [p for name, p in unet.named_parameters() if "lora_B" in name]
    else:
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        moved = [p for name, p in unet.named_parameters() if "attn" in name and name.endswith("weight")]
    with torch.no_grad():
        for p in moved:
            p.add_(0.1 * torch.randn_like(p))
    unet.train()
    return components, unet, frozen


def recovered_noise(scheduler: DDPMScheduler, noisy, x0, timesteps) -> torch.Tensor:
    """Invert x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε for ε."""
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
    return (noisy - abar.sqrt() * x0) / (1 - abar).sqrt()


# ------------------------------------------------------------------------------------- 1. pair sharing


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_pair_members_and_reference_share_timestep_noise_and_caption(
    pixel_pipeline, pairs_parquet, tmp_path, mode
):
    components, unet, frozen = policy_and_reference(pixel_pipeline, mode)
    cfg = train_config(pixel_pipeline, pairs_parquet, tmp_path)
    batch = make_batch(components, cfg, [0, 1, 2, 3])
    size = 4
    assert len(set(batch["timesteps"].tolist())) > 1, "pairs should draw their own timesteps"
    assert not torch.equal(batch["chosen"], batch["rejected"])

    recorder = UNetCalls(*(m for m in (unet, frozen) if m is not None))
    try:
        stats = dpo_step(components, unet, frozen, batch, cfg)
    finally:
        recorder.remove()

    assert len(recorder.calls) == 2, "one policy and one reference forward over both members"
    reference, policy = recorder.calls  # the reference runs first, so its activations are freed early
    if mode == "lora":
        assert policy["lora_active"] is True and reference["lora_active"] is False
    x0 = torch.cat([batch["chosen"], batch["rejected"]])  # (2B, C, H, W)

    # the policy call: winners in the first half, losers in the second, same t / ε / caption per pair
    assert torch.equal(policy["timestep"][:size], policy["timestep"][size:])
    assert torch.equal(policy["timestep"][:size], batch["timesteps"])
    noise = recovered_noise(components.scheduler, policy["sample"], x0, policy["timestep"])  # (2B, C, H, W)
    torch.testing.assert_close(noise[:size], noise[size:], atol=1e-4, rtol=0)
    torch.testing.assert_close(noise[:size], batch["noise"], atol=1e-4, rtol=0)
    assert torch.equal(policy["hidden"][:size], policy["hidden"][size:])
    expected_hidden, _ = diffusion.encode_prompts(components, batch["captions"])
    assert torch.equal(policy["hidden"][:size], expected_hidden)

    # the reference call sees exactly the policy's inputs
    for key in ("sample", "timestep", "hidden"):
        assert torch.equal(reference[key], policy[key]), key
    # ... but it is a different model: its errors are not the policy's
    assert not torch.allclose(stats["ref_err_w"], stats["policy_err_w"])


def test_caption_dropout_drops_both_members_together(pixel_pipeline, pairs_parquet, tmp_path):
    components, unet, frozen = policy_and_reference(pixel_pipeline, "lora")
    empty, _ = diffusion.encode_prompts(components, [""])  # (1, L, D)

    cfg = train_config(pixel_pipeline, pairs_parquet, tmp_path, "data.caption_dropout=1.0")
    batch = make_batch(components, cfg, list(range(6)))
    assert batch["captions"] == [""] * 6

    cfg = train_config(pixel_pipeline, pairs_parquet, tmp_path, "data.caption_dropout=0.5")
    positions = list(range(16))
    batch = make_batch(components, cfg, positions)
    dropped = [caption == "" for caption in batch["captions"]]
    assert any(dropped) and not all(dropped), batch["captions"]
    recorder = UNetCalls(unet)
    try:
        dpo_step(components, unet, frozen, batch, cfg)
    finally:
        recorder.remove()
    hidden = recorder.calls[0]["hidden"]  # (2B, L, D)
    size = len(positions)
    assert torch.equal(hidden[:size], hidden[size:]), "a dropped caption is dropped for both members"
    for row, was_dropped in enumerate(dropped):
        assert torch.equal(hidden[row], empty[0]) == was_dropped, row


# ---------------------------------------------------------------------------------------- 2. targets


def test_epsilon_target_is_the_noise(pixel_pipeline):
    scheduler = diffusion.load_components(pixel_pipeline).scheduler
    assert scheduler.config.prediction_type == "epsilon"
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    target = diffusion.target_for(scheduler, x0, noise, torch.tensor([0, 500, 999]))
    assert torch.equal(target, noise)


def test_v_target_matches_scheduler_velocity_and_closed_form(v_pipeline):
    scheduler = diffusion.load_components(v_pipeline).scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    timesteps = torch.tensor([0, 1, 500, 999])
    target = diffusion.target_for(scheduler, x0, noise, timesteps)

    torch.testing.assert_close(target, scheduler.get_velocity(x0, noise, timesteps), rtol=0, atol=0)
    abar = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    by_hand = abar.sqrt() * noise.double() - (1 - abar).sqrt() * x0.double()  # v = α_t·ε − σ_t·x0
    torch.testing.assert_close(target.double(), by_hand, rtol=1e-6, atol=1e-6)
    # at t = 999 of the cosine schedule ᾱ ≈ 0, so the velocity is −x0 (the target is not the noise)
    torch.testing.assert_close(target[3], -x0[3], atol=1e-2, rtol=0)


def test_unsupported_prediction_type_names_the_accepted_ones():
    scheduler = DDPMScheduler(num_train_timesteps=10, prediction_type="sample")
    with pytest.raises(UserError, match="'sample'.*epsilon, v_prediction"):
        diffusion.target_for(scheduler, torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), torch.tensor([1]))


# ------------------------------------------------------------------------------------------ 3. score


@pytest.mark.parametrize("fixture", ["pixel_pipeline", "v_pipeline"])
def test_score_is_minus_half_mean_squared_error_over_chw(request, fixture):
    components = diffusion.load_components(request.getfixturevalue(fixture))
    unet, scheduler = components.unet.eval(), components.scheduler
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    timesteps = torch.tensor([3, 400, 990])
    hidden, _ = diffusion.encode_prompts(components, ["a red circle", "a dog", ""])

    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # (B, C, H, W)
    target = noise if fixture == "pixel_pipeline" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    with torch.no_grad():
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample  # computed on its own
        expected = -0.5 * (prediction - target).pow(2).mean(dim=(1, 2, 3))  # (B,)
        got = diffusion.score(unet, scheduler, x0, noise, timesteps, hidden)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert len(set(got.tolist())) == 3, "one score per sample, not a batch mean"

    # batch order does not matter: scores follow their samples
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        shuffled = diffusion.score(unet, scheduler, x0[order], noise[order], timesteps[order], hidden[order])
    torch.testing.assert_close(shuffled, got[order], rtol=1e-5, atol=1e-6)

    # a UNet whose output is exactly zero: s = −½ · mean(target²)
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.zero_()
        zero = diffusion.score(unet, scheduler, x0, noise, timesteps, hidden)
    torch.testing.assert_close(zero, -0.5 * target.pow(2).mean(dim=(1, 2, 3)), rtol=1e-6, atol=0)


# --------------------------------------------------------------------- 4. the reference never moves


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_leaves_reference_and_base_weights_untouched(pixel_pipeline, pairs_parquet, tmp_path, mode):
    components = diffusion.load_components(pixel_pipeline)
    base = diffusion.load_components(pixel_pipeline).unet.eval()  # an independent copy of the base model
    unet, scheduler = components.unet, components.scheduler
    initial = {name: p.detach().clone() for name, p in unet.named_parameters()}
    torch.manual_seed(0)
    frozen = None
    if mode == "lora":
        params = diffusion.add_lora(unet, rank=4, alpha=4.0, dropout=0.0, target_modules=LORA_MODULES)
    else:
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        params = list(unet.parameters())
    unet.train()
    cfg = train_config(pixel_pipeline, pairs_parquet, tmp_path, "loss.beta=5000")
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    trainable_before = [p.detach().clone() for p in params]
    for step in range(3):
        batch = make_batch(components, cfg, list(range(4 * step, 4 * step + 4)))
        loss = dpo_step(components, unet, frozen, batch, cfg)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert any(not torch.equal(p, q) for p, q in zip(params, trainable_before)), "training changed nothing"

    fixed = make_batch(components, cfg, [100, 101, 102, 103])
    latents = torch.cat([fixed["chosen"], fixed["rejected"]])  # (2B, C, H, W)
    noise, timesteps = fixed["noise"].repeat(2, 1, 1, 1), fixed["timesteps"].repeat(2)
    hidden, added = diffusion.repeat_condition(*diffusion.encode_prompts(components, fixed["captions"]), 2)
    with torch.no_grad():
        base_errors = diffusion.denoising_errors(base, scheduler, latents, noise, timesteps, hidden, added)
        policy_errors = diffusion.denoising_errors(unet, scheduler, latents, noise, timesteps, hidden, added)
    with runtime.reference_of(unet, frozen) as reference_network:
        ref_errors = diffusion.denoising_errors(
            reference_network, scheduler, latents, noise, timesteps, hidden, added
        )
    assert not torch.allclose(policy_errors, base_errors), "the policy should have moved"
    torch.testing.assert_close(ref_errors, base_errors, rtol=0, atol=0)

    reference = unet if mode == "lora" else frozen
    seen = 0
    for name, p in reference.named_parameters():
        if "lora_" in name:
            continue
        base_name = name.replace(".base_layer.", ".")
        assert torch.equal(p, initial[base_name]), f"base weight {base_name} changed"
        seen += 1
    assert seen == len(initial)
    if mode == "lora":
        assert all(p.requires_grad == ("lora_" in name) for name, p in unet.named_parameters())


# ------------------------------------------------------------------ 5. the export loads in diffusers


def test_exported_lora_loads_in_stable_diffusion_pipeline(sd_pipeline, pairs_parquet, tmp_path):
    # alpha != rank on purpose: the exported file must carry the LoRA scale (alpha / rank = 2)
    cfg = train_config(
        sd_pipeline,
        pairs_parquet,
        tmp_path / "run",
        "data.resolution=16",
        "optim.max_steps=3",
        "optim.batch_size=4",
        "optim.lr=0.05",
        "lora.rank=4",
        "lora.alpha=8",
        "checkpoint.every=3",
    )
    result = preference.train(cfg)
    assert os.path.isfile(os.path.join(result.final_dir, diffusion.LORA_WEIGHTS))

    # the saved tiny pipeline is a regular diffusers SD pipeline, with or without the usual keywords
    assert (
        type(DiffusionPipeline.from_pretrained(sd_pipeline, local_files_only=True)) is StableDiffusionPipeline
    )
    pipe = StableDiffusionPipeline.from_pretrained(
        sd_pipeline,
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    components = diffusion.load_components(sd_pipeline)
    prompts = ["a red square", "a blue circle on the left"]
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
    hidden, _ = diffusion.encode_prompts(components, prompts)
    torch.testing.assert_close(embeds, hidden, rtol=0, atol=0)  # training saw the pipeline's own condition

    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 700])

    def unet_out():
        with torch.no_grad():
            return pipe.unet(x, t, encoder_hidden_states=hidden).sample

    def image():
        generator = torch.Generator().manual_seed(0)
        return pipe(
            prompts[0],
            height=16,
            width=16,
            num_inference_steps=2,
            guidance_scale=1.5,
            generator=generator,
            output_type="pt",
        ).images

    base_out, base_image = unet_out(), image()
    pipe.load_lora_weights(result.final_dir)
    lora_out, lora_image = unet_out(), image()
    assert (lora_out - base_out).abs().max() > 1e-3
    assert not torch.allclose(lora_image, base_image)

    # what diffusers loaded is exactly the trained policy (last checkpoint = exported step), scale included
    trained = diffusion.load_components(sd_pipeline).unet
    diffusion.add_lora(trained, rank=4, alpha=8.0, dropout=0.0, target_modules=LORA_MODULES)
    checkpoint.load_weights(os.path.join(result.output_dir, "checkpoints", "step-3"), trained)
    with torch.no_grad():
        policy_out = trained.eval()(x, t, encoder_hidden_states=hidden).sample
    torch.testing.assert_close(lora_out, policy_out, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        aligned_out = diffusion.load_aligned(components, result.final_dir)(
            x, t, encoder_hidden_states=hidden
        ).sample
    torch.testing.assert_close(aligned_out, policy_out, rtol=1e-5, atol=1e-5)

    pipe.unload_lora_weights()
    torch.testing.assert_close(unet_out(), base_out, rtol=0, atol=0)
    torch.testing.assert_close(image(), base_image, rtol=0, atol=0)


# ------------------------------------------------------------------------ 6. SDXL-style conditioning


def tiny_sdxl(path) -> diffusion.Components:
    """Two text encoders (hidden 32 + 32), pooled projection 16, 6 time ids × 8 dims: 16 + 48 = 64 inputs."""
    torch.manual_seed(0)
    unet = tiny_unet(
        4,
        8,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    )
    encoder_2 = text_encoder(word_tokenizer(), layers=2, projection_dim=16)
    vae = tiny_vae()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    components = diffusion.Components(
        unet, scheduler, text_encoder(word_tokenizer()), word_tokenizer(), vae, encoder_2, word_tokenizer()
    )
    diffusion.save_components(components, str(path))
    return diffusion.load_components(str(path))


def test_sdxl_conditioning_matches_the_sdxl_pipeline(tmp_path):
    components = tiny_sdxl(tmp_path / "sdxl")
    assert components.is_sdxl and components.resolution == 16
    prompts = ["a red circle", "two green dogs on the right"]
    hidden, added = diffusion.encode_prompts(components, prompts)
    assert hidden.shape == (2, 8, 32 + 32)  # (B, L, D1 + D2)
    assert added["text_embeds"].shape == (2, 16)
    assert torch.equal(added["time_ids"], torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2))

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tmp_path / "sdxl"), local_files_only=True)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, embeds, rtol=0, atol=0)
    torch.testing.assert_close(added["text_embeds"], pooled, rtol=0, atol=0)

    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        errors = diffusion.denoising_errors(
            components.unet, components.scheduler, latents, noise, torch.tensor([10, 900]), hidden, added
        )
        pooled_swapped = {"text_embeds": added["text_embeds"].flip(0), "time_ids": added["time_ids"]}
        other = diffusion.denoising_errors(
            components.unet,
            components.scheduler,
            latents,
            noise,
            torch.tensor([10, 900]),
            hidden,
            pooled_swapped,
        )
    assert errors.shape == (2,) and torch.isfinite(errors).all()
    assert not torch.equal(errors, other), "the pooled text embedding must reach the UNet"

    # an SDXL LoRA export loads in StableDiffusionXLPipeline and reproduces the policy
    unet = components.unet
    add_random_lora(unet, rank=2, alpha=4.0)
    with torch.no_grad():
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
        policy = unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    diffusion.export(components, unet, str(tmp_path / "final"), lora=True)
    pipe.load_lora_weights(str(tmp_path / "final"))
    with torch.no_grad():
        loaded = pipe.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    torch.testing.assert_close(loaded, policy, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- 7. loading errors


@pytest.mark.parametrize("missing", ["unet", "scheduler", "text_encoder", "tokenizer"])
def test_load_components_names_the_missing_folder(pixel_pipeline, tmp_path, missing):
    broken = tmp_path / "pipe"
    shutil.copytree(pixel_pipeline, broken, ignore=shutil.ignore_patterns(missing))
    with pytest.raises(UserError) as info:
        diffusion.load_components(str(broken))
    message = str(info.value)
    assert str(broken) in message and f"'{missing}/'" in message and "\n" not in message


def test_load_components_rejects_a_path_that_is_not_a_folder(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        diffusion.load_components(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "targets",
    [["to_q", "to_k", "to_v", "to_out.0"], ["time_emb_proj", "proj"], ["q_proj", "k_proj", "v_proj"]],
)
def test_exported_lora_reloads_exactly_for_every_layer_kind(targets, tmp_path):
    """Attention, resnet time projections and the pooled-text attention (q/k/v_proj) of the toy base all
    round-trip: the reloaded final/ computes what the trained LoRA UNet computes (alpha ≠ rank)."""
    components = diffusion.load_components(TOY_BASE)
    unet = copy.deepcopy(components.unet)
    add_random_lora(unet, rank=4, alpha=8, targets=targets)
    diffusion.export(components, unet, str(tmp_path), lora=True)
    reloaded = diffusion.load_aligned(components, str(tmp_path))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    hidden, _ = diffusion.encode_prompts(components, ["a large red circle on the left"] * 2)
    with torch.no_grad():
        trained = unet(x, torch.tensor(700), encoder_hidden_states=hidden).sample
        loaded = reloaded(x, torch.tensor(700), encoder_hidden_states=hidden).sample
        base = components.unet(x, torch.tensor(700), encoder_hidden_states=hidden).sample
    assert float((trained - base).abs().max()) > 1e-2
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)


def test_sampling_in_nhwc_matches_nchw_and_leaves_the_weights_contiguous(pixel_pipeline):
    """``sample`` holds the conv weights in channels-last while it runs; the images are the NCHW ones (to
    float rounding) and afterwards every weight is contiguous again, as safetensors and training need."""
    components = diffusion.load_components(pixel_pipeline)
    prompts, seeds = ["a red circle", "a blue square on the left"], [3, 4]
    nhwc = diffusion.sample(components, prompts, seeds, steps=4)
    assert all(p.is_contiguous() for p in components.unet.parameters())
    nchw = diffusion.sample(components, prompts, seeds, steps=4, relayout=False)
    torch.testing.assert_close(nhwc, nchw, atol=1e-4, rtol=0)
    with diffusion.channels_last(components.unet):
        conv = components.unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert components.unet.conv_in.weight.is_contiguous()


def test_sampling_a_lora_policy_uses_a_fused_copy_and_leaves_the_policy_untouched(pixel_pipeline):
    components = diffusion.load_components(pixel_pipeline)
    unet = components.unet
    add_random_lora(unet, rank=4, alpha=4)
    before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    with diffusion.for_sampling(unet) as fused:
        assert fused is not unet
    assert not any("lora" in name for name, _ in fused.named_parameters())
    assert not any(p.requires_grad for p in fused.parameters())
    after = dict(unet.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    hidden, _ = diffusion.encode_prompts(components, ["a red circle", "a dog"])
    with torch.no_grad():
        lora_out = unet(x, torch.tensor(500), encoder_hidden_states=hidden).sample
        fused_out = fused(x, torch.tensor(500), encoder_hidden_states=hidden).sample
        unet.disable_adapters()
        base_out = unet(x, torch.tensor(500), encoder_hidden_states=hidden).sample
        unet.enable_adapters()
    assert float((lora_out - base_out).abs().max()) > 1e-3
    torch.testing.assert_close(fused_out, lora_out, atol=1e-5, rtol=0)


def test_sampling_a_fully_finetuned_policy_uses_it_in_eval_mode_without_a_copy(pixel_pipeline):
    unet = diffusion.load_components(pixel_pipeline).unet.train()
    with diffusion.for_sampling(unet) as model:
        assert model is unet and not unet.training
    assert unet.training
