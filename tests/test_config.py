"""Strict config loading: every problem reported together, with key path and origin."""

import pytest
from conftest import TOY

from mmalign.config import TrainConfig, describe, load_config, to_yaml
from mmalign.errors import UserError


def write(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_quickstart_recipe():
    cfg = load_config(None, [TOY])
    assert isinstance(cfg, TrainConfig)
    assert cfg.loss.name == "dpo" and cfg.loss.beta == 5000.0  # Diffusion-DPO's official SD 1.5 β
    assert cfg.lora.enabled and cfg.lora.rank == 8


def test_yaml_values_and_overrides_merge(tmp_path):
    path = write(tmp_path, "loss:\n  beta: 2500\noptim:\n  lr: 1.0e-4\n")
    cfg = load_config(path, [TOY, "optim.lr=3e-4", "lora.target_modules=[to_q,to_v]"])
    assert cfg.loss.beta == 2500.0 and isinstance(cfg.loss.beta, float)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.lora.target_modules == ["to_q", "to_v"]


def test_all_errors_reported_together_with_origin(tmp_path):
    path = write(tmp_path, "loss:\n  beta: -1\n  bogus: 2\noptim:\n  lr: abc\n")
    with pytest.raises(UserError) as info:
        load_config(path, [TOY, "model.prediction_type=x0", "lora.rank=0"])
    lines = str(info.value).splitlines()
    assert len(lines) == 5
    assert any("`loss.beta` must be > 0, got -1" in line and path in line for line in lines)
    assert any("unknown key `loss.bogus`" in line and "accepted: beta" in line for line in lines)
    assert any("`optim.lr` must be a number, got 'abc'" in line for line in lines)
    assert any("`model.prediction_type`" in line and "command line" in line for line in lines)
    assert any("`lora.rank` must be > 0, got 0" in line for line in lines)


def test_bool_is_not_an_int_and_sections_must_be_mappings(tmp_path):
    path = write(tmp_path, "optim:\n  max_steps: true\nloss: 3\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    text = str(info.value)
    assert "`optim.max_steps` must be an integer, got True" in text
    assert "`loss` must be a section" in text


def test_missing_paths_reported_when_the_toy_world_does_not_build_them(tmp_path):
    with pytest.raises(UserError) as info:
        load_config(
            None, ["toy.enabled=false", f"model.path={tmp_path}/none", f"data.path={tmp_path}/x.parquet"]
        )
    text = str(info.value)
    assert "`model.path` must be a pipeline folder" in text and "`data.path`" in text
    # the toy world builds its own base and pairs inside output_dir, only when asked for
    out = tmp_path / "run"
    load_config(None, ["toy.enabled=true", f"output_dir={out}", f"data.path={out}/data/pairs.parquet"])
    with pytest.raises(UserError, match="`model.path`.*the toy world builds only its own"):
        load_config(None, ["toy.enabled=true", f"model.path={tmp_path}/none", f"output_dir={out}"])
    with pytest.raises(UserError, match="`data.path`.*inside output_dir"):
        load_config(None, ["toy.enabled=true", f"data.path={tmp_path}/x.parquet", f"output_dir={out}"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, [TOY, "loss.beta=123", "data.ties=keep"])
    path = write(tmp_path, to_yaml(cfg))
    assert load_config(path) == cfg


def test_describe_documents_every_key():
    lines = describe()
    assert any(line.startswith("loss.beta = 5000.0") for line in lines)
    assert all("#" in line and line.split("#", 1)[1].strip() for line in lines)
