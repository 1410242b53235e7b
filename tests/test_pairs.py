"""Best-vs-worst pair construction and the toy world's Pick-a-Pic pair file."""

import io

import numpy as np
import torch
from PIL import Image

from mmalign.adapters import diffusion
from mmalign.data import read_pairs
from mmalign.data.pickapic import write_pickapic_parquet
from mmalign.pairs import best_and_worst, sample_best_worst_pairs
from mmalign.pairs.best_worst import png_bytes
from mmalign.rewards import build_reward
from mmalign.toy import shapes


def test_best_and_worst_per_group():
    rewards = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [0.7, 0.2, 0.8]])
    best, worst, distinct = best_and_worst(rewards)
    assert best.tolist() == [1, 0, 2]
    assert worst.tolist() == [0, 0, 1]
    assert distinct.tolist() == [True, False, True]


def test_png_bytes_are_lossless():
    image = torch.rand(3, 16, 16)
    decoded = np.asarray(Image.open(io.BytesIO(png_bytes(image))))
    expected = (image.permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.array_equal(decoded, expected)


def test_sampled_pairs_prefer_the_higher_reward_through_the_real_reader(pixel_pipeline, tmp_path):
    components = diffusion.load_components(pixel_pipeline)
    reward = build_reward("toy_shapes")
    prompts = shapes.prompts("train")[:3]
    rows = sample_best_worst_pairs(
        components,
        prompts,
        reward,
        samples_per_group=3,
        groups_per_prompt=2,
        first_seed=7,
        steps=2,
        guidance_scale=1.0,
    )
    assert 0 < len(rows) <= 6
    assert {label for *_, label in rows} <= {0.0, 1.0}
    path = str(tmp_path / "pairs.parquet")
    write_pickapic_parquet(path, rows)
    records = read_pairs("pickapic", path)
    for record in records:
        chosen, rejected = (
            torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)[None]
            / 255.0
            for b in (record.chosen, record.rejected)
        )
        assert float(reward(chosen, [record.caption])) > float(reward(rejected, [record.caption]))
