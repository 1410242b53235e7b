"""Offline preference training of a text-to-image diffusion model: Diffusion-DPO and its loss family.

One readable loop (Wallace et al., arXiv 2311.12908, Alg. 1 with the loss of Eq. 14):

    setup → data → score policy (both members) → score reference (same t, ε, caption) → loss → step
          → log → validate → checkpoint → export

Determinism that resume and multi-process runs rely on: the k-th pair of the global data stream, its noise,
its timestep and its caption dropout are functions of (seed, k) alone. A resumed run, a run with gradient
accumulation and a run split over several processes therefore see exactly the same pairs with the same noise
as a single uninterrupted run with the same global batch.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from mmalign import checkpoint, distributed
from mmalign.adapters import diffusion
from mmalign.config import LoraConfig, TrainConfig, to_yaml
from mmalign.data import PairDataset, read_pairs, validate_images
from mmalign.errors import UserError
from mmalign.losses import PAIRWISE, get_loss
from mmalign.recipes import evaluate

OBJECTIVES = (*PAIRWISE, "sft")


@dataclass
class RunResult:
    output_dir: str
    final_dir: str
    exported_step: int
    val_history: list[tuple[int, float]]


class PairStream:
    """The global, epoch-shuffled order of pairs and the per-pair randomness, keyed by stream position."""

    def __init__(self, num_pairs: int, seed: int, num_train_timesteps: int):
        self.num_pairs, self.seed, self.num_train_timesteps = num_pairs, seed, num_train_timesteps
        self._orders: dict[int, torch.Tensor] = {}

    def pair_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_pairs)
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(self.num_pairs, generator=self._generator(-1 - epoch))}
        return int(self._orders[epoch][offset])

    def randomness(self, position: int, latent_shape: torch.Size, caption_dropout: float):
        """(noise, timestep, drop caption, swap members) for the pair at ``position``."""
        g = self._generator(position)
        noise = torch.randn(latent_shape, generator=g)  # (C, H, W), shared by both members
        t = int(torch.randint(0, self.num_train_timesteps, (1,), generator=g))
        drop = bool(torch.rand(1, generator=g) < caption_dropout)
        swap = bool(torch.rand(1, generator=g) < 0.5)
        return noise, t, drop, swap

    def _generator(self, key: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed << 33) + key + (1 << 32))


class LatentCache:
    """Model-space latents of each pair, computed once (VAE encode, or pixels for pixel-space models)."""

    def __init__(self, dataset: PairDataset, components: diffusion.Components, enabled: bool):
        self.dataset, self.components, self.enabled = dataset, components, enabled
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, index: int) -> tuple[str, torch.Tensor, torch.Tensor, float]:
        record = self.dataset.records[index]
        if index not in self._latents:
            item = self.dataset[index]  # decodes the two images
            pixels = torch.stack([item["chosen"], item["rejected"]])  # (2, 3, H, W)
            # a seeded draw from the VAE posterior, so a resumed run encodes exactly as the first one did
            generator = torch.Generator(self.components.unet.device).manual_seed(index)
            latents = diffusion.encode_images(self.components, pixels, generator=generator)
            chosen, rejected = latents.float().cpu()
            if not self.enabled:
                return record.caption, chosen, rejected, record.label
            self._latents[index] = (chosen, rejected)
        chosen, rejected = self._latents[index]
        return record.caption, chosen, rejected, record.label


def build_batch(stream: PairStream, cache: LatentCache, positions: list[int], cfg: TrainConfig, device):
    """Stack the pairs at ``positions`` with their shared noise, timesteps and text condition."""
    captions, chosen, rejected, labels, noises, timesteps = [], [], [], [], [], []
    for position in positions:
        caption, lat_w, lat_l, label = cache.get(stream.pair_index(position))
        noise, t, drop, swap = stream.randomness(position, lat_w.shape, cfg.data.caption_dropout)
        if cfg.data.labels == "random" and swap:
            lat_w, lat_l = lat_l, lat_w
        captions.append("" if drop else caption)
        chosen.append(lat_w)
        rejected.append(lat_l)
        labels.append(label)
        noises.append(noise)
        timesteps.append(t)
    return {
        "captions": captions,
        "chosen": torch.stack(chosen).to(device),  # (B, C, H, W)
        "rejected": torch.stack(rejected).to(device),  # (B, C, H, W)
        "label": torch.tensor(labels, device=device),  # (B,)
        "noise": torch.stack(noises).to(device),  # (B, C, H, W)
        "timesteps": torch.tensor(timesteps, device=device),  # (B,)
    }


def reference_errors(unet, frozen, scheduler, latents, noise, timesteps, hidden, added) -> torch.Tensor:
    """Denoising errors of the reference: the LoRA-disabled policy, or the frozen copy for full fine-tuning."""
    with torch.no_grad():
        if frozen is not None:
            return diffusion.denoising_errors(frozen, scheduler, latents, noise, timesteps, hidden, added)
        unet.disable_adapters()
        try:
            return diffusion.denoising_errors(unet, scheduler, latents, noise, timesteps, hidden, added)
        finally:
            unet.enable_adapters()


def preference_step(model, unet, frozen, components, batch, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Per-pair loss and diagnostics for one micro-batch; ``model`` may be the DDP-wrapped ``unet``."""
    scheduler = components.scheduler
    size = len(batch["captions"])
    hidden, added = diffusion.encode_prompts(components, batch["captions"])  # (B, L, D)
    if cfg.loss.name == "sft":
        errors = diffusion.denoising_errors(
            model, scheduler, batch["chosen"], batch["noise"], batch["timesteps"], hidden, added
        )  # (B,)
        return {"loss": errors, "policy_err_w": errors.detach()}
    # Both members in one forward: same noise, same timestep, same caption within a pair.
    latents = torch.cat([batch["chosen"], batch["rejected"]])  # (2B, C, H, W)
    noise = batch["noise"].repeat(2, 1, 1, 1)  # (2B, C, H, W)
    timesteps = batch["timesteps"].repeat(2)  # (2B,)
    hidden2, added2 = diffusion.repeat_condition(hidden, added, 2)
    # The reference runs first, so its activations are freed before the policy's are held for backward.
    ref = reference_errors(unet, frozen, scheduler, latents, noise, timesteps, hidden2, added2)  # (2B,)
    policy = diffusion.denoising_errors(model, scheduler, latents, noise, timesteps, hidden2, added2)  # (2B,)
    # score s = −½ · error (the Diffusion-DPO surrogate of the log-likelihood)
    pw, pl, rw, rl = (-0.5 * policy[:size], -0.5 * policy[size:], -0.5 * ref[:size], -0.5 * ref[size:])
    loss_fn, options = get_loss(cfg.loss.name), _loss_options(cfg)
    out = loss_fn(pw, pl, rw, rl, beta=cfg.loss.beta, **options)
    per_pair = out.loss
    label = batch["label"]
    if bool((label < 1).any()):
        # Ties (label 0.5) are soft labels: label · L(w, l) + (1 − label) · L(l, w).
        reverse = loss_fn(pl, pw, rl, rw, beta=cfg.loss.beta, **options).loss
        per_pair = label * per_pair + (1 - label) * reverse
    margin = out.chosen_rewards - out.rejected_rewards
    return {
        "loss": per_pair,
        "implicit_acc": (margin > 0).float() + 0.5 * (margin == 0).float(),
        "reward_margin": margin,
        "policy_err_w": policy[:size].detach(),
        "policy_err_l": policy[size:].detach(),
        "ref_err_w": ref[:size],
        "ref_err_l": ref[size:],
    }


