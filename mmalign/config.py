"""Typed configuration: dataclasses are the schema, YAML files hold values, ``key.sub=value`` overrides.

Loading is strict. Unknown keys, wrong types, out-of-range values and missing files are collected and
reported together, each with its key path and where the value came from (the YAML file or the command
line). OmegaConf does the YAML parsing and the merging of overrides; the checks here turn the merged tree
into dataclasses.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mmalign.errors import UserError
from mmalign.losses import names_for


def _spec(default, *, doc: str, gt=None, ge=None, le=None, lt=None, choices=None):
    """A field with its documentation and the range it accepts."""
    factory = isinstance(default, (list, dict))
    metadata = {"doc": doc, "gt": gt, "ge": ge, "le": le, "lt": lt, "choices": choices}
    if factory:
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    kind: str = _spec(
        "diffusion",
        doc="Modality adapter: diffusion (UNet, ε / v-prediction) or flow (rectified-flow transformers).",
        choices=("diffusion", "flow"),
    )
    path: str = _spec(
        "assets/toy-t2i",
        doc="Local diffusers pipeline folder (unet/ or transformer/, scheduler/, text encoders, optional vae/).",
    )
    prediction_type: str | None = _spec(
        None,
        doc="diffusion: expected UNet target, checked against the scheduler config. null: the scheduler's.",
        choices=("epsilon", "v_prediction", None),
    )
    resolution: int | None = _spec(
        None,
        doc="flow: pixel height = width of samples and training media; null: the family's default.",
        gt=0,
    )
    num_frames: int | None = _spec(
        None, doc="flow video models: frames per clip; null: the family's default.", gt=0
    )
    embedded_guidance: float = _spec(
        3.5,
        doc="flow, guidance-distilled transformers (Flux-dev's guidance_embeds): the guidance value they are "
        "trained and sampled with (FLUX.1-dev LoRA recipes use 3.5).",
        gt=0,
    )
    gradient_checkpointing: bool = _spec(False, doc="Recompute activations in the backward pass.")
    attention: str = _spec(
        "auto",
        doc="Attention kernel: auto (xformers where installed and usable, else SDPA), sdpa, flash, xformers, "
        "math (the explicit attention matrix; for comparisons).",
        choices=("auto", "sdpa", "flash", "xformers", "math"),
    )


@dataclass
class LoraConfig:
    enabled: bool = _spec(True, doc="Train a LoRA (reference = adapter disabled); false: full fine-tuning.")
    rank: int = _spec(8, doc="LoRA rank r.", gt=0)
    alpha: float = _spec(8.0, doc="LoRA scale numerator (scale = alpha / rank).", gt=0)
    dropout: float = _spec(0.0, doc="LoRA dropout.", ge=0, lt=1)
    target_modules: list[str] = _spec(
        ["to_q", "to_k", "to_v", "to_out.0"], doc="Module names that get a LoRA (attention projections)."
    )


@dataclass
class DataConfig:
    format: str = _spec(
        "pickapic",
        doc="Data format: pairs (Pick-a-Pic parquet, datasets folder, JSONL + images, VideoGen-RewardBench CSV), "
        "scored samples (scored_jsonl, recipe rwr) or captioned images (captions_parquet, captions_jsonl: recipes "
        "tpo and kto).",
        choices=(
            "pickapic",
            "hf_disk",
            "jsonl",
            "videogen_csv",
            "scored_jsonl",
            "captions_parquet",
            "captions_jsonl",
        ),
    )
    path: str = _spec(
        "runs/quickstart/data/pairs.parquet", doc="Parquet file/folder, dataset folder, JSONL or CSV."
    )
    image_root: str | None = _spec(
        None,
        doc="jsonl, videogen_csv: folder the media paths are relative to (videogen_csv: the CSV's folder).",
    )
    dimension: str | None = _spec(
        None, doc="videogen_csv: the preference column to follow (VQ, MQ, TA); or give `data.weights`."
    )
    weights: dict[str, float] | None = _spec(
        None, doc="videogen_csv: {column: weight}; preference = sign of Σ w·(A: +1, B: −1, same: 0)."
    )
    frame_stride: int = _spec(1, doc="Video data: keep every k-th frame.", gt=0)
    reward_column: str = _spec(
        "reward", doc="scored_jsonl (recipe rwr): the key holding each sample's reward."
    )
    label_column: str = _spec(
        "label",
        doc="captions_parquet / captions_jsonl: the column or key of thumbs-up / thumbs-down labels (recipe kto; "
        "true / false or 1 / 0).",
    )
    ties: str = _spec(
        "drop", doc="Pairs with label_0 = 0.5: drop, or keep as soft labels.", choices=("drop", "keep")
    )
    resolution: int | None = _spec(None, doc="Training resolution in pixels; null: the model's own.", gt=0)
    num_frames: int | None = _spec(None, doc="Video data: frames per clip; null: the model's own.", gt=0)
    cache_latents: bool = _spec(True, doc="Decode and VAE-encode each image once, then reuse the latents.")
    caption_dropout: float = _spec(
        0.0, doc="Share of pairs whose caption is dropped (both members together). Paper: 0.2.", ge=0, le=1
    )
    labels: str = _spec(
        "given",
        doc="given: use the preference labels; random: ignore them (a random member is 'chosen'), for controls.",
        choices=("given", "random"),
    )


@dataclass
class LossConfig:
    name: str = _spec(
        "dpo",
        doc="Preference loss (docs/algorithms.md); sft: plain denoising loss on the chosen member (baselines "
        "and controls).",
        choices=names_for("preference"),
    )
    beta: float = _spec(
        5000.0,
        doc="β. Diffusion-DPO's official value for SD 1.5 is 5000, Flow-DPO's for SD 3.5-M 100 (score = −½·error).",
        gt=0,
    )
    beta_schedule: str = _spec(
        "constant",
        doc="constant β (Flow-DPO's recommendation), or weighted: β_t = β·(1 − t)², t the noise level in [0, 1].",
        choices=("constant", "weighted"),
    )
    label_smoothing: float = _spec(0.0, doc="dpo: conservative-DPO label smoothing ε.", ge=0, lt=0.5)
    label_noise: float = _spec(0.1, doc="robust: assumed label-flip rate ε.", ge=0, lt=0.5)


@dataclass
class TimestepConfig:
    density: str | None = _spec(
        None,
        doc="Training noise levels: uniform, or logit_normal (flow). null: the modality's paper default, "
        "uniform for diffusion (Wallace et al.), logit_normal(0, 1) for flow (Esser et al., arXiv 2403.03206).",
        choices=("uniform", "logit_normal", None),
    )
    logit_mean: float = _spec(0.0, doc="logit_normal: mean of the normal before the sigmoid.")
    logit_std: float = _spec(1.0, doc="logit_normal: standard deviation.", gt=0)
    shift: float | None = _spec(
        None, doc="flow: σ shift s, σ' = s·σ / (1 + (s − 1)·σ); null: the scheduler's own.", gt=0
    )


@dataclass
class OnlineConfig:
    enabled: bool = _spec(
        False, doc="Make pairs by sampling: per prompt, best vs worst of N by the reward (no data.path)."
    )
    prompts: str = _spec("train", doc="A toy split name or a text file of training prompts.")
    samples_per_prompt: int = _spec(8, doc="N samples per prompt and group (the paper uses up to 24).", ge=2)
    groups_per_prompt: int = _spec(1, doc="Best/worst groups per prompt per pool.", gt=0)
    refresh_every: int = _spec(
        0, doc="Rebuild the pool every K optimizer steps; 0: the pool sampled at step 0 is kept.", ge=0
    )
    refresh_from: str = _spec(
        "policy",
        doc="Model that samples a rebuilt pool: the current policy (on-policy) or the reference.",
        choices=("policy", "reference"),
    )
    reward: str | None = _spec(None, doc="Reward model that labels the samples; null: eval.reward.")
    guidance_scale: float | None = _spec(
        None, doc="Guidance scale of the pool samples; null: sampling.guidance_scale.", ge=1
    )
    first_seed: int = _spec(100_000, doc="Seed of the first pool sample; pool k uses the next block.", ge=0)


@dataclass
class RWRConfig:
    temperature: float = _spec(
        1.0,
        doc="τ of the weights w = G·softmax(r/τ) over the G samples of each global batch (Flow-RWR, arXiv 2501.13918).",
        gt=0,
    )


@dataclass
class TPOConfig:
    perturber: str = _spec(
        "rules",
        doc="Where each image's mismatched caption comes from: rules (lexicon swaps, no model), llm (a local "
        "causal LM at tpo.llm_path, validated, falling back to the rules) or column (perturbed_caption in the "
        "data, as `mmalign pairs tpo` writes it).",
        choices=("rules", "llm", "column"),
    )
    families: list[str] = _spec(
        ["content", "attributes", "relations", "context"],
        doc="Perturbation families drawn from (TPO, arXiv 2509.25771): content (objects, counts), attributes "
        "(colour, material, size, style), relations (spatial, motion), context (setting, weather, light, time).",
    )
    llm_path: str | None = _spec(None, doc="perturber llm: a local transformers causal LM folder.")
    unperturbable: str = _spec(
        "skip",
        doc="A caption no rule of tpo.families can perturb: skip it (reported with its row) or fail.",
        choices=("skip", "fail"),
    )


@dataclass
class KTOConfig:
    reference_point: str = _spec(
        "batch_mean",
        doc="KTO's reference point z (Diffusion-KTO, arXiv 2404.04465): batch_mean of the implicit rewards, or "
        "mismatched (captions rolled by one within the batch); averaged over processes, clamped ≥ 0, detached.",
        choices=("batch_mean", "mismatched"),
    )
    desirable_weight: float = _spec(1.0, doc="λ_D, the weight of desirable samples.", gt=0)
    undesirable_weight: float = _spec(1.0, doc="λ_U, the weight of undesirable samples.", gt=0)


@dataclass
class OptimConfig:
    max_steps: int = _spec(200, doc="Optimizer steps.", gt=0)
    batch_size: int = _spec(32, doc="Pairs per process per micro-batch.", gt=0)
    gradient_accumulation_steps: int = _spec(1, doc="Micro-batches per optimizer step.", gt=0)
    # the optimizers take lr as a float32 scalar: a larger value overflows inside torch
    lr: float = _spec(1e-3, doc="Peak learning rate.", gt=0, lt=3.4e38)
    lr_scheduler: str = _spec(
        "constant",
        doc="diffusers lr schedule name.",
        choices=("constant", "constant_with_warmup", "linear", "cosine"),
    )
    warmup_steps: int = _spec(0, doc="Linear warm-up steps.", ge=0)
    weight_decay: float = _spec(0.0, doc="AdamW weight decay.", ge=0)
    adam_beta1: float = _spec(0.9, doc="AdamW β1.", ge=0, lt=1)
    adam_beta2: float = _spec(0.999, doc="AdamW β2.", ge=0, lt=1)
    max_grad_norm: float = _spec(1.0, doc="Gradient clipping norm; 0 disables clipping.", ge=0)
    skip_nonfinite: bool = _spec(
        False,
        doc="A step whose loss or gradient is NaN/inf: false stops the run (exit 2, naming the step); true skips "
        "the step (no update) and counts it in metrics.jsonl as skipped_nonfinite.",
    )
    mixed_precision: str = _spec("no", doc="accelerate mixed precision.", choices=("no", "fp16", "bf16"))
    seed: int = _spec(0, doc="Seed of data order, noise, timesteps and LoRA init.")


@dataclass
class LogConfig:
    every: int = _spec(10, doc="Write metrics every N optimizer steps.", gt=0)
    tensorboard: bool = _spec(True, doc="Also write TensorBoard event files under output_dir/tensorboard.")
    progress: bool = _spec(True, doc="Show a tqdm progress bar.")


@dataclass
class CheckpointConfig:
    every: int = _spec(100, doc="Save a checkpoint every N optimizer steps (and at the end).", gt=0)
    keep: int = _spec(2, doc="How many of the newest periodic checkpoints to keep.", gt=0)
    resume: str | None = _spec(None, doc="null, 'latest', or a checkpoint folder to continue from.")


@dataclass
class ValidationConfig:
    every: int = _spec(50, doc="Measure held-out reward every N steps; 0 disables.", ge=0)
    prompts: str = _spec("val", doc="A toy split name or a text file of prompts; never the test prompts.")
    seeds_per_prompt: int = _spec(4, doc="Samples per validation prompt.", gt=0)
    keep_best: bool = _spec(True, doc="Export the checkpoint with the best validation reward, not the last.")


@dataclass
class SamplingConfig:
    steps: int = _spec(20, doc="Sampler steps (DDIM for diffusion, Euler for flow).", gt=0)
    guidance_scale: float = _spec(1.5, doc="Classifier-free guidance scale.", ge=1)
    batch_size: int = _spec(
        128, doc="Prompts denoised together (each twice, for guidance); lower it for large models.", gt=0
    )


@dataclass
class EvalConfig:
    enabled: bool = _spec(True, doc="Evaluate base vs aligned (and control) after training.")
    reward: str = _spec(
        "toy_shapes",
        doc="Reward model name: toy_shapes (dense, in [0, 1]), toy_shapes_sparse (1 only when colour, shape and "
        "position all match), toy_moving_shapes (video).",
        choices=("toy_shapes", "toy_shapes_sparse", "toy_moving_shapes"),
    )
    prompts: str = _spec("test", doc="A toy split name (test, val) or a text file with one prompt per line.")
    seeds_per_prompt: int = _spec(
        8, doc="Samples per prompt; seeds are first_seed + k, the same for every model.", gt=0
    )
    first_seed: int = _spec(
        1000,
        doc="Seed of each prompt's first sample (validation uses 2000 +, the toy pairs 100 000 +).",
        ge=0,
    )
    grid_prompts: int = _spec(8, doc="Prompts shown in the before/after grid.", gt=0)


@dataclass
class ToyConfig:
    enabled: bool = _spec(
        False,
        doc="Run in the toy world: build its own missing assets first (the base at its asset folder, the pairs "
        "inside output_dir) and train the no-label control.",
    )
    world: str = _spec(
        "shapes",
        doc="Toy world of the prompts splits: shapes (still images) or moving_shapes (video clips).",
        choices=("shapes", "moving_shapes"),
    )
    samples_per_prompt: int = _spec(
        4, doc="Base samples per training prompt and seed group; best vs worst.", ge=2
    )
    pairs_per_prompt: int = _spec(2, doc="Pairs built per training prompt.", gt=0)
    guidance_scale: float | None = _spec(
        None,
        doc="Guidance scale of the base samples the pairs are built from; null: sampling.guidance_scale.",
        ge=1,
    )
    control: bool = _spec(
        True,
        doc="Also train the control on the same data and budget: no labels (preference: a random member of "
        "each pair; rwr: shuffled rewards; kto: random labels) or, for recipe tpo, plain supervised fine-tuning "
        "on the correctly captioned images.",
    )
    images_per_prompt: int = _spec(
        4,
        doc="Captioned toy data: images per training caption — true renders (recipe tpo) or base samples "
        "labelled by the toy reward (recipe kto).",
        gt=0,
    )
    feedback_threshold: float = _spec(
        0.7,
        doc="Recipe kto's toy data: a base sample is thumbs-up when its toy reward is at least this.",
        ge=0,
        le=1,
    )


@dataclass
class RunConfig:
    """The sections every recipe shares."""

    output_dir: str = _spec("runs/quickstart", doc="Run directory.")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    toy: ToyConfig = field(default_factory=ToyConfig)


@dataclass
class TrainConfig(RunConfig):
    """``recipe: preference``: Diffusion-DPO / Flow-DPO and the pairwise loss family, offline or online pairs."""

    recipe: str = _spec("preference", doc="Training recipe.", choices=("preference",))
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class RWRTrainConfig(RunConfig):
    """``recipe: rwr``: reward-weighted regression (Flow-RWR) on scored samples, offline or online."""

    recipe: str = _spec("rwr", doc="Training recipe.", choices=("rwr",))
    rwr: RWRConfig = field(default_factory=RWRConfig)


@dataclass
class TPOLossConfig(LossConfig):
    name: str = _spec(
        "dpo",
        doc="TDPO with a pairwise loss (dpo, ipo, hinge, robust: the image with its caption is chosen, with the "
        "mismatched caption rejected), TKTO (kto: desirable and undesirable captions), or sft (plain "
        "fine-tuning on the captioned images: TPO's control).",
        choices=names_for("tpo"),
    )


@dataclass
class KTOLossConfig(LossConfig):
    name: str = _spec(
        "kto", doc="Diffusion-KTO on thumbs-up / thumbs-down samples.", choices=names_for("kto")
    )


@dataclass
class TPOTrainConfig(RunConfig):
    """``recipe: tpo``: TDPO / TKTO on captioned images and mismatched captions — no image pairs, no reward."""

    recipe: str = _spec("tpo", doc="Training recipe.", choices=("tpo",))
    loss: TPOLossConfig = field(default_factory=TPOLossConfig)
    tpo: TPOConfig = field(default_factory=TPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)


@dataclass
class KTOTrainConfig(RunConfig):
    """``recipe: kto``: Diffusion-KTO on unpaired thumbs-up / thumbs-down images (caption, image, label)."""

    recipe: str = _spec("kto", doc="Training recipe.", choices=("kto",))
    loss: KTOLossConfig = field(default_factory=KTOLossConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)


@dataclass
class RLConfig:
    algorithm: str = _spec(
        "b2_diffurl",
        doc="b2_diffurl: B²-DiffuRL (arXiv 2503.11240), the last split_step(stage) steps trained, trajectories "
        "forking into rl.branches at the split, the best and worst branch of each group kept; ddpo: DDPO (arXiv "
        "2305.13301), rl.branches independent full trajectories per prompt, every step trained.",
        choices=("b2_diffurl", "ddpo"),
    )
    prompts: str = _spec("train", doc="A toy split name or a text file of training prompts.")
    prompts_per_stage: int = _spec(8, doc="Prompts sampled at each stage (one branch group each).", gt=0)
    branches: int = _spec(
        4,
        doc="Samples per prompt and stage: the branches of one group (B²-DiffuRL's reference run: 5).",
        ge=2,
    )
    stages: int | None = _spec(
        None,
        doc="S of the backward progressive schedule split_step(i) = left + floor(i·(right − left + 1)/S); "
        "null: optim.max_steps (one run step is one stage).",
        gt=0,
    )
    left: int = _spec(
        14, doc="b2_diffurl: trained steps at stage 0 (reference run: 14 of 20 DDIM steps).", gt=0
    )
    right: int = _spec(
        20, doc="b2_diffurl: trained steps in the last block of stages (reference run: 20 of 20).", gt=0
    )
    thresholds: list[float] = _spec(
        [0.5, -0.5],
        doc="b2_diffurl: [high, low]; per branch group the best is kept if its z ≥ high, the worst if z < low.",
    )
    history: int = _spec(
        8, doc="Past stages whose rewards join each prompt's z-score statistics (B²-DiffuRL: 8).", ge=0
    )
    min_count: int | None = _spec(
        None,
        doc="Fewest kept rewards for a prompt's own statistics, else the stage's (null: ddpo 16, DDPO's "
        "per-prompt tracker; b2_diffurl 1).",
        gt=0,
    )
    clip_range: float | None = _spec(
        None, doc="PPO clip ε (null: b2_diffurl 0.1, ddpo 1e-4, the papers' values).", gt=0
    )
    adv_clip: float | None = _spec(None, doc="Advantages clamped to ±c (null: b2_diffurl 5, ddpo 10).", gt=0)
    inner_epochs: int = _spec(
        2, doc="Optimizer steps per stage, each over all kept transitions (B²-DiffuRL: 2; DDPO: 1).", gt=0
    )
    eta: float | None = _spec(
        None,
        doc="Sampler noise: DDIM η for diffusion (null: 1), the SDE noise level a for flow (null: 0.7).",
        gt=0,
    )
    kl_coef: float = _spec(
        0.0,
        doc="Weight of the KL between the policy's and the reference's transitions (Flow-GRPO); 0: no "
        "reference forward.",
        ge=0,
    )
    guidance_scale: float | None = _spec(
        None,
        doc="Guidance of the RL samples and of the recomputed log-densities; null: sampling.guidance_scale.",
        ge=1,
    )
    reward: str | None = _spec(
        None,
        doc="Training reward; null: eval.reward.",
        choices=("toy_shapes", "toy_shapes_sparse", "toy_moving_shapes", None),
    )


@dataclass
class BranchRLTrainConfig(RunConfig):
    """``recipe: branch_rl``: online RL on a denoiser, B²-DiffuRL or its DDPO baseline, PPO-clip on LoRA."""

    recipe: str = _spec("branch_rl", doc="Training recipe.", choices=("branch_rl",))
    rl: RLConfig = field(default_factory=RLConfig)


@dataclass
class LatentRewardModelConfig:
    dimensions: list[str] = _spec(
        ["reward"],
        doc="Reward dimensions, one output each: names of the reward's components for scored samples "
        "(toy_moving_shapes: colour, shape, motion, reward), one name for preference pairs.",
    )
    width: int = _spec(32, doc="Channels of the convolution trunk.", gt=0)
    embed_dim: int = _spec(64, doc="Width of the prompt + noise-level condition and of the head.", gt=0)
    tie_margin: float = _spec(
        0.0,
        doc="Preference pairs: 0 reads a tie as the soft label ½; m > 0 uses Rao–Kupper's model of ties "
        "(P(a ≻ b) = σ(d − m)).",
        ge=0,
    )


@dataclass
class LatentRewardTrainConfig(RunConfig):
    """``recipe: latent_reward``: a reward model on the generator's noisy latents, for reward guidance."""

    recipe: str = _spec("latent_reward", doc="Training recipe.", choices=("latent_reward",))
    reward_model: LatentRewardModelConfig = field(default_factory=LatentRewardModelConfig)


