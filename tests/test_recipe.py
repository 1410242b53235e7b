"""The offline preference recipe (``mmalign.recipes.preference.train``) on tiny real diffusers pipelines.

Every run here is a few optimizer steps of a real UNet2DConditionModel on CPU. Runs are compared with each
other (accumulation, resume) or with the base model loaded from disk, never with a mock.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from _distributed_worker import float64_recipe
from accelerate import Accelerator
from conftest import TOY_BASE, png, run_overrides
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from mmalign import checkpoint
from mmalign.adapters import diffusion
from mmalign.config import load_config
from mmalign.data import PairDataset, read_pairs, write_pickapic_parquet
from mmalign.losses import dpo
from mmalign.recipes import preference, runtime

METRIC_KEYS = (
    "step",
    "loss",
    "implicit_acc",
    "reward_margin",
    "policy_err_w",
    "policy_err_l",
    "ref_err_w",
    "ref_err_l",
    "lr",
    "pairs_per_s",
)


def tiny_config(pipeline: str, data: str, out, *overrides: str):
    return load_config(
        None,
        [
            *run_overrides(pipeline, data, out),
            "optim.max_steps=4",
            "optim.batch_size=4",
            "log.every=1",
            *overrides,
        ],
    )


@pytest.fixture
def loaded(monkeypatch) -> list[diffusion.Components]:
    """The components each ``train`` call loads — the real objects, kept so the trained UNet can be inspected."""
    real = diffusion.load_components
    kept = []

    def load_and_keep(path, **kwargs):
        components = real(path, **kwargs)
        kept.append(components)
        return components

    monkeypatch.setattr(diffusion, "load_components", load_and_keep)
    return kept


def metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_lora(out) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "final", diffusion.LORA_WEIGHTS))


def assert_same_tensors(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"largest difference {worst:.3g} > {atol}"


def base_unet(pipeline: str) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(pipeline, subfolder="unet", local_files_only=True)


def with_lora(unet: UNet2DConditionModel, cfg) -> UNet2DConditionModel:
    """``unet`` with the LoRA of ``cfg.lora`` added (initialised from the global RNG)."""
    lora = cfg.lora
    diffusion.add_lora(
        unet, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules
    )
    return unet


def initial_lora(pipeline: str, cfg) -> dict[str, torch.Tensor]:
    """The LoRA a run starts from: the recipe seeds the global RNG with optim.seed right before add_lora."""
    unet = base_unet(pipeline)
    torch.manual_seed(cfg.optim.seed)
    with_lora(unet, cfg)
    return {name: p.detach().clone() for name, p in unet.named_parameters() if "lora_" in name}


def stream_batch(pipeline: str, cfg, step: int) -> dict:
    """The micro-batch a 1-process, no-accumulation run sees at optimizer step ``step`` (1-based)."""
    components = diffusion.load_components(pipeline)
    dataset = PairDataset(read_pairs("pickapic", cfg.data.path), resolution=components.resolution)
    adapter = diffusion.DiffusionAdapter(components, pipeline)
    cache = preference.LatentCache(dataset, adapter, enabled=True)
    stream = preference.PairStream(len(dataset), cfg.optim.seed)
    first = (step - 1) * cfg.optim.batch_size
    positions = list(range(first, first + cfg.optim.batch_size))
    return preference.build_batch(stream, cache, positions, cfg, adapter, "cpu")


def errors_of(unet, components: diffusion.Components, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair denoising errors of ``unet`` on the chosen and the rejected members of ``batch``."""
    hidden, _ = diffusion.encode_prompts(components, batch["captions"])
    noise, timesteps = batch["noise"], batch["timesteps"]
    with torch.no_grad():
        err_w = diffusion.denoising_errors(
            unet, components.scheduler, batch["chosen"], noise, timesteps, hidden
        )
        err_l = diffusion.denoising_errors(
            unet, components.scheduler, batch["rejected"], noise, timesteps, hidden
        )
    return err_w, err_l  # (B,), (B,)


# ------------------------------------------------------------------------------------------- a few steps


