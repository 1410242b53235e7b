"""Rectified-flow adapter: diffusers flow-matching transformers with ``FlowMatchEulerDiscreteScheduler``.

Images: ``SD3Transformer2DModel`` (StableDiffusion3Pipeline), ``FluxTransformer2DModel`` (FluxPipeline).
Video: ``WanTransformer3DModel`` (WanPipeline), ``LTXVideoTransformer3DModel`` (LTXPipeline). Latents are
(B, C, H, W) for images and (B, C, F, H, W) for video, whatever the family packs them into for its forward.

What the preference engine needs from a flow model (Liu et al., arXiv 2501.13918; Esser et al., arXiv
2403.03206 for the σ density):

- x_t = (1 − σ)·x0 + σ·ε, the velocity target v = ε − x0, error e = mean over every non-batch dim of
  (v − v_θ(x_t, t, y))², score s = −½·e; σ ∈ [0, 1] is also the timestep t = σ·1000 the network sees.
- σ is drawn per pair: u uniform or logit-normal (mean, std), then the scheduler's shift — the static
  σ' = s·u / (1 + (s − 1)·u), or for resolution-dependent schedulers (Flux, LTX) the same exponential shift
  μ(sequence length) that sampling applies. Both members of a pair, and policy and reference, share σ and ε.
- Sampling: the scheduler's Euler steps over its own sigma schedule, classifier-free guidance in one
  batched forward (Flux-dev-style embedded guidance instead when the transformer has ``guidance_embeds``).

The text condition comes from the pipeline's own ``encode_prompt``, so it is exactly what the family's
diffusers pipeline feeds its transformer; ``final/`` is written with the pipeline's ``save_lora_weights``.
A folder whose ``model_index.json`` lists the VAE as null is a pixel-space model (the toy video world's).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from mmalign.adapters.base import (
    add_peft_lora,
    fuse_lora,
    latent_space_of,
    lora_state,
    per_sample_mean,
    weight_dtype,
)
from mmalign.errors import UserError
from mmalign.rl.samplers import flow_sde_posterior

# diffusers' names for the attention kernels of its dispatcher (``set_attention_backend``)
ATTENTION_BACKENDS = {
    "sdpa": "native",
    "flash": "_native_flash",
    "math": "_native_math",
    "xformers": "xformers",
}


# ------------------------------------------------------------------------------------------------ families


class _Family:
    """How one diffusers pipeline family turns prompts and latents into a velocity prediction."""

    pipeline: str  # diffusers pipeline class name (model_index.json's _class_name)
    lora_mixin: str  # the diffusers LoRA loader mixin of that pipeline
    video = False
    dynamic_shift = False  # whether the scheduler shifts σ by the latent sequence length

    def condition(self, pipe, prompts: list[str], device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, pipe, network, noisy, timesteps, condition) -> torch.Tensor:
        raise NotImplementedError

    def default_shape(self, pipe) -> tuple[int, ...]:
        raise NotImplementedError

    def latent_shape(self, pipe, media_shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def encode(self, vae, pixels, generator) -> torch.Tensor:
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def decode(self, vae, latents) -> torch.Tensor:
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(latents).sample

    def sequence_length(self, pipe, latent_shape: tuple[int, ...]) -> int:
        """Tokens the transformer sees for one sample (the dynamic shift's input)."""
        raise NotImplementedError


class SD3(_Family):
    pipeline, lora_mixin = "StableDiffusion3Pipeline", "SD3LoraLoaderMixin"

    def condition(self, pipe, prompts, device):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}  # (B, L, D), (B, P)

    def predict(self, pipe, network, noisy, timesteps, condition):
        return network(hidden_states=noisy, timestep=timesteps, **condition).sample  # (B, C, H, W)

    def default_shape(self, pipe):
        size = pipe.default_sample_size * pipe.vae_scale_factor
        return (size, size)

    def latent_shape(self, pipe, media_shape):
        factor = pipe.vae_scale_factor if pipe.vae is not None else 1
        height, width = media_shape
        return (pipe.transformer.config.in_channels, height // factor, width // factor)


class Flux(SD3):
    pipeline, lora_mixin = "FluxPipeline", "FluxLoraLoaderMixin"
    dynamic_shift = True

    def condition(self, pipe, prompts, device):
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, pipe, network, noisy, timesteps, condition):
        batch, channels, height, width = noisy.shape
        packed = pipe._pack_latents(noisy, batch, channels, height, width)  # (B, h/2·w/2, 4C)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text = condition["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if network.config.guidance_embeds:
            guidance = torch.full((batch,), pipe.embedded_guidance, device=noisy.device, dtype=torch.float32)
        out = network(
            hidden_states=packed,
            timestep=timesteps / 1000,  # Flux's time embedding takes σ itself
            guidance=guidance,
            txt_ids=text_ids,
            img_ids=image_ids,
            **condition,
        ).sample
        factor = pipe.vae_scale_factor
        return pipe._unpack_latents(out, height * factor, width * factor, factor)  # (B, C, H, W)

    def latent_shape(self, pipe, media_shape):
        factor = pipe.vae_scale_factor if pipe.vae is not None else 1
        height, width = media_shape
        return (pipe.transformer.config.in_channels // 4, height // factor, width // factor)

    def sequence_length(self, pipe, latent_shape):
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)


