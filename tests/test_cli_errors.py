"""Bad input ends with exit code 2 and one line per problem that names the key / file / row, the value and
what is accepted; no traceback. Every case goes through ``mmalign.cli.main`` in-process, as a user's
``mmalign train config.yaml key=value`` would.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import QUIET_RUN, build_pipeline, png

from mmalign.cli import main
from mmalign.data.pickapic import write_pickapic_parquet
from mmalign.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")
QUICK = [
    *QUIET_RUN,
    "optim.max_steps=1",
    "optim.batch_size=2",
]


@pytest.fixture(autouse=True)
def empty_working_directory(tmp_path_factory, monkeypatch):
    """Each case runs from an empty folder, which must stay empty: a refused run leaves no partial files behind
    (relative defaults such as runs/quickstart would land here). Cases on the shipped configs chdir to the
    repository instead and check their paths themselves."""
    folder = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(folder)
    yield
    if os.path.samefile(os.getcwd(), folder):
        assert os.listdir(folder) == [], "a refused run wrote files outside its output_dir"


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    """Exit code and the "mmalign: error:" lines; a traceback on stderr fails the test."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("mmalign: error:")]


def one_error(capsys, *argv: str) -> str:
    code, lines = run(capsys, *argv)
    assert code == 2, lines
    assert len(lines) == 1, lines
    return lines[0]


def train(config: str, *overrides: str) -> list[str]:
    return ["train", config, *QUICK, *overrides]


# -------------------------------------------------------------------------------------------- config


def test_unknown_key_in_the_yaml_file(capsys, tmp_path, config_file):
    with open(config_file, "a") as f:
        f.write("optim:\n  lrr: 0.1\n")
    line = one_error(capsys, *train(config_file))
    assert "`optim.lrr`" in line and config_file in line
    assert "accepted:" in line and "lr" in line.split("accepted:")[1]


def test_unknown_key_on_the_command_line(capsys, config_file):
    line = one_error(capsys, *train(config_file, "optim.lrr=0.1"))
    assert "`optim.lrr`" in line and "command line" in line and "accepted:" in line


def test_unknown_section(capsys, config_file):
    line = one_error(capsys, *train(config_file, "optimizer.lr=0.1"))
    assert "`optimizer`" in line and "command line" in line and "optim" in line.split("accepted:")[1]


def test_wrong_type(capsys, config_file):
    line = one_error(capsys, *train(config_file, "optim.lr=abc"))
    assert "`optim.lr`" in line and "must be a number" in line and "'abc'" in line and "command line" in line


def test_every_error_is_reported_at_once(capsys, tmp_path, config_file):
    with open(config_file, "a") as f:
        f.write("log:\n  every: often\n")
    code, lines = run(
        capsys, *train(config_file, "optim.lr=abc", "optim.batch_size=two", "loss.nmae=dpo", "lora.rank=0")
    )
    assert code == 2
    assert len(lines) == 5, lines
    expected = {
        "`log.every`": ("must be an integer", "'often'", config_file),
        "`optim.lr`": ("must be a number", "'abc'", "command line"),
        "`optim.batch_size`": ("must be an integer", "'two'", "command line"),
        "`loss.nmae`": ("unknown key", "accepted:", "command line"),
        "`lora.rank`": ("must be > 0", "got 0", "command line"),
    }
    for key, fragments in expected.items():
        (line,) = [line for line in lines if key in line]
        assert all(fragment in line for fragment in fragments), line


@pytest.mark.parametrize("beta", ["0", "-1"])
def test_beta_must_be_positive(capsys, config_file, beta):
    line = one_error(capsys, *train(config_file, f"loss.beta={beta}"))
    assert "`loss.beta` must be > 0" in line and f"got {beta}" in line and "command line" in line


def test_a_learning_rate_beyond_float32_is_refused_before_the_optimizer_overflows(capsys, config_file):
    line = one_error(capsys, *train(config_file, "optim.lr=1e39"))
    assert "`optim.lr` must be < 3.4e+38" in line and "got 1e+39" in line and "command line" in line


