"""TPO (TDPO, TKTO) and Diffusion-KTO recipes on tiny real pipelines, and the captioned-image data they read.

What the recipes must do and these tests pin:

- TDPO: one latent, one noise, one timestep, two text conditions — and exactly the Diffusion-DPO / Flow-DPO
  loss fed those tensors (arXiv 2509.25771);
- TKTO: (image, caption) desirable, (image, mismatched caption) undesirable, sharing noise and timestep;
- KTO's reference point: the batch mean of the implicit rewards, or mismatched captions (arXiv 2404.04465);
  at policy = reference every sample's loss is λ/2 = 0.5;
- a few training steps change the LoRA only; the controls are plain fine-tuning (tpo) and coin-flip labels (kto).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiny_flow
import torch
from conftest import png, run_overrides
from diffusers import UNet2DConditionModel

from mmalign import adapters, cli
from mmalign.adapters import diffusion
from mmalign.config import load_config
from mmalign.data.captioned import CaptionedRecord, read_captioned, write_captioned_parquet
from mmalign.errors import UserError
from mmalign.losses import dpo, kto, mismatched_reference_point
from mmalign.pairs.tpo import RulePerturber
from mmalign.recipes import kto as kto_recipe
from mmalign.recipes import recipe as recipe_of
from mmalign.recipes import runtime, tpo
from mmalign.recipes.preference import media_options
from mmalign.recipes.runtime import PairStream
from mmalign.toy import assets

CPU = torch.device("cpu")
COLOURS = {"red": [220, 20, 20], "green": [20, 200, 40], "blue": [30, 40, 210]}


def captioned_records(count: int = 12, *, labels: bool = False) -> list[CaptionedRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        colour = list(COLOURS)[i % 3]
        shape = ("circle", "square")[i // 3 % 2]
        side = ("left", "right")[i // 6 % 2]
        pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 20, 3), 0, 255).tolist()
        label = (i % 2 == 0) if labels else None
        records.append(CaptionedRecord(f"a {colour} {shape} on the {side}", png(pixels), i, "t", label=label))
    return records


@pytest.fixture(scope="module")
def captions_parquet(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("captions") / "captions.parquet"
    write_captioned_parquet(str(path), captioned_records())
    return str(path)


@pytest.fixture(scope="module")
def feedback_parquet(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("feedback") / "feedback.parquet"
    write_captioned_parquet(str(path), captioned_records(labels=True))
    return str(path)


@pytest.fixture(scope="module")
def flow_sd3(tmp_path_factory) -> str:
    return tiny_flow.save("sd3", tmp_path_factory.mktemp("flow") / "sd3")


def tpo_config(pipeline: str, data: str, out_dir, *overrides: str, recipe: str = "tpo"):
    return load_config(
        None,
        [
            f"recipe={recipe}",
            *run_overrides(pipeline, data, out_dir),
            "data.format=captions_parquet",
            "optim.batch_size=4",
            "optim.max_steps=2",
            "checkpoint.every=2",
            "log.every=1",
            "loss.beta=500",
            *overrides,
        ],
    )


def random_lora(network, targets=("to_q", "to_k", "to_v", "to_out.0"), *, scale: float = 0.1) -> None:
    """A LoRA with random up-projections (peft starts them at zero), so that policy ≠ reference."""
    torch.manual_seed(0)
    network.requires_grad_(False)
    from mmalign.adapters.base import add_peft_lora

    add_peft_lora(network, rank=4, alpha=4.0, dropout=0.0, target_modules=list(targets))
    with torch.no_grad():
        for name, p in network.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)


def setup(cfg, *, perturbed: bool = True):
    """The recipe's adapter, source and first batch, with a random LoRA on the adapter's network."""
    adapter = adapters.load(cfg.model, timesteps=cfg.timesteps)
    records = kto_recipe.read_captioned_data(cfg, require_label=cfg.recipe == "kto")
    if perturbed:
        records = tpo.mismatched_captions(cfg, records, log=lambda text: None)
    source = kto_recipe.CaptionedCache(records, adapter, media_options(cfg, adapter))
    stream = PairStream(len(source), cfg.optim.seed)
    build = tpo.build_batch if cfg.recipe == "tpo" else kto_recipe.build_batch
    batch = build(stream, source, list(range(4)), cfg, adapter, CPU)
    random_lora(adapter.network)
    reference = functools.partial(runtime.reference_of, adapter.network, None)
    return adapter, batch, reference


class Inputs:
    """The (sample, timestep, text condition) of every forward of ``network``, in order."""

    def __init__(self, network):
        self.calls = []
        self.handle = network.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        sample = kwargs.get("sample", kwargs.get("hidden_states", args[0] if args else None))
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self.calls.append([torch.as_tensor(x).detach().clone() for x in (sample, timestep, text)])


def scores_under(adapter, network, batch, captions) -> torch.Tensor:
    """−½ · error of the batch's images (its own noise and timesteps) under ``captions``."""
    condition = adapter.encode_prompts(captions)
    return -0.5 * adapter.errors(network, batch["chosen"], batch["noise"], batch["timesteps"], condition)


