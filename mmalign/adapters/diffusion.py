"""Text-to-image diffusion adapter (diffusers ``UNet2DConditionModel``: SD 1.x / 2.x, SDXL, pixel-space UNets).

What the preference engine needs from a diffusion model, and nothing else:

- ``load_components``: a pipeline directory on local disk (``unet/``, ``scheduler/``, ``text_encoder/``,
  ``tokenizer/``, optional ``vae/``; SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``) → ``Components``.
- ``score``: −½ · per-sample mean squared denoising error, the log-likelihood surrogate of Diffusion-DPO
  (Wallace et al., arXiv 2311.12908, Eq. 14). Both members of a pair and both models (policy and reference)
  see the same timestep, the same noise and the same text condition.
- ``sample``: DDIM sampling with classifier-free guidance, seeded per sample.

A model without ``vae/`` works in pixel space (as DeepFloyd IF does); the toy world's base model is one.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerBase

from mmalign.adapters.base import (
    add_peft_lora,
    fuse_lora,
    latent_space_of,
    lora_state,
    per_sample_mean,
    score_of,
    weight_dtype,
)
from mmalign.adapters.base import for_sampling as for_sampling
from mmalign.errors import UserError
from mmalign.rl.samplers import Gaussian, ddim_posterior, ddim_prev_timestep

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Components:
    """The frozen parts of a text-to-image pipeline plus the UNet that gets trained."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    vae: AutoencoderKL | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: PreTrainedTokenizerBase | None = None

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def resolution(self) -> int:
        """Pixel resolution the UNet was built for."""
        factor = 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.unet.config.sample_size * factor

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None


