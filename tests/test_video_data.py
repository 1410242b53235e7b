"""Video decoding and writing (GIF, MP4, comparison grids) and the VideoGen-RewardBench CSV pair reader."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.video import load_video, write_gif, write_mp4, write_video_grid
from mmalign.data.videogen import read_videogen_csv
from mmalign.errors import UserError

FRAMES, HEIGHT, WIDTH, SIDE = 6, 20, 24, 6


def moving_square() -> np.ndarray:
    """(F, H, W, 3) uint8: a white 6x6 square on black, rows 7..12, left edge at x = 2 + 3t in frame t."""
    frames = np.zeros((FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)
    for t in range(FRAMES):
        frames[t, 7 : 7 + SIDE, 2 + 3 * t : 2 + 3 * t + SIDE] = 255
    return frames


def square_centre(frame: torch.Tensor) -> tuple[float, float]:
    """(row, column) centroid of the bright pixels of one (3, H, W) frame in [-1, 1]."""
    rows, cols = torch.nonzero(frame.mean(0) > 0, as_tuple=True)
    return rows.float().mean().item(), cols.float().mean().item()


def expected_centre(t: int, crop_left: int) -> tuple[float, float]:
    """The square spans rows 7..12 (centre 9.5) and columns 2+3t..7+3t (centre 4.5+3t) before the crop."""
    return 9.5, 4.5 + 3 * t - crop_left


# --- decoding -------------------------------------------------------------------------------------------


def test_gif_round_trip_is_exact_and_centre_crops_to_the_shorter_side(tmp_path):
    path = str(tmp_path / "clips" / "square.gif")  # the writer creates the folder
    write_gif(path, moving_square())
    video = load_video(path, num_frames=FRAMES, resolution=HEIGHT, where="test")
    assert video.shape == (3, FRAMES, HEIGHT, HEIGHT) and video.dtype == torch.float32
    # 24 -> 20 wide: the shorter side is already 20, so only the centre crop (2 columns each side) applies.
    expected = torch.from_numpy(moving_square()[:, :, 2:22]).permute(3, 0, 1, 2).float() / 127.5 - 1.0
    assert torch.equal(video, expected)
    assert video.min() == -1.0 and video.max() == 1.0


def test_mp4_round_trip_keeps_the_square_within_a_pixel(tmp_path):
    path = str(tmp_path / "square.mp4")
    write_mp4(path, moving_square())
    video = load_video(path, num_frames=FRAMES, resolution=HEIGHT, where="test")
    assert video.shape == (3, FRAMES, HEIGHT, HEIGHT)
    assert video.min() >= -1.0 and video.max() <= 1.0
    for t in range(FRAMES):
        assert square_centre(video[:, t]) == pytest.approx(expected_centre(t, crop_left=2), abs=1.0)


def test_frame_stride_picks_every_other_frame(tmp_path):
    path = str(tmp_path / "square.mp4")
    write_mp4(path, moving_square())
    video = load_video(path, num_frames=3, resolution=HEIGHT, frame_stride=2, where="test")
    assert video.shape == (3, 3, HEIGHT, HEIGHT)
    for index, t in enumerate([0, 2, 4]):
        assert square_centre(video[:, index]) == pytest.approx(expected_centre(t, crop_left=2), abs=1.0)


def test_resolution_resizes_every_frame_like_to_tensor(tmp_path):
    path = str(tmp_path / "square.gif")
    write_gif(path, moving_square())
    video = load_video(path, num_frames=2, resolution=10, where="test")
    assert video.shape == (3, 2, 10, 10)
    from mmalign.data.images import to_tensor

    assert torch.equal(video[:, 1], to_tensor(Image.fromarray(moving_square()[1]), 10))


def test_gif_with_transparent_frames_still_gives_rgb(tmp_path):
    path = str(tmp_path / "alpha.gif")
    colours = [(255, 0, 0, 0), (0, 255, 0, 255), (0, 0, 255, 255)]
    frames = [Image.new("RGBA", (8, 6), colour) for colour in colours]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    video = load_video(path, num_frames=3, resolution=6, where="test")
    assert video.shape == (3, 3, 6, 6)
    assert video[:, 2].mean(dim=(1, 2)).tolist() == [-1.0, -1.0, 1.0]  # the last frame is pure blue


def test_float_frames_and_scale_write_the_same_clip_bigger(tmp_path):
    floats = torch.from_numpy(moving_square()).permute(3, 0, 1, 2).float() / 255  # (3, F, H, W)
    path = str(tmp_path / "big.gif")
    write_gif(path, floats, scale=2)
    video = load_video(path, num_frames=FRAMES, resolution=2 * HEIGHT, where="test")
    assert video.shape == (3, FRAMES, 2 * HEIGHT, 2 * HEIGHT)
    assert square_centre(video[:, 3]) == (19.5, 2 * (4.5 + 9) + 0.5 - 4)  # doubled, crop of 4 columns


def test_mp4_pads_odd_sides_with_the_last_row_and_column(tmp_path):
    odd = moving_square()[:, :19, :23]
    path = str(tmp_path / "odd.mp4")
    write_mp4(path, odd)
    import imageio.v3 as iio

    frames = iio.imread(path, index=None, plugin="FFMPEG")
    assert frames.shape == (FRAMES, 20, 24, 3)


def test_too_few_frames_names_the_video_and_the_count(tmp_path):
    path = str(tmp_path / "square.gif")
    write_gif(path, moving_square())
    with pytest.raises(UserError) as err:
        load_video(
            path, num_frames=4, resolution=HEIGHT, frame_stride=2, where="bench.csv line 3: column path_A"
        )
    message = str(err.value)
    assert message.startswith("bench.csv line 3: column path_A: video ")
    assert "has 6 frames; needs at least 7 (4 frames at frame_stride 2)" in message
    assert "\n" not in message


def test_corrupt_and_missing_files_name_where_and_the_path(tmp_path):
    corrupt = tmp_path / "broken.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(2000))
    for path in (str(corrupt), str(tmp_path / "gone.mp4")):
        with pytest.raises(UserError) as err:
            load_video(path, num_frames=1, resolution=8, where="bench.csv line 2: column path_B")
        message = str(err.value)
        assert message.startswith(f"bench.csv line 2: column path_B: not a readable video {path} (")
        assert "\n" not in message


def test_missing_imageio_asks_for_the_video_extra(tmp_path, monkeypatch):
    path = str(tmp_path / "square.gif")
    write_gif(path, moving_square())  # GIF writing needs Pillow only
    monkeypatch.setitem(sys.modules, "imageio", None)
    monkeypatch.setitem(sys.modules, "imageio.v3", None)
    expected = 'video decoding needs the video extra: pip install -e ".[video]"'
    with pytest.raises(UserError) as err:
        load_video(path, num_frames=1, resolution=8, where="test")
    assert str(err.value) == expected
    with pytest.raises(UserError, match="needs the video extra"):
        write_mp4(str(tmp_path / "x.mp4"), moving_square())


def test_bad_num_frames_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"test: num_frames must be a positive integer, got 0"):
        load_video(str(tmp_path / "x.gif"), num_frames=0, resolution=8, where="test")


# --- comparison grid ------------------------------------------------------------------------------------


def grid_columns(frames: int = 3) -> dict[str, torch.Tensor]:
    """Two models x two videos of (3, F, 8, 10); model m, video n, frame t is grey (40m + 20n + 60t) / 255."""
    columns = {}
    for m, name in enumerate(["base", "aligned"]):
        videos = torch.zeros(2, 3, frames, 8, 10)
        for n in range(2):
            for t in range(frames):
                videos[n, :, t] = (40 * m + 20 * n + 60 * t) / 255
        columns[name] = videos
    return columns


def test_video_grid_gif_has_every_frame_and_the_grid_size(tmp_path):
    path = str(tmp_path / "eval" / "grid.gif")
    write_video_grid(path, grid_columns(), ["a cat", "a dog"], scale=4)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        assert gif.size == (220 + 2 * 10 * 4, 16 + 2 * 8 * 4)  # (width, height)
        gif.seek(2)
        frame = gif.convert("RGB")
    # aligned (column 1), video 1 (row 1), frame 2: grey 40 + 20 + 120 = 180, tiles start at x 260, y 48.
    assert frame.getpixel((220 + 40 + 5, 16 + 32 + 5)) == (180, 180, 180)
    assert frame.getpixel((220 + 5, 16 + 5)) == (120, 120, 120)  # base, video 0, frame 2


def test_video_grid_mp4_and_bad_extension(tmp_path):
    path = str(tmp_path / "grid.mp4")
    write_video_grid(path, grid_columns(frames=2), ["a cat", "a dog"], scale=2)
    import imageio.v3 as iio

    assert iio.imread(path, index=None, plugin="FFMPEG").shape == (2, 16 + 32, 220 + 40, 3)
    with pytest.raises(UserError, match=r"grid\.png must end in \.gif or \.mp4, got '\.png'"):
        write_video_grid(str(tmp_path / "grid.png"), grid_columns(), ["a", "b"])


# --- VideoGen-RewardBench CSV ---------------------------------------------------------------------------

HEADER = "prompt,path_A,path_B,A_model,VQ,MQ,TA"
# Votes per line (line 1 is the header). Weights VQ 0.1, MQ 0.2, TA 0.3 give:
#   line 2: A, A, B       ->  0.1 + 0.2 - 0.3 = 0   tie (exact within rounding: 5.6e-17 in floats)
#   line 3: B, same, A    -> -0.1 + 0   + 0.3 = 0.2 A chosen
#   line 4: A, B, B       ->  0.1 - 0.2 - 0.3 = -0.4 B chosen
#   line 5: same x 3      ->  0                     tie
#   line 6: b, a, Same    -> -0.1 + 0.2 + 0   = 0.1 A chosen (cells are case-insensitive)
# MQ alone: A, same, B, same, a -> lines 2 (A), 4 (B), 6 (A); ties on lines 3 and 5.
VOTES = [("A", "A", "B"), ("B", "same", "A"), ("A", "B", "B"), ("same", "same", "same"), ("b", "a", "Same")]
WEIGHTS = {"VQ": 0.1, "MQ": 0.2, "TA": 0.3}


def write_bench(folder, rows: list[str] | None = None) -> str:
    """A CSV plus empty video files videos/{i}_a.mp4 and videos/{i}_b.mp4 for the rows of VOTES."""
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = []
        for i, (vq, mq, ta) in enumerate(VOTES, start=1):
            for side in "ab":
                (folder / "videos" / f"{i}_{side}.mp4").write_bytes(b"")
            rows.append(f"prompt {i},videos/{i}_a.mp4,videos/{i}_b.mp4,model-x,{vq},{mq},{ta}")
    path = folder / "bench.csv"
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return str(path)


def video(folder, name: str) -> str:
    return os.path.realpath(folder / "videos" / name)


def summary(records) -> list[tuple[int, str, str, str, float]]:
    """(line, prompt, chosen file, chosen column, label) per record."""
    return [(r.row, r.caption, os.path.basename(r.chosen), r.chosen_column, r.label) for r in records]


def test_one_dimension_orients_pairs_and_drops_ties(tmp_path):
    path = write_bench(tmp_path)
    records = read_videogen_csv(path, video_root=None, dimension="MQ")
    assert summary(records) == [
        (2, "prompt 1", "1_a.mp4", "path_A", 1.0),
        (4, "prompt 3", "3_b.mp4", "path_B", 1.0),
        (6, "prompt 5", "5_a.mp4", "path_A", 1.0),
    ]
    assert records[1].rejected == video(tmp_path, "3_a.mp4") and records[1].rejected_column == "path_A"
    assert records[0].chosen == video(tmp_path, "1_a.mp4") and os.path.isabs(records[0].chosen)
    assert all(r.source == path and r.row_unit == "line" for r in records)


def test_weighted_mix_with_ties_dropped_and_kept(tmp_path):
    path = write_bench(tmp_path)
    dropped = read_videogen_csv(path, video_root=None, weights=WEIGHTS)
    assert summary(dropped) == [
        (3, "prompt 2", "2_a.mp4", "path_A", 1.0),
        (4, "prompt 3", "3_b.mp4", "path_B", 1.0),
        (6, "prompt 5", "5_a.mp4", "path_A", 1.0),
    ]
    kept = read_videogen_csv(path, video_root=str(tmp_path), weights=WEIGHTS, ties="keep")
    assert [(r.row, r.label) for r in kept] == [(2, 0.5), (3, 1.0), (4, 1.0), (5, 0.5), (6, 1.0)]
    tie = kept[0]  # a tie keeps the file's order: A as chosen
    assert (tie.chosen, tie.rejected) == (video(tmp_path, "1_a.mp4"), video(tmp_path, "1_b.mp4"))


def test_bad_vote_names_line_column_value_and_accepted(tmp_path):
    rows = [f"p,videos/{i}_a.mp4,videos/{i}_b.mp4,m,A,A,A" for i in (1, 2)] + ["p,x.mp4,y.mp4,m,A,B,maybe"]
    (tmp_path / "videos").mkdir()
    for name in ("1_a", "1_b", "2_a", "2_b"):
        (tmp_path / "videos" / f"{name}.mp4").write_bytes(b"")
    path = write_bench(tmp_path, rows)
    with pytest.raises(UserError) as err:
        read_videogen_csv(path, video_root=None, weights={"MQ": 1, "TA": 1})
    assert str(err.value) == f"{path} line 4: column TA is 'maybe'; accepted: A, B or same (any case)"
    # Columns that are not weighted are never read.
    with pytest.raises(UserError, match="line 4: column path_A: video 'x.mp4' not found"):
        read_videogen_csv(path, video_root=None, dimension="MQ")


def test_unknown_dimension_or_weight_key_lists_the_columns(tmp_path):
    path = write_bench(tmp_path)
    columns = "columns: prompt, path_A, path_B, A_model, VQ, MQ, TA"
    with pytest.raises(UserError) as err:
        read_videogen_csv(path, video_root=None, dimension="Overall")
    assert str(err.value) == f"data.dimension: {path} has no column 'Overall' ({columns})"
    with pytest.raises(UserError, match=rf"data\.weights: .* has no column 'vq' \({columns}\)"):
        read_videogen_csv(path, video_root=None, weights={"vq": 1.0})


def test_dimension_and_weights_are_exclusive_and_weights_numeric(tmp_path):
    path = write_bench(tmp_path)
    with pytest.raises(UserError, match="give exactly one of data.dimension .* or data.weights"):
        read_videogen_csv(path, video_root=None)
    with pytest.raises(UserError, match="give exactly one of data.dimension"):
        read_videogen_csv(path, video_root=None, dimension="VQ", weights={"VQ": 1.0})
    with pytest.raises(UserError, match=r"data\.weights\.TA must be a finite number, got 'high'"):
        read_videogen_csv(path, video_root=None, weights={"VQ": 1.0, "TA": "high"})


def test_missing_required_column_names_file_and_columns(tmp_path):
    path = tmp_path / "bench.csv"
    path.write_text("prompt,path_A,VQ\np,a.mp4,A\n")
    with pytest.raises(UserError) as err:
        read_videogen_csv(str(path), video_root=None, dimension="VQ")
    message = str(err.value)
    assert f"{path} has no column 'path_B'" in message
    assert "(columns: prompt, path_A, VQ; needs path_A, path_B, prompt" in message


def test_video_paths_outside_the_root_are_refused(tmp_path):
    root = tmp_path / "bench"
    (root / "videos").mkdir(parents=True)
    (root / "videos" / "a.mp4").write_bytes(b"")
    (tmp_path / "outside.mp4").write_bytes(b"")
    for bad in ("../outside.mp4", str(tmp_path / "outside.mp4")):
        path = write_bench(root, ["p,videos/a.mp4,videos/a.mp4,m,A,A,A", f"p,videos/a.mp4,{bad},m,A,A,A"])
        with pytest.raises(UserError) as err:
            read_videogen_csv(path, video_root=None, dimension="VQ")
        message = str(err.value)
        assert f"bench.csv line 3: column path_B: path {bad!r} escapes the dataset root" in message
        assert os.path.realpath(root) in message


def test_missing_video_and_blank_lines(tmp_path):
    path = write_bench(tmp_path)
    with open(path, "a") as handle:
        handle.write("\np,videos/1_a.mp4,videos/gone.mp4,m,A,A,A\n")
    with pytest.raises(UserError) as err:
        read_videogen_csv(path, video_root=None, dimension="VQ")
    expected = f"{path} line 8: column path_B: video 'videos/gone.mp4' not found (looked for "
    assert str(err.value).startswith(expected)  # line 7 is blank and skipped, not counted as a row