# -------------------------------------------------------------------------------------------------- TDPO


@pytest.mark.parametrize("pipeline_name", ["pixel_pipeline", "flow_sd3"])
def test_tdpo_shares_latent_noise_and_timestep_and_is_dpo_on_the_two_captions(
    pipeline_name, request, captions_parquet, tmp_path
):
    pipeline = request.getfixturevalue(pipeline_name)
    overrides = tiny_flow.media_overrides("sd3") if pipeline_name == "flow_sd3" else []
    cfg = tpo_config(pipeline, captions_parquet, tmp_path, *overrides)
    adapter, batch, reference = setup(cfg)
    assert batch["chosen"] is batch["rejected"]  # one latent per image, encoded once
    assert all(c != r for c, r in zip(batch["captions"], batch["rejected_captions"]))
    network = adapter.network
    recorder = Inputs(network)
    try:
        out = tpo.tpo_step(adapter, network, reference, batch, cfg)
    finally:
        recorder.handle.remove()
    assert len(recorder.calls) == 2  # reference, then policy, each on the 2B (image, caption) rows
    size = len(batch["captions"])
    for sample, timestep, text in recorder.calls:
        assert torch.equal(sample[:size], sample[size:])  # the same noisy latent under both captions
        assert torch.equal(timestep.reshape(-1)[:size], timestep.reshape(-1)[size:])
        assert not torch.allclose(text[:size], text[size:])  # two different conditions

    with torch.no_grad():
        policy_w = scores_under(adapter, network, batch, batch["captions"])
        policy_l = scores_under(adapter, network, batch, batch["rejected_captions"])
        with reference() as ref_network:
            ref_w = scores_under(adapter, ref_network, batch, batch["captions"])
            ref_l = scores_under(adapter, ref_network, batch, batch["rejected_captions"])
    expected = dpo(policy_w, policy_l, ref_w, ref_l, beta=cfg.loss.beta).loss
    assert float(expected.std()) > 1e-4, "the pairs must differ for the test to mean anything"
    torch.testing.assert_close(out["loss"].detach(), expected, atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------------- TKTO, KTO


@pytest.mark.parametrize("pipeline_name", ["pixel_pipeline", "flow_sd3"])
def test_tkto_scores_the_image_under_both_captions_with_shared_noise(
    pipeline_name, request, captions_parquet, tmp_path
):
    pipeline = request.getfixturevalue(pipeline_name)
    overrides = tiny_flow.media_overrides("sd3") if pipeline_name == "flow_sd3" else []
    cfg = tpo_config(pipeline, captions_parquet, tmp_path, "loss.name=kto", "loss.beta=2000", *overrides)
    adapter, batch, reference = setup(cfg)
    network = adapter.network
    out = tpo.tpo_step(adapter, network, reference, batch, cfg)
    with torch.no_grad():
        policy = torch.cat(
            [
                scores_under(adapter, network, batch, batch["captions"]),
                scores_under(adapter, network, batch, batch["rejected_captions"]),
            ]
        )
        with reference() as ref_network:
            ref = torch.cat(
                [
                    scores_under(adapter, ref_network, batch, batch["captions"]),
                    scores_under(adapter, ref_network, batch, batch["rejected_captions"]),
                ]
            )
    desirable = torch.tensor([True] * 4 + [False] * 4)
    expected = kto(policy, ref, desirable, beta=2000.0)
    torch.testing.assert_close(out["loss"].detach(), expected.loss, atol=1e-5, rtol=1e-4)
    z = (policy - ref).mean().clamp(min=0)  # the batch-mean reference point
    torch.testing.assert_close(out["reference_point"][0], z, atol=1e-7, rtol=1e-5)
    assert torch.equal(out["desirable_share"], desirable.float())


def test_kto_at_policy_equal_to_reference_is_half_per_sample(pixel_pipeline, feedback_parquet, tmp_path):
    """REFERENCES.md: at policy = reference the Diffusion-KTO loss is 0.5 per sample (λ = 1), with either z."""
    for point in ("batch_mean", "mismatched"):
        cfg = tpo_config(
            pixel_pipeline, feedback_parquet, tmp_path, f"kto.reference_point={point}", recipe="kto"
        )
        adapter, batch, _ = setup(cfg, perturbed=False)
        network = adapters.load(cfg.model, timesteps=cfg.timesteps).network
        random_lora(network, scale=0.0)  # a LoRA that does not change the outputs yet, as at step 0
        reference = functools.partial(runtime.reference_of, network, None)
        out = kto_recipe.kto_step(adapter, network, reference, batch, cfg)
        torch.testing.assert_close(out["loss"], torch.full((4,), 0.5), atol=1e-6, rtol=0)


def test_kto_mismatched_reference_point_rolls_the_captions(pixel_pipeline, feedback_parquet, tmp_path):
    cfg = tpo_config(
        pixel_pipeline,
        feedback_parquet,
        tmp_path,
        "kto.reference_point=mismatched",
        "loss.beta=2000",
        recipe="kto",
    )
    adapter, batch, reference = setup(cfg, perturbed=False)
    network = adapter.network
    out = kto_recipe.kto_step(adapter, network, reference, batch, cfg)
    rolled = batch["captions"][-1:] + batch["captions"][:-1]
    assert rolled != batch["captions"]
    as_pairs = dict(batch, chosen=batch["latents"])
    with torch.no_grad():
        policy = scores_under(adapter, network, as_pairs, batch["captions"])
        policy_mm = scores_under(adapter, network, as_pairs, rolled)
        with reference() as ref_network:
            ref = scores_under(adapter, ref_network, as_pairs, batch["captions"])
            ref_mm = scores_under(adapter, ref_network, as_pairs, rolled)
    z = mismatched_reference_point(policy_mm, ref_mm)
    assert float((policy - ref).mean()) != pytest.approx(float(z), abs=1e-9)  # the two options differ here
    torch.testing.assert_close(out["reference_point"][0], z, atol=1e-7, rtol=1e-5)
    expected = kto(policy, ref, batch["desirable"], beta=2000.0, reference_point=z).loss
    torch.testing.assert_close(out["loss"].detach(), expected, atol=1e-5, rtol=1e-4)


def test_kto_control_labels_are_coin_flips_of_the_stream(pixel_pipeline, feedback_parquet, tmp_path):
    given = tpo_config(pixel_pipeline, feedback_parquet, tmp_path, recipe="kto")
    control = tpo_config(pixel_pipeline, feedback_parquet, tmp_path, "data.labels=random", recipe="kto")
    labels = {}
    for name, cfg in (("given", given), ("control", control)):
        adapter = adapters.load(cfg.model, timesteps=cfg.timesteps)
        records = kto_recipe.read_captioned_data(cfg, require_label=True)
        source = kto_recipe.CaptionedCache(records, adapter, media_options(cfg, adapter))
        stream = PairStream(len(source), cfg.optim.seed)
        batch = kto_recipe.build_batch(stream, source, list(range(12)), cfg, adapter, CPU)
        labels[name] = batch["desirable"]
        if name == "given":
            expected = [records[stream.pair_index(p)].label for p in range(12)]
            assert batch["desirable"].tolist() == expected
    assert not torch.equal(labels["given"], labels["control"])
    assert 0 < int(labels["control"].sum()) < 12


# --------------------------------------------------------------------------------------------- training


@pytest.fixture
def loaded(monkeypatch) -> list[diffusion.Components]:
    """The components each ``train`` call loads — the real objects, kept so the trained UNet can be read."""
    real = diffusion.load_components
    kept = []

    def load_and_keep(path, **kwargs):
        kept.append(real(path, **kwargs))
        return kept[-1]

    monkeypatch.setattr(diffusion, "load_components", load_and_keep)
    return kept


@pytest.mark.parametrize("recipe,loss", [("tpo", "dpo"), ("tpo", "kto"), ("tpo", "sft"), ("kto", "kto")])
def test_a_few_steps_train_the_lora_only(
    recipe, loss, pixel_pipeline, captions_parquet, feedback_parquet, tmp_path, loaded
):
    data = feedback_parquet if recipe == "kto" else captions_parquet
    cfg = tpo_config(pixel_pipeline, data, tmp_path / "run", f"loss.name={loss}", recipe=recipe)
    recipe_of(recipe)(cfg)
    unet = loaded[-1].unet
    lora = {name: p.detach() for name, p in unet.named_parameters() if "lora_" in name}
    assert lora and all(float(p.abs().sum()) > 0 for name, p in lora.items() if "lora_B" in name)
    base = dict(
        UNet2DConditionModel.from_pretrained(
            pixel_pipeline, subfolder="unet", local_files_only=True
        ).named_parameters()
    )
    frozen = {
        name.replace(".base_layer", ""): p for name, p in unet.named_parameters() if "lora_" not in name
    }
    assert frozen.keys() == base.keys()
    assert not [name for name, p in frozen.items() if not torch.equal(p, base[name])]
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    assert [row["step"] for row in rows] == [1, 2] and all(np.isfinite(row["loss"]) for row in rows)
    if loss == "dpo":  # the zero-initialised LoRA makes policy == reference at step 1: ln 2
        assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    if loss == "kto":  # and 1 − σ(0) = 0.5 for KTO
        assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert os.path.isfile(os.path.join(cfg.output_dir, "final", diffusion.LORA_WEIGHTS))


def test_tpo_control_is_supervised_fine_tuning_and_kto_control_drops_the_labels(captions_parquet, tmp_path):
    own = [f"output_dir={tmp_path}", f"data.path={tmp_path}/data/c.parquet", "data.format=captions_parquet"]
    tpo_cfg = load_config(None, ["recipe=tpo", "toy.enabled=true", *own])
    kto_cfg = load_config(None, ["recipe=kto", "toy.enabled=true", *own])
    tpo_control, kto_control = cli._control_config(tpo_cfg), cli._control_config(kto_cfg)
    assert tpo_control.loss.name == "sft" and tpo_control.data.labels == "given"
    assert kto_control.loss.name == "kto" and kto_control.data.labels == "random"
    assert tpo_control.optim == tpo_cfg.optim and kto_control.optim == kto_cfg.optim  # same budget


# ------------------------------------------------------------------------------------------------ data


def test_captions_parquet_and_jsonl_read_the_same_records(tmp_path):
    records = captioned_records(4, labels=True)
    write_captioned_parquet(str(tmp_path / "c.parquet"), records)
    lines = []
    for i, record in enumerate(records):
        (tmp_path / f"{i}.png").write_bytes(record.image)
        lines.append(json.dumps({"caption": record.caption, "image": f"{i}.png", "label": int(record.label)}))
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    from_parquet = read_captioned("captions_parquet", str(tmp_path / "c.parquet"), require_label=True)
    from_jsonl = read_captioned("captions_jsonl", str(tmp_path / "c.jsonl"), require_label=True)
    assert [(r.caption, r.label) for r in from_parquet] == [(r.caption, r.label) for r in records]
    assert [(r.caption, r.label) for r in from_jsonl] == [(r.caption, r.label) for r in records]
    assert [Path(r.image).read_bytes() for r in from_jsonl] == [r.image for r in from_parquet]
    assert from_jsonl[2].where("label").endswith("line 3: key label")


@pytest.mark.parametrize("column", [[1, 0.7], [0, 2], [True, None], ["1", "yes"], [1, -1]])
def test_a_label_that_is_not_boolean_names_the_row(column, tmp_path):
    table = {"caption": ["a red circle", "a blue square"], "image": [png([1, 2, 3])] * 2, "thumbs": column}
    pq.write_table(pa.table(table), tmp_path / "f.parquet")
    row = 0 if isinstance(column[0], str) else 1
    with pytest.raises(UserError) as err:
        read_captioned(
            "captions_parquet", str(tmp_path / "f.parquet"), label_column="thumbs", require_label=True
        )
    shown = "is missing" if column[1] is None else f"is {column[row]!r};"
    assert str(err.value).startswith(f"{tmp_path / 'f.parquet'} row {row}: column thumbs {shown}")
    assert str(err.value).endswith("accepted: true / false or 1 / 0 (1: desirable, 0: undesirable)")


def test_a_dataset_without_captions_or_labels_names_what_it_needs(tmp_path):
    pq.write_table(pa.table({"text": ["a red circle"], "image": [png([1, 2, 3])]}), tmp_path / "n.parquet")
    with pytest.raises(
        UserError, match=r"has no column 'caption' \(columns: text, image; captioned images need"
    ):
        read_captioned("captions_parquet", str(tmp_path / "n.parquet"))
    pq.write_table(pa.table({"caption": ["a red circle"], "image": [png([1, 2, 3])]}), tmp_path / "u.parquet")
    with pytest.raises(
        UserError, match=r"has no column 'label' .*the label column 'label' \(data.label_column\)"
    ):
        read_captioned("captions_parquet", str(tmp_path / "u.parquet"), require_label=True)


def test_unperturbable_captions_are_skipped_with_their_row_or_fail(
    pixel_pipeline, captions_parquet, tmp_path
):
    records = captioned_records(3)
    records[1] = CaptionedRecord("abstract art", records[1].image, 1, "data.parquet")
    cfg = tpo_config(pixel_pipeline, captions_parquet, tmp_path, "tpo.families=[relations]")
    notes = []
    kept = tpo.mismatched_captions(cfg, records, log=notes.append)
    assert [r.row for r in kept] == [0, 2] and tpo.family_counts(kept) == "relations 2"
    assert all(r.perturbed == r.caption.replace("left", "right") for r in kept)  # "on the left" inverted
    assert notes == [
        "skipped 1 of 3 captions no rule of relations can perturb (first: data.parquet row 1: column caption: "
        "'abstract art')"
    ]
    fail = tpo_config(
        pixel_pipeline, captions_parquet, tmp_path, "tpo.families=[relations]", "tpo.unperturbable=fail"
    )
    with pytest.raises(
        UserError, match=r"^data.parquet row 1: column caption: caption 'abstract art' cannot be"
    ):
        tpo.mismatched_captions(fail, records, log=notes.append)


def test_mismatched_captions_are_the_rule_perturbers_keyed_by_row(pixel_pipeline, captions_parquet, tmp_path):
    records = captioned_records(6)
    cfg = tpo_config(pixel_pipeline, captions_parquet, tmp_path, "optim.seed=3")
    kept = tpo.mismatched_captions(cfg, records, log=lambda text: None)
    rules = RulePerturber(cfg.tpo.families, seed=3)
    expected = [rules.perturb(r.caption, key) for key, r in enumerate(records)]
    assert [(r.perturbed, r.family) for r in kept] == [(p.text, p.family) for p in expected]
    assert all(r.perturbed != r.caption for r in kept)


def test_pairs_tpo_writes_a_dataset_the_column_perturber_trains_on(
    pixel_pipeline, captions_parquet, tmp_path, capsys
):
    config = tmp_path / "tpo.yaml"
    config.write_text("recipe: tpo\n")
    out = tmp_path / "perturbed.parquet"
    args = [f"model.path={pixel_pipeline}", f"data.path={captions_parquet}", "data.format=captions_parquet"]
    args += [f"output_dir={tmp_path / 'run'}", "toy.enabled=false", "optim.seed=5"]
    assert cli.main(["pairs", "tpo", str(config), *args, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("wrote 12 captioned images with mismatched captions (")
    written = read_captioned("captions_parquet", str(out))
    rules = RulePerturber(seed=5)
    expected = [
        rules.perturb(r.caption, key)
        for key, r in enumerate(read_captioned("captions_parquet", captions_parquet))
    ]
    assert [(r.perturbed, r.family) for r in written] == [(p.text, p.family) for p in expected]
    cfg = tpo_config(pixel_pipeline, str(out), tmp_path, "tpo.perturber=column")
    records = tpo.mismatched_captions(
        cfg, read_captioned("captions_parquet", str(out)), log=lambda text: None
    )
    assert [r.perturbed for r in records] == [p.text for p in expected]
    missing = tpo_config(pixel_pipeline, captions_parquet, tmp_path, "tpo.perturber=column")
    with pytest.raises(
        UserError, match=r"row 0: column perturbed_caption: no mismatched caption \(12 rows lack one\)"
    ):
        tpo.mismatched_captions(missing, read_captioned("captions_parquet", captions_parquet), log=print)


def test_kto_weights_scale_desirable_and_undesirable_samples(pixel_pipeline, feedback_parquet, tmp_path):
    """λ_D and λ_U multiply the per-sample loss of their samples (with z from the same batch)."""
    plain = tpo_config(pixel_pipeline, feedback_parquet, tmp_path, "loss.beta=2000", recipe="kto")
    weighted = tpo_config(
        pixel_pipeline,
        feedback_parquet,
        tmp_path,
        "loss.beta=2000",
        "kto.desirable_weight=2.0",
        "kto.undesirable_weight=0.5",
        recipe="kto",
    )
    adapter, batch, reference = setup(plain, perturbed=False)
    network = adapter.network
    with torch.no_grad():
        base = kto_recipe.kto_step(adapter, network, reference, batch, plain)["loss"]
        scaled = kto_recipe.kto_step(adapter, network, reference, batch, weighted)["loss"]
    desirable = batch["desirable"]
    assert desirable.any() and (~desirable).any()
    expected = torch.where(desirable, 2.0 * base, 0.5 * base)
    torch.testing.assert_close(scaled, expected, atol=1e-7, rtol=1e-6)


def test_the_toy_world_builds_captioned_data_only_where_it_can(tmp_path):
    """TPO's true renders exist for the still shapes world; KTO's labelled samples come from the diffusion base."""
    own = [f"output_dir={tmp_path}", f"data.path={tmp_path}/data/c.parquet", "data.format=captions_parquet"]
    video = load_config(None, ["recipe=tpo", "toy.enabled=true", "toy.world=moving_shapes", *own])
    with pytest.raises(
        UserError, match=r"captioned data for recipe tpo in toy.world shapes only, got 'moving_shapes'"
    ):
        assets.ensure_data(video, log=lambda text: None)
    flow = load_config(None, ["recipe=kto", "toy.enabled=true", "model.kind=flow", *own])
    with pytest.raises(
        UserError, match=r"from the diffusion base \(assets/toy-t2i\) only, got model.kind 'flow'"
    ):
        assets.ensure_data(flow, log=lambda text: None)
    renders = load_config(None, ["recipe=tpo", "toy.enabled=true", "toy.images_per_prompt=1", *own])
    assets.ensure_data(renders, log=lambda text: None)
    records = read_captioned("captions_parquet", renders.data.path)
    assert len(records) == 126 and all(r.label is None and r.perturbed is None for r in records)
    assert os.listdir(tmp_path / "data") == ["c.parquet"]  # written atomically: no partial file left
