"""Offline preference-pair readers: Pick-a-Pic parquet, load_from_disk, JSONL, and image tensors."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmalign.data import (
    PairDataset,
    collate_pairs,
    load_image,
    read_hf_disk,
    read_jsonl,
    read_pairs,
    read_pickapic_parquet,
    to_tensor,
    validate_images,
    write_pickapic_parquet,
)
from mmalign.errors import UserError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def png(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_of(src: bytes | str) -> tuple[int, int, int]:
    return load_image(src, where="test").getpixel((0, 0))


# --- Pick-a-Pic parquet ---------------------------------------------------------------------------------


def test_parquet_round_trip_flips_label_0_and_handles_ties(tmp_path):
    path = str(tmp_path / "train.parquet")
    rows = [
        ("a red thing", png(RED), png(BLUE), 1.0),
        ("flipped", png(RED), png(BLUE), 0.0),
        ("a tie", png(GREEN), png(BLUE), 0.5),
        ("last", png(GREEN), png(RED), 1.0),
    ]
    write_pickapic_parquet(path, rows)
    assert pq.read_schema(path).types == [pa.string(), pa.binary(), pa.binary(), pa.float64()]

    dropped = read_pickapic_parquet(path, ties="drop")
    assert [r.row for r in dropped] == [0, 1, 3]
    assert [r.caption for r in dropped] == ["a red thing", "flipped", "last"]
    assert [r.label for r in dropped] == [1.0, 1.0, 1.0]
    assert dropped[0].chosen == rows[0][1] and dropped[0].rejected == rows[0][2]
    # label_0 = 0: jpg_1 was preferred, so chosen holds exactly the jpg_1 bytes.
    assert dropped[1].chosen == rows[1][2] and dropped[1].rejected == rows[1][1]
    assert (dropped[1].chosen_column, dropped[1].rejected_column) == ("jpg_1", "jpg_0")
    assert all(r.source == path for r in dropped)

    kept = read_pickapic_parquet(path, ties="keep")
    assert [r.row for r in kept] == [0, 1, 2, 3]
    assert kept[2].label == 0.5
    assert colour_of(kept[2].chosen) == GREEN and colour_of(kept[2].rejected) == BLUE


def test_parquet_with_hf_style_image_structs(tmp_path):
    path = str(tmp_path / "hf.parquet")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "caption": pa.array(["x", "y"]),
            "jpg_0": pa.array(
                [{"bytes": png(RED), "path": None}, {"bytes": png(GREEN), "path": "g.png"}], image
            ),
            "jpg_1": pa.array([{"bytes": png(BLUE), "path": None}, {"bytes": png(RED), "path": None}], image),
            "label_0": pa.array([1.0, 0.0]),
            "model_0": pa.array(["sdxl", "sd15"]),
        }
    )
    pq.write_table(table, path)
    records = read_pickapic_parquet(path)
    assert [colour_of(r.chosen) for r in records] == [RED, RED]
    assert [colour_of(r.rejected) for r in records] == [BLUE, GREEN]


def test_parquet_folder_and_glob_of_shards(tmp_path):
    folder = tmp_path / "shards"
    write_pickapic_parquet(str(folder / "train-00000.parquet"), [("a", png(RED), png(BLUE), 1.0)])
    write_pickapic_parquet(str(folder / "train-00001.parquet"), [("b", png(RED), png(BLUE), 1.0)] * 2)
    from_folder = read_pickapic_parquet(str(folder))
    assert [(os.path.basename(r.source), r.row) for r in from_folder] == [
        ("train-00000.parquet", 0),
        ("train-00001.parquet", 0),
        ("train-00001.parquet", 1),
    ]
    assert len(read_pickapic_parquet(str(folder / "*-00001.parquet"))) == 2


def test_parquet_missing_label_column_names_file_and_columns(tmp_path):
    path = str(tmp_path / "train.parquet")
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [png(RED)], "jpg_1": [png(BLUE)]}), path)
    with pytest.raises(UserError) as err:
        read_pickapic_parquet(path)
    message = str(err.value)
    assert path in message and "'label_0'" in message
    assert "columns: caption, jpg_0, jpg_1;" in message
    assert "needs caption, jpg_0, jpg_1, label_0" in message
    assert "\n" not in message


def test_parquet_bad_label_value_and_missing_file(tmp_path):
    path = str(tmp_path / "train.parquet")
    write_pickapic_parquet(path, [("x", png(RED), png(BLUE), 1.0)])
    table = pq.read_table(path)
    table = pa.concat_tables([table, table.set_column(3, "label_0", pa.array([2.0]))])
    pq.write_table(table, path)
    with pytest.raises(
        UserError, match=r"train\.parquet row 1: column label_0 is 2\.0; accepted: 1 .* 0 .* 0\.5"
    ):
        read_pickapic_parquet(path)
    with pytest.raises(UserError, match="nope.parquet does not exist"):
        read_pickapic_parquet(str(tmp_path / "nope.parquet"))


def test_unreadable_image_in_row_2_is_named_by_validate_and_getitem(tmp_path):
    path = str(tmp_path / "train.parquet")
    rows = [
        ("ok", png(RED), png(BLUE), 1.0),
        ("ok", png(RED), png(BLUE), 1.0),
        ("bad", png(RED), b"junk", 1.0),
    ]
    write_pickapic_parquet(path, rows)
    records = read_pickapic_parquet(path)
    expected = f"{path} row 2: column jpg_1: not a readable image (cannot identify image file)"
    with pytest.raises(UserError) as err:
        validate_images(records)
    assert str(err.value) == expected
    dataset = PairDataset(records, resolution=8)
    assert dataset[1]["chosen"].shape == (3, 8, 8)
    with pytest.raises(UserError) as err:
        dataset[2]
    assert str(err.value) == expected


def test_unreadable_image_in_flipped_pair_names_its_own_column(tmp_path):
    path = str(tmp_path / "train.parquet")
    write_pickapic_parquet(path, [("ok", png(RED), png(BLUE), 1.0), ("bad", png(RED), b"junk", 0.0)])
    with pytest.raises(UserError, match=r"row 1: column jpg_1: not a readable image"):
        validate_images(read_pickapic_parquet(path))


# --- datasets.load_from_disk ----------------------------------------------------------------------------


def test_hf_disk_with_image_features_and_bytes_columns(tmp_path):
    import datasets

    columns = {
        "caption": ["keep", "flip", "tie"],
        "jpg_0": [png(RED), png(RED), png(GREEN)],
        "jpg_1": [png(BLUE), png(BLUE), png(BLUE)],
        "label_0": [1.0, 0.0, 0.5],
    }
    image_features = datasets.Features(
        {
            "caption": datasets.Value("string"),
            "jpg_0": datasets.Image(),
            "jpg_1": datasets.Image(),
            "label_0": datasets.Value("float64"),
        }
    )
    datasets.Dataset.from_dict(columns, features=image_features).save_to_disk(str(tmp_path / "images"))
    records = read_hf_disk(str(tmp_path / "images"))
    assert [r.row for r in records] == [0, 1]
    assert records[1].chosen == columns["jpg_1"][1] and records[1].rejected == columns["jpg_0"][1]

    plain = datasets.Dataset.from_dict(columns)  # jpg_* inferred as binary values
    datasets.DatasetDict({"train": plain, "test": plain.select([2])}).save_to_disk(str(tmp_path / "dict"))
    assert len(read_hf_disk(str(tmp_path / "dict"))) == 2
    ties = read_hf_disk(str(tmp_path / "dict"), split="test", ties="keep")
    assert [(r.label, colour_of(r.chosen)) for r in ties] == [(0.5, GREEN)]
    assert ties[0].source.endswith("dict split test")
    with pytest.raises(UserError, match=r"no split 'valid' \(splits: train, test\)"):
        read_hf_disk(str(tmp_path / "dict"), split="valid")


def test_hf_disk_rejects_a_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=f"{tmp_path} is not a dataset written by save_to_disk"):
        read_hf_disk(str(tmp_path))


# --- JSONL + image folder -------------------------------------------------------------------------------


def write_jsonl(path, entries: list) -> str:
    lines = [entry if isinstance(entry, str) else json.dumps(entry) for entry in entries]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    (root / "img" / "red.png").write_bytes(png(RED))
    (root / "img" / "blue.png").write_bytes(png(BLUE))
    (tmp_path / "outside.png").write_bytes(png(GREEN))
    return root


def test_jsonl_happy_path_with_ties(image_folder):
    path = write_jsonl(
        image_folder / "pairs.jsonl",
        [
            {"caption": "red wins", "chosen": "img/red.png", "rejected": "img/blue.png"},
            "",
            {"caption": "a tie", "chosen": "img/blue.png", "rejected": "img/red.png", "label": 0.5},
        ],
    )
    records = read_jsonl(path)
    assert len(records) == 1
    assert records[0].chosen == os.path.realpath(image_folder / "img" / "red.png")
    assert (records[0].row, records[0].label) == (1, 1.0)
    kept = read_pairs("jsonl", path, ties="keep")
    assert [(r.row, r.label) for r in kept] == [(1, 1.0), (3, 0.5)]
    item = PairDataset(kept, resolution=4)[1]
    assert item["chosen"][2].eq(1).all() and item["rejected"][0].eq(1).all()


def test_jsonl_paths_outside_the_root_are_refused(image_folder, tmp_path):
    outside = str(tmp_path / "outside.png")
    for line, bad in [("line 2", "../outside.png"), ("line 2", outside)]:
        path = write_jsonl(
            image_folder / "pairs.jsonl",
            [
                {"caption": "ok", "chosen": "img/red.png", "rejected": "img/blue.png"},
                {"caption": "bad", "chosen": "img/red.png", "rejected": bad},
            ],
        )
        with pytest.raises(UserError) as err:
            read_jsonl(path)
        message = str(err.value)
        assert f"pairs.jsonl {line}: key rejected" in message and repr(bad) in message
        assert f"escapes the dataset root {os.path.realpath(image_folder)}" in message
    # An absolute path is fine while it stays inside the root.
    inside = str(image_folder / "img" / "blue.png")
    path = write_jsonl(
        image_folder / "pairs.jsonl", [{"caption": "ok", "chosen": "img/red.png", "rejected": inside}]
    )
    assert read_jsonl(path)[0].rejected == os.path.realpath(inside)


def test_jsonl_missing_image_bad_json_and_missing_key(image_folder):
    good = {"caption": "ok", "chosen": "img/red.png", "rejected": "img/blue.png"}
    cases = [
        ({**good, "chosen": "img/gone.png"}, r"line 2: key chosen: image 'img/gone.png' not found"),
        ('{"caption": "x", "chosen": ', r"line 2: not valid JSON \(Expecting value at column 29\)"),
        (
            {"caption": "ok", "chosen": "img/red.png"},
            r"line 2: missing key 'rejected' \(needs caption, chosen",
        ),
        ({**good, "label": 0.0}, r"line 2: key label is 0\.0; accepted: 1\.0 .* or 0\.5"),
    ]
    for entry, pattern in cases:
        path = write_jsonl(image_folder / "pairs.jsonl", [good, entry])
        with pytest.raises(UserError, match=pattern):
            read_jsonl(path)


# --- image tensors, batches and dispatch ----------------------------------------------------------------


def test_to_tensor_exact_values_for_solid_red():
    tensor = to_tensor(Image.new("RGB", (6, 6), RED), 6)
    assert tensor.shape == (3, 6, 6) and tensor.dtype == torch.float32
    assert tensor[0].eq(1.0).all() and tensor[1:].eq(-1.0).all()


def test_to_tensor_resizes_shorter_side_and_centre_crops():
    image = Image.new("RGB", (16, 8), RED)
    image.paste(Image.new("RGB", (8, 8), GREEN), (4, 0))
    cropped = to_tensor(image, 8)  # shorter side already 8: only the centre crop applies
    assert cropped[1].eq(1.0).all() and cropped[0].eq(-1.0).all()
    smaller = to_tensor(Image.effect_noise((40, 24), 64).convert("RGB"), 12)
    assert smaller.shape == (3, 12, 12)
    assert smaller.min() >= -1.0 and smaller.max() <= 1.0


def test_collate_pairs_batches_a_dataloader(tmp_path):
    path = str(tmp_path / "train.parquet")
    write_pickapic_parquet(path, [(f"c{i}", png(RED, (10, 8)), png(BLUE), 1.0) for i in range(3)])
    dataset = PairDataset(read_pairs("pickapic", path), resolution=4)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_pairs)))
    assert batch["captions"] == ["c0", "c1", "c2"]
    assert batch["chosen"].shape == batch["rejected"].shape == (3, 3, 4, 4)
    assert batch["label"].dtype == torch.float32 and batch["label"].tolist() == [1.0, 1.0, 1.0]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [0, 1, 2]


def test_read_pairs_rejects_unknown_format_bad_ties_and_empty_data(tmp_path):
    with pytest.raises(
        UserError, match=r"data\.format must be one of pickapic, hf_disk, jsonl, videogen_csv, got 'csv'"
    ):
        read_pairs("csv", str(tmp_path))
    with pytest.raises(UserError, match=r"data\.ties must be one of 'drop', 'keep', got 'maybe'"):
        read_pairs("pickapic", str(tmp_path), ties="maybe")
    path = str(tmp_path / "ties.parquet")
    write_pickapic_parquet(path, [("tie", png(RED), png(BLUE), 0.5)])
    with pytest.raises(UserError, match="holds no preference pairs"):
        read_pairs("pickapic", path)
    with pytest.raises(UserError, match="data.resolution must be a positive integer, got 0"):
        PairDataset([], resolution=0)
