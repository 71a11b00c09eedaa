"""Uploaded media: base64 data URLs (nothing is fetched from the network), images checked from their header
before any pixel is decoded, videos read and written through emu3.media."""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
from pathlib import Path

import numpy as np

from .. import media
from ..errors import InputError
from ..pipeline import Emu3
from .errors import APIError

IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})


VIDEO_TYPES = {"video/mp4": ".mp4", "video/webm": ".webm", "image/gif": ".gif", "video/quicktime": ".mov"}


def data_url_bytes(url: str, param: str, types: dict[str, str] | None = None) -> tuple[bytes, str]:
    """The bytes of a base64 data URL and its MIME type (or, given `types`, the file suffix it maps to)."""
    m = re.match(r"data:([\w/+.-]*)(;[^,]*)?,", url[:200])
    if not m:
        raise APIError(400, f"{param} must be a data URL (data:TYPE;base64,...); this server fetches nothing "
                            "from the network", param)
    if "base64" not in (m.group(2) or ""):
        raise APIError(400, f"the {param} data URL must be base64-encoded", param)
    if types is not None and m.group(1) not in types:
        raise APIError(400, f"{param}: type {m.group(1)!r} is not accepted; use one of {', '.join(types)}", param)
    try:
        data = base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"the {param} data URL is not valid base64", param) from None
    return data, types[m.group(1)] if types is not None else m.group(1)


def read_video_bytes(pipe: Emu3, data: bytes, suffix: str, fps: float | None, max_pixels: int,
                      max_frames: int = 64):
    """An uploaded video at the model's resolution (declared size and frame count checked before decoding)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            return pipe.vision.read_video(path, fps=fps, max_frames=max_frames, max_pixels=max_pixels)
        except InputError as e:
            raise APIError(400, str(e).replace(str(path), "video"), "video") from None


def read_image_data_url(url: str, param: str, max_pixels: int):
    """A base64 data URL -> RGB PIL image, refused before decoding if its format or declared size is wrong."""
    if not url.startswith("data:"):
        raise APIError(400, "image_url must be a data URL (data:image/png;base64,...); this server fetches nothing "
                            "from the network", param)
    data, _ = data_url_bytes(url, param)
    try:
        return media.read_image_bytes(data, "image_url", max_pixels, IMAGE_FORMATS)
    except InputError as e:
        raise APIError(400, str(e), param) from None


def encode_video(frames: np.ndarray, fps: float, fmt: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"video.{fmt}"
        media.write_video(path, frames, fps)
        return path.read_bytes()


# --------------------------------------------------------------------------------------------
# Running it