def test_missing_config_file(capsys, tmp_path):
    missing = str(tmp_path / "nope.yaml")
    line = one_error(capsys, "train", missing)
    assert missing in line and "does not exist" in line


def test_override_without_equals_sign(capsys, config_file):
    line = one_error(capsys, *train(config_file, "optim.lr"))
    assert "'optim.lr'" in line and "key.sub=value" in line


# ------------------------------------------------------------------------------------------ launch


@pytest.mark.parametrize(
    "environment, named",
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZERO_STAGE=3"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"},
            "OFFLOAD_OPTIMIZER_DEVICE=cpu",
        ),
        ({"ACCELERATE_USE_FSDP": "true"}, "FSDP_VERSION=1"),  # accelerate's default version
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP_VERSION=1"),
    ],
)
def test_an_unsupported_launch_backend_is_refused_before_it_can_hang(
    capsys, monkeypatch, tmp_path, config_file, environment, named
):
    """accelerate launch exports these variables from a launch file; a backend the recipe cannot run under
    must be named at once, with the launch files that work, instead of crashing or hanging later."""
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    line = one_error(capsys, *train(config_file))
    assert named in line and "fsdp2.yaml" in line
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_the_launch_backend_is_checked_once_per_launch(monkeypatch):
    """The CLI checks the launch before it builds anything and the recipe's accelerator builder would check it
    again: a launch already approved is not examined a second time; a different one is."""
    from mmalign.recipes import runtime

    examined = []
    original = runtime._check_zero
    monkeypatch.setattr(runtime, "_check_zero", lambda *a: (examined.append(a), original(*a)))
    monkeypatch.setattr(runtime, "_approved_launches", set())
    zero2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    runtime.check_backend(zero2)
    runtime.check_backend(dict(zero2))
    assert len(examined) == 1
    runtime.check_backend({**zero2, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"})
    assert len(examined) == 2
    with pytest.raises(UserError, match="ZERO_STAGE=3"):  # a refused launch is never remembered as approved
        runtime.check_backend({**zero2, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    with pytest.raises(UserError, match="ZERO_STAGE=3"):
        runtime.check_backend({**zero2, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})


# ------------------------------------------------------------------------------------------ model


def test_missing_model_path(capsys, tmp_path, config_file):
    line = one_error(capsys, *train(config_file, "model.path=/nonexistent"))
    assert "`model.path`" in line and "'/nonexistent'" in line and "pipeline folder" in line
    assert not os.path.exists(tmp_path / "run"), "a config error must stop before anything is written"


def test_a_typo_in_the_quickstart_model_path_starts_no_toy_pretraining(capsys, tmp_path, monkeypatch):
    """The toy world builds only its own base (assets/toy-t2i): any other missing model folder is an error,
    and nothing is written there or in the run directory."""
    monkeypatch.chdir(REPO)
    typo = tmp_path / "nonexistent" / "model"
    line = one_error(
        capsys,
        "train",
        QUICKSTART,
        f"model.path={typo}",
        f"output_dir={tmp_path / 'run'}",
        "log.progress=false",
    )
    assert "`model.path`" in line and str(typo) in line and "not found" in line and "assets/toy-t2i" in line
    assert not os.path.exists(tmp_path / "nonexistent") and not os.path.exists(tmp_path / "run")


def test_a_typo_in_the_quickstart_data_path_builds_no_toy_pairs(capsys, tmp_path, monkeypatch):
    """Toy pairs are built only inside output_dir: a missing data file elsewhere is an error."""
    monkeypatch.chdir(REPO)
    typo = tmp_path / "elsewhere" / "pairs.parquet"
    line = one_error(
        capsys,
        "train",
        QUICKSTART,
        f"data.path={typo}",
        f"output_dir={tmp_path / 'run'}",
        "log.progress=false",
    )
    assert "`data.path`" in line and str(typo) in line and "inside output_dir" in line
    assert not os.path.exists(tmp_path / "elsewhere") and not os.path.exists(tmp_path / "run")


def test_without_the_toy_world_nothing_is_built(capsys, tmp_path, monkeypatch):
    """The toy's own paths are built only when the config asks for the toy world (toy.enabled defaults off)."""
    monkeypatch.chdir(REPO)
    pairs = tmp_path / "run" / "data" / "pairs.parquet"
    line = one_error(
        capsys,
        "train",
        QUICKSTART,
        "toy.enabled=false",
        f"data.path={pairs}",
        f"output_dir={tmp_path / 'run'}",
        "log.progress=false",
    )
    assert "`data.path`" in line and str(pairs) in line and "toy world" not in line
    assert not os.path.exists(tmp_path / "run")


def test_model_folder_without_unet(capsys, tmp_path, config_file):
    broken = build_pipeline(tmp_path / "pipe", vae=False)
    os.rename(os.path.join(broken, "unet"), os.path.join(broken, "unet.old"))
    line = one_error(capsys, *train(config_file, f"model.path={broken}"))
    assert broken in line and "'unet/'" in line


@pytest.mark.parametrize(
    ("expected", "fixture", "actual"),
    [("v_prediction", "pixel_pipeline", "epsilon"), ("epsilon", "v_pipeline", "v_prediction")],
)
def test_prediction_type_mismatch(capsys, request, config_file, expected, fixture, actual):
    pipeline = request.getfixturevalue(fixture)
    line = one_error(
        capsys, *train(config_file, f"model.path={pipeline}", f"model.prediction_type={expected}")
    )
    assert "model.prediction_type" in line and f"'{expected}'" in line and f"'{actual}'" in line
    assert pipeline in line


# ------------------------------------------------------------------------------------------- data


def test_parquet_without_the_label_column(capsys, tmp_path, config_file):
    path = str(tmp_path / "no_label.parquet")
    table = pa.table({"caption": ["a red square"], "jpg_0": [png([255, 0, 0])], "jpg_1": [png([0, 0, 255])]})
    pq.write_table(table, path)
    line = one_error(capsys, *train(config_file, f"data.path={path}"))
    assert path in line and "'label_0'" in line and "needs caption, jpg_0, jpg_1, label_0" in line


def test_unreadable_image_names_its_row(capsys, tmp_path, config_file):
    path = str(tmp_path / "bad_image.parquet")
    rows = [(f"a red square {i}", png([10 * i, 0, 0]), png([0, 0, 10 * i]), 1.0) for i in range(5)]
    rows[3] = (rows[3][0], rows[3][1], b"\x89PNG\r\n\x1a\n truncated", 1.0)
    write_pickapic_parquet(path, rows)
    line = one_error(capsys, *train(config_file, f"data.path={path}"))
    assert f"{path} row 3: column jpg_1" in line and "not a readable image" in line


def test_jsonl_image_path_escaping_the_dataset_root(capsys, tmp_path, config_file):
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "a.png").write_bytes(png([255, 0, 0]))
    (tmp_path / "outside.png").write_bytes(png([0, 0, 255]))
    lines = [
        {"caption": "a red square", "chosen": "a.png", "rejected": "a.png"},
        {"caption": "a blue square", "chosen": "a.png", "rejected": "../outside.png"},
    ]
    jsonl = root / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(entry) + "\n" for entry in lines))
    line = one_error(capsys, *train(config_file, "data.format=jsonl", f"data.path={jsonl}"))
    assert f"{jsonl} line 2: key rejected" in line and "'../outside.png'" in line
    assert "escapes the dataset root" in line and str(root) in line


# ------------------------------------------------------------------------------------------- good run


def test_good_tiny_run_exits_zero(capsys, tmp_path, config_file):
    code, lines = run(capsys, *train(config_file, "checkpoint.every=1"))
    assert code == 0 and lines == []
    final = tmp_path / "run" / "final"
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1 and rows[-1]["loss"] == pytest.approx(0.693147, abs=1e-4)


# ------------------------------------------------------------------------------- flow models and video data


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> str:
    import tiny_flow

    return tiny_flow.save("wan", tmp_path_factory.mktemp("wan") / "pipe")


@pytest.fixture(scope="module")
def clip_pairs(tmp_path_factory) -> str:
    import tiny_flow

    return tiny_flow.write_videogen_csv(tmp_path_factory.mktemp("clips"), frames=5, size=32, rows=2)


def flow_train(pipeline: str, data: str, out, *overrides: str) -> list[str]:
    import tiny_flow

    return [
        "train",
        QUICKSTART,
        *QUICK,
        f"model.path={pipeline}",
        f"data.path={data}",
        f"output_dir={out}",
        *tiny_flow.media_overrides("wan"),
        "data.format=videogen_csv",
        "data.dimension=VQ",
        *overrides,
    ]


def test_a_video_that_cannot_be_decoded_names_its_row_and_column(capsys, tmp_path, wan_folder, clip_pairs):
    import shutil

    folder = tmp_path / "clips"
    shutil.copytree(os.path.dirname(clip_pairs), folder)
    (folder / "videos" / "1b.gif").write_bytes(b"not a video at all")
    line = one_error(capsys, *flow_train(wan_folder, str(folder / "pairs.csv"), tmp_path / "run"))
    assert "pairs.csv line 3" in line and "path_B" in line, line
    assert not (tmp_path / "run").exists(), "nothing is written before the data passed its checks"


def test_an_epsilon_unet_given_to_a_flow_run_names_the_kind(capsys, tmp_path, pixel_pipeline, clip_pairs):
    line = one_error(capsys, *flow_train(pixel_pipeline, clip_pairs, tmp_path / "run"))
    assert pixel_pipeline in line and "holds a UNet" in line and "model.kind=diffusion" in line


def test_a_transformer_folder_with_the_diffusion_kind_names_the_kind(
    capsys, tmp_path, wan_folder, pairs_parquet
):
    argv = train(
        QUICKSTART,
        f"model.path={wan_folder}",
        f"data.path={pairs_parquet}",
        f"output_dir={tmp_path / 'run'}",
    )
    line = one_error(capsys, *argv)
    assert wan_folder in line and "model.kind=flow" in line


def test_a_dimension_that_is_not_a_csv_column_lists_the_columns(capsys, tmp_path, wan_folder, clip_pairs):
    line = one_error(capsys, *flow_train(wan_folder, clip_pairs, tmp_path / "run", "data.dimension=QQ"))
    assert "QQ" in line and "VQ" in line and "MQ" in line and "pairs.csv" in line


def test_fewer_than_two_online_samples_per_prompt(capsys, tmp_path, wan_folder, clip_pairs):
    line = one_error(
        capsys,
        *flow_train(
            wan_folder, clip_pairs, tmp_path / "run", "online.enabled=true", "online.samples_per_prompt=1"
        ),
    )
    assert "`online.samples_per_prompt` must be >= 2, got 1" in line


def test_an_unknown_model_kind(capsys, config_file):
    line = one_error(capsys, *train(config_file, "model.kind=audio"))
    assert "`model.kind`" in line and "diffusion, flow" in line and "audio" in line


def test_an_unknown_recipe(capsys, config_file):
    line = one_error(capsys, *train(config_file, "recipe=ppo"))
    assert "`recipe`" in line and "preference, rwr" in line and "ppo" in line


def test_a_weighted_beta_needs_no_flow_model_but_a_logit_normal_density_does(capsys, config_file):
    line = one_error(capsys, *train(config_file, "timesteps.density=logit_normal"))
    assert "`timesteps.density`" in line and "uniform" in line


def test_an_output_dir_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, config_file):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    line = one_error(capsys, *train(config_file, f"output_dir={blocker}"))
    assert "`output_dir` must be a folder" in line and str(blocker) in line
    line = one_error(capsys, *train(config_file, f"output_dir={blocker}/run"))
    assert "cannot be created" in line and str(blocker) in line


