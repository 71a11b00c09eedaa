"""Pixels in and out: the released image processor (smart_resize), safe image/video reading, writing.

The processor reproduces `Emu3VisionVQImageProcessor` exactly: sides rounded to multiples of 8
with Python's banker's rounding, the pixel count clamped to [min_pixels, max_pixels], aspect ratio
at most 5, PIL bicubic resize, x/255 (float64, then float32), then (x - 0.5) / 0.5. Its inverse
rounds to the nearest uint8, so that postprocess(preprocess(x)) == x; the release truncates
(astype(uint8)), which darkens every output by half a level on average. Transparent images are
composited on white.

Reading refuses bad input before it costs memory: the declared size of an image or a video stream
is checked against a pixel limit before any pixel is decoded, and video frames are resized to the
target size as they are decoded, so a long clip is held as uint8 at model resolution only.
Video goes through PyAV (FFmpeg): mp4, webm, mkv, mov, avi, animated gif; or a folder of frames.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .fsutil import atomic_file

MAX_INPUT_PIXELS = 8192 * 8192  # per image or per video frame, checked on the declared size
MAX_VIDEO_FRAMES = 1024  # frames kept after fps sampling, unless the caller raises it
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v", ".gif"}


# --------------------------------------------------------------------------------------------
# The released image processor


def smart_resize(height: int, width: int, factor: int = 8, min_pixels: int = 512 * 512,
                 max_pixels: int = 1024 * 1024) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    if height < factor or width < factor:
        raise InputError(f"image is too small: {width}x{height} pixels, each side must be at least {factor}")
    if max(height, width) / min(height, width) > 5:
        raise InputError(f"aspect ratio {max(height, width) / min(height, width):.2f} of a {width}x{height} "
                         "image is larger than the limit of 5")
    h = round(height / factor) * factor  # banker's rounding, as released
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass
class ImageProcessor:
    """Settings of the released `preprocessor_config.json` that change results."""

    min_pixels: int = 512 * 512
    max_pixels: int = 1024 * 1024
    spatial_factor: int = 8

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise InputError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        if self.spatial_factor < 1:
            raise InputError(f"spatial_factor must be >= 1, got {self.spatial_factor}")

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(height, width, self.spatial_factor, self.min_pixels, self.max_pixels)

    def resize(self, image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
        """PIL RGB image -> (H, W, 3) uint8 at `size` (default: smart_resize of its own size)."""
        h, w = size or self.target_size(image.height, image.width)
        if (image.height, image.width) != (h, w):
            image = image.resize((w, h), resample=Image.BICUBIC)
        return np.array(image, dtype=np.uint8)

    def preprocess(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        """Images -> (N, 3, H, W) float32 in [-1, 1]; all resized to the first image's target size, as released."""
        images = [images] if isinstance(images, Image.Image) else list(images)
        size = self.target_size(images[0].height, images[0].width)
        return to_pixels(np.stack([self.resize(to_rgb(im), size) for im in images]))

    def to_dict(self) -> dict:
        """The released preprocessor_config.json (fields the official processor reads)."""
        return {
            "image_processor_type": "Emu3VisionVQImageProcessor",
            "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
            "resample": 3, "rescale_factor": 1 / 255,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels,
            "size": {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
            "spatial_factor": self.spatial_factor,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessor:
        """Read a released or transformers preprocessor_config.json; refuse settings we do not implement."""
        checks = {"do_resize": True, "do_rescale": True, "do_normalize": True, "resample": 3,
                  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
        for key, want in checks.items():
            if key in d and d[key] != want:
                raise InputError(f"preprocessor_config.json: {key}={d[key]!r} is not supported (expected {want!r})")
        if "rescale_factor" in d and not math.isclose(d["rescale_factor"], 1 / 255):
            raise InputError(f"preprocessor_config.json: rescale_factor={d['rescale_factor']} is not supported")
        defaults = cls()
        size = d.get("size") or {}
        return cls(
            min_pixels=int(d.get("min_pixels", size.get("min_pixels", defaults.min_pixels))),
            max_pixels=int(d.get("max_pixels", size.get("max_pixels", defaults.max_pixels))),
            spatial_factor=int(d.get("spatial_factor", defaults.spatial_factor)),
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the released processor makes it: anything with transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth greyscale: scale to 8 bits
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") and arr.max() > 255 else max(arr.max(), 1.0)
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_pixels(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 in [-1, 1], with the released arithmetic."""
    t = torch.from_numpy(np.array(frames, copy=not frames.flags.writeable)) if isinstance(frames, np.ndarray) \
        else torch.as_tensor(frames)
    if t.dtype != torch.uint8 or t.shape[-1] != 3:
        raise InputError(f"expected uint8 frames of shape (..., H, W, 3), got {tuple(t.shape)} {t.dtype}")
    x = (t.double() * (1 / 255)).float()
    x = (x - 0.5) / 0.5
    return x.movedim(-1, -3).contiguous()  # (..., 3, H, W)


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8: (x + 1) / 2 * 255, clipped, rounded."""
    x = (pixels.detach().float().cpu().double() + 1.0) / 2.0 * 255.0
    return x.round_().clamp_(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


# --------------------------------------------------------------------------------------------
# Reading


def _require_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")


def open_image(path: str | os.PathLike, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Decode one image file to RGB, refusing it before decoding if it declares more than max_pixels."""
    path = Path(path)
    _require_file(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an image")
    return _decode_image(lambda: Image.open(path), str(path), max_pixels, None)


def read_image_bytes(data: bytes, name: str = "image", max_pixels: int = MAX_INPUT_PIXELS,
                     formats: frozenset[str] | None = None) -> Image.Image:
    """Decode an image held in memory (an upload) to RGB. Its format (PIL's name: PNG, JPEG, ...) must
    be in `formats` and its declared size within max_pixels, both checked from the header alone."""
    import io

    return _decode_image(lambda: Image.open(io.BytesIO(data)), name, max_pixels, formats)


def _decode_image(opener, name: str, max_pixels: int, formats: frozenset[str] | None) -> Image.Image:
    try:
        image = opener()
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: image is far larger than the limit of {max_pixels} pixels ({e})") from None
    except UnidentifiedImageError:  # PIL's message names only its own file object
        raise InputError(f"{name}: not an image file that can be read (no known image format in its header)") \
            from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: not an image file that can be read ({type(e).__name__}: {e})") from None
    with image:
        if formats is not None and image.format not in formats:
            raise InputError(f"{name}: {image.format} images are not accepted; use one of {', '.join(sorted(formats))}")
        w, h = image.size
        if w * h > max_pixels:
            raise InputError(f"{name}: image declares {w}x{h} = {w * h} pixels, more than the limit of "
                             f"{max_pixels} pixels")
        if w < 1 or h < 1:
            raise InputError(f"{name}: image declares an empty size {w}x{h}")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{name}: image is corrupt or truncated ({type(e).__name__}: {e})") from None


def probe(path: str | os.PathLike) -> str:
    """'image' or 'video' (a folder of frames, a video container, or an animated image)."""
    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in VIDEO_SUFFIXES - {".gif"}:
        return "video"
    try:
        with Image.open(path) as im:
            return "video" if getattr(im, "n_frames", 1) > 1 else "image"
    except Image.DecompressionBombError:
        return "image"  # open_image refuses it with the limit
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        if suffix in IMAGE_SUFFIXES | {".gif"}:
            return "image"  # open_image explains what is wrong with it
    import av

    try:
        av.open(str(path)).close()
    except (av.error.FFmpegError, OSError, UnicodeDecodeError):
        raise InputError(f"{path}: neither an image nor a video file that can be read") from None
    return "video"


@dataclass
class Video:
    frames: np.ndarray  # (T, H, W, 3) uint8, at the requested size
    fps: float
    source_size: tuple[int, int]  # (height, width) before resizing


def _natural_key(name: str):
    return [int(s) if s.isdigit() else s.lower() for s in re.split(r"(\d+)", name)]


def _sample_times(n_out_max: int | None, frame_limit: int, start: float, end: float | None, fps: float):
    """Output timestamps start, start + 1/fps, ... (stops at end); raises past frame_limit."""
    k = 0
    while True:
        t = start + k / fps
        if end is not None and t >= end - 1e-9:
            return
        if n_out_max is not None and k >= n_out_max:
            return
        if k >= frame_limit:
            raise InputError(f"video gives more than {frame_limit} frames (limit); pass max_frames / --max-frames, "
                             "a shorter duration or a lower fps")
        yield t
        k += 1


def read_video(path: str | os.PathLike, *, fps: float | None = None, start: float = 0.0,
               duration: float | None = None, max_frames: int | None = None, resize=None,
               frame_limit: int = MAX_VIDEO_FRAMES, max_pixels: int = MAX_INPUT_PIXELS) -> Video:
    """Decode a video file or a folder of frames, sampled at `fps` (default: the source rate).

    The frame shown at time t is the last source frame that starts at or before t. `resize` maps the
    source (height, width) to the output (height, width); frames are resized (bicubic) as decoded.
    A folder of frames plays at `fps` (default 24) in natural name order.
    """
    path = Path(path)
    _require_file(path)
    for name, value in (("fps", fps), ("duration", duration)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InputError(f"{name} must be a positive number, got {value}")
    if not (start >= 0 and math.isfinite(start)):
        raise InputError(f"start must be >= 0 seconds, got {start}")
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be >= 1, got {max_frames}")
    end = None if duration is None else start + duration
    if path.is_dir():
        return _read_frame_folder(path, fps or 24.0, start, end, max_frames, resize, frame_limit, max_pixels)
    return _read_container(path, fps, start, end, max_frames, resize, frame_limit, max_pixels)


def _resized(image: Image.Image, resize, size_cache: dict) -> np.ndarray:
    if "size" not in size_cache:
        size_cache["size"] = resize(image.height, image.width) if resize else (image.height, image.width)
    h, w = size_cache["size"]
    if (image.height, image.width) != (h, w):
        image = image.resize((w, h), resample=Image.BICUBIC)
    return np.array(image, dtype=np.uint8)


def _read_frame_folder(path, fps, start, end, max_frames, resize, frame_limit, max_pixels) -> Video:
    files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise InputError(f"{path}: folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    out, cache, source = [], {}, None
    for t in _sample_times(max_frames, frame_limit, start, end, fps):
        i = math.floor(t * fps + 1e-6)  # the folder plays at `fps`: frame i starts at i / fps
        if i >= len(files):
            break
        image = open_image(files[i], max_pixels)
        if source is None:
            source = (image.height, image.width)
        elif (image.height, image.width) != source:
            raise InputError(f"{files[i]}: frame size {image.width}x{image.height} differs from the first "
                             f"frame's {source[1]}x{source[0]}")
        out.append(_resized(image, resize, cache))
    if not out:
        raise InputError(f"{path}: no frames at or after start={start}s")
    return Video(np.stack(out), float(fps), source)


def _declared_duration(container, stream) -> float | None:
    """Seconds the container says the video lasts (None when it does not say)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


def _read_container(path, fps, start, end, max_frames, resize, frame_limit, max_pixels) -> Video:
    import av  # imported here: only video reading needs FFmpeg

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a video file that can be read ({e})") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        w, h = stream.codec_context.width, stream.codec_context.height
        if w * h > max_pixels:
            raise InputError(f"{path}: video declares {w}x{h} = {w * h} pixels per frame, more than the limit of "
                             f"{max_pixels} pixels")
        src_fps = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
        fps = fps or src_fps
        stream.thread_type = "AUTO"
        times = _sample_times(max_frames, frame_limit, start, end, fps)
        target = next(times, None)
        tol = 0.25 / src_fps  # timestamps are quantised (webm: 1 ms); a quarter frame absorbs that
        out, cache, n_decoded, t, ended = [], {}, 0, 0.0, True
        prev: list = []  # [av frame, its resized array or None]: the frame on screen at `target`

        def emit():
            if prev[1] is None:  # convert lazily: frames skipped by fps sampling are never resized
                prev[1] = _resized(prev[0].to_image(), resize, cache)
            out.append(prev[1])

        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else n_decoded / src_fps
                n_decoded += 1
                # every output time before this frame's start shows the previous frame
                while target is not None and prev and target < t - tol:
                    emit()
                    target = next(times, None)
                if target is None:
                    ended = False
                    break
                if frame.width * frame.height > max_pixels:
                    raise InputError(f"{path}: frame {n_decoded} is {frame.width}x{frame.height}, more than the "
                                     f"limit of {max_pixels} pixels")
                prev[:] = [frame, None]
            last_end = t + 1.0 / src_fps  # the last frame lasts one source frame period
            while target is not None and prev and target < last_end - tol:
                emit()
                target = next(times, None)
        except av.error.FFmpegError as e:
            raise InputError(f"{path}: video is corrupt or truncated after {n_decoded} frames ({e})") from None
        declared = _declared_duration(container, stream)
        if ended and n_decoded and declared and last_end + 2 / src_fps < 0.95 * declared:
            raise InputError(f"{path}: video stops after {n_decoded} frames at {last_end:.2f} s but declares "
                             f"{declared:.2f} s; the file looks truncated")
    if not out:
        raise InputError(f"{path}: no frames decoded at or after start={start}s")
    source = (h, w)
    return Video(np.stack(out), float(fps), source)


# --------------------------------------------------------------------------------------------
# Writing


def write_image(path: str | os.PathLike, image: np.ndarray) -> None:
    """(H, W, 3) uint8 -> png/jpg/webp/bmp/tiff, atomically."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"{path}: unsupported image format; use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    with atomic_file(path) as tmp:
        fmt = Image.registered_extensions()[path.suffix.lower()]
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format=fmt)


VIDEO_WRITERS = {".mp4": ("libx264", {"crf": "17", "preset": "medium"}),
                 ".webm": ("libvpx-vp9", {"crf": "24", "b": "0"}),
                 ".gif": None}


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float) -> None:
    """(T, H, W, 3) uint8 -> mp4 (H.264) / webm (VP9) / gif, atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_WRITERS:
        raise InputError(f"{path}: unsupported video format; use one of {', '.join(VIDEO_WRITERS)}")
    if not (fps > 0 and math.isfinite(fps)):
        raise InputError(f"fps must be a positive number, got {fps}")
    frames = np.ascontiguousarray(frames)
    with atomic_file(path) as tmp:
        if suffix == ".gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                           duration=max(20, round(1000 / fps)), loop=0)
            return
        import av

        codec, options = VIDEO_WRITERS[suffix]
        t, h, w, _ = frames.shape
        pad_h, pad_w = h % 2, w % 2  # yuv420p needs even sides
        with av.open(str(tmp), mode="w", format="mp4" if suffix == ".mp4" else "webm") as out:
            stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = w + pad_w, h + pad_h, "yuv420p"
            stream.options = options
            for f in frames:
                if pad_h or pad_w:
                    f = np.pad(f, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)


def write_media(path: str | os.PathLike, frames: np.ndarray, fps: float = 24.0) -> None:
    """Write (H, W, 3) as an image or (T, H, W, 3) as a video, by the file suffix."""
    suffix = Path(path).suffix.lower()
    if frames.ndim == 3:
        if suffix in VIDEO_WRITERS:
            return write_video(path, frames[None], fps)
        return write_image(path, frames)
    if suffix in IMAGE_SUFFIXES:
        raise InputError(f"{path}: codes describe a video of {len(frames)} frames; write .mp4, .webm or .gif")
    return write_video(path, frames, fps)


def check_output_suffix(path: str | os.PathLike, kind: str) -> None:
    """Fail before any work if `path` cannot hold `kind` ('image' or 'video')."""
    suffix = Path(path).suffix.lower()
    allowed = (IMAGE_SUFFIXES | set(VIDEO_WRITERS)) if kind == "image" else set(VIDEO_WRITERS)
    if suffix not in allowed:
        raise InputError(f"{path}: cannot write {'an image' if kind == 'image' else 'a video'} to '{suffix or path}'; "
                         f"use one of {', '.join(sorted(allowed))}")