@pytest.mark.parametrize("pipeline_name", ["pixel_pipeline", "sd_pipeline", "v_pipeline"])
def test_lora_steps_train_only_the_adapter(pipeline_name, request, pairs_parquet, tmp_path, loaded):
    pipeline = request.getfixturevalue(pipeline_name)
    cfg = tiny_config(pipeline, pairs_parquet, tmp_path / "run")
    preference.train(cfg)
    unet = loaded[-1].unet

    before = initial_lora(pipeline, cfg)
    after = {name: p.detach() for name, p in unet.named_parameters() if "lora_" in name}
    assert after.keys() == before.keys() and after
    unchanged = [name for name in after if torch.equal(after[name], before[name])]
    assert not unchanged, f"LoRA parameters that did not train: {unchanged[:3]}"

    base = dict(base_unet(pipeline).named_parameters())
    frozen = {
        name.replace(".base_layer", ""): p for name, p in unet.named_parameters() if "lora_" not in name
    }
    assert frozen.keys() == base.keys()
    moved = [name for name, p in frozen.items() if not torch.equal(p, base[name])]
    assert not moved, f"base parameters changed by a LoRA run: {moved[:3]}"

    rows = metrics(cfg.output_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert set(METRIC_KEYS) <= row.keys()
        assert all(math.isfinite(row[key]) for key in METRIC_KEYS)
    # At step 1 the zero-initialised LoRA makes policy == reference: DPO's loss is exactly ln 2.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] != pytest.approx(math.log(2), abs=1e-4)

    written = load_config(os.path.join(cfg.output_dir, "config.yaml"))
    assert written == cfg


def test_full_finetuning_keeps_the_initial_model_as_reference(
    pixel_pipeline, pairs_parquet, tmp_path, loaded
):
    cfg = tiny_config(pixel_pipeline, pairs_parquet, tmp_path / "run", "lora.enabled=false")
    preference.train(cfg)
    unet = loaded[-1].unet

    base = dict(base_unet(pixel_pipeline).named_parameters())
    trained = dict(unet.named_parameters())
    assert trained.keys() == base.keys()
    moved = [name for name in base if not torch.equal(trained[name], base[name])]
    assert len(moved) > 0.9 * len(base), f"only {len(moved)} of {len(base)} UNet tensors trained"

    # The reference errors logged at the last step are the base model's on that step's batch.
    last = metrics(cfg.output_dir)[-1]
    components = diffusion.load_components(pixel_pipeline)
    err_w, err_l = errors_of(components.unet, components, stream_batch(pixel_pipeline, cfg, step=4))
    assert last["ref_err_w"] == pytest.approx(float(err_w.mean()), abs=1e-6)
    assert last["ref_err_l"] == pytest.approx(float(err_l.mean()), abs=1e-6)
    assert abs(last["policy_err_w"] - last["ref_err_w"]) > 1e-5

    # final/ is a whole UNet folder equal to the trained weights.
    exported = diffusion.load_aligned(components, cfg.output_dir + "/final")
    assert all(torch.equal(p, trained[name]) for name, p in exported.named_parameters())


# ------------------------------------------------------------------------------------ equivalences


@pytest.fixture
def float64():
    """Run the recipe in float64 (models, noise and LoRA), so equivalences can be checked to 1e-6.

    In float32 two runs that are equal in exact arithmetic drift apart at roundoff level and the roundoff is
    amplified: DPO's logit is β·(a small difference of two nearly equal errors), and Adam's first steps
    normalise near-zero gradient entries to ±lr. Float64 leaves the arithmetic of the recipe as it is.
    """
    with float64_recipe():
        yield


def accumulation_runs(pipeline: str, data: str, tmp_path):
    """Global batch 4 as 4 pairs × 1 micro-batch and as 1 pair × 4 micro-batches; clipping active (norm ≫ 1)."""
    steps = ["optim.max_steps=3", "optim.max_grad_norm=1.0"]
    full = tiny_config(pipeline, data, tmp_path / "full", *steps)
    accumulated = tiny_config(
        pipeline,
        data,
        tmp_path / "accum",
        *steps,
        "optim.batch_size=1",
        "optim.gradient_accumulation_steps=4",
    )
    preference.train(full)
    preference.train(accumulated)
    return full, accumulated


def test_gradient_accumulation_matches_the_full_batch(pixel_pipeline, pairs_parquet, tmp_path, float64):
    full, accumulated = accumulation_runs(pixel_pipeline, pairs_parquet, tmp_path)
    assert_same_tensors(final_lora(full.output_dir), final_lora(accumulated.output_dir), atol=1e-6)
    rows_full, rows_accum = metrics(full.output_dir), metrics(accumulated.output_dir)
    assert [row["step"] for row in rows_accum] == [1, 2, 3]
    for a, b in zip(rows_full, rows_accum):
        # grad_norm is the norm before clipping: a gradient scaled by the number of micro-batches shows here
        # even though Adam and clipping would hide it from the weights.
        assert a["grad_norm"] > 1.0
        for key in ("loss", "grad_norm", "reward_margin", "ref_err_w", "policy_err_l"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_gradient_accumulation_in_float32_differs_by_roundoff_only(pixel_pipeline, pairs_parquet, tmp_path):
    """The same comparison at the precision users train in, with a tolerance for amplified roundoff."""
    full, accumulated = accumulation_runs(pixel_pipeline, pairs_parquet, tmp_path)
    start = initial_lora(pixel_pipeline, full)
    a = load_file(os.path.join(full.output_dir, "checkpoints", "step-3", "trainable.safetensors"))
    b = load_file(os.path.join(accumulated.output_dir, "checkpoints", "step-3", "trainable.safetensors"))
    assert a.keys() == start.keys() == b.keys()
    gap = math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))
    update = math.sqrt(sum(float((a[k] - start[k]).pow(2).sum()) for k in a))
    # Measured here: 3e-4 of the update (a few entries in Adam's ε regime); a real mismatch — other pairs,
    # a step per micro-batch — is of the order of the update itself.
    assert gap < 1e-2 * update, f"runs differ by {gap / update:.2e} of the update"
    first_full, first_accum = metrics(full.output_dir)[0], metrics(accumulated.output_dir)[0]
    assert first_full["loss"] == pytest.approx(first_accum["loss"], abs=1e-6)
    assert first_full["grad_norm"] == pytest.approx(first_accum["grad_norm"], rel=1e-5)