# ------------------------------------------------------------------------------- captioned images (tpo, kto)


def captions_table(path, **columns) -> str:
    table = {"caption": ["a red circle on the left", "abstract art"], "image": [png([200, 10, 10])] * 2}
    table.update(columns)
    pq.write_table(pa.table({k: v for k, v in table.items() if v is not None}), path)
    return str(path)


def tpo_argv(pixel_pipeline, data, tmp_path, *overrides: str) -> list[str]:
    """A `mmalign train` of recipe tpo (or kto) with no config file, on the tiny pipeline."""
    config = tmp_path / "tpo.yaml"
    config.write_text("recipe: tpo\n")
    return train(
        str(config),
        f"model.path={pixel_pipeline}",
        f"data.path={data}",
        f"output_dir={tmp_path / 'run'}",
        "data.format=captions_parquet",
        *overrides,
    )


def test_a_caption_the_rules_cannot_perturb_names_its_row_when_it_fails(capsys, tmp_path, pixel_pipeline):
    data = captions_table(tmp_path / "c.parquet")
    line = one_error(
        capsys,
        *tpo_argv(pixel_pipeline, data, tmp_path, "tpo.families=[relations]", "tpo.unperturbable=fail"),
    )
    assert line == (
        f"mmalign: error: {data} row 1: column caption: caption 'abstract art' cannot be perturbed by the "
        "families relations (tpo.unperturbable: fail; use skip to leave such rows out)"
    )


