"""Image preprocessing for the VLM, as the released code does it (research note nld_vlm.md: the remote
image_processing.py over cv2; here Pillow):

  1. decode; RGBA (or LA / P with transparency) is composited onto white, anything else converted to RGB
  2. downscale only: if the longest side exceeds max_image_size, scale both sides by the same ratio
     (floor), never upscale for size
  3. patch grid: each side becomes ceil(side / 28) * 28 (28 = patch 14 x spatial merge 2), bicubic
  4. pixels / 255, then (x - CLIP mean) / CLIP std per channel -> float32 [3, H, W]

Sources accepted: a path, bytes, or a PIL image. A bad image (unreadable path, not an image, more pixels
than `max_pixels` or a file larger than `max_bytes`) is one InvalidArgument line naming the file.
Bicubic is Pillow's, not cv2's INTER_CUBIC: the two differ slightly in the last bits of resampled pixels.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_BYTES = 32 * 2 ** 20              # a file larger than this is refused before decoding
MAX_PIXELS = 64 * 2 ** 20             # decoded width * height above this is refused (decompression bombs)


def load_image(source: Any, *, name: str | None = None, max_bytes: int = MAX_BYTES,
               max_pixels: int = MAX_PIXELS) -> Any:
    """A path / bytes / PIL image -> a decoded RGB PIL image (transparency onto white). `name` is what
    errors call the image (default: the path, or "image")."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, (str, Path)):
        name = name or str(source)
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise InvalidArgument(f"{name}: image too large ({size} bytes, at most {max_bytes})")
            data = path.read_bytes()
        except OSError as e:
            raise InvalidArgument(f"{name}: cannot read the image ({e.strerror or e})") from None
    elif isinstance(source, (bytes, bytearray)):
        name, data = name or "image", bytes(source)
        if len(data) > max_bytes:
            raise InvalidArgument(f"{name}: image too large ({len(data)} bytes, at most {max_bytes})")
    else:
        raise InvalidArgument(f"{name or 'image'}: expected a path, bytes or a PIL image, "
                              f"got {type(source).__name__}")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise InvalidArgument(f"{name}: image too large ({w}x{h} pixels, at most {max_pixels})")
        img.load()
    except InvalidArgument:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InvalidArgument(f"{name}: not a readable image ({type(e).__name__}: "
                              f"{(str(e).splitlines() or [''])[0]})") from None
    return to_rgb(img)


def to_rgb(img: Any) -> Any:
    """RGB; an image with transparency is alpha-composited onto a white background."""
    from PIL import Image

    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def target_size(height: int, width: int, max_image_size: int, grid: int) -> tuple[int, int]:
    """(H, W) an image of height x width is resized to: downscaled (never upscaled) so its longest side is
    at most max_image_size, then each side rounded up to a multiple of `grid` (patch * merge)."""
    ratio = max(height, width) / max_image_size
    if ratio > 1:
        height, width = max(1, math.floor(height / ratio)), max(1, math.floor(width / ratio))
    return math.ceil(height / grid) * grid, math.ceil(width / grid) * grid


def preprocess(img: Any, max_image_size: int, grid: int) -> Any:
    """RGB PIL image -> normalized pixels, torch float32 [3, H, W] with H, W multiples of `grid`."""
    import numpy as np
    import torch
    from PIL import Image

    w, h = img.size
    H, W = target_size(h, w, max_image_size, grid)
    if (H, W) != (h, w):
        img = img.resize((W, H), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0     # [3, H, W]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (x - mean) / std


def image_pixels(source: Any, max_image_size: int, grid: int, *, name: str | None = None,
                 max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> Any:
    """load_image + preprocess: a path / bytes / PIL image -> float32 [3, H, W]."""
    return preprocess(load_image(source, name=name, max_bytes=max_bytes, max_pixels=max_pixels),
                      max_image_size, grid)