@dataclass
class GuidanceConfig:
    mode: str = _spec(
        "latent",
        doc="latent: the latent reward model's gradient on x_t (Flow-NRG, arXiv 2501.13918); pixel: decode the "
        "predicted x0, score it with guidance.pixel_reward and back-propagate through the generator (baseline).",
        choices=("latent", "pixel"),
    )
    scale: float = _spec(
        1.0, doc="Guidance scale w: the prediction moves by w times the (clipped) gradient.", ge=0
    )
    start: float = _spec(
        0.0, doc="First share of the sampler's steps with guidance (0: from the first).", ge=0, le=1
    )
    end: float = _spec(1.0, doc="Guidance on the steps i with start <= i / steps < end.", ge=0, le=1)
    max_grad_norm: float = _spec(
        0.0, doc="Clip each sample's reward gradient to this norm; 0: no clipping.", ge=0
    )
    pixel_reward: str = _spec(
        "clean_latent",
        doc="mode pixel: a differentiable reward of the decoded media; clean_latent reads the latent reward "
        "model at noise level 0 (pixel-space generators).",
    )


@dataclass
class GuideConfig:
    """``mmalign guide``: sample a frozen model with and without reward guidance from the same seeds."""

    recipe: str = _spec("guide", doc="Reward-guided sampling (mmalign guide).", choices=("guide",))
    output_dir: str = _spec("runs/guide", doc="Where the grids and guide.json go.")
    model: ModelConfig = field(default_factory=ModelConfig)
    reward_model: str = _spec(
        "assets/toy-video-reward/final",
        doc="Latent reward model folder (final/ of a recipe: latent_reward run).",
    )
    weights: dict[str, float] = _spec(
        {}, doc="λ_k per reward dimension of the reward model; dimensions not named weigh 0."
    )
    prompt: str | None = _spec(None, doc="One prompt to sample; null: the prompts of eval.prompts.")
    world: str = _spec(
        "moving_shapes",
        doc="Toy world whose split names eval.prompts may give.",
        choices=("shapes", "moving_shapes"),
    )
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# the config schema of each recipe, chosen by the top-level `recipe` key
SCHEMAS: dict[str, type] = {
    "preference": TrainConfig,
    "rwr": RWRTrainConfig,
    "tpo": TPOTrainConfig,
    "kto": KTOTrainConfig,
    "branch_rl": BranchRLTrainConfig,
    "latent_reward": LatentRewardTrainConfig,
    "guide": GuideConfig,
}


