"""What every training recipe does besides its own step: the runtime chores, each in one place.

- ``check_backend`` / ``build_accelerator``: the launch (one process, DDP, FSDP2, DeepSpeed ZeRO 1/2);
- ``Policy``: the trained network (LoRA or full fine-tuning), its reference, optimizer, schedule and the
  launch backend's wrapping; ``policy.reference()`` is the model the losses compare against;
- ``PairStream`` / ``stream_at``: the epoch-shuffled order of a source's items and each position's noise,
  timestep and dropout, keyed by (seed, position) — which is why accumulation, resume and several processes
  equal one process — rebuilt when an online pool is;
- ``Run``: the run directory, the deterministic positions of the global data stream, backward + step with
  clipping and the NaN/inf check, the metrics window (``metrics.jsonl``, TensorBoard, progress), validation
  with keep-best, atomic checkpoints (never of non-finite weights) and exact resume, and the export of
  ``final/``.

A recipe builds these, then runs its own loop (``recipes/preference.py``, ``recipes/rwr.py``); the loop
reads top to bottom and only the step itself is the recipe's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from mmalign import checkpoint, distributed
from mmalign.adapters import Adapter, adapters_disabled, for_sampling, weight_dtype
from mmalign.config import RunConfig, to_yaml
from mmalign.errors import UserError
from mmalign.recipes import evaluate


@dataclass
class RunResult:
    output_dir: str
    final_dir: str
    exported_step: int
    val_history: list[tuple[int, float]]


# ------------------------------------------------------------------------------------------------ launch


def check_backend(environ=os.environ) -> None:
    """Refuse, before any process group forms, a launch backend the recipes cannot run under.

    accelerate launch exports these variables from the launch file. DDP, FSDP2 (``fsdp2.yaml``) and DeepSpeed
    ZeRO 1/2 (``deepspeed_zero2.yaml``) are supported. FSDP1 wraps the model in one flat parameter, which the
    reference switch (LoRA disabled) and the whole-tensor checkpoints do not handle; ZeRO stage 3 partitions
    the weights themselves, so that every forward would be collective and gathered differently; ZeRO
    offload moves the optimizer step to DeepSpeed's CPU path, whose state the checkpoints do not read.
    """
    launch = tuple(sorted((k, v) for k, v in environ.items() if k.startswith(_LAUNCH_VARIABLES)))
    if launch in _approved_launches:  # the CLI checks before it builds toy assets; the recipes check again
        return
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        version = environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise UserError(
                f"launch: FSDP_VERSION={version} (fsdp_version in the launch file) is not supported by the "
                "training recipes (accepted: 2); launch with configs/accelerate/fsdp2.yaml"
            )
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        offload = {
            name: environ.get(f"ACCELERATE_DEEPSPEED_{name.upper()}", "none")
            for name in ("offload_optimizer_device", "offload_param_device")
        }
        _check_zero(stage, offload, "ACCELERATE_DEEPSPEED_")
    _approved_launches.add(launch)


_LAUNCH_VARIABLES = ("ACCELERATE_USE_", "FSDP_", "ACCELERATE_DEEPSPEED_")
_approved_launches: set[tuple] = set()


def _check_zero(stage, offload: dict[str, str | None], prefix: str) -> None:
    """ZeRO stage 1 or 2 without offload; ``prefix`` names where the values came from."""
    if str(stage) not in ("1", "2"):
        raise UserError(
            f"launch: {prefix}ZERO_STAGE={stage} (zero_stage in the launch file) is not supported by the "
            "training recipes (accepted: 1, 2); launch with configs/accelerate/deepspeed_zero2.yaml "
            "or fsdp2.yaml"
        )
    for name, device in offload.items():
        if device not in (None, "none"):
            raise UserError(
                f"launch: {prefix}{name.upper()}={device} ({name} in the launch file) is not supported by "
                "the training recipes (accepted: none); launch with "
                "configs/accelerate/deepspeed_zero2.yaml or fsdp2.yaml"
            )


def build_accelerator(cfg: RunConfig, accelerator: Accelerator | None = None) -> Accelerator:
    """The launch's accelerator, or the caller's one (whose accumulation must be the config's)."""
    check_backend()
    if not sys.stderr.isatty():
        quiet_library_bars()
    if accelerator is None:
        return Accelerator(
            gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
            mixed_precision=cfg.optim.mixed_precision,
        )
    if accelerator.gradient_accumulation_steps != cfg.optim.gradient_accumulation_steps:
        raise ValueError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, the config "
            f"{cfg.optim.gradient_accumulation_steps} (optim.gradient_accumulation_steps)"
        )
    return accelerator