def test_a_caption_the_rules_cannot_perturb_is_skipped_and_reported(capsys, tmp_path, pixel_pipeline):
    data = captions_table(tmp_path / "c.parquet")
    code = main(tpo_argv(pixel_pipeline, data, tmp_path, "tpo.families=[relations]"))
    out = capsys.readouterr().out
    assert code == 0
    assert (
        f"skipped 1 of 2 captions no rule of relations can perturb (first: {data} row 1: column caption: "
        "'abstract art')" in out
    )


def test_a_dataset_without_captions(capsys, tmp_path, pixel_pipeline):
    data = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a red circle"], "image": [png([1, 2, 3])]}), data)
    line = one_error(capsys, *tpo_argv(pixel_pipeline, str(data), tmp_path))
    assert line == (
        f"mmalign: error: data.path: {data} has no column 'caption' (columns: text, image; captioned images "
        "need caption and image)"
    )


def test_a_label_column_that_is_not_boolean(capsys, tmp_path, pixel_pipeline):
    data = captions_table(tmp_path / "l.parquet", label=[1.0, 0.25])
    line = one_error(capsys, *tpo_argv(pixel_pipeline, data, tmp_path, "recipe=kto"))
    assert line == (
        f"mmalign: error: {data} row 1: column label is 0.25; accepted: true / false or 1 / 0 "
        "(1: desirable, 0: undesirable)"
    )