def _loss_options(cfg: TrainConfig) -> dict:
    if cfg.loss.name == "dpo":
        return {"label_smoothing": cfg.loss.label_smoothing}
    if cfg.loss.name == "robust":
        return {"label_noise": cfg.loss.label_noise}
    return {}


def check_model(components: diffusion.Components, cfg: TrainConfig) -> None:
    """The model must fit the algorithm: its scheduler's target must be the one the config expects."""
    actual = components.prediction_type
    if actual not in diffusion.PREDICTION_TYPES:
        raise UserError(
            f"{cfg.model.path}/scheduler: prediction_type {actual!r} is not supported "
            f"(accepted: {', '.join(diffusion.PREDICTION_TYPES)})"
        )
    if cfg.model.prediction_type is not None and cfg.model.prediction_type != actual:
        raise UserError(
            f"`model.prediction_type` is {cfg.model.prediction_type!r} but {cfg.model.path}/scheduler "
            f"says {actual!r}; set model.prediction_type={actual} or null"
        )
    if cfg.loss.name not in OBJECTIVES:
        raise UserError(
            f"`loss.name` {cfg.loss.name!r} is not a pairwise objective (accepted: {', '.join(OBJECTIVES)})"
        )


def add_configured_lora(unet, lora: LoraConfig) -> list[torch.nn.Parameter]:
    """The ``lora`` section's adapters on ``unet``; returns the trainable parameters."""
    return diffusion.add_lora(
        unet, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
    )