def configure_deepspeed(accelerator: Accelerator, cfg: RunConfig) -> None:
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
    if cfg.optim.skip_nonfinite:
        raise UserError(
            "`optim.skip_nonfinite` is true, which DeepSpeed cannot honour: it takes the optimizer step inside "
            "backward, before a non-finite step could be dropped (accepted under DeepSpeed: false)"
        )
    micro, accum = cfg.optim.batch_size, cfg.optim.gradient_accumulation_steps
    plugin.deepspeed_config.update(
        {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum,
            "train_batch_size": global_batch(cfg, accelerator),
            "gradient_clipping": max(cfg.optim.max_grad_norm, 0.0),
        }
    )


def quiet_library_bars() -> None:
    """No weight-loading progress bars from transformers and diffusers: in a log file each is a wall of
    carriage-return redraws."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def global_batch(cfg: RunConfig, accelerator: Accelerator) -> int:
    """Samples (pairs) per optimizer step over all processes and micro-batches."""
    return cfg.optim.batch_size * cfg.optim.gradient_accumulation_steps * accelerator.num_processes


def resolve_attention(choice: str, device: torch.device) -> str:
    """``model.attention`` → the backend to use: ``auto`` takes xformers only where it is installed and usable
    (a CUDA device), else SDPA; an explicit choice that cannot run here is an error."""
    installed = _xformers_importable()
    usable = device.type == "cuda" and installed
    if choice == "auto":
        if installed and not usable:
            warnings.warn(
                f"xformers is installed but cannot run on {device.type}; model.attention=auto uses SDPA",
                stacklevel=2,
            )
        return "xformers" if usable else "sdpa"
    if choice == "xformers" and not usable:
        where = "installed" if device.type == "cuda" else "usable on a CUDA device"
        raise UserError(
            f"`model.attention` is 'xformers', which is not {where} here ({device.type}); use auto or sdpa"
        )
    return choice


def _xformers_importable() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ policy


class Policy:
    """The trained network and everything about training it: LoRA or full fine-tuning, the reference, the
    optimizer and lr schedule, and how the launch backend wraps or shards it.

    ``network`` is the plain module (its parameters are what checkpoints hold); ``model`` is what forwards
    go through (the DDP / DeepSpeed wrapper, or ``network`` itself).
    """

    def __init__(self, adapter: Adapter, cfg: RunConfig, accelerator: Accelerator):
        self.adapter, self.cfg, self.accelerator = adapter, cfg, accelerator
        device = accelerator.device
        adapter.to(device)
        network = adapter.network.to(device)
        torch.manual_seed(cfg.optim.seed)  # the LoRA initialisation, identical on every rank
        self.frozen = None
        if cfg.lora.enabled:
            params = adapter.add_lora(network, **_lora_options(cfg))
        else:
            self.frozen = copy.deepcopy(network).requires_grad_(False).eval()
            params = list(network.parameters())
        if cfg.model.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        adapter.set_attention(network, resolve_attention(cfg.model.attention, device))
        network.train()
        self.network = network

        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.optim.lr,
            betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2),
            weight_decay=cfg.optim.weight_decay,
        )
        self.schedule = get_scheduler(
            cfg.optim.lr_scheduler,
            optimizer,
            num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=cfg.optim.max_steps,
        )
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            configure_deepspeed(accelerator, cfg)
        self.model, self.optimizer = accelerator.prepare(network, optimizer)
        self.sharded = distributed.is_sharded(network)  # FSDP2 shards the network in place
        # Under FSDP2 and DeepSpeed the backend owns the parameters' storage: sampling uses the network itself
        # (no fused copy, no change of memory layout), and export gathers the weights into a fresh network.
        self.owned = self.sharded or self.deepspeed
        self.backend = "FSDP2" if self.sharded else "DDP"
        if self.deepspeed:
            self.backend = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP2 swaps in sharded ones
        if self.sharded and self.frozen is not None:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            self.frozen = fsdp2_prepare_model(accelerator, self.frozen)  # sharded like the policy
        if self.deepspeed and self.frozen is not None:
            self.frozen.to(
                weight_dtype(network)
            )  # DeepSpeed cast the policy (bf16 / fp16): the same precision

    def reference(self):
        """A context giving the reference network (see ``reference_of``)."""
        return reference_of(self.network, self.frozen)

    def sampling(self):
        """A context giving the current policy ready to sample (see ``adapters.for_sampling``)."""
        return for_sampling(self.network, fused_copy=not self.owned)

    def unsharded(self, *, keep: bool):
        """The trained network as one plain module on the rank with ``keep`` (None elsewhere): the base read
        again from ``model.path``, with the LoRA of the config, and the gathered trained parameters."""
        if not self.owned:
            return self.network
        trained = checkpoint.trainable_state(self.network, keep=keep)  # collective
        if not keep:
            return None
        plain = self.adapter.load_network(dtype=self.network.dtype)
        if self.cfg.lora.enabled:
            self.adapter.add_lora(plain, **_lora_options(self.cfg))
        missing = sorted({name for name, p in plain.named_parameters() if p.requires_grad} - set(trained))
        if missing:
            raise RuntimeError(f"the gathered network lacks trained parameters, e.g. {missing[0]!r}")
        checkpoint.assign(plain, trained)
        return plain


@contextlib.contextmanager
def reference_of(network: torch.nn.Module, frozen: torch.nn.Module | None):
    """The reference model, without gradients: the frozen copy (full fine-tuning) or the policy with its
    LoRA disabled — exactly the base model in both cases, whatever the step or a resume."""
    with torch.no_grad():
        if frozen is not None:
            yield frozen
        else:
            with adapters_disabled(network) as base:
                yield base


def _lora_options(cfg: RunConfig) -> dict:
    lora = cfg.lora
    return {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": lora.target_modules,
    }


# ------------------------------------------------------------------------------------------------ stream


class PairStream:
    """The global, epoch-shuffled order of pairs and the per-pair randomness, keyed by stream position.

    ``salt`` keys the order of one pair pool among several (an online run's pools are rebuilt); the noise,
    timestep and dropout of a position do not depend on it."""

    def __init__(self, num_pairs: int, seed: int, *, salt: int = 0):
        self.num_pairs, self.seed, self.salt = num_pairs, seed, salt
        self._orders: dict[int, torch.Tensor] = {}

    def pair_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_pairs)
        if epoch not in self._orders:
            key = -1 - epoch - (self.salt << 24)
            self._orders = {epoch: torch.randperm(self.num_pairs, generator=self._generator(key))}
        return int(self._orders[epoch][offset])

    def randomness(self, position: int, adapter: Adapter, latent_shape: torch.Size, caption_dropout: float):
        """(noise, timestep, drop caption, swap members) for the pair at ``position``."""
        g = self._generator(position)
        noise, t = adapter.draw(g, latent_shape)  # shared by both members, and by policy and reference
        drop = bool(torch.rand(1, generator=g) < caption_dropout)
        swap = bool(torch.rand(1, generator=g) < 0.5)
        return noise, t, drop, swap

    def _generator(self, key: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed << 33) + key + (1 << 32))


def stream_at(step: int, source, stream: PairStream | None, policy: Policy, run: Run) -> PairStream:
    """The stream of optimizer step ``step`` over ``source`` (offline data or an online pool): a pool due for a
    rebuild is rebuilt first, from ``policy``, and gets a stream of its own."""
    if source.due(step):
        source.refresh(step, policy, log=run.note)
    if stream is None or stream.salt != source.generation:
        stream = PairStream(len(source), run.cfg.optim.seed, salt=source.generation)
    return stream


# --------------------------------------------------------------------------------------------------- run


class Run:
    """The run directory and the loop's chores: stream positions, backward + step, metrics, validation,
    checkpoints, resume and export.

    ``extras``: recipe state that checkpoints must carry for an exact resume (e.g. an online pair pool),
    each with ``state() -> (tensors, meta)`` and ``load_state(tensors, meta)``.
    """

    def __init__(
        self,
        cfg: RunConfig,
        adapter: Adapter,
        policy: Policy,
        *,
        describe: str,
        base_val_reward: float | None = None,
        extras: dict | None = None,
        metrics_label: str = "loss",
    ):
        self.cfg, self.adapter, self.policy = cfg, adapter, policy
        self.accelerator = policy.accelerator
        self.is_main = self.accelerator.is_main_process
        self.out_dir = cfg.output_dir
        self.ckpt_dir = os.path.join(cfg.output_dir, "checkpoints")
        self.extras = extras or {}
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.micro, self.accum = cfg.optim.batch_size, cfg.optim.gradient_accumulation_steps
        self.global_batch = global_batch(cfg, self.accelerator)
        if self.is_main:
            # written only once model and data passed their checks, so a bad rerun never clobbers a good run
            os.makedirs(self.ckpt_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
        self.start_step, self.best = 0, {"reward": -math.inf, "step": None}
        self.val_history: list[tuple[int, float]] = []
        self.skipped_nonfinite = 0  # steps dropped for a NaN/inf loss or gradient (optim.skip_nonfinite)
        self._resume()
        self.completed = self.start_step  # optimizer steps done; the one being computed is completed + 1
        self.validation = Validation(cfg, adapter) if cfg.validation.every else None
        if self.is_main and cfg.log.progress:
            resumed = f", resuming at step {self.start_step}" if self.start_step else ""
            print(f"{describe}, {self._launch()}, {cfg.optim.max_steps} steps{resumed}", flush=True)
        self.writer = (
            _tensorboard(self.out_dir, self.start_step) if (self.is_main and cfg.log.tensorboard) else None
        )
        # a bar on a terminal; in a log file (not a terminal) one line per metrics row instead of every redraw
        self.show = self.is_main and cfg.log.progress
        self.lines = self.show and not sys.stderr.isatty()
        self.label = metrics_label
        self.bar = tqdm(
            total=cfg.optim.max_steps,
            initial=self.start_step,
            desc=f"{metrics_label} ({self.out_dir})",
            disable=not self.show or self.lines,
            dynamic_ncols=True,
        )
        self.window: dict[str, list[torch.Tensor]] = {}
        self.window_start = time.perf_counter()
        # the current step's diagnostics, added to the window once the step is known not to be skipped
        self.step_stats: dict[str, list[torch.Tensor]] = {}
        self.step_skipped = False
        self.nonfinite_loss = torch.zeros((), device=self.accelerator.device)
        if self.validation is not None and self.start_step == 0:
            # step 0 is the base model itself: the line every later validation reward is judged against
            reward = self._validate() if base_val_reward is None else base_val_reward
            self.val_history.append((0, reward))
            if self.is_main:
                self._write({"step": 0, "val_reward": reward})

    def note(self, text: str) -> None:
        """One line for the user (rank 0, with the progress bar kept intact)."""
        if self.show:
            self.bar.write(text, file=sys.stderr if not self.lines else sys.stdout)

    # --- the loop's skeleton
    def steps(self) -> range:
        return range(self.start_step, self.cfg.optim.max_steps)

    def positions(self, step: int, micro_step: int) -> list[int]:
        """Stream positions of this process's micro-batch ``micro_step`` of optimizer step ``step``: the global
        batch of a step is one contiguous block of the stream, split in the same order whatever the launch."""
        first = step * self.global_batch + (micro_step * self.world + self.rank) * self.micro
        return list(range(first, first + self.micro))

    def encode_ahead(self, source) -> int:
        """Fill an offline source's latent cache before the first step with every item this process's remaining
        steps will read, in the order they first read them, so that each step only looks its latents up.

        The work is the one the steps would otherwise do on first use (decode, VAE-encode with the item's own
        seeded posterior draw), so the latents are bit for bit the same; items the run never reaches are not
        encoded. Nothing happens when ``data.cache_latents`` is false (every step then encodes its own).
        Returns how many items were encoded."""
        if not source.enabled:
            return 0
        stream = PairStream(len(source), self.cfg.optim.seed)  # an offline source's stream (salt 0)
        wanted = dict.fromkeys(
            stream.pair_index(position)
            for step in self.steps()
            for micro_step in range(self.accum)
            for position in self.positions(step, micro_step)
        )
        started = time.perf_counter()
        for index in tqdm(
            wanted, desc="encoding", unit="item", disable=not self.show or self.lines, leave=False
        ):
            source.get(index)
        if self.lines and wanted:
            print(f"encoded {len(wanted)} items in {time.perf_counter() - started:.1f} s", flush=True)
        self.window_start = time.perf_counter()  # the first metrics row's throughput counts steps only
        return len(wanted)

    def accumulate(self):
        """Forwards inside this context count towards the current optimizer step (accelerate accumulation)."""
        return _both(self.accelerator.accumulate(self.policy.model), self.accelerator.autocast())

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Backward; when the accumulation window closes (accelerate decides), check the step's losses and
        gradients for NaN/inf, then clip and step — or drop the step (``optim.skip_nonfinite``)."""
        policy, cfg = self.policy, self.cfg
        # a non-finite loss in any micro-batch of the step; read once, when the window closes
        self.nonfinite_loss += (~torch.isfinite(loss.detach())).float()
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and self._nonfinite_step():
            policy.optimizer.zero_grad(set_to_none=True)
            return
        if self.accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
            # the norm before clipping; DeepSpeed clipped inside backward and reports its own
            grad_norm = self.accelerator.clip_grad_norm_(policy.params, cfg.optim.max_grad_norm)
            if grad_norm is not None:
                grad_norm = distributed.whole(torch.as_tensor(grad_norm)).float().reshape(1)
                self.step_stats.setdefault("grad_norm", []).append(grad_norm.cpu())
        policy.optimizer.step()
        policy.optimizer.zero_grad(set_to_none=True)

    def record(self, stats: dict[str, torch.Tensor]) -> None:
        """Per-sample diagnostics of one micro-batch, averaged into the next metrics row."""
        for key, value in stats.items():
            self.step_stats.setdefault(key, []).append(value.detach().float())

    def end_step(self, done: int) -> None:
        """After optimizer step ``done`` (1-based): lr schedule, log, validate, checkpoint."""
        cfg = self.cfg
        self.completed = done
        if not self.step_skipped:  # a skipped step's NaN/inf diagnostics stay out of the metrics means
            for key, values in self.step_stats.items():
                self.window.setdefault(key, []).extend(values)
        self.step_stats, self.step_skipped = {}, False
        self.policy.schedule.step()
        self.bar.update(1)
        last = done == cfg.optim.max_steps
        if done % cfg.log.every == 0 or last:
            self._log(done)
        if self.validation is not None and (done % cfg.validation.every == 0 or last):
            # held-out prompts (not the test prompts); keep the best
            reward = self._validate()
            self.val_history.append((done, reward))
            if self.is_main:
                self._write({"step": done, "val_reward": reward})
            if reward > self.best["reward"]:
                self.best = {"reward": reward, "step": done}
                self._check_weights(done)
                checkpoint.save_weights(
                    os.path.join(self.ckpt_dir, "best"), self.policy.network, write=self.is_main
                )
            self.accelerator.wait_for_everyone()
        if done % cfg.checkpoint.every == 0 or last:
            self._checkpoint(done)

    def finish(self, *, loss_name: str) -> RunResult:
        """Export the best (or last) weights to ``final/`` in the family's own format."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
        cfg, policy = self.cfg, self.policy
        exported = cfg.optim.max_steps
        final_dir = os.path.join(self.out_dir, "final")
        if cfg.validation.keep_best and self.best["step"] is not None:
            checkpoint.load_weights(os.path.join(self.ckpt_dir, "best"), policy.network)
            exported = self.best["step"]
        # a sharded or ZeRO-managed network is gathered into a plain one on rank 0 (every rank takes part)
        network = policy.unsharded(keep=self.is_main)
        if self.is_main:
            self.adapter.export(network, final_dir, lora=cfg.lora.enabled)
            with open(os.path.join(final_dir, "mmalign.json"), "w") as f:
                json.dump(
                    {
                        "step": exported,
                        "val_reward": self.best["reward"] if self.best["step"] else None,
                        "loss": loss_name,
                        "kind": self.adapter.kind,
                        "base": os.path.abspath(cfg.model.path),
                    },
                    f,
                    indent=2,
                )
        self.accelerator.wait_for_everyone()
        return RunResult(self.out_dir, final_dir, exported, self.val_history)

    # --- internals
    def _launch(self) -> str:
        world = self.world
        launch = "1 process" if world == 1 else f"{world} processes ({self.policy.backend})"
        return f"{launch}, global batch {self.global_batch}"

    def _log(self, done: int) -> None:
        elapsed = time.perf_counter() - self.window_start
        # loss stays null when every step of the window was skipped as non-finite
        row = {"step": done, "loss": None, **_reduce(self.accelerator, self.window)}
        row["lr"] = self.policy.schedule.get_last_lr()[0]
        row["pairs_per_s"] = len(self.window.get("loss", [])) * self.micro * self.world / elapsed
        if self.cfg.optim.skip_nonfinite:
            row["skipped_nonfinite"] = self.skipped_nonfinite  # since step 0
        self.window, self.window_start = {}, time.perf_counter()
        if self.is_main:
            self._write(row)
            shown = {"loss": "skipped" if row["loss"] is None else f"{row['loss']:.4f}"}
            if "implicit_acc" in row:  # a pairwise loss; the sft control has none
                shown["acc"] = f"{row['implicit_acc']:.2f}"
            self.bar.set_postfix(shown)
            if self.lines:
                values = ", ".join(f"{key} {value}" for key, value in shown.items())
                print(
                    f"{self.label} step {done}/{self.cfg.optim.max_steps}: {values}, "
                    f"{row['pairs_per_s']:.1f} samples/s",
                    flush=True,
                )

    def _validate(self) -> float:
        with self.policy.sampling() as network:
            return self.validation(network, self.accelerator, relayout=not self.policy.owned)

    def _nonfinite_step(self) -> bool:
        """Whether the step whose window is closing had a NaN/inf loss or gradient on any rank (the same answer
        on every rank, so all skip together). Without ``optim.skip_nonfinite`` an error naming the step."""
        device = self.accelerator.device
        if self.accelerator.scaler is None:
            grads = [p.grad for p in self.policy.params if p.grad is not None]
            grads_finite = distributed.local_all_finite(grads, device)
        else:  # fp16: the grad scaler skips an overflowing step itself and lowers its scale
            grads_finite = torch.ones((), device=device)
        flags = torch.stack([self.nonfinite_loss.clamp(max=1), 1 - grads_finite])  # (2,)
        loss_bad, grads_bad = (bool(flag > 0) for flag in self.accelerator.reduce(flags, reduction="sum"))
        self.nonfinite_loss = torch.zeros((), device=device)
        if not (loss_bad or grads_bad):
            return False
        step, what = self.completed + 1, "the loss" if loss_bad else "a gradient"
        if not self.cfg.optim.skip_nonfinite:
            raise UserError(
                f"step {step}: {what} is not finite (NaN or inf), so the run stopped (the checkpoints written "
                "so far are intact); lower `optim.lr`, check the data, or set `optim.skip_nonfinite=true` to skip "
                "such steps"
            )
        self.skipped_nonfinite += 1
        self.step_skipped = True
        self.note(f"step {step}: {what} is not finite (NaN or inf); step skipped (optim.skip_nonfinite)")
        return True

    def _check_weights(self, done: int) -> None:
        """Refuse to save non-finite weights; every rank checks its part and all agree."""
        finite = distributed.local_all_finite(self.policy.params, self.accelerator.device)
        if bool(self.accelerator.reduce(1 - finite, reduction="sum") > 0):
            raise UserError(
                f"step {done}: the trained weights are not finite (NaN or inf) after the optimizer step, so no "
                "checkpoint was written (the earlier ones are intact); lower `optim.lr`"
            )

    def _checkpoint(self, done: int) -> None:
        """Written once, atomically, with the recipe's extras; never of non-finite weights."""
        self._check_weights(done)
        state = {
            "step": done,
            "schedule": self.policy.schedule.state_dict(),
            "best": self.best,
            "val_history": self.val_history,
            "skipped_nonfinite": self.skipped_nonfinite,
        }
        extra_tensors, extra_meta = {}, {}
        for name, holder in self.extras.items():
            tensors, meta = holder.state()
            extra_tensors.update({f"{name}.{key}": value for key, value in tensors.items()})
            extra_meta[name] = meta
        state["extras"] = extra_meta
        checkpoint.save(
            os.path.join(self.ckpt_dir, f"step-{done}"),
            module=self.policy.network,
            optimizer=self.policy.optimizer.optimizer,
            state=state,
            extra=extra_tensors,
            write=self.is_main,
        )
        if self.is_main:
            checkpoint.prune(self.ckpt_dir, self.cfg.checkpoint.keep)
        self.accelerator.wait_for_everyone()

    def _resume(self) -> None:
        cfg = self.cfg
        resume_from = (
            checkpoint.latest(self.ckpt_dir) if cfg.checkpoint.resume == "latest" else cfg.checkpoint.resume
        )
        metrics = os.path.join(self.out_dir, "metrics.jsonl")
        if resume_from is None:
            if self.is_main:
                _truncate_metrics(metrics, -1)  # a fresh start: rows of an earlier attempt are not this run's
            return
        policy = self.policy
        state = checkpoint.load(resume_from, module=policy.network, optimizer=policy.optimizer.optimizer)
        policy.schedule.load_state_dict(state["schedule"])
        self.start_step, self.best = state["step"], state["best"]
        self.val_history = [tuple(item) for item in state["val_history"]]
        # checkpoints written before steps could be skipped hold no count: none was skipped
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        if self.extras:
            tensors = checkpoint.load_extra(resume_from)
            for name, holder in self.extras.items():
                prefix = f"{name}."
                own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
                holder.load_state(own, state["extras"][name])
        if self.is_main:
            _truncate_metrics(metrics, self.start_step)

    def _write(self, row: dict) -> None:
        with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.writer.add_scalar(key, value, row["step"])


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


class Validation:
    """Mean reward on the validation prompts (never the test prompts), sampled by the current policy.

    The prompt/seed pairs are split across the ranks (each samples a contiguous share, padded to equal length,
    since a sharded network's forward is collective) and the rewards gathered in their original order, so the
    mean is the one a single process computes.
    """

    def __init__(self, cfg: RunConfig, adapter: Adapter):
        self.cfg, self.adapter = cfg, adapter
        prompts = evaluate.prompt_list(cfg.validation.prompts, key="validation.prompts", world=cfg.toy.world)
        self.prompts, self.seeds = evaluate.prompt_seeds(
            prompts, cfg.validation.seeds_per_prompt, first_seed=2000
        )
        self.reward = evaluate.build_reward_model(cfg.eval.reward)

    def __call__(self, network, accelerator: Accelerator, *, relayout: bool) -> float:
        share = distributed.rank_chunk(
            len(self.prompts), accelerator.process_index, accelerator.num_processes
        )
        prompts = [self.prompts[i] for i in share]
        media = self.adapter.sample(
            prompts,
            [self.seeds[i] for i in share],
            network=network,
            relayout=relayout,
            steps=self.cfg.sampling.steps,
            guidance_scale=self.cfg.sampling.guidance_scale,
            batch_size=self.cfg.sampling.batch_size,
        )
        rewards = self.reward(media, prompts).float().to(accelerator.device)  # (share,)
        return float(accelerator.gather(rewards)[: len(self.prompts)].mean())


def _reduce(accelerator: Accelerator, window: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    row = {}
    for key, values in window.items():
        mean = torch.cat([v.reshape(-1) for v in values]).mean().to(accelerator.device)
        row[key] = float(accelerator.reduce(mean, reduction="mean"))
    return row


def _truncate_metrics(path: str, step: int) -> None:
    """On resume, drop rows logged after the checkpoint at ``step`` (the resumed run writes them again) and a
    last line a crash cut short. Replaced atomically: a crash here loses no row."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        # every row is written with its newline last: a line without one is a write cut short
        rows = [
            line for line in f if line.endswith("\n") and line.strip() and json.loads(line)["step"] <= step
        ]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensorboard(out_dir: str, start_step: int):
    """The run's TensorBoard writer. Events an earlier attempt logged after the checkpoint this run starts from
    (after ``start_step``; all of them on a fresh start) are purged, as ``metrics.jsonl``'s rows are."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step + 1 if start_step else 0)