def test_pair_data_given_to_the_tpo_recipe_names_the_formats(capsys, tmp_path, pixel_pipeline, pairs_parquet):
    line = one_error(capsys, *tpo_argv(pixel_pipeline, pairs_parquet, tmp_path, "data.format=pickapic"))
    assert line == (
        "mmalign: error: `data.format` 'pickapic' does not hold captioned images; recipe tpo reads "
        "captions_parquet or captions_jsonl (caption, image)"
    )


def test_caption_dropout_with_tdpo_is_refused(capsys, tmp_path, pixel_pipeline):
    data = captions_table(tmp_path / "c.parquet")
    line = one_error(capsys, *tpo_argv(pixel_pipeline, data, tmp_path, "data.caption_dropout=0.2"))
    assert "`data.caption_dropout` 0.2 applies to loss sft only in recipe tpo" in line


def test_an_llm_perturber_without_a_model_folder(capsys, tmp_path, pixel_pipeline):
    data = captions_table(tmp_path / "c.parquet")
    line = one_error(
        capsys,
        *tpo_argv(pixel_pipeline, data, tmp_path, "tpo.perturber=llm", f"tpo.llm_path={tmp_path}/no-lm"),
    )
    assert line == (
        f"mmalign: error: `tpo.llm_path` must be a local causal LM folder, got '{tmp_path}/no-lm' (command line): "
        "not found"
    )


def test_an_unknown_perturbation_family(capsys, tmp_path, pixel_pipeline):
    data = captions_table(tmp_path / "c.parquet")
    line = one_error(capsys, *tpo_argv(pixel_pipeline, data, tmp_path, "tpo.families=[attributes,colour]"))
    assert line == (
        "mmalign: error: `tpo.families` must be a non-empty list of content, attributes, relations, context, "
        "got ['attributes', 'colour']"
    )
