"""Decode preference videos into model-ready tensors, and write clips and side-by-side grids as GIF or MP4.

Decoding goes through imageio (the ``video`` extra): GIF with its Pillow plugin, MP4 with imageio-ffmpeg.
Every frame is resized and centre-cropped exactly as :func:`mmalign.data.images.to_tensor` treats an image,
so a one-frame video and the same picture as a PNG give the same tensor. GIF writing needs only Pillow.

GIF caveat: Pillow stores identical consecutive frames once (it merges them and adds up their durations), so
a clip that holds still reads back with fewer frames; MP4 keeps every frame.
"""

from __future__ import annotations

import os
from types import ModuleType

import numpy as np
import torch
from PIL import Image, ImageDraw

from mmalign.data.images import to_tensor
from mmalign.errors import UserError

INSTALL_VIDEO = 'video decoding needs the video extra: pip install -e ".[video]"'
GRID_LABEL_WIDTH, GRID_HEADER = 220, 16  # the same layout as recipes/evaluate.py::write_grid


def load_video(
    path: str, *, num_frames: int, resolution: int, frame_stride: int = 1, where: str
) -> torch.Tensor:
    """Decode frames 0, s, 2s, ... (``num_frames`` of them) -> ``(3, F, R, R)`` float32 in [-1, 1].

    Only the frames up to the last one needed are decoded. ``where`` locates the video for error messages,
    e.g. ``"/x/bench.csv line 3: column path_A"``.
    """
    for name, value in (
        ("num_frames", num_frames),
        ("resolution", resolution),
        ("frame_stride", frame_stride),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"{where}: {name} must be a positive integer, got {value!r}")
    needed = (num_frames - 1) * frame_stride + 1
    frames, count = _decode_frames(path, needed=needed, where=where)
    if count < needed:
        raise UserError(
            f"{where}: video {path} has {count} frames; needs at least {needed} "
            f"({num_frames} frames at frame_stride {frame_stride})"
        )
    images = [Image.fromarray(frame) for frame in frames[::frame_stride]]
    picked = [to_tensor(image, resolution) for image in images]  # F x (3, R, R)
    return torch.stack(picked, dim=1)  # (3, F, R, R)


def write_gif(path: str, frames: torch.Tensor | np.ndarray, fps: float = 4, *, scale: int = 1) -> None:
    """Write an animated GIF that loops forever; ``scale`` upsamples nearest-neighbour so tiny clips stay visible.

    ``frames`` is uint8 ``(F, H, W, 3)`` or float ``(3, F, H, W)`` in [0, 1]. GIF delays are whole
    centiseconds, so the frame time is ``1/fps`` rounded to 10 ms.
    """
    pixels = _upscale(_to_uint8_frames(frames), scale)  # (F, H*s, W*s, 3)
    images = [Image.fromarray(frame) for frame in pixels]
    _make_parent(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_mp4(path: str, frames: torch.Tensor | np.ndarray, fps: float = 4, *, scale: int = 1) -> None:
    """Write an H.264 MP4 (yuv420p, which most players need); ``scale`` upsamples nearest-neighbour.

    ``frames`` is uint8 ``(F, H, W, 3)`` or float ``(3, F, H, W)`` in [0, 1]. yuv420p needs even sides, so
    after scaling an odd height or width gets one copy of its last row or column appended (bottom / right);
    any ``scale`` >= 2 makes both sides even without padding. Needs the ``video`` extra.
    """
    iio = _imageio()
    pixels = _pad_to_even(_upscale(_to_uint8_frames(frames), scale))  # (F, H', W', 3), H' and W' even
    _make_parent(path)
    # macro_block_size=1: imageio-ffmpeg would otherwise resize every frame to a multiple of 16.
    iio.imwrite(path, pixels, plugin="FFMPEG", fps=fps, codec="libx264", macro_block_size=1, quality=8)


def write_video_grid(
    path: str, columns: dict[str, torch.Tensor], labels: list[str], *, scale: int = 4, fps: float = 4
) -> None:
    """One animated GIF (``.gif``) or MP4 (``.mp4``) comparing models: each frame is a grid.

    ``columns`` maps a model name to its videos ``(N, 3, F, H, W)`` in [0, 1], all of one shape; row ``i``
    shows video ``i`` of every model next to ``labels[i]``. The frame is ``header + N*H*scale`` pixels high
    and ``label_width + models*W*scale`` wide, laid out like ``recipes/evaluate.py::write_grid``.
    """
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".gif", ".mp4"):
        raise UserError(
            f"video grid path {path} must end in .gif or .mp4, got {extension or 'no extension'!r}"
        )
    _check_grid(columns, labels)
    frames = _grid_frames(columns, labels, scale=scale)  # (F, header + N*H*s, label_width + M*W*s, 3)
    if extension == ".gif":
        write_gif(path, frames, fps)
    else:
        write_mp4(path, frames, fps)


