"""The adapter protocol: what a recipe may ask of a model, whatever its modality.

A recipe never imports a modality module; it gets an adapter from :func:`mmalign.adapters.load` (chosen by
``model.kind``) and speaks to it only through the methods below. The adapter hides the model family: how
media become latents, how a prompt becomes a condition, how noise is drawn and a prediction scored.

The score contract (DESIGN.md): ``errors`` returns one fp32 value per sample, the mean over every non-batch
dimension of the squared error of the network's prediction against its training target, so a (B, C, H, W)
image and a (B, C, F, H, W) video are scored alike; the log-likelihood surrogate every loss reads is
s = −½·e (:func:`score_of`). Both members of a pair, and the policy and the reference, get the same noise,
timestep and condition: the recipe draws them once per pair (``draw``) and passes them to every call.

Adding a modality: a module in ``adapters/`` with one class that satisfies :class:`Adapter`, and one line
in ``ADAPTERS`` (``adapters/__init__.py``). Recipes, runtime and losses need no change.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from typing import Any, Protocol

import torch


class StepGuide(Protocol):
    """A per-step hook of ``Adapter.sample``: reward guidance (``mmalign.recipes.guidance``).

    At each step i it is ``active`` on, the sampler calls it with the state x_t (b, …), the noise level
    t in [0, 1] (b,) as ``noise_level`` reports it, the chunk's prompts and — when ``uses_prediction`` — the
    predicted clean latents x0, computed with the autograd graph from x_t. It returns g (b, …), the direction
    (already scaled and clipped) in which x_t should move to raise the reward; the sampler turns g into the
    change of its prediction that moves the step that way (velocity v − g for flow; see each adapter)."""

    uses_prediction: bool

    def active(self, step: int, steps: int) -> bool: ...

    def __call__(
        self,
        step: int,
        latents: torch.Tensor,
        noise_level: torch.Tensor,
        prompts: list[str],
        prediction: torch.Tensor | None,
    ) -> torch.Tensor: ...


class StochasticSampler(Protocol):
    """A stochastic sampler for online RL, one step at a time (``mmalign.recipes.branch_rl``).

    Step i of ``timesteps`` (T,) moves x_t to x_{t−1} ~ ``posterior(output(network, x_t, i, condition), x_t, i)``,
    a :class:`mmalign.rl.samplers.Gaussian`; step indices are (b,) tensors, so one batch may mix steps.
    ``stochastic`` (T,) says which steps have σ > 0 (only those have a log-density to train);
    ``forwards_per_sample`` counts the network evaluations one ``output`` costs per sample (2 with guidance)."""

    timesteps: torch.Tensor
    stochastic: list[bool]
    forwards_per_sample: int

    def initial(self, seeds: list[int], device: torch.device) -> torch.Tensor: ...

    def condition(self, prompts: list[str]) -> Any: ...

    def output(self, network, latents: torch.Tensor, steps: torch.Tensor, condition) -> torch.Tensor: ...

    def posterior(self, output: torch.Tensor, latents: torch.Tensor, steps: torch.Tensor): ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


class Adapter(Protocol):
    """One loaded model of some modality: the trained network plus the frozen parts around it."""

    kind: str  # the `model.kind` that selects it: "diffusion", "flow", ...
    media: str  # "image" or "video": how samples are stored and shown
    network: torch.nn.Module  # what gets trained: a UNet, a transformer

    # --- setup ----------------------------------------------------------------------------------------
    def to(self, device: torch.device) -> None:
        """Move the frozen parts (text encoders, VAE) to ``device``; the recipe places the network."""

    def check(self, model_cfg: Any) -> None:
        """Raise UserError when the loaded model does not fit the ``model`` section (e.g. its target)."""

    def describe(self) -> str:
        """A few words on what was loaded, e.g. ``"WanTransformer3DModel (video, flow matching)"``."""

    def load_network(self, dtype: torch.dtype) -> torch.nn.Module:
        """A fresh copy of the base network read again from disk (exports of sharded runs)."""

    def add_lora(
        self, network: torch.nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: list[str]
    ) -> list[torch.nn.Parameter]:
        """Freeze ``network`` and add a peft LoRA; returns the trainable parameters."""

    def set_attention(self, network: torch.nn.Module, backend: str) -> None:
        """Select the attention kernel (``model.attention``) on ``network``."""

    # --- data -------------------------------------------------------------------------------------------
    def media_shape(self) -> tuple[int, ...]:
        """Default media size for data and sampling: (H, W) for images, (F, H, W) for video."""

    def encode_media(self, pixels: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
        """Pixels in [-1, 1], (N, 3, H, W) or (N, 3, F, H, W) → model-space latents, fp32."""

    def decode(self, latents: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        """Model-space latents → media in [0, 1], (N, 3, H, W) or (N, 3, F, H, W); ``differentiable`` keeps
        the autograd graph (pixel-space reward guidance)."""

    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent at ``media_shape``: (C, h, w) or (C, F, h, w)."""

    def latent_space(self) -> str:
        """``pixels`` for a pixel-space model, else the VAE's class and a digest of its config."""

    # --- scoring ----------------------------------------------------------------------------------------
    def draw(self, generator: torch.Generator, latent_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """The randomness one pair shares: noise of ``latent_shape`` and a scalar timestep tensor."""

    def noise_level(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(N,) timesteps → (N,) noise level t in [0, 1] (0 clean, 1 pure noise)."""

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t of clean ``latents``, exactly as ``errors`` builds its inputs."""

    def encode_prompts(self, prompts: list[str]) -> Any:
        """The text condition of ``prompts`` (opaque to recipes), batch-first."""

    def repeat_condition(self, condition: Any, times: int) -> Any:
        """A (B, …) condition as (times·B, …), in block order [all B, all B, …]."""

    def errors(
        self,
        network: torch.nn.Module,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: Any,
    ) -> torch.Tensor:
        """Per-sample mean squared error of ``network``'s prediction against its target, (N,) fp32."""

    # --- sampling and export ----------------------------------------------------------------------------
    def sample(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        network: torch.nn.Module | None = None,
        steps: int,
        guidance_scale: float,
        batch_size: int,
        relayout: bool = True,
        return_latents: bool = False,
        guide: StepGuide | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Seeded samples, media in [0, 1] (and the latents they decode from, with ``return_latents``);
        ``guide`` steers each step it is active on up a reward (:class:`StepGuide`)."""

    def stochastic_sampler(
        self, *, steps: int, noise: float | None, guidance_scale: float
    ) -> StochasticSampler:
        """The sampler of online RL: every step a Gaussian with a log-density (DDIM η > 0, the flow SDE);
        ``noise`` is η or the SDE's noise level a (null: the modality's paper default)."""

    def export(self, network: torch.nn.Module, out_dir: str, *, lora: bool) -> None:
        """Write ``final/`` in the format the family's diffusers pipeline loads."""

    def load_aligned(self, final_dir: str) -> torch.nn.Module:
        """The base network with ``final/`` applied, ready to sample."""


def latent_space_of(vae) -> str:
    """``pixels`` for a pixel-space model, else the VAE's class and a digest of its config: a latent reward
    model trained on one VAE's latents reads no other's."""
    if vae is None:
        return "pixels"
    text = json.dumps(dict(vae.config), sort_keys=True, default=str)
    return f"{type(vae).__name__}:{hashlib.sha1(text.encode()).hexdigest()[:10]}"


def score_of(errors: torch.Tensor) -> torch.Tensor:
    """The log-likelihood surrogate s = −½·e of Diffusion-DPO (arXiv 2311.12908, Eq. 14) and Flow-DPO."""
    return -0.5 * errors


def per_sample_mean(squared: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: (N, ...) → (N,)."""
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of ``module``'s (or a DDP / DeepSpeed wrapper's) floating-point weights, leaving out the
    modules diffusers keeps in fp32 whatever the model's dtype (``_keep_in_fp32_modules``, e.g. Wan's norms)."""
    inner = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    kept = getattr(inner, "_keep_in_fp32_modules", None) or ()
    for name, p in inner.named_parameters():
        if p.is_floating_point() and not any(part in name.split(".") for part in kept):
            return p.dtype
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


@contextlib.contextmanager
def adapters_disabled(network: torch.nn.Module):
    """The LoRA policy with its adapters switched off: exactly the base model, the reference of a LoRA run."""
    network.disable_adapters()
    try:
        yield network
    finally:
        network.enable_adapters()


def has_lora(network: torch.nn.Module) -> bool:
    return bool(getattr(network, "peft_config", None))


def fuse_lora(network: torch.nn.Module) -> torch.nn.Module:
    """Fold the active LoRA into the base weights and drop the adapter layers, in place: the same function
    (to float rounding), at the base model's cost per forward — the LoRA detour is ≈ 30% of a toy UNet's time."""
    if has_lora(network):
        network.fuse_lora()
        network.unload_lora()
    return network


@contextlib.contextmanager
def for_sampling(network: torch.nn.Module, *, fused_copy: bool = True):
    """The network under training, ready to sample from (validation, online pairs).

    With a LoRA and ``fused_copy``: a frozen copy with the LoRA fused in. Fusing into the trained network and
    back would perturb the base weights that the reference is. Otherwise — full fine-tuning, where a copy
    would cost a whole model, or a network whose parameters FSDP2 or DeepSpeed own — the network itself in
    eval mode; its mode is restored afterwards.
    """
    if fused_copy and has_lora(network):
        yield fuse_lora(copy.deepcopy(network).requires_grad_(False)).eval()
        return
    training = network.training
    network.eval()
    try:
        yield network
    finally:
        network.train(training)


def add_peft_lora(
    network: torch.nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: list[str]
) -> list[torch.nn.Parameter]:
    """Freeze ``network`` and add a peft LoRA through diffusers' ``add_adapter``; the trainable parameters.

    With the adapter disabled the network is exactly the base model, which is the reference of a LoRA run.
    """
    from peft import LoraConfig

    from mmalign.errors import UserError

    names = [name for name, _ in network.named_modules()]
    present = {name.rsplit(".", 1)[-1] for name in names} | {".".join(name.split(".")[-2:]) for name in names}
    missing = [m for m in target_modules if m not in present]
    if missing:
        raise UserError(
            f"`lora.target_modules` names modules {type(network).__name__} does not have: {missing}"
        )
    network.requires_grad_(False)
    network.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            init_lora_weights="gaussian",
            target_modules=list(target_modules),
        )
    )
    return [p for p in network.parameters() if p.requires_grad]


def lora_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's key format (``…lora_A.weight``), on the CPU in fp32, contiguous.

    diffusers' ``convert_state_dict_to_diffusers`` is not applied: it renames ``q_proj`` / ``k_proj`` /
    ``v_proj`` (text-encoder style) layers to an older layout that ``load_lora_weights`` then maps back wrongly
    for a UNet, so such a LoRA would reload with part of its weights missing.
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(network)
    return {key: value.detach().float().cpu().contiguous() for key, value in state.items()}