class Wan(_Family):
    pipeline, lora_mixin = "WanPipeline", "WanLoraLoaderMixin"
    video = True

    def condition(self, pipe, prompts, device):
        length = min(226, pipe.tokenizer.model_max_length)  # 226 is the pipeline's default for UMT5
        embeds, _ = pipe.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=length, device=device
        )
        return {"encoder_hidden_states": embeds}  # (B, L, D)

    def predict(self, pipe, network, noisy, timesteps, condition):
        return network(hidden_states=noisy, timestep=timesteps, **condition).sample  # (B, C, F, H, W)

    def default_shape(self, pipe):
        return (81, 480, 832)  # WanPipeline's defaults

    def latent_shape(self, pipe, media_shape):
        frames, height, width = media_shape
        channels = pipe.transformer.config.in_channels
        if pipe.vae is None:
            return (channels, frames, height, width)
        temporal, spatial = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
        return (channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)

    def encode(self, vae, pixels, generator):
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        mean, std = _channel_stats(vae, latents)
        return (latents - mean) / std

    def decode(self, vae, latents):
        mean, std = _channel_stats(vae, latents)
        return vae.decode(latents.to(vae.dtype) * std + mean).sample


class LTX(_Family):
    pipeline, lora_mixin = "LTXPipeline", "LTXVideoLoraLoaderMixin"
    video = True
    dynamic_shift = True
    frame_rate = 25  # LTXPipeline's default; it scales the temporal rotary positions

    def condition(self, pipe, prompts, device):
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, device=device
        )
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}  # (B, L, D), (B, L)

    def predict(self, pipe, network, noisy, timesteps, condition):
        _, _, frames, height, width = noisy.shape
        spatial, temporal = network.config.patch_size, network.config.patch_size_t
        packed = pipe._pack_latents(noisy, spatial, temporal)  # (B, F·H·W / patches, C·patch)
        out = network(
            hidden_states=packed,
            timestep=timesteps,
            num_frames=frames // temporal,
            height=height // spatial,
            width=width // spatial,
            rope_interpolation_scale=(
                pipe.vae_temporal_compression_ratio / self.frame_rate,
                pipe.vae_spatial_compression_ratio,
                pipe.vae_spatial_compression_ratio,
            ),
            **condition,
        ).sample
        return pipe._unpack_latents(
            out, frames // temporal, height // spatial, width // spatial, spatial, temporal
        )

    def default_shape(self, pipe):
        return (161, 512, 704)  # LTXPipeline's defaults

    def latent_shape(self, pipe, media_shape):
        frames, height, width = media_shape
        channels = pipe.transformer.config.in_channels
        temporal, spatial = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        return (channels, (frames - 1) // temporal + 1, height // spatial, width // spatial)

    def encode(self, vae, pixels, generator):
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
        return _ltx_pipeline()._normalize_latents(
            latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor
        )

    def decode(self, vae, latents):
        latents = _ltx_pipeline()._denormalize_latents(
            latents.to(vae.dtype), vae.latents_mean, vae.latents_std, vae.config.scaling_factor
        )
        return vae.decode(latents, temb=None).sample

    def sequence_length(self, pipe, latent_shape):
        return latent_shape[-3] * latent_shape[-2] * latent_shape[-1]


def _ltx_pipeline():
    from diffusers import LTXPipeline

    return LTXPipeline


def _channel_stats(vae, latents) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's per-channel latent mean and std, shaped to broadcast over (B, C, F, H, W)."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    return mean, std


FAMILIES: dict[str, _Family] = {family.pipeline: family for family in (SD3(), Flux(), Wan(), LTX())}


# ------------------------------------------------------------------------------------------------ loading


def read_index(path: str) -> dict:
    """The folder's ``model_index.json``, checked to describe a supported flow-matching pipeline."""
    if not os.path.isdir(path):
        raise UserError(f"model.path: {path!r} is not a directory (expected a diffusers pipeline folder)")
    index_path = os.path.join(path, "model_index.json")
    if os.path.isdir(os.path.join(path, "unet")):
        raise UserError(
            f"model.path: {path} holds a UNet (unet/), not a flow-matching transformer; "
            "set model.kind=diffusion for ε- or v-prediction UNets"
        )
    if not os.path.isfile(index_path):
        raise UserError(f"model.path: {path} has no model_index.json (expected a diffusers pipeline folder)")
    with open(index_path) as f:
        index = json.load(f)
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise UserError(
            f"model.path: {path}/model_index.json names {name!r}, not a supported flow pipeline "
            f"(accepted: {', '.join(FAMILIES)})"
        )
    scheduler = (index.get("scheduler") or [None, None])[1]
    if scheduler != "FlowMatchEulerDiscreteScheduler":
        raise UserError(
            f"model.path: {path}/scheduler is {scheduler}, not FlowMatchEulerDiscreteScheduler: "
            "model.kind=flow needs a rectified-flow (flow-matching) model"
        )
    return index


def load_pipeline(path: str, *, dtype: torch.dtype = torch.float32):
    """The family's diffusers pipeline from local disk; components listed as null (a pixel-space model's
    VAE) are passed as None, as a user of the pipeline would pass them."""
    import diffusers

    index = read_index(path)
    absent = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
    pipeline_class = getattr(diffusers, index["_class_name"])
    pipe = pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


# ------------------------------------------------------------------------------------------------ adapter


class FlowAdapter:
    """The :class:`~mmalign.adapters.base.Adapter` of a rectified-flow pipeline (``model.kind: flow``)."""

    kind = "flow"

    def __init__(self, pipe, path: str, *, media_shape=None, density=None, shift=None, embedded_guidance=3.5):
        self.pipe, self.path = pipe, path
        self.family = FAMILIES[type(pipe).__name__]
        self.scheduler = pipe.scheduler
        if shift is not None:
            self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config, shift=shift)
        self._media_shape = tuple(media_shape) if media_shape else self.family.default_shape(pipe)
        self.density = density or {"name": "logit_normal", "mean": 0.0, "std": 1.0}
        pipe.embedded_guidance = embedded_guidance

    @classmethod
    def load(
        cls, path: str, *, dtype: torch.dtype = torch.float32, model_cfg=None, timesteps_cfg=None
    ) -> FlowAdapter:
        pipe = load_pipeline(path, dtype=dtype)
        video = FAMILIES[type(pipe).__name__].video
        return cls(pipe, path, **flow_options(model_cfg, timesteps_cfg, video=video))

    @property
    def network(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def media(self) -> str:
        """A video family at one frame is a text-to-image model (as Wan generates images): its media are
        images, its latents keep the frame axis."""
        return "video" if self.family.video and self._media_shape[0] > 1 else "image"

    def to(self, device: torch.device) -> None:
        for name, module in self.pipe.components.items():
            if isinstance(module, torch.nn.Module) and name != "transformer":
                module.to(device)

    def check(self, model_cfg) -> None:
        if model_cfg.prediction_type is not None:
            raise UserError(
                f"`model.prediction_type` is {model_cfg.prediction_type!r}, but {self.path} is a flow-matching "
                "model (its target is the velocity ε − x0); set model.prediction_type=null"
            )
        shape = self._media_shape
        latent = self.family.latent_shape(self.pipe, shape)
        if any(size <= 0 for size in latent):
            raise UserError(f"`model.resolution` / `model.num_frames` {shape} are too small for {self.path}")

    def describe(self) -> str:
        space = "pixel space" if self.pipe.vae is None else "latent"
        return f"{type(self.network).__name__} ({self.media}, flow matching, {space})"

    def load_network(self, dtype: torch.dtype) -> torch.nn.Module:
        network_class = type(self.network)
        return network_class.from_pretrained(
            self.path, subfolder="transformer", dtype=dtype, local_files_only=True
        )

    def add_lora(self, network, *, rank, alpha, dropout, target_modules) -> list[torch.nn.Parameter]:
        return add_peft_lora(network, rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)

    def set_attention(self, network, backend: str) -> None:
        """Map ``model.attention`` onto diffusers' attention dispatch (``set_attention_backend``)."""
        from diffusers.utils import logging

        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # its "experimental feature" notice, once per call, says nothing to users
        try:
            network.set_attention_backend(ATTENTION_BACKENDS[backend])
        except (RuntimeError, ValueError, ImportError) as err:
            raise UserError(
                f"`model.attention` {backend!r} cannot run here: {str(err).splitlines()[0]}"
            ) from None
        finally:
            logging.set_verbosity(verbosity)

    # --- data
    def media_shape(self) -> tuple[int, ...]:
        return self._media_shape

    def latent_shape(self) -> tuple[int, ...]:
        """The sampler's latent of one sample at ``media_shape``: (C, H, W) or (C, F, H, W)."""
        return tuple(self.family.latent_shape(self.pipe, self._media_shape))

    def latent_space(self) -> str:
        """What the latents are: ``pixels`` without a VAE, else the VAE class and a digest of its config."""
        return latent_space_of(self.pipe.vae)

    def encode_media(self, pixels: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """Pixels in [-1, 1], (N, 3, H, W) or (N, 3, F, H, W) → latents; pixel-space models pass through."""
        if self.family.video and pixels.dim() == 4:
            pixels = pixels[:, :, None]  # an image as a one-frame clip (N, 3, 1, H, W)
        if self.pipe.vae is None:
            return pixels.float()
        with torch.no_grad():
            return self.family.encode(self.pipe.vae, pixels, generator).float()

    def decode(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        """Latents → media in [0, 1]; ``differentiable`` keeps the graph (pixel-space reward guidance)."""
        with contextlib.nullcontext() if differentiable else torch.no_grad():
            return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        pixels = latents if self.pipe.vae is None else self.family.decode(self.pipe.vae, latents)
        if self.media == "image" and pixels.dim() == 5:
            pixels = pixels[:, :, 0]  # (N, 3, H, W) of a one-frame model
        return (pixels.float().clamp(-1, 1) + 1) / 2

    # --- scoring
    def draw(self, generator: torch.Generator, latent_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise of ``latent_shape`` and the timestep t = σ·N of a σ drawn from the configured density."""
        noise = torch.randn(latent_shape, generator=generator)  # (C, [F,] h, w), shared by both members
        density = self.density
        if density["name"] == "uniform":
            u = torch.rand(1, generator=generator)
        else:  # logit-normal (Esser et al., arXiv 2403.03206, Eq. 19)
            u = torch.sigmoid(density["mean"] + density["std"] * torch.randn(1, generator=generator))
        sigma = self.shift(u, latent_shape)
        return noise, (sigma * self.scheduler.config.num_train_timesteps)[0]

    def shift(self, u: torch.Tensor, latent_shape) -> torch.Tensor:
        """σ in [0, 1] → the scheduler's shifted σ (static shift, or the dynamic shift μ of Flux / LTX)."""
        config = self.scheduler.config
        if config.use_dynamic_shifting:
            mu = self._mu(latent_shape)
            return self.scheduler.time_shift(mu, 1.0, u)
        shift = self.scheduler.shift
        return shift * u / (1 + (shift - 1) * u)

    def _mu(self, latent_shape) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = self.scheduler.config
        return calculate_shift(
            self.family.sequence_length(self.pipe, tuple(latent_shape)),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.float() / self.scheduler.config.num_train_timesteps  # σ

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = (1 − σ)·x0 + σ·ε, σ = t / N per sample."""
        sigma = self.noise_level(timesteps).to(latents.dtype)
        sigma = sigma.reshape(-1, *([1] * (latents.dim() - 1)))  # (N, 1, 1, 1[, 1])
        return (1 - sigma) * latents + sigma * noise

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return self.family.condition(self.pipe, prompts, self.pipe.text_encoder.device)

    def repeat_condition(self, condition: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
        return {key: torch.cat([value] * times) for key, value in condition.items()}

    def errors(self, network, latents, noise, timesteps, condition) -> torch.Tensor:
        """Per-sample mean squared velocity error; (N, C, [F,] H, W) inputs → (N,) fp32."""
        dtype = weight_dtype(network)
        noisy = self.noisy(latents, noise, timesteps).to(dtype)
        condition = _as_dtype(condition, dtype)
        prediction = self.family.predict(self.pipe, network, noisy, timesteps.to(dtype), condition)
        target = noise - latents  # v = ε − x0
        return per_sample_mean((prediction.float() - target.float()).pow(2))  # (N,)

    # --- sampling and export
    @torch.no_grad()
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
        """Euler samples of the flow ODE from each seed's own noise; media in [0, 1] (and the latents).

        ``guide`` (:class:`~mmalign.adapters.base.StepGuide`): at each step it is active on, its ascent
        direction g of a reward at x_t (scaled, clipped) turns the velocity into v − g, after classifier-free
        guidance: the Euler step x_{σ'} = x_σ + (σ' − σ)·v with σ' < σ then moves x up the reward."""
        network = network if network is not None else self.network
        media, finals = [], []
        for start in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[start : start + batch_size], seeds[start : start + batch_size]
            latents = self._euler(network, chunk, chunk_seeds, steps, guidance_scale, guide)
            media.append(self.decode(latents))
            finals.append(latents.float())
        media, finals = torch.cat(media), torch.cat(finals)
        return (media, finals) if return_latents else media

    def _euler(self, network, prompts, seeds, steps, guidance_scale, guide=None) -> torch.Tensor:
        device, dtype = network.device, weight_dtype(network)
        shape = self.family.latent_shape(self.pipe, self._media_shape)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        latents = noise.to(device, torch.float32)  # (b, C, [F,] h, w), the ODE state in fp32
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        options = {"mu": self._mu(shape)} if scheduler.config.use_dynamic_shifting else {}
        scheduler.set_timesteps(steps, device=device, **options)
        condition = self.encode_prompts(prompts)
        # embedded guidance (Flux-dev) replaces classifier-free guidance; scale 1 needs no unconditional pass
        guided = guidance_scale != 1 and not getattr(network.config, "guidance_embeds", False)
        if guided:
            negative = self.encode_prompts([""] * len(prompts))
            condition = {key: torch.cat([negative[key], condition[key]]) for key in condition}
        condition = _as_dtype(condition, dtype)
        for i, t in enumerate(scheduler.timesteps):
            active = guide is not None and guide.active(i, len(scheduler.timesteps))
            # pixel-space guidance differentiates the prediction itself: the forward keeps its graph
            tracked = active and guide.uses_prediction
            with torch.enable_grad() if tracked else contextlib.nullcontext():
                state = latents.detach().requires_grad_(True) if tracked else latents
                model_in = torch.cat([state, state]) if guided else state
                timestep = t.expand(model_in.shape[0]).to(dtype)
                velocity = self.family.predict(
                    self.pipe, network, model_in.to(dtype), timestep, condition
                ).float()
                if guided:
                    uncond, cond = velocity.chunk(2)
                    velocity = uncond + guidance_scale * (cond - uncond)
                if active:
                    sigma = scheduler.sigmas[i]
                    level = self.noise_level(t.expand(state.shape[0]))  # (b,) σ
                    x0 = state - sigma * velocity if tracked else None  # x0 = x_t − σ·v
                    velocity = velocity.detach() - guide(i, state, level, prompts, x0)
            latents = scheduler.step(velocity, t, latents).prev_sample
        return latents

    def stochastic_sampler(self, *, steps: int, noise: float | None, guidance_scale: float) -> FlowSDESampler:
        """The flow SDE with noise level a = ``noise`` (null: 0.7, Flow-GRPO's) for online RL."""
        return FlowSDESampler(
            self, steps=steps, noise_level=0.7 if noise is None else noise, guidance_scale=guidance_scale
        )

    def export(self, network, out_dir: str, *, lora: bool) -> None:
        """``final/``: a LoRA for the family's pipeline (``pipeline.load_lora_weights(out_dir)``) or a full
        transformer folder."""
        import diffusers.loaders as loaders

        if lora:
            mixin = getattr(loaders, self.family.lora_mixin)
            # the LoraConfig travels in the file's metadata: without it alpha would be assumed equal to rank
            mixin.save_lora_weights(
                out_dir,
                transformer_lora_layers=lora_state(network),
                transformer_lora_adapter_metadata=network.peft_config["default"].to_dict(),
                safe_serialization=True,
            )
        else:
            network.save_pretrained(out_dir, safe_serialization=True)

    def load_aligned(self, final_dir: str) -> torch.nn.Module:
        """The base transformer with ``final/`` applied: a LoRA fused into a copy, or the exported network."""
        import copy

        if os.path.isfile(os.path.join(final_dir, LORA_WEIGHTS)):
            network = copy.deepcopy(self.network)
            network.load_lora_adapter(
                final_dir, prefix="transformer", weight_name=LORA_WEIGHTS, adapter_name="aligned"
            )
            return fuse_lora(network).eval()
        if os.path.isfile(os.path.join(final_dir, "config.json")):
            return type(self.network).from_pretrained(final_dir, local_files_only=True).eval()
        raise UserError(
            f"{final_dir} holds neither {LORA_WEIGHTS} nor a transformer (config.json); was it written by training?"
        )


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class FlowSDESampler:
    """The stochastic sampler of online RL on a rectified flow, one step at a time, with per-sample steps.

    Each transition σ → σ_next of the scheduler's own schedule (the one :meth:`FlowAdapter.sample` walks) is
    the Euler–Maruyama step of the reverse-time SDE with the flow's marginals (Flow-GRPO, Liu et al., arXiv
    2505.05470; :func:`mmalign.rl.samplers.flow_sde_posterior`), around the guided velocity. At σ = 1 the
    SDE's std uses the schedule's second σ in its denominator, as Flow-GRPO's reference code does. With a = 0
    every step is the ODE's Euler step, so ``sample``'s trajectory is retraced.
    """

    def __init__(self, adapter: FlowAdapter, *, steps: int, noise_level: float, guidance_scale: float):
        self.adapter, self.noise_level, self.guidance_scale = adapter, noise_level, guidance_scale
        self.shape = adapter.family.latent_shape(adapter.pipe, adapter._media_shape)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(adapter.scheduler.config)
        options = {"mu": adapter._mu(self.shape)} if scheduler.config.use_dynamic_shifting else {}
        scheduler.set_timesteps(steps, **options)
        self.timesteps = scheduler.timesteps.clone()  # (T,) σ·N, noisiest first
        self.sigmas = scheduler.sigmas.clone().float()  # (T + 1,), ending at 0
        self.sigma_at_one = float(self.sigmas[1])
        embedded = getattr(adapter.network.config, "guidance_embeds", False)
        self.guided = guidance_scale != 1 and not embedded
        self.forwards_per_sample = 2 if self.guided else 1
        probe = torch.zeros(len(self.timesteps), 1)
        posterior = self.posterior(probe, probe, torch.arange(len(self.timesteps)))
        self.stochastic = (posterior.std.flatten() > 0).tolist()  # (T,)

    def initial(self, seeds: list[int], device: torch.device) -> torch.Tensor:
        """x at σ = 1 of each seed, (b, C, [F,] h, w) fp32, as ``FlowAdapter.sample`` draws it."""
        noise = [torch.randn(self.shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(device, torch.float32)

    def condition(self, prompts: list[str]):
        condition = self.adapter.encode_prompts(prompts)
        negative = self.adapter.encode_prompts([""] * len(prompts)) if self.guided else None
        return condition, negative

    def output(self, network, latents: torch.Tensor, steps: torch.Tensor, condition) -> torch.Tensor:
        """The guided velocity at x = ``latents`` for step indices ``steps`` (b,), fp32."""
        condition, negative = condition
        dtype = weight_dtype(network)
        timesteps = self.timesteps.to(latents.device)[steps]  # (b,)
        if self.guided:
            condition = {key: torch.cat([negative[key], condition[key]]) for key in condition}
            latents, timesteps = torch.cat([latents, latents]), torch.cat([timesteps, timesteps])
        velocity = self.adapter.family.predict(
            self.adapter.pipe, network, latents.to(dtype), timesteps.to(dtype), _as_dtype(condition, dtype)
        ).float()
        if self.guided:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + self.guidance_scale * (cond - uncond)
        return velocity

    def posterior(self, output: torch.Tensor, latents: torch.Tensor, steps: torch.Tensor):
        """The SDE transition from x = ``latents`` at step indices ``steps`` (b,) given the velocity ``output``."""
        steps = steps.cpu()
        return flow_sde_posterior(
            output,
            latents,
            self.sigmas[steps].to(latents.device),
            self.sigmas[steps + 1].to(latents.device),
            noise_level=self.noise_level,
            sigma_at_one=self.sigma_at_one,
        )

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.adapter.decode(latents)


def flow_options(model_cfg, timesteps_cfg, *, video: bool) -> dict:
    """Constructor options from the ``model`` and ``timesteps`` sections (either may be None: defaults)."""
    options = {}
    if timesteps_cfg is not None:
        options["density"] = {
            "name": timesteps_cfg.density or "logit_normal",
            "mean": timesteps_cfg.logit_mean,
            "std": timesteps_cfg.logit_std,
        }
        options["shift"] = timesteps_cfg.shift
    if model_cfg is None:
        return options
    options["embedded_guidance"] = model_cfg.embedded_guidance
    media_shape = None
    if model_cfg.resolution is not None:
        size = model_cfg.resolution
        media_shape = (model_cfg.num_frames or 1, size, size) if video else (size, size)
        if video and model_cfg.num_frames is None:
            raise UserError("`model.num_frames` must be set with model.resolution for a video model")
    elif model_cfg.num_frames is not None:
        raise UserError("`model.num_frames` needs `model.resolution` too (the clip's pixel size)")
    options["media_shape"] = media_shape
    return options


def _as_dtype(condition: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in condition.items()}


__all__ = ["FAMILIES", "FlowAdapter", "load_pipeline", "read_index"]