def check_backend(environ=os.environ) -> None:
    """Refuse, before any process group forms, a launch backend this recipe cannot run under.

    accelerate launch exports these variables from the launch file. DDP, FSDP2 (``fsdp2.yaml``) and DeepSpeed
    ZeRO 1/2 (``deepspeed_zero2.yaml``) are supported. FSDP1 wraps the model in one flat parameter, which the
    reference switch (LoRA disabled) and the whole-tensor checkpoints do not handle; ZeRO stage 3 partitions
    the weights themselves, so that every forward would be collective and gathered differently; ZeRO
    offload moves the optimizer step to DeepSpeed's CPU path, whose state the checkpoints do not read.
    """
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise UserError(
                f"launch: FSDP_VERSION={version} (fsdp_version in the launch file) is not supported by the "
                "diffusion preference recipe (accepted: 2); launch with configs/accelerate/fsdp2.yaml"
            )
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        offload = {
            name: environ.get(f"ACCELERATE_DEEPSPEED_{name.upper()}", "none")
            for name in ("offload_optimizer_device", "offload_param_device")
        }
        _check_zero(stage, offload, "ACCELERATE_DEEPSPEED_")


def _check_zero(stage, offload: dict[str, str | None], prefix: str) -> None:
    """ZeRO stage 1 or 2 without offload; ``prefix`` names where the values came from."""
    if str(stage) not in ("1", "2"):
        raise UserError(
            f"launch: {prefix}ZERO_STAGE={stage} (zero_stage in the launch file) is not supported by the "
            "diffusion preference recipe (accepted: 1, 2); launch with configs/accelerate/deepspeed_zero2.yaml "
            "or fsdp2.yaml"
        )
    for name, device in offload.items():
        if device not in (None, "none"):
            raise UserError(
                f"launch: {prefix}{name.upper()}={device} ({name} in the launch file) is not supported by "
                "the diffusion preference recipe (accepted: none); launch with "
                "configs/accelerate/deepspeed_zero2.yaml or fsdp2.yaml"
            )