def load_components(path: str, *, dtype: torch.dtype = torch.float32) -> Components:
    """Load a pipeline directory from local disk; nothing is fetched from a hub."""
    if not os.path.isdir(path):
        raise UserError(f"model.path: {path!r} is not a directory (expected a diffusers pipeline folder)")
    for sub in ("unet", "scheduler", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise UserError(
                f"model.path: {path} has no '{sub}/' folder "
                "(a pipeline folder needs unet/, scheduler/, text_encoder/, tokenizer/ and optionally vae/)"
            )
    local = {"local_files_only": True}
    unet = load_unet(path, dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **local)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **local)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), **local)
    vae = None
    if os.path.isdir(os.path.join(path, "vae")):
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype, **local)
    text_encoder_2 = tokenizer_2 = None
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", dtype=dtype, **local
        )
        tokenizer_2 = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer_2"), **local)
    for module in (text_encoder, vae, text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval()
    return Components(unet, scheduler, text_encoder, tokenizer, vae, text_encoder_2, tokenizer_2)


def load_unet(path: str, *, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The UNet alone of the pipeline folder ``path`` (checked by ``load_components``)."""
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype, local_files_only=True)


def save_components(components: Components, path: str, *, unet: UNet2DConditionModel | None = None) -> None:
    """Write a pipeline folder that ``load_components`` (and diffusers, for SD layouts) reads back."""
    os.makedirs(path, exist_ok=True)
    (unet or components.unet).save_pretrained(os.path.join(path, "unet"), safe_serialization=True)
    components.scheduler.save_pretrained(os.path.join(path, "scheduler"))
    components.text_encoder.save_pretrained(os.path.join(path, "text_encoder"), safe_serialization=True)
    components.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    if components.vae is not None:
        components.vae.save_pretrained(os.path.join(path, "vae"), safe_serialization=True)
    if components.text_encoder_2 is not None:
        components.text_encoder_2.save_pretrained(
            os.path.join(path, "text_encoder_2"), safe_serialization=True
        )
        components.tokenizer_2.save_pretrained(os.path.join(path, "tokenizer_2"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump(_model_index(components), f, indent=2)


def _model_index(components: Components) -> dict:
    """diffusers' ``model_index.json``; the SD layout (with a VAE) loads with ``DiffusionPipeline.from_pretrained``."""
    index = {
        "_class_name": "StableDiffusionXLPipeline" if components.is_sdxl else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", type(components.scheduler).__name__],
        "text_encoder": ["transformers", type(components.text_encoder).__name__],
        "tokenizer": ["transformers", type(components.tokenizer).__name__],
    }
    if components.vae is not None:
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if components.is_sdxl:
        index["text_encoder_2"] = ["transformers", type(components.text_encoder_2).__name__]
        index["tokenizer_2"] = ["transformers", type(components.tokenizer_2).__name__]
    else:
        # No safety checker is shipped: the pipeline loads without one instead of asking for its weights.
        index.update(
            {
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
                "requires_safety_checker": False,
            }
        )
    return index


# --------------------------------------------------------------------------------------------- conditioning


def _tokenize(tokenizer: PreTrainedTokenizerBase, prompts: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


@torch.no_grad()
def encode_prompts(components: Components, prompts: list[str]) -> tuple[torch.Tensor, dict | None]:
    """Text condition for the UNet: (B, L, D) hidden states, plus SDXL's pooled embeds and time ids."""
    device = components.text_encoder.device
    ids = _tokenize(components.tokenizer, prompts, device)  # (B, L)
    if not components.is_sdxl:
        return components.text_encoder(ids).last_hidden_state, None  # (B, L, D)
    # SDXL conditions on the penultimate layer of both encoders and the pooled projection of the second.
    hidden_1 = components.text_encoder(ids, output_hidden_states=True).hidden_states[-2]  # (B, L, D1)
    out_2 = components.text_encoder_2(
        _tokenize(components.tokenizer_2, prompts, device), output_hidden_states=True
    )
    hidden = torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
    size = components.resolution
    # time ids: original size, crop top-left, target size (SDXL paper, Sec. 2.2)
    time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=hidden.dtype, device=device)
    added = {"text_embeds": out_2.text_embeds, "time_ids": time_ids.expand(len(prompts), 6)}
    return hidden, added


def repeat_condition(
    hidden: torch.Tensor, added: dict | None, times: int
) -> tuple[torch.Tensor, dict | None]:
    """Repeat a (B, ...) condition to (times·B, ...) in block order [all B, all B, ...]."""
    hidden = hidden.repeat(times, *([1] * (hidden.dim() - 1)))
    if added is not None:
        added = {key: value.repeat(times, 1) for key, value in added.items()}
    return hidden, added


def as_dtype(
    hidden: torch.Tensor, added: dict | None, dtype: torch.dtype
) -> tuple[torch.Tensor, dict | None]:
    """The text condition in ``dtype`` (SDXL's pooled embeds and time ids too)."""
    if added is not None:
        added = {key: value.to(dtype) for key, value in added.items()}
    return hidden.to(dtype), added


# ------------------------------------------------------------------------------------------------- latents


@torch.no_grad()
def encode_images(
    components: Components, pixels: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pixels in [-1, 1], (B, 3, H, W) → model-space latents (B, C, h, w). Pixel-space models pass through."""
    if components.vae is None:
        return pixels
    vae = components.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    shift = vae.config.shift_factor or 0.0
    return (latents - shift) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(components: Components, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents → pixels in [0, 1], (B, 3, H, W)."""
    return decode_with_graph(components, latents)


def decode_with_graph(components: Components, latents: torch.Tensor) -> torch.Tensor:
    """``decode_latents`` keeping the autograd graph (pixel-space reward guidance)."""
    if components.vae is not None:
        vae = components.vae
        shift = vae.config.shift_factor or 0.0
        latents = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (latents.float().clamp(-1, 1) + 1) / 2


# --------------------------------------------------------------------------------------------------- score


def target_for(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the UNet is trained to predict: ε, or the velocity v = α_t·ε − σ_t·x0 (Salimans & Ho 2202.00512)."""
    if scheduler.config.prediction_type == "epsilon":
        return noise
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    raise UserError(
        f"scheduler prediction_type {scheduler.config.prediction_type!r} is not supported "
        f"(accepted: {', '.join(PREDICTION_TYPES)})"
    )


def denoising_errors(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    added: dict | None = None,
) -> torch.Tensor:
    """Per-sample mean squared error of the UNet's prediction; (N, C, H, W) inputs → (N,) fp32.

    The UNet sees its inputs in its weights' dtype (a bf16 model under DeepSpeed's bf16); noising, target
    and error stay in the inputs' precision.
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)  # (N, C, H, W)
    hidden, added = as_dtype(hidden, added, weight_dtype(unet))
    noisy = noisy.to(hidden.dtype)
    prediction = unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    target = target_for(scheduler, latents, noise, timesteps)
    return per_sample_mean((prediction.float() - target.float()).pow(2))  # (N,)


def score(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    added: dict | None = None,
) -> torch.Tensor:
    """The log-likelihood surrogate s = −½ · e per sample (N,)."""
    return score_of(denoising_errors(unet, scheduler, latents, noise, timesteps, hidden, added))


# -------------------------------------------------------------------------------------------------- sample


@torch.no_grad()
def sample(
    components: Components,
    prompts: list[str],
    seeds: list[int],
    *,
    unet: UNet2DConditionModel | None = None,
    steps: int = 20,
    guidance_scale: float = 1.5,
    batch_size: int = 128,
    relayout: bool = True,
) -> torch.Tensor:
    """DDIM (η = 0) samples with classifier-free guidance; pixels in [0, 1], (B, 3, H, W).

    Each sample's starting noise comes from its own seed, so a (prompt, seed) pair gives the same image
    whatever the batch it is drawn in — the before/after comparison is paired. ``relayout``: hold the weights
    channels-last meanwhile (``channels_last``); False where FSDP2 or DeepSpeed owns the weights' storage.
    """
    images, _ = sample_latents(
        components,
        prompts,
        seeds,
        unet=unet,
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        relayout=relayout,
    )
    return images


@torch.no_grad()
def sample_latents(
    components: Components,
    prompts: list[str],
    seeds: list[int],
    *,
    unet: UNet2DConditionModel | None = None,
    steps: int = 20,
    guidance_scale: float = 1.5,
    batch_size: int = 128,
    relayout: bool = True,
    guide=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample``, and the final model-space latents the images decode from, (B, C, h, w) fp32.

    ``guide`` (:class:`~mmalign.adapters.base.StepGuide`): at each step it is active on, its ascent direction
    g at x_t turns the (guided) prediction into ε − σ_t·g, σ_t = √(1 − ᾱ_t) — classifier guidance (Dhariwal &
    Nichol, arXiv 2105.05233, Algorithm 2) with g in place of s·∇ log p — or, for v-prediction, the same ε
    change written as v − (σ_t / α_t)·g, α_t = √ᾱ_t; either way the predicted x0 moves by (σ_t² / α_t)·g."""
    unet = unet or components.unet
    with channels_last(unet) if relayout else contextlib.nullcontext():
        return _sample(components, unet, prompts, seeds, steps, guidance_scale, batch_size, guide)


@contextlib.contextmanager
def channels_last(module: torch.nn.Module):
    """Hold ``module``'s 4-D weights in NHWC for a while. Sampling the toy UNet ran ≈ 17% faster that way on
    a 2-core AVX-512 CPU, and NHWC is the usual layout for half precision on GPUs. The weights are put back
    afterwards: training's backward was slower in NHWC there, and safetensors stores only contiguous tensors."""
    module.to(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        module.to(memory_format=torch.contiguous_format)


def _sample(components, unet, prompts, seeds, steps, guidance_scale, batch_size, guide=None):
    device = unet.device
    ddim = DDIMScheduler.from_config(components.scheduler.config)
    channels, size = unet.config.in_channels, unet.config.sample_size
    images, finals = [], []
    for start in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[start : start + batch_size], seeds[start : start + batch_size]
        noise = torch.stack(
            [
                torch.randn(channels, size, size, generator=torch.Generator().manual_seed(s))
                for s in chunk_seeds
            ]
        ).to(device, unet.dtype)  # (b, C, h, w)
        hidden, added = encode_prompts(components, chunk)
        guided = guidance_scale != 1  # at scale 1 the unconditional branch cancels: skip it
        if guided:
            uncond, added_uncond = encode_prompts(components, [""] * len(chunk))
            hidden = torch.cat([uncond, hidden])  # (2b, L, D)
            if added is not None:
                added = {key: torch.cat([added_uncond[key], added[key]]) for key in added}
        hidden, added = as_dtype(hidden, added, noise.dtype)
        ddim.set_timesteps(steps, device=device)
        latents = noise * ddim.init_noise_sigma
        for i, t in enumerate(ddim.timesteps):
            active = guide is not None and guide.active(i, len(ddim.timesteps))
            tracked = active and guide.uses_prediction  # pixel-space guidance differentiates the prediction
            with torch.enable_grad() if tracked else contextlib.nullcontext():
                state = latents.detach().requires_grad_(True) if tracked else latents
                model_in = ddim.scale_model_input(torch.cat([state, state]) if guided else state, t)
                out = unet(model_in, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
                if guided:
                    out_uncond, out_cond = out.chunk(2)
                    out = out_uncond + guidance_scale * (out_cond - out_uncond)
                if active:
                    out = _guided_output(components, ddim, out, state, t, chunk, guide, i, tracked)
            latents = ddim.step(out, t, latents).prev_sample
        images.append(decode_latents(components, latents))
        finals.append(latents.float())
    return torch.cat(images), torch.cat(finals)


def _guided_output(components, ddim, out, state, t, prompts, guide, step, tracked) -> torch.Tensor:
    """The UNet's output after one guide step (see ``sample_latents``), in the UNet's prediction type."""
    alpha_bar = ddim.alphas_cumprod[t].to(state.device)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    epsilon = components.prediction_type == "epsilon"
    x0 = None
    if tracked:
        x0 = (state - sigma * out) / alpha if epsilon else alpha * state - sigma * out  # (b, C, h, w)
    level = (t.float() / components.scheduler.config.num_train_timesteps).expand(state.shape[0])  # (b,)
    ascent = guide(step, state, level, prompts, x0)
    return out.detach() - (sigma if epsilon else sigma / alpha) * ascent.to(out.dtype)


class DDIMSampler:
    """The stochastic DDIM sampler of online RL (η > 0), one step at a time, with per-sample timesteps.

    Each transition x_t → x_{t−1} is the Gaussian of :func:`mmalign.rl.samplers.ddim_posterior` (Song et al.,
    arXiv 2010.02502, Eq. 12 and 16) around the guided prediction; a recipe draws from it, stores the
    log-density and recomputes it under the updated network. The DDIM schedule and the starting noise of a
    seed are those of :func:`sample`, so η = 0 retraces ``sample``'s trajectory exactly. Steps whose σ_t is 0
    (the last one when the schedule's ``set_alpha_to_one`` holds) are deterministic: ``stochastic`` says which.
    """

    def __init__(self, components: Components, *, steps: int, eta: float, guidance_scale: float):
        self.components, self.eta, self.guidance_scale = components, eta, guidance_scale
        self.scheduler = DDIMScheduler.from_config(components.scheduler.config)
        self.scheduler.set_timesteps(steps)
        self.timesteps = self.scheduler.timesteps.clone()  # (T,), noisiest first
        self.forwards_per_sample = 2 if guidance_scale != 1 else 1  # guidance adds the unconditional pass
        probe = torch.zeros(len(self.timesteps), 1)
        posterior = self._posterior(probe, probe, torch.arange(len(self.timesteps)))
        self.stochastic = (posterior.std.flatten() > 0).tolist()  # (T,) per step

    def initial(self, seeds: list[int], device: torch.device) -> torch.Tensor:
        """x_T of each seed, (b, C, h, w) fp32, as :func:`sample` draws it."""
        unet = self.components.unet
        channels, size = unet.config.in_channels, unet.config.sample_size
        noise = [torch.randn(channels, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(device) * self.scheduler.init_noise_sigma

    def condition(self, prompts: list[str]):
        """The text condition of ``prompts``, with the empty prompt's for guidance."""
        hidden, added = encode_prompts(self.components, prompts)
        if self.guidance_scale == 1:
            return hidden, added
        uncond, added_uncond = encode_prompts(self.components, [""] * len(prompts))
        return (hidden, added), (uncond, added_uncond)

    def output(self, network, latents: torch.Tensor, steps: torch.Tensor, condition) -> torch.Tensor:
        """The guided prediction at x_t = ``latents`` (b, C, h, w) for step indices ``steps`` (b,), fp32."""
        timesteps = self.timesteps.to(latents.device)[steps]  # (b,)
        guided = self.guidance_scale != 1
        (hidden, added), (uncond, added_uncond) = condition if guided else (condition, (None, None))
        if guided:
            hidden = torch.cat([uncond, hidden])  # (2b, L, D)
            if added is not None:
                added = {key: torch.cat([added_uncond[key], added[key]]) for key in added}
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
        hidden, added = as_dtype(hidden, added, weight_dtype(network))
        out = network(
            latents.to(hidden.dtype), timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added
        ).sample.float()
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + self.guidance_scale * (out_cond - out_uncond)
        return out

    def posterior(self, output: torch.Tensor, latents: torch.Tensor, steps: torch.Tensor) -> Gaussian:
        """The transition from x_t = ``latents`` at step indices ``steps`` (b,) given the prediction ``output``."""
        return self._posterior(output, latents, steps.to(latents.device))

    def _posterior(self, output, latents, steps) -> Gaussian:
        timesteps = self.timesteps.to(latents.device)[steps]  # (b,)
        previous = ddim_prev_timestep(self.scheduler, timesteps)
        return ddim_posterior(self.scheduler, output, latents, timesteps, previous, eta=self.eta)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.components, latents)


# ---------------------------------------------------------------------------------------- LoRA and export

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def add_lora(
    unet: UNet2DConditionModel, *, rank: int, alpha: float, dropout: float, target_modules: list[str]
) -> list[torch.nn.Parameter]:
    """Freeze the UNet and add a peft LoRA; returns the trainable parameters (reference = adapter disabled)."""
    return add_peft_lora(unet, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)


def lora_layers(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's key format, which diffusers' loaders read as they are (see ``lora_state``)."""
    return lora_state(unet)


def export(components: Components, unet: UNet2DConditionModel, out_dir: str, *, lora: bool) -> None:
    """Write ``final/``: a diffusers LoRA (``pipeline.load_lora_weights(out_dir)``) or a full UNet folder."""
    # the pipelines' own LoRA writers, without importing the pipelines (and their image processors)
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    if lora:
        pipeline_class = (
            StableDiffusionXLLoraLoaderMixin if components.is_sdxl else StableDiffusionLoraLoaderMixin
        )
        state = lora_layers(unet)
        # The LoraConfig travels in the file's metadata: without it diffusers' loader assumes alpha = rank,
        # and a LoRA trained with alpha != rank would load with the wrong scale.
        pipeline_class.save_lora_weights(
            out_dir,
            unet_lora_layers=state,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
    else:
        unet.save_pretrained(out_dir, safe_serialization=True)


def load_aligned(components: Components, final_dir: str) -> UNet2DConditionModel:
    """The base UNet with ``final/`` applied: a LoRA loaded onto a copy, or the exported full UNet."""
    import copy

    if os.path.isfile(os.path.join(final_dir, LORA_WEIGHTS)):
        unet = copy.deepcopy(components.unet)
        unet.load_lora_adapter(final_dir, prefix="unet", weight_name=LORA_WEIGHTS, adapter_name="aligned")
        return fuse_lora(unet).eval()
    if os.path.isfile(os.path.join(final_dir, "config.json")):
        return UNet2DConditionModel.from_pretrained(final_dir, local_files_only=True).eval()
    raise UserError(
        f"{final_dir} holds neither {LORA_WEIGHTS} nor a UNet (config.json); was it written by training?"
    )


# ------------------------------------------------------------------------------------------------ adapter


class DiffusionAdapter:
    """The :class:`~mmalign.adapters.base.Adapter` of a text-to-image UNet pipeline (``model.kind: diffusion``)."""

    kind = "diffusion"
    media = "image"

    def __init__(self, components: Components, path: str):
        self.components, self.path = components, path

    @classmethod
    def load(
        cls, path: str, *, dtype: torch.dtype = torch.float32, model_cfg=None, timesteps_cfg=None
    ) -> DiffusionAdapter:
        if timesteps_cfg is not None and timesteps_cfg.density not in (None, "uniform"):
            raise UserError(
                f"`timesteps.density` {timesteps_cfg.density!r} is for flow models; a diffusion UNet trains on "
                "uniform integer timesteps (accepted: uniform or null)"
            )
        if timesteps_cfg is not None and timesteps_cfg.shift is not None:
            raise UserError(
                "`timesteps.shift` applies to flow models only; set it to null for model.kind=diffusion"
            )
        if model_cfg is not None and (model_cfg.resolution is not None or model_cfg.num_frames is not None):
            raise UserError(
                "`model.resolution` / `model.num_frames` apply to flow models; a UNet samples at its own size "
                "(set them to null, or data.resolution for the training images)"
            )
        if os.path.isdir(os.path.join(path, "transformer")) and not os.path.isdir(os.path.join(path, "unet")):
            raise UserError(
                f"model.path: {path} holds a transformer (transformer/), not a UNet; "
                "set model.kind=flow for rectified-flow transformers"
            )
        return cls(load_components(path, dtype=dtype), path)

    @property
    def network(self) -> UNet2DConditionModel:
        return self.components.unet

    def to(self, device: torch.device) -> None:
        for module in (self.components.text_encoder, self.components.vae, self.components.text_encoder_2):
            if module is not None:
                module.to(device)

    def check(self, model_cfg) -> None:
        """The scheduler's target must be a supported one, and the one the config expects."""
        actual = self.components.prediction_type
        if actual not in PREDICTION_TYPES:
            raise UserError(
                f"{self.path}/scheduler: prediction_type {actual!r} is not supported "
                f"(accepted: {', '.join(PREDICTION_TYPES)})"
            )
        if model_cfg.prediction_type is not None and model_cfg.prediction_type != actual:
            raise UserError(
                f"`model.prediction_type` is {model_cfg.prediction_type!r} but {self.path}/scheduler "
                f"says {actual!r}; set model.prediction_type={actual} or null"
            )

    def describe(self) -> str:
        space = "pixel space" if self.components.vae is None else "latent"
        return f"UNet2DConditionModel ({self.components.prediction_type}, {space})"

    def load_network(self, dtype: torch.dtype) -> UNet2DConditionModel:
        return load_unet(self.path, dtype=dtype)

    def add_lora(self, network, *, rank, alpha, dropout, target_modules) -> list[torch.nn.Parameter]:
        return add_lora(network, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)

    def set_attention(self, network: UNet2DConditionModel, backend: str) -> None:
        """UNets use diffusers' legacy attention processors: SDPA (``AttnProcessor2_0``, the default), the
        explicit-matrix ``AttnProcessor`` for ``math``, or xformers."""
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if backend == "xformers":
            network.enable_xformers_memory_efficient_attention()
        elif backend == "math":
            network.set_attn_processor(AttnProcessor())
        elif backend == "sdpa":
            network.set_attn_processor(AttnProcessor2_0())
        else:
            raise UserError(
                f"`model.attention` {backend!r} is not available for a UNet (accepted: auto, sdpa, math, xformers)"
            )

    # --- data
    def media_shape(self) -> tuple[int, ...]:
        return (self.components.resolution, self.components.resolution)

    def latent_shape(self) -> tuple[int, ...]:
        """The sampler's latent of one image: (C, h, w)."""
        unet = self.components.unet
        return (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)

    def latent_space(self) -> str:
        """``pixels`` without a VAE, else the VAE class and a digest of its config."""
        return latent_space_of(self.components.vae)

    def encode_media(self, pixels: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        return encode_images(self.components, pixels, generator=generator).float()

    def decode(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        if differentiable:
            return decode_with_graph(self.components, latents)
        return decode_latents(self.components, latents)

    # --- scoring
    def draw(self, generator: torch.Generator, latent_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise (C, H, W) and an integer timestep uniform over the training schedule (Wallace et al.)."""
        noise = torch.randn(latent_shape, generator=generator)  # (C, H, W), shared by both members
        t = torch.randint(0, self.components.scheduler.config.num_train_timesteps, (1,), generator=generator)
        return noise, t[0]

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.components.scheduler.config.num_train_timesteps

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·ε, the scheduler's ``add_noise``, as ``errors`` noises its inputs."""
        return self.components.scheduler.add_noise(latents, noise, timesteps)

    def encode_prompts(self, prompts: list[str]):
        return encode_prompts(self.components, prompts)

    def repeat_condition(self, condition, times: int):
        hidden, added = condition
        return repeat_condition(hidden, added, times)

    def errors(self, network, latents, noise, timesteps, condition) -> torch.Tensor:
        hidden, added = condition
        return denoising_errors(network, self.components.scheduler, latents, noise, timesteps, hidden, added)

    # --- sampling and export
    def sample(
        self,
        prompts,
        seeds,
        *,
        network=None,
        steps: int,
        guidance_scale: float,
        batch_size: int = 128,
        relayout: bool = True,
        return_latents: bool = False,
        guide=None,
    ):
        images, latents = sample_latents(
            self.components,
            prompts,
            seeds,
            unet=network,
            steps=steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            relayout=relayout,
            guide=guide,
        )
        return (images, latents) if return_latents else images

    def stochastic_sampler(self, *, steps: int, noise: float | None, guidance_scale: float) -> DDIMSampler:
        """DDIM with η = ``noise`` (null: 1, the DDPM variance of DDPO and B²-DiffuRL) for online RL."""
        return DDIMSampler(
            self.components, steps=steps, eta=1.0 if noise is None else noise, guidance_scale=guidance_scale
        )

    def export(self, network, out_dir: str, *, lora: bool) -> None:
        export(self.components, network, out_dir, lora=lora)

    def load_aligned(self, final_dir: str) -> UNet2DConditionModel:
        return load_aligned(self.components, final_dir)
