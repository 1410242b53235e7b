"""Decode preference images and turn them into model-ready tensors (PIL + torch only)."""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError

from mmalign.errors import UserError


def load_image(src: bytes | str, *, where: str) -> Image.Image:
    """Decode encoded image bytes or an image file path into an RGB image.

    ``where`` locates the image for the error message, e.g. ``"/x/train.parquet row 17: column jpg_1"``.
    """
    try:
        image = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        image.load()  # decode now: a truncated file should fail here, not inside a DataLoader worker
        return image.convert("RGB")
    except UnidentifiedImageError:
        # PIL's message ends with the repr of a BytesIO object, which tells the user nothing.
        reason = "cannot identify image file"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
    raise UserError(f"{where}: not a readable image ({reason})")


def to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """RGB image -> ``(3, R, R)`` float32 in [-1, 1].

    The shorter side is resized to ``R`` (bicubic) and the centre ``R x R`` is cropped, as in Diffusion-DPO's
    evaluation-style preprocessing; an image that is already ``R x R`` is not resampled, so its pixels map
    exactly (0 -> -1, 255 -> 1).
    """
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) != (resolution, resolution):
        scale = resolution / min(width, height)
        new_w = max(resolution, round(width * scale))
        new_h = max(resolution, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left = (new_w - resolution) // 2
        top = (new_h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    pixels = pixels.view(resolution, resolution, 3).permute(2, 0, 1)  # (3, R, R)
    return pixels.float() / 127.5 - 1.0