# ------------------------------------------------------------------------------------------------ loading


def load_config(path: str | None, overrides: list[str] = (), schema: type | None = None):
    """Read ``path`` (YAML), apply ``key.sub=value`` overrides, check everything, return the dataclass.

    The schema is the one of the tree's ``recipe`` (``SCHEMAS``; default ``preference``) unless given.
    """
    tree, origin = {}, {}
    if path is not None:
        if not os.path.isfile(path):
            raise UserError(f"config file {path!r} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise UserError(f"{path}: not valid YAML ({_first_line(err)})") from None
        if not isinstance(OmegaConf.to_container(loaded), dict):
            raise UserError(
                f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"
            )
        tree = OmegaConf.to_container(loaded)
        _record_origin(tree, path, origin)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key.sub=value")
        try:
            extra = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise UserError(f"override {item!r}: {_first_line(err)}") from None
        _record_origin(extra, "command line", origin)
        tree = OmegaConf.to_container(OmegaConf.merge(tree, extra))
    try:  # ${section.key} interpolations, after the overrides (data.path: ${output_dir}/data/pairs.parquet)
        tree = OmegaConf.to_container(OmegaConf.create(tree), resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"{path or 'config'}: {_first_line(err)}") from None
    if schema is None:
        schema = _schema_of(tree, origin)
    errors: list[str] = []
    config = _build(schema, tree, "", origin, errors)
    if isinstance(config, RunConfig):
        reported = " ".join(errors)
        errors.extend(e for e in _check_paths(config, origin) if e.split(" ", 1)[0] not in reported)
    if errors:
        raise UserError("\n".join(errors))
    return config


def _schema_of(tree: dict, origin: dict) -> type:
    recipe = tree.get("recipe", "preference")
    if recipe not in SCHEMAS:
        raise UserError(
            f"`recipe` must be one of {', '.join(SCHEMAS)}, got {recipe!r} ({origin.get('recipe', 'config')})"
        )
    return SCHEMAS[recipe]


def _check_paths(config: RunConfig, origin: dict) -> list[str]:
    """Inputs must exist, except the toy world's own, which it builds when they are missing (``toy_builds``)."""
    errors = []
    wanted = [("model.path", config.model.path, os.path.isdir, "a pipeline folder")]
    # online runs sample their pairs, and online RL its trajectories: data.path is not read
    if not config.online.enabled and getattr(config, "recipe", None) != "branch_rl":
        wanted.append(("data.path", config.data.path, os.path.exists, "an existing file or folder"))
    if config.data.image_root is not None:
        wanted.append(("data.image_root", config.data.image_root, os.path.isdir, "a folder"))
    tpo = getattr(config, "tpo", None)
    if tpo is not None and tpo.perturber == "llm":
        wanted.append(("tpo.llm_path", tpo.llm_path or "", os.path.isdir, "a local causal LM folder"))
    for key, value, exists, what in wanted:
        if exists(value) or toy_builds(config, key):
            continue
        hint = ""
        if config.toy.enabled and key in ("model.path", "data.path"):
            hint = f" (the toy world builds only its own: {toy_own(config, key)})"
        errors.append(
            f"`{key}` must be {what}, got {value!r} ({origin.get(key, 'default')}): not found{hint}"
        )
    errors.extend(_check_output_dir(config.output_dir, origin.get("output_dir", "default")))
    if config.checkpoint.resume not in (None, "latest") and not os.path.isdir(config.checkpoint.resume):
        where = origin.get("checkpoint.resume", "config")
        errors.append(
            f"`checkpoint.resume` must be null, 'latest' or a checkpoint folder, got {config.checkpoint.resume!r} "
            f"({where}): not found"
        )
    return errors


# The toy world's own base model folder for each (model.kind, toy.world): the only model path it builds.
TOY_BASES = {
    ("diffusion", "shapes"): "assets/toy-t2i",
    ("flow", "shapes"): "assets/toy-flow-t2i",
    ("flow", "moving_shapes"): "assets/toy-video",
}


def toy_builds(config: RunConfig, key: str) -> bool:
    """Whether the toy world builds the missing input at ``key``: only when the config asks for the toy world
    (``toy.enabled``) and the path is the toy's own — its base's asset folder, or pair data inside
    ``output_dir`` — so a typo never starts a long job or writes outside the run directory."""
    if not config.toy.enabled:
        return False
    if key == "model.path":
        own = _toy_base(config)
        return own is not None and os.path.abspath(config.model.path) == os.path.abspath(own)
    if key == "data.path":
        run_dir = os.path.abspath(config.output_dir)
        path = os.path.abspath(config.data.path)
        return (
            config.data.format == _toy_format(config)
            and os.path.commonpath([run_dir, path]) == run_dir != path
        )
    return False


def _toy_format(config: RunConfig) -> str:
    """The format of the data the toy world builds for a recipe: pairs, or captioned images."""
    return "captions_parquet" if getattr(config, "recipe", "preference") in ("tpo", "kto") else "pickapic"


def _toy_base(config: RunConfig) -> str | None:
    return TOY_BASES.get((config.model.kind, config.toy.world))


def toy_own(config: RunConfig, key: str) -> str:
    """What the toy world builds for ``key``, for the error message."""
    if key == "model.path":
        own = _toy_base(config)
        return f"the base at {own}" if own else f"no base for model.kind {config.model.kind!r}"
    what = "captioned images (captions_parquet)" if _toy_format(config) != "pickapic" else "Pick-a-Pic pairs"
    return f"{what} inside output_dir {config.output_dir!r}"


def _check_output_dir(path: str, where: str) -> list[str]:
    """The run directory must be a folder, or creatable in a writable parent."""
    existing = path
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) or "."
    if os.path.exists(path) and not os.path.isdir(path):
        return [f"`output_dir` must be a folder, got {path!r} ({where}): it is a file"]
    if not os.path.isdir(existing):
        return [f"`output_dir` {path!r} ({where}) cannot be created: {existing!r} is a file"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"`output_dir` {path!r} ({where}) cannot be written: {existing!r} is not writable"]
    return []


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _record_origin(tree: dict, source: str, origin: dict, prefix: str = "") -> None:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        origin[path] = source
        if isinstance(value, dict):
            _record_origin(value, source, origin, path + ".")


