"""Image content parts of chat requests: where an `image_url` may point, and what it decodes to.

Accepted: a data URL (`data:image/png;base64,...`), or a local file (`file:///abs/path` or an absolute path)
inside one of the directories the server was started with (`serve --allow-image-dir DIR`; none: local files
are refused). http(s) URLs are refused (the server fetches nothing). Any refusal is an InvalidArgument naming
the part, which the server answers with HTTP 400; the image itself is decoded and checked later by
model/images.py (not an image, too large: also 400).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import InvalidArgument
from ..model.images import MAX_BYTES, load_image


def resolve_image(url: str, allowed_dirs: list[Path], where: str) -> bytes | Path:
    """The image an image_url names: bytes (data URL) or a path under an allowed directory."""
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise InvalidArgument(f"{where}: a data URL must be base64 (data:image/...;base64,...)")
        if len(data) > MAX_BYTES * 4 // 3 + 4:
            raise InvalidArgument(f"{where}: image too large (more than {MAX_BYTES} bytes)")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(f"{where}: the data URL is not valid base64") from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise InvalidArgument(f"{where}: remote URLs are not fetched; send a data URL or a local path")
    if parsed.scheme not in ("", "file"):
        raise InvalidArgument(f"{where}: unsupported URL scheme {parsed.scheme!r} (expected data: or a local path)")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
    if not allowed_dirs:
        raise InvalidArgument(f"{where}: local image paths are off (start the server with --allow-image-dir DIR)")
    if not path.is_absolute():
        raise InvalidArgument(f"{where}: {path}: expected an absolute path")
    real = path.resolve()
    if not any(real.is_relative_to(d.resolve()) for d in allowed_dirs):
        raise InvalidArgument(f"{where}: {path} is not under an allowed image directory")
    return real


def open_image(url: str, allowed_dirs: list[Path], where: str):
    """The decoded RGB image (PIL) an image_url names; errors name the part (and the file)."""
    src = resolve_image(url, allowed_dirs, where)
    return load_image(src, name=where if isinstance(src, bytes) else f"{where} ({src})")