def test_resume_matches_an_uninterrupted_run(pixel_pipeline, pairs_parquet, tmp_path, loaded):
    # A warm-up schedule makes the lr depend on the restored scheduler state.
    common = ["optim.lr_scheduler=constant_with_warmup", "optim.warmup_steps=3", "checkpoint.every=2"]
    straight = tiny_config(pixel_pipeline, pairs_parquet, tmp_path / "straight", *common)
    preference.train(straight)

    # The interrupted run logged step 3 and was killed before its step-3 checkpoint was written.
    out = tmp_path / "resumed"
    preference.train(tiny_config(pixel_pipeline, pairs_parquet, out, *common, "optim.max_steps=3"))
    shutil.rmtree(out / "checkpoints" / "step-3")
    assert [row["step"] for row in metrics(out)] == [1, 2, 3]
    assert checkpoint.latest(str(out / "checkpoints")) == str(out / "checkpoints" / "step-2")
    resumed = tiny_config(pixel_pipeline, pairs_parquet, out, *common, "checkpoint.resume=latest")
    preference.train(resumed)

    assert_same_tensors(final_lora(straight.output_dir), final_lora(resumed.output_dir), atol=1e-6)
    rows, rows_straight = metrics(resumed.output_dir), metrics(straight.output_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for a, b in zip(rows, rows_straight):
        for key in ("loss", "lr", "ref_err_w", "ref_err_l", "policy_err_w"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)

    # The checkpoint holds the adapter only; after resume the reference (adapter disabled) is still the base.
    saved = load_file(str(out / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    unet, components = loaded[-1].unet, loaded[-1]
    batch = stream_batch(pixel_pipeline, resumed, step=4)
    unet.disable_adapters()
    try:
        ref_w, ref_l = errors_of(unet, components, batch)
    finally:
        unet.enable_adapters()
    base_w, base_l = errors_of(base_unet(pixel_pipeline), components, batch)
    assert torch.equal(ref_w, base_w) and torch.equal(ref_l, base_l)
    policy_w, _ = errors_of(unet, components, batch)
    assert not torch.allclose(policy_w, base_w, atol=1e-6)


def test_resume_on_a_latent_pipeline_sees_the_same_latents(sd_pipeline, pairs_parquet, tmp_path):
    """The VAE's latent sample must not depend on when a process first meets a pair."""
    straight = tiny_config(sd_pipeline, pairs_parquet, tmp_path / "straight")
    preference.train(straight)
    out = tmp_path / "resumed"
    preference.train(tiny_config(sd_pipeline, pairs_parquet, out, "optim.max_steps=2", "checkpoint.every=2"))
    preference.train(tiny_config(sd_pipeline, pairs_parquet, out, "checkpoint.resume=latest"))

    assert_same_tensors(final_lora(straight.output_dir), final_lora(str(out)), atol=1e-6)
    for a, b in zip(metrics(str(out)), metrics(straight.output_dir)):
        assert a["ref_err_w"] == pytest.approx(b["ref_err_w"], rel=1e-5), a["step"]


def test_pairs_are_encoded_ahead_exactly_as_on_first_use(sd_pipeline, pairs_parquet, tmp_path, monkeypatch):
    """With the latent cache, every pair the steps will read is VAE-encoded once before step 1 (and no pair the
    run never reaches); the latents, hence the whole run, are those of encoding each pair inside its step."""
    encoded, at_step = [], []
    encode_media = diffusion.DiffusionAdapter.encode_media
    preference_step = preference.preference_step

    def counting_encode(self, pixels, *, generator):
        encoded.append(pixels.shape[0])
        return encode_media(self, pixels, generator=generator)

    def noting_step(*args, **kwargs):
        at_step.append(len(encoded))
        return preference_step(*args, **kwargs)

    monkeypatch.setattr(diffusion.DiffusionAdapter, "encode_media", counting_encode)
    monkeypatch.setattr(preference, "preference_step", noting_step)
    # 3 steps of 4 pairs read 12 of the 16 pairs
    ahead = tiny_config(sd_pipeline, pairs_parquet, tmp_path / "ahead", "optim.max_steps=3")
    preference.train(ahead)
    assert at_step == [12, 12, 12] and set(encoded) == {2}

    encoded.clear(), at_step.clear()
    inside = tiny_config(
        sd_pipeline, pairs_parquet, tmp_path / "inside", "optim.max_steps=3", "data.cache_latents=false"
    )
    preference.train(inside)
    assert at_step == [4, 8, 12]  # each step decoded and encoded its own 4 pairs
    assert_same_tensors(final_lora(ahead.output_dir), final_lora(inside.output_dir), atol=0)
    for a, b in zip(metrics(ahead.output_dir), metrics(inside.output_dir), strict=True):
        assert (a["loss"], a["ref_err_w"], a["ref_err_l"]) == (b["loss"], b["ref_err_w"], b["ref_err_l"])


# ------------------------------------------------------------------------------------------- checkpoints


def test_checkpoints_are_atomic_and_pruned(pixel_pipeline, pairs_parquet, tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    preference.train(
        tiny_config(
            pixel_pipeline, pairs_parquet, out, "optim.max_steps=6", "checkpoint.every=2", "checkpoint.keep=2"
        )
    )
    assert sorted(os.listdir(ckpt)) == ["step-4", "step-6"]
    assert not [path for path, _, _ in os.walk(out) if path.endswith(".tmp")]
    for name in ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"):
        assert (ckpt / "step-6" / name).is_file()

    # A half-written checkpoint from a crash is never a resume point.
    (ckpt / "step-99.tmp").mkdir()
    assert checkpoint.latest(str(ckpt)) == str(ckpt / "step-6")
    preference.train(
        tiny_config(
            pixel_pipeline,
            pairs_parquet,
            out,
            "optim.max_steps=8",
            "checkpoint.every=2",
            "checkpoint.keep=2",
            "checkpoint.resume=latest",
        )
    )
    assert [row["step"] for row in metrics(out)] == list(range(1, 9))
    assert sorted(os.listdir(ckpt)) == ["step-6", "step-8", "step-99.tmp"]
    with open(ckpt / "step-8" / "state.json") as f:
        assert json.load(f)["step"] == 8


def test_a_crash_while_saving_leaves_the_previous_checkpoint(
    pixel_pipeline, pairs_parquet, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    steps = ["checkpoint.every=2", "checkpoint.resume=latest"]
    preference.train(tiny_config(pixel_pipeline, pairs_parquet, out, *steps, "optim.max_steps=2"))
    real_save_file = checkpoint.save_file

    def disk_full_at_the_optimizer(tensors, filename, *args, **kwargs):
        if filename.endswith("optimizer.safetensors"):
            raise OSError("No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", disk_full_at_the_optimizer)
    with pytest.raises(OSError, match="No space left"):
        preference.train(tiny_config(pixel_pipeline, pairs_parquet, out, *steps))
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    # The half-written step-4 stays a .tmp folder; the newest resume point is still step 2.
    assert sorted(os.listdir(ckpt)) == ["step-2", "step-4.tmp"]
    assert checkpoint.latest(str(ckpt)) == str(ckpt / "step-2")
    preference.train(tiny_config(pixel_pipeline, pairs_parquet, out, *steps))
    assert sorted(os.listdir(ckpt)) == ["step-2", "step-4"]
    assert [row["step"] for row in metrics(out)] == [1, 2, 3, 4]


def test_exported_lora_loads_and_changes_samples(pixel_pipeline, pairs_parquet, tmp_path, loaded):
    cfg = tiny_config(pixel_pipeline, pairs_parquet, tmp_path / "run", "optim.lr=1e-2")
    result = preference.train(cfg)
    trained = loaded[-1].unet.eval()
    assert result.final_dir == os.path.join(cfg.output_dir, "final")
    assert result.exported_step == 4

    components = diffusion.load_components(pixel_pipeline)
    aligned = diffusion.load_aligned(components, result.final_dir)
    prompts, seeds = ["a red square", "a blue circle"], [1000, 1001]
    options = {"steps": 4, "guidance_scale": 1.5}
    base_images = diffusion.sample(components, prompts, seeds, **options)
    aligned_images = diffusion.sample(components, prompts, seeds, unet=aligned, **options)
    trained_images = diffusion.sample(components, prompts, seeds, unet=trained, **options)
    assert float((aligned_images - base_images).abs().max()) > 1e-3
    torch.testing.assert_close(aligned_images, trained_images, atol=1e-5, rtol=0)
    # load_aligned works on a copy: the base components are untouched.
    torch.testing.assert_close(diffusion.sample(components, prompts, seeds, **options), base_images)


# ------------------------------------------------------------------------------------------- labels


@pytest.fixture(scope="module")
def ties_parquet(tmp_path_factory) -> str:
    """8 pairs, half of them ties (label_0 = 0.5)."""
    rows = [
        (f"a {colour} square", png([40 * i, 10, 200]), png([10, 30 * i, 90]), 0.5 if i % 2 else 1.0)
        for i, colour in enumerate(["red", "green", "blue", "red", "green", "blue", "red", "green"])
    ]
    path = tmp_path_factory.mktemp("ties") / "pairs.parquet"
    write_pickapic_parquet(str(path), rows)
    return str(path)


def test_ties_train_and_their_loss_is_symmetric(pixel_pipeline, ties_parquet, tmp_path):
    cfg = tiny_config(
        pixel_pipeline, ties_parquet, tmp_path / "run", "data.ties=keep", "optim.max_steps=2", "loss.beta=500"
    )
    assert {record.label for record in read_pairs("pickapic", ties_parquet, ties="keep")} == {1.0, 0.5}
    preference.train(cfg)
    assert all(math.isfinite(row["loss"]) for row in metrics(cfg.output_dir))

    components = diffusion.load_components(pixel_pipeline)
    unet = components.unet
    torch.manual_seed(0)
    diffusion.add_lora(
        unet, rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    with torch.no_grad():  # move the policy away from the reference, or every loss is ln 2
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    batch = stream_batch(pixel_pipeline, cfg, step=1)
    batch["label"] = torch.tensor([1.0, 0.5, 1.0, 0.5])
    adapter = diffusion.DiffusionAdapter(components, pixel_pipeline)
    reference = functools.partial(runtime.reference_of, unet, None)
    out = preference.preference_step(adapter, unet, reference, batch, cfg)

    pw, pl = -0.5 * out["policy_err_w"], -0.5 * out["policy_err_l"]
    rw, rl = -0.5 * out["ref_err_w"], -0.5 * out["ref_err_l"]
    forward = dpo(pw, pl, rw, rl, beta=cfg.loss.beta).loss
    reverse = dpo(pl, pw, rl, rw, beta=cfg.loss.beta).loss
    assert float((forward - reverse).abs().min()) > 1e-3, "test needs pairs where the direction matters"
    expected = torch.where(batch["label"] == 1, forward, 0.5 * forward + 0.5 * reverse)
    torch.testing.assert_close(out["loss"].detach(), expected, atol=1e-6, rtol=1e-5)

    swapped = dict(batch, chosen=batch["rejected"], rejected=batch["chosen"])
    out_swapped = preference.preference_step(adapter, unet, reference, swapped, cfg)
    ties = batch["label"] == 0.5
    torch.testing.assert_close(
        out_swapped["loss"][ties].detach(), out["loss"][ties].detach(), atol=1e-6, rtol=1e-5
    )
    assert not torch.allclose(out_swapped["loss"][~ties], out["loss"][~ties], atol=1e-4)


def test_random_labels_sft_control_trains(pixel_pipeline, pairs_parquet, tmp_path):
    control = tiny_config(
        pixel_pipeline, pairs_parquet, tmp_path / "control", "loss.name=sft", "data.labels=random"
    )
    given = tiny_config(pixel_pipeline, pairs_parquet, tmp_path / "given", "loss.name=sft")
    preference.train(control)
    preference.train(given)

    rows = metrics(control.output_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in rows)
    lora = final_lora(control.output_dir)
    # lora_B starts at zero
    up = [value for name, value in lora.items() if ".lora_B." in name]
    assert up and all(float(value.abs().max()) > 0 for value in up)
    # The labels are really ignored: random members give a different run than the given winners.
    other = final_lora(given.output_dir)
    assert max(float((lora[k] - other[k]).abs().max()) for k in lora) > 1e-4


def test_validation_tracks_reward_keeps_the_best_and_can_reuse_the_base_reward(pairs_parquet, tmp_path):
    """Validation samples the held-out prompts at step 0 and every N steps, the exported final/ is the best
    validated step, and a run handed the base's reward (the control is) does not sample step 0 again."""
    overrides = [
        *run_overrides(TOY_BASE, pairs_parquet, tmp_path / "run"),
        "optim.max_steps=4",
        "optim.batch_size=4",
        "optim.lr=1e-2",
        "validation.every=2",
        "validation.seeds_per_prompt=1",
        "sampling.steps=3",
    ]
    result = preference.train(load_config(None, overrides))
    rows = [row for row in metrics(result.output_dir) if "val_reward" in row]
    assert [row["step"] for row in rows] == [0, 2, 4]
    assert all(0 <= row["val_reward"] <= 1 for row in rows)
    assert result.val_history == [(row["step"], row["val_reward"]) for row in rows]
    best = max(rows[1:], key=lambda row: row["val_reward"])
    with open(os.path.join(result.final_dir, "mmalign.json")) as f:
        exported = json.load(f)
    assert exported["step"] == best["step"] == result.exported_step
    assert exported["val_reward"] == pytest.approx(best["val_reward"])
    # The same run handed the base's reward starts from it; steps 2 and 4 are the same weights, so the same.
    overrides[2] = f"output_dir={tmp_path / 'reused'}"
    reused = preference.train(load_config(None, overrides), base_val_reward=0.125)
    again = [row for row in metrics(reused.output_dir) if "val_reward" in row]
    assert again[0] == {"step": 0, "val_reward": 0.125}
    assert [row["val_reward"] for row in again[1:]] == [row["val_reward"] for row in rows[1:]]


def test_progress_in_a_log_file_is_one_line_per_metrics_row(pixel_pipeline, pairs_parquet, tmp_path, capsys):
    """Not a terminal (a log file, CI): no progress-bar redraws, one line every log.every steps."""
    cfg = tiny_config(pixel_pipeline, pairs_parquet, tmp_path / "run", "log.progress=true", "log.every=2")
    preference.train(cfg)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err, "progress-bar redraws in a log"
    lines = [line for line in captured.out.splitlines() if line.startswith("dpo step")]
    assert [line.split(":")[0] for line in lines] == ["dpo step 2/4", "dpo step 4/4"]
    assert all("loss " in line and "samples/s" in line for line in lines)


# ------------------------------------------------------------------------------------- BCO's reward shift


def test_reward_shift_is_the_running_mean_over_pairs_and_skips_non_finite_steps():
    """Steps of 2 and 1 pairs with implicit rewards [1, 3] and [6]: δ = (1 + 3) / 2 = 2, then
    (1 + 3 + 6) / 3 = 10/3 (every pair weighs the same); a step with a NaN reward leaves δ at 10/3; the state a
    checkpoint holds gives a fresh one the same δ, which then continues alike: + [2] → (10 + 2) / 4 = 3."""
    accelerator = Accelerator(cpu=True)
    shift = preference.RewardShift(accelerator)
    assert shift.value == 0.0
    shift.observe(torch.tensor([1.0]))
    shift.observe(torch.tensor([3.0]))  # a second micro-batch of the same step
    shift.step()
    assert shift.value == pytest.approx(2.0)
    shift.observe(torch.tensor([6.0]))
    shift.step()
    assert shift.value == pytest.approx(10 / 3)
    shift.observe(torch.tensor([float("nan"), 1.0]))
    shift.step()
    assert shift.value == pytest.approx(10 / 3)

    resumed = preference.RewardShift(accelerator)
    resumed.load_state(*shift.state())
    assert resumed.value == shift.value
    for holder in (shift, resumed):
        holder.observe(torch.tensor([2.0]))
        holder.step()
        assert holder.value == pytest.approx(3.0)


def bco_config(pipeline: str, data: str, out, *overrides: str):
    """bco_pair with a β and lr at which the implicit rewards move well away from 0 within two steps."""
    return tiny_config(
        pipeline, data, out, "loss.name=bco_pair", "loss.beta=500", "optim.lr=1e-2", *overrides
    )


def policy_after(pipeline: str, cfg, step: int) -> UNet2DConditionModel:
    """The policy UNet as the run's checkpoint of optimizer step ``step`` holds it."""
    unet = with_lora(diffusion.load_components(pipeline).unet, cfg)
    checkpoint.load_weights(os.path.join(cfg.output_dir, "checkpoints", f"step-{step}"), unet)
    return unet


def test_bco_pair_trains_with_the_running_mean_of_its_implicit_rewards(
    pixel_pipeline, pairs_parquet, tmp_path, float64
):
    """δ and the step-3 loss, recomputed from the checkpoints (s = −½·e, r = s_θ − s_ref, β = 500).

    Step k's pairs give per-pair implicit rewards m = β·(r_w + r_l) / 2 under the policy that step starts from
    (the checkpoint of step k − 1; step 1 starts at the zero-initialised LoRA, so m = 0 there). δ_k, the shift
    step k trains with, is the mean of m over the pairs of steps 1 … k − 1: δ_1 = δ_2 = 0, δ_3 = (0 + m̄_2) / 2.
    Step 3's loss is mean over its pairs of −log σ(β·r_w − δ_3) − log σ(−(β·r_l − δ_3)).
    """
    cfg = bco_config(
        pixel_pipeline,
        pairs_parquet,
        tmp_path / "run",
        "optim.max_steps=3",
        "checkpoint.every=1",
        "checkpoint.keep=3",
    )
    preference.train(cfg)
    rows = metrics(cfg.output_dir)
    components = diffusion.load_components(pixel_pipeline)
    beta = cfg.loss.beta

    def log_ratios(step: int):  # r_w, r_l of step ``step``'s pairs, under the policy that step starts from
        batch = stream_batch(pixel_pipeline, cfg, step=step)
        ref_w, ref_l = errors_of(components.unet, components, batch)
        pol_w, pol_l = errors_of(policy_after(pixel_pipeline, cfg, step - 1), components, batch)
        return -0.5 * (pol_w - ref_w), -0.5 * (pol_l - ref_l)  # (B,), (B,)

    assert rows[0]["reward_shift"] == 0 and rows[1]["reward_shift"] == 0
    assert rows[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)  # policy = reference, δ = 0
    r_w, r_l = log_ratios(2)
    shift = 0.5 * (0.0 + float((beta * (r_w + r_l) / 2).mean()))
    assert abs(shift) > 0.05, f"δ_3 = {shift:.3g}: the rewards barely moved, the test would prove nothing"
    assert rows[2]["reward_shift"] == pytest.approx(shift, abs=1e-5)

    r_w, r_l = log_ratios(3)
    chosen, rejected = beta * r_w, beta * r_l  # (B,) each

    def hand_loss(delta: float) -> float:
        return float((-F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))).mean())

    assert rows[2]["loss"] == pytest.approx(hand_loss(shift), abs=1e-5)
    assert abs(hand_loss(shift) - hand_loss(0.0)) > 1e-3  # a run that ignored δ would fail the line above


def test_bco_pair_resume_continues_with_the_saved_reward_shift(pixel_pipeline, pairs_parquet, tmp_path):
    straight = bco_config(pixel_pipeline, pairs_parquet, tmp_path / "straight")
    preference.train(straight)
    out = tmp_path / "resumed"
    preference.train(
        bco_config(pixel_pipeline, pairs_parquet, out, "optim.max_steps=2", "checkpoint.every=2")
    )
    saved = checkpoint.load_extra(str(out / "checkpoints" / "step-2"))
    preference.train(bco_config(pixel_pipeline, pairs_parquet, out, "checkpoint.resume=latest"))

    rows, rows_straight = metrics(str(out)), metrics(straight.output_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert abs(rows_straight[2]["reward_shift"]) > 0.05, (
        "δ must have moved for the comparison to mean anything"
    )
    # the checkpoint of step 2 holds the δ that step 3 trains with
    assert float(saved["reward_shift.value"][0]) == pytest.approx(rows_straight[2]["reward_shift"], rel=1e-6)
    for a, b in zip(rows, rows_straight):
        for key in ("reward_shift", "implicit_reward", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    assert_same_tensors(final_lora(straight.output_dir), final_lora(str(out)), atol=1e-6)


def test_bco_pair_gradient_accumulation_gives_the_reward_shift_of_the_full_batch(
    pixel_pipeline, pairs_parquet, tmp_path, float64
):
    full = bco_config(pixel_pipeline, pairs_parquet, tmp_path / "full")
    accumulated = bco_config(
        pixel_pipeline,
        pairs_parquet,
        tmp_path / "accum",
        "optim.batch_size=1",
        "optim.gradient_accumulation_steps=4",
    )
    preference.train(full)
    preference.train(accumulated)
    rows_full, rows_accum = metrics(full.output_dir), metrics(accumulated.output_dir)
    assert [row["step"] for row in rows_accum] == [1, 2, 3, 4]
    assert abs(rows_full[-1]["reward_shift"]) > 0.05
    for a, b in zip(rows_full, rows_accum):
        for key in ("reward_shift", "implicit_reward", "loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert_same_tensors(final_lora(full.output_dir), final_lora(accumulated.output_dir), atol=1e-6)