def _build(schema: type, values, prefix: str, origin: dict, errors: list[str]):
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    if not isinstance(values, dict):
        where = origin.get(prefix.rstrip("."), "config")
        errors.append(f"`{prefix.rstrip('.')}` must be a section (mapping), got {values!r} ({where})")
        return schema()
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in fields:
            errors.append(
                f"unknown key `{path}` ({origin.get(path, 'config')}); accepted: {', '.join(sorted(fields))}"
            )
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path + ".", origin, errors)
            continue
        problem = _check_value(value, hint, fields[key].metadata)
        if problem:
            errors.append(f"`{path}` {problem}, got {value!r} ({origin.get(path, 'config')})")
            continue
        kwargs[key] = float(value) if hint is float and isinstance(value, int) else value
    return schema(**kwargs)


def _check_value(value, hint, meta) -> str | None:
    """None when ``value`` fits the field; else what the field accepts."""
    if not _fits_type(value, hint):
        return f"must be {_type_name(hint)}"
    if value is None:
        return None
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        return "must be one of " + ", ".join("null" if c is None else str(c) for c in choices)
    for bound, test, word in (
        ("gt", float.__gt__, ">"),
        ("ge", float.__ge__, ">="),
        ("lt", float.__lt__, "<"),
        ("le", float.__le__, "<="),
    ):
        limit = meta.get(bound)
        if limit is not None and not test(float(value), float(limit)):
            return f"must be {word} {limit}"
    return None


def _fits_type(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits_type(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _fits_type(k, key) and _fits_type(v, item) for k, v in value.items()
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        key, item = typing.get_args(hint)
        return f"a mapping of {_type_name(key)} to {_type_name(item)}"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, hint.__name__)


def to_yaml(config) -> str:
    """The resolved config as YAML, for the run directory."""
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(config)))


def describe(schema: type = TrainConfig, prefix: str = "") -> list[str]:
    """One line per key with its default and documentation (``mmalign config --help``)."""
    lines = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.extend(describe(hints[f.name], prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} = {default!r}  # {f.metadata.get('doc', '')}")
    return lines