def video_extra_installed() -> bool:
    """Whether imageio (the ``video`` extra, needed for MP4 and for decoding) can be imported."""
    try:
        _imageio()
    except UserError:
        return False
    return True


def _imageio() -> ModuleType:
    """``imageio.v3``, or a UserError with the install command: the video extra is optional."""
    try:
        import imageio.v3 as iio
    except ImportError:
        raise UserError(INSTALL_VIDEO) from None
    return iio


def _decode_frames(path: str, *, needed: int, where: str) -> tuple[list[np.ndarray], int]:
    """The first ``needed`` decoded frames and how many were seen (< needed if the clip is short).

    Frames come back as imageio gives them: ``(H, W, 3)``, or ``(H, W, 4)`` for a GIF frame with
    transparency; ``to_tensor`` converts each to RGB.
    """
    iio = _imageio()
    frames: list[np.ndarray] = []
    try:
        reader = iio.imiter(path)
        try:
            for frame in reader:
                frames.append(frame)
                if len(frames) == needed:
                    break
        finally:
            reader.close()  # stops the ffmpeg subprocess when the clip is longer than needed
    except (OSError, ValueError, RuntimeError, SyntaxError, IndexError) as err:
        # imageio appends ffmpeg's whole banner and stderr; the first line is the part a user can act on.
        lines = str(err).strip().splitlines()
        reason = lines[0].strip() if lines else type(err).__name__
        raise UserError(f"{where}: not a readable video {path} ({reason})") from None
    return frames, len(frames)


def _to_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 ``(F, H, W, 3)`` passes through; float ``(3, F, H, W)`` in [0, 1] is rounded to it."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(frames)
    if frames.dtype == torch.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be (F, H, W, 3), got shape {tuple(frames.shape)}")
        return frames.numpy()
    if not frames.is_floating_point() or frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(
            f"frames must be uint8 (F, H, W, 3) or float (3, F, H, W), got {frames.dtype} {tuple(frames.shape)}"
        )
    pixels = (frames.detach().float().cpu().clamp(0, 1) * 255).round().byte()  # (3, F, H, W)
    return pixels.permute(1, 2, 3, 0).contiguous().numpy()  # (F, H, W, 3)


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upsampling by an integer factor: each pixel becomes a ``scale x scale`` block."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)  # (F, H*s, W*s, 3)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Append a copy of the last row / column where a side is odd (yuv420p stores chroma per 2x2 block)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")  # (F, H', W', 3)


def _make_parent(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _check_grid(columns: dict[str, torch.Tensor], labels: list[str]) -> None:
    """Every model must show the same videos: one shape ``(N, 3, F, H, W)`` and one label per row."""
    if not columns:
        raise ValueError("write_video_grid needs at least one column")
    shapes = {name: tuple(videos.shape) for name, videos in columns.items()}
    first = next(iter(shapes.values()))
    if len(first) != 5 or first[1] != 3 or len(set(shapes.values())) != 1:
        raise ValueError(f"every column must hold videos of one shape (N, 3, F, H, W), got {shapes}")
    if len(labels) != first[0]:
        raise ValueError(f"write_video_grid got {len(labels)} labels for {first[0]} videos per column")


def _grid_frames(columns: dict[str, torch.Tensor], labels: list[str], *, scale: int) -> np.ndarray:
    """Draw the text once on a white canvas, then paste every model's frame ``t`` into a copy of it."""
    first = next(iter(columns.values()))
    rows, _, num_frames, height, width = first.shape
    height, width = height * scale, width * scale
    canvas = Image.new("RGB", (GRID_LABEL_WIDTH + width * len(columns), GRID_HEADER + height * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(columns):
        draw.text((GRID_LABEL_WIDTH + c * width + 2, 2), name, fill="black")
    for r, label in enumerate(labels):
        draw.text((2, GRID_HEADER + r * height + height // 2 - 5), label, fill="black")
    background = np.asarray(canvas)  # (header + N*H*s, label_width + M*W*s, 3)
    frames = np.repeat(background[None], num_frames, axis=0)  # (F, header + N*H*s, label_width + M*W*s, 3)
    for c, videos in enumerate(columns.values()):
        left = GRID_LABEL_WIDTH + c * width
        for r in range(rows):
            top = GRID_HEADER + r * height
            tiles = _upscale(_to_uint8_frames(videos[r]), scale)  # (F, H*s, W*s, 3)
            frames[:, top : top + height, left : left + width] = tiles
    return frames