def configure_deepspeed(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Hand DeepSpeed the batch, accumulation and clipping of the mmalign config, before ``prepare``.

    No DataLoader is prepared, so DeepSpeed cannot infer its micro-batch; and it clips and accumulates
    inside its own step, so those must be the config's, not the launch file's.
    """
    plugin = accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    offload = {
        f"offload_{part}_device": zero.get(f"offload_{part}", {}).get("device")
        for part in ("optimizer", "param")
    }
    _check_zero(plugin.zero_stage, offload, "DeepSpeed config: ")
    micro, accum = cfg.optim.batch_size, cfg.optim.gradient_accumulation_steps
    plugin.deepspeed_config.update(
        {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            "train_batch_size": micro * accum * accelerator.num_processes,
            "gradient_clipping": max(cfg.optim.max_grad_norm, 0.0),
        }
    )


def train(
    cfg: TrainConfig, *, base_val_reward: float | None = None, accelerator: Accelerator | None = None
) -> RunResult:
    """Run the recipe.

    ``base_val_reward``: the base model's validation reward, when another run already measured it with the
    same model, prompts, seeds and sampler (the control does); step 0 reuses it. ``accelerator``: one built
    by the caller (with its own plugins); by default the recipe builds it from the launch environment. Its
    gradient accumulation must be the config's.
    """
    # 1. setup ---------------------------------------------------------------------------------------------
    check_backend()
    if accelerator is None:
        accelerator = Accelerator(
            gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
            mixed_precision=cfg.optim.mixed_precision,
        )
    elif accelerator.gradient_accumulation_steps != cfg.optim.gradient_accumulation_steps:
        raise ValueError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, the config "
            f"{cfg.optim.gradient_accumulation_steps} (optim.gradient_accumulation_steps)"
        )
    out_dir, ckpt_dir = cfg.output_dir, os.path.join(cfg.output_dir, "checkpoints")
    is_main = accelerator.is_main_process

    # 2. model: policy and reference -----------------------------------------------------------------------
    components = diffusion.load_components(cfg.model.path)
    check_model(components, cfg)
    device = accelerator.device
    for module in (components.text_encoder, components.vae, components.text_encoder_2):
        if module is not None:
            module.to(device)
    unet = components.unet.to(device)
    torch.manual_seed(cfg.optim.seed)  # the LoRA initialisation, identical on every rank
    frozen = None
    if cfg.lora.enabled:
        params = add_configured_lora(unet, cfg.lora)
    else:
        frozen = copy.deepcopy(unet).requires_grad_(False).eval()
        params = list(unet.parameters())
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.model.attention == "xformers":
        if device.type != "cuda":
            raise UserError("`model.attention` is 'xformers', which needs a CUDA device; use 'sdpa' here")
        unet.enable_xformers_memory_efficient_attention()
    unet.train()

    # 3. data ----------------------------------------------------------------------------------------------
    records = read_pairs(cfg.data.format, cfg.data.path, ties=cfg.data.ties, image_root=cfg.data.image_root)
    if not records:
        raise UserError(f"`data.path` {cfg.data.path}: no preference pairs left (ties={cfg.data.ties})")
    validate_images(records)
    dataset = PairDataset(records, resolution=cfg.data.resolution or components.resolution)
    if is_main:
        # written only once model and data passed their checks, so a bad rerun never clobbers a good run
        os.makedirs(ckpt_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    cache = LatentCache(dataset, components, cfg.data.cache_latents)
    stream = PairStream(len(dataset), cfg.optim.seed, components.scheduler.config.num_train_timesteps)
    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = cfg.optim.batch_size, cfg.optim.gradient_accumulation_steps
    global_batch = micro * accum * world

    # 4. optimizer and schedule ----------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.optim.lr,
        betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
        weight_decay=cfg.optim.weight_decay,
    )
    schedule = get_scheduler(
        cfg.optim.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.optim.max_steps,
    )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(unet, optimizer)
    sharded = distributed.is_sharded(unet)  # FSDP2 shards the UNet in place
    # Under FSDP2 and DeepSpeed the backend owns the parameters' storage: validation samples the UNet itself
    # (no fused copy, no change of memory layout), and export gathers the weights into a fresh UNet.
    owned = sharded or deepspeed
    backend = "FSDP2" if sharded else "DDP"
    if deepspeed:
        backend = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters
    if sharded and frozen is not None:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        frozen = fsdp2_prepare_model(accelerator, frozen)  # the reference is sharded like the policy
    if deepspeed and frozen is not None:
        frozen.to(diffusion.weight_dtype(unet))  # DeepSpeed cast the policy (bf16 / fp16): the same precision

    # 5. resume --------------------------------------------------------------------------------------------
    start_step, best = 0, {"reward": -math.inf, "step": None}
    val_history: list[tuple[int, float]] = []
    resume_from = checkpoint.latest(ckpt_dir) if cfg.checkpoint.resume == "latest" else cfg.checkpoint.resume
    if resume_from is not None:
        state = checkpoint.load(resume_from, module=unet, optimizer=optimizer.optimizer)
        schedule.load_state_dict(state["schedule"])
        start_step, best = state["step"], state["best"]
        val_history = [tuple(item) for item in state["val_history"]]
        if is_main:
            _truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), start_step)
    validation = _build_validation(cfg, fused_copy=not owned) if cfg.validation.every else None
    if is_main and cfg.log.progress:
        print(_describe(cfg, len(dataset), accelerator, backend, start_step), flush=True)
    writer = _tensorboard(out_dir) if (is_main and cfg.log.tensorboard) else None
    bar = tqdm(
        total=cfg.optim.max_steps,
        initial=start_step,
        desc=f"{cfg.loss.name} ({out_dir})",
        disable=not (is_main and cfg.log.progress),
        dynamic_ncols=True,
    )

    if validation is not None and start_step == 0:
        # step 0 is the base model itself: the line every later validation reward is judged against
        reward = validation(components, unet, accelerator) if base_val_reward is None else base_val_reward
        val_history.append((0, reward))
        if is_main:
            _write_metrics(out_dir, {"step": 0, "val_reward": reward}, writer)

    window: dict[str, list[torch.Tensor]] = {}
    window_start = time.perf_counter()
    for step in range(start_step, cfg.optim.max_steps):
        for m in range(accum):
            first = step * global_batch + (m * world + rank) * micro
            batch = build_batch(stream, cache, list(range(first, first + micro)), cfg, device)
            with accelerator.accumulate(model), accelerator.autocast():
                # 6. score policy and reference, 7. loss (mean over pairs, outside the log-sigmoid)
                stats = preference_step(model, unet, frozen, components, batch, cfg)
                loss = stats["loss"].mean()
                # 8. backward and step
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                    # the norm before clipping; DeepSpeed clipped inside backward and reports its own
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                    if grad_norm is not None:
                        grad_norm = distributed.whole(torch.as_tensor(grad_norm)).float().reshape(1)
                        window.setdefault("grad_norm", []).append(grad_norm.cpu())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in stats.items():
                window.setdefault(key, []).append(value.detach().float())
        schedule.step()
        done = step + 1
        bar.update(1)

        # 9. log (averaged over the window and across processes)
        if done % cfg.log.every == 0 or done == cfg.optim.max_steps:
            elapsed = time.perf_counter() - window_start
            row = {"step": done, **_reduce(accelerator, window)}
            row["lr"] = schedule.get_last_lr()[0]
            row["pairs_per_s"] = len(window["loss"]) * micro * world / elapsed
            window, window_start = {}, time.perf_counter()
            if is_main:
                _write_metrics(out_dir, row, writer)
                shown = {"loss": f"{row['loss']:.4f}"}
                if "implicit_acc" in row:  # a pairwise loss; the sft control has none
                    shown["acc"] = f"{row['implicit_acc']:.2f}"
                bar.set_postfix(shown)

        # 10. validate on held-out prompts (not the test prompts) and keep the best
        if validation is not None and (done % cfg.validation.every == 0 or done == cfg.optim.max_steps):
            reward = validation(components, unet, accelerator)  # every rank samples its share
            val_history.append((done, reward))
            if is_main:
                _write_metrics(out_dir, {"step": done, "val_reward": reward}, writer)
            if reward > best["reward"]:
                best = {"reward": reward, "step": done}
                checkpoint.save_weights(os.path.join(ckpt_dir, "best"), unet, write=is_main)
            accelerator.wait_for_everyone()

        # 11. checkpoint (written once, atomically)
        if done % cfg.checkpoint.every == 0 or done == cfg.optim.max_steps:
            state = {
                "step": done,
                "schedule": schedule.state_dict(),
                "best": best,
                "val_history": val_history,
            }
            checkpoint.save(
                os.path.join(ckpt_dir, f"step-{done}"),
                module=unet,
                optimizer=optimizer.optimizer,
                state=state,
                write=is_main,
            )
            if is_main:
                checkpoint.prune(ckpt_dir, cfg.checkpoint.keep)
            accelerator.wait_for_everyone()
    bar.close()
    if writer is not None:
        writer.close()

    # 12. export the best (or last) weights to final/ in the ecosystem's own format
    exported = cfg.optim.max_steps
    final_dir = os.path.join(out_dir, "final")
    if cfg.validation.keep_best and best["step"] is not None:
        checkpoint.load_weights(os.path.join(ckpt_dir, "best"), unet)
        exported = best["step"]
    # a sharded or ZeRO-managed UNet is gathered into a plain one on rank 0 (every rank takes part)
    policy = _unsharded_policy(cfg, unet, keep=is_main) if owned else unet
    if is_main:
        diffusion.export(components, policy, final_dir, lora=cfg.lora.enabled)
        with open(os.path.join(final_dir, "mmalign.json"), "w") as f:
            json.dump(
                {
                    "step": exported,
                    "val_reward": best["reward"] if best["step"] else None,
                    "loss": cfg.loss.name,
                    "base": os.path.abspath(cfg.model.path),
                },
                f,
                indent=2,
            )
    accelerator.wait_for_everyone()
    return RunResult(out_dir, final_dir, exported, val_history)


def _describe(cfg: TrainConfig, num_pairs: int, accelerator: Accelerator, backend: str, start: int) -> str:
    """One line on what is about to run, e.g. ``dpo on 640 pairs, LoRA rank 8, 2 processes (FSDP2) ...``."""
    trained = f"LoRA rank {cfg.lora.rank}" if cfg.lora.enabled else "full fine-tuning"
    world = accelerator.num_processes
    launch = "1 process" if world == 1 else f"{world} processes ({backend})"
    batch = f"global batch {cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps * world}"
    resumed = f", resuming at step {start}" if start else ""
    return f"{cfg.loss.name} on {num_pairs} pairs, {trained}, {launch}, {batch}, {cfg.optim.max_steps} steps{resumed}"


def _unsharded_policy(cfg: TrainConfig, unet, *, keep: bool):
    """The trained UNet as one plain module on the rank with ``keep`` (None elsewhere): the base UNet read
    again from ``model.path``, with the LoRA of the config, and the gathered trained parameters."""
    trained = checkpoint.trainable_state(unet, keep=keep)  # collective
    if not keep:
        return None
    policy = diffusion.load_unet(cfg.model.path, dtype=unet.dtype)
    if cfg.lora.enabled:
        add_configured_lora(policy, cfg.lora)
    missing = sorted({name for name, p in policy.named_parameters() if p.requires_grad} - set(trained))
    if missing:
        raise RuntimeError(f"the gathered UNet lacks trained parameters, e.g. {missing[0]!r}")
    checkpoint.assign(policy, trained)
    return policy


def _build_validation(cfg: TrainConfig, *, fused_copy: bool):
    """A function (components, unet, accelerator) → mean reward on the validation prompts.

    The prompt/seed pairs are split across the ranks (each samples a contiguous share, padded to equal
    length, since a sharded UNet's forward is collective) and the rewards gathered in their original order,
    so the mean is the one a single process computes. ``fused_copy``: sample a fused copy of a LoRA policy (see
    ``diffusion.for_sampling``); False when the launch backend owns the parameters.
    """
    prompts = evaluate.prompt_list(cfg.validation.prompts, key="validation.prompts")
    prompts, seeds = evaluate.prompt_seeds(prompts, cfg.validation.seeds_per_prompt, first_seed=2000)
    reward = evaluate.build_reward_model(cfg.eval.reward)

    def validate(components: diffusion.Components, unet, accelerator: Accelerator) -> float:
        share = distributed.rank_chunk(len(prompts), accelerator.process_index, accelerator.num_processes)
        my_prompts = [prompts[i] for i in share]
        with diffusion.for_sampling(unet, fused_copy=fused_copy) as model:
            images = diffusion.sample(
                components,
                my_prompts,
                [seeds[i] for i in share],
                unet=model,
                relayout=fused_copy,
                steps=cfg.sampling.steps,
                guidance_scale=cfg.sampling.guidance_scale,
                batch_size=cfg.sampling.batch_size,
            )
        rewards = reward(images, my_prompts).float().to(accelerator.device)  # (share,)
        return float(accelerator.gather(rewards)[: len(prompts)].mean())

    return validate


def _reduce(accelerator: Accelerator, window: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    row = {}
    for key, values in window.items():
        mean = torch.cat([v.reshape(-1) for v in values]).mean().to(accelerator.device)
        row[key] = float(accelerator.reduce(mean, reduction="mean"))
    return row


def _write_metrics(out_dir: str, row: dict, writer) -> None:
    with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if writer is not None:
        for key, value in row.items():
            if key != "step":
                writer.add_scalar(key, value, row["step"])


def _truncate_metrics(path: str, step: int) -> None:
    """On resume, drop rows logged after the checkpoint; the resumed run writes them again."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


def _tensorboard(out_dir: str):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(out_dir, "tensorboard"))
