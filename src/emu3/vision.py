"""Pixels <-> visual codes: the image processor and the VQ model together, for images and videos.

Videos are encoded in one of two modes (the release does not say which one BAAI trained on):
- "chunks": independent 4-frame clips, as the official `autoencode.py` example does. Each latent
  frame depends only on its own 4 frames; decoding is per clip.
- "causal": the whole clip in one pass. Latent frame k sees frames <= 4k+3 through the causal
  temporal convolutions, and decoding runs the temporal layers over all latent frames.
A frame count that is not a multiple of 4 is padded at the end by repeating the last frame (the
same convention that turns an image into 4 equal frames); `decode_video(..., num_frames=T)` trims
the padding away. Memory stays bounded: frames are held as uint8 and converted to float, encoded
and decoded `frame_batch` frames at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import media
from .checkpoint import load_vq, read_json, save_vq
from .errors import InputError
from .media import ImageProcessor, Video, to_pixels, to_uint8
from .vq import VisionVQ, vq_config

MODES = ("chunks", "causal")

# The image processor that goes with each VQ preset (emu3.vq.VQ_PRESETS): the resolutions it is meant for.
PRESET_PROCESSORS = {
    "emu3": ImageProcessor(512 * 512, 1024 * 1024, 8),  # as released
    "tiny": ImageProcessor(16 * 16, 64 * 64, 4),
    "demo": ImageProcessor(64 * 64, 64 * 64, 8),  # the shapes world is 64x64
}


def _steps(start: int, stop: int, step: int, what: str, progress: bool):
    """range(start, stop, step), with a progress bar (frames done, time left) when asked for and slow."""
    steps = range(start, stop, step)
    if not progress:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc=f"{what} {stop - start} frames", unit="batch", leave=False, delay=1.0, dynamic_ncols=True)


def pad_frames(frames: np.ndarray, multiple: int) -> np.ndarray:
    """Repeat the last frame until the count is a multiple of `multiple` (at least one multiple)."""
    t = len(frames)
    if t == 0:
        raise InputError("a video needs at least one frame")
    target = max(multiple, -(-t // multiple) * multiple)
    if target == t:
        return frames
    return np.concatenate([frames, np.repeat(frames[-1:], target - t, axis=0)])


class VisionTokenizer:
    """A VQ model with its image processor. Codes are int64 tensors: (h, w) per image, (T', h, w) per video."""

    def __init__(self, model: VisionVQ, processor: ImageProcessor | None = None, frame_batch: int = 8):
        self.model = model.eval()
        self.processor = processor or ImageProcessor(spatial_factor=model.config.spatial_factor)
        if self.processor.spatial_factor != model.config.spatial_factor:
            raise InputError(f"processor spatial_factor {self.processor.spatial_factor} differs from the VQ's "
                             f"{model.config.spatial_factor}")
        if frame_batch < 1:
            raise InputError(f"frame_batch must be >= 1, got {frame_batch}")
        self.frame_batch = frame_batch

    # ---- construction and persistence ----

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, frame_batch: int = 8) -> VisionTokenizer:
        """Load from a released, transformers or -hf folder (preprocessor_config.json is optional)."""
        folder = Path(folder)
        model = load_vq(folder, device=device, dtype=dtype)
        proc_path = folder / "preprocessor_config.json"
        if proc_path.exists():
            processor = ImageProcessor.from_dict(read_json(proc_path))
        else:
            processor = ImageProcessor(spatial_factor=model.config.spatial_factor)
        return cls(model, processor, frame_batch)

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **overrides) -> VisionTokenizer:
        """A freshly initialised tokenizer (random weights) of a named size: the start of training."""
        config = vq_config(name, **overrides)  # refuses unknown names
        torch.manual_seed(seed)
        return cls(VisionVQ(config), PRESET_PROCESSORS[name])

    def save_pretrained(self, folder: str | os.PathLike, layout: str = "released") -> None:
        save_vq(self.model, folder, layout, extra_files={"preprocessor_config.json": self.processor.to_dict()})

    @property
    def temporal_factor(self) -> int:
        return self.model.config.temporal_factor

    # ---- images ----

    def encode_image(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        return self.encode_images([image])[0]

    def encode_images(self, images: list[Image.Image | np.ndarray]) -> list[torch.Tensor]:
        """(h, w) codes per image. PIL images are resized to their own smart_resize target; uint8 (H, W, 3)
        arrays are taken as already at model resolution. Images of equal size are encoded as one batch."""
        arrays = [self.processor.resize(media.to_rgb(im)) if isinstance(im, Image.Image) else np.asarray(im)
                  for im in images]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape[:2], []).append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx in groups.values():
            for s in range(0, len(idx), self.frame_batch):
                part = idx[s:s + self.frame_batch]
                codes = self.model.encode(to_pixels(np.stack([arrays[i] for i in part])))  # (b, h, w)
                for i, c in zip(part, codes.cpu()):
                    out[i] = c
        return out  # type: ignore[return-value]

    def decode_image(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """(h, w) codes -> (H, W, 3) uint8; (B, h, w) -> (B, H, W, 3)."""
        codes = torch.as_tensor(codes)
        single = codes.ndim == 2
        pixels = self.model.decode(codes[None] if single else codes, frame_batch=self.frame_batch)
        return to_uint8(pixels[0] if single else pixels)

    # ---- videos ----

    def read_video(self, path: str | os.PathLike, **kwargs) -> Video:
        """media.read_video with frames resized to this tokenizer's smart_resize target."""
        return media.read_video(path, resize=self.processor.target_size, **kwargs)

    def encode_video(self, frames: np.ndarray, mode: str = "chunks", progress: bool = False) -> torch.Tensor:
        """(T, H, W, 3) uint8 frames at model resolution -> (ceil(T/4), h, w) codes. `progress`: a bar over
        the frame batches on stderr, shown when it takes more than a second."""
        if mode not in MODES:
            raise InputError(f"unknown video mode {mode!r}; choose one of {', '.join(MODES)}")
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.dtype != np.uint8 or frames.shape[-1] != 3:
            raise InputError(f"frames must be uint8 (T, H, W, 3), got {frames.shape} {frames.dtype}")
        f = self.temporal_factor
        frames = pad_frames(frames, f)
        model, fb = self.model, self.frame_batch
        model.check_pixels(torch.empty(1, f, 3, *frames.shape[1:3], device="meta"))
        if mode == "chunks":  # independent clips of f frames, about fb frames per forward
            step = max(1, fb // f) * f
            codes = [model.encode(to_pixels(frames[i:i + step]).unflatten(0, (-1, f)))  # (clips, 1, h, w)
                     for i in _steps(0, len(frames), step, "encode", progress)]
            return torch.cat(codes)[:, 0].cpu()
        with model.inference():  # one causal clip: the 2D encoder streams, the temporal layers see all
            z = torch.cat([model.encode_frames(to_pixels(frames[i:i + fb]))
                           for i in _steps(0, len(frames), fb, "encode", progress)])  # (T, C, h, w)
            latents = model.encode_temporal(z.transpose(0, 1)[None])  # (1, C, T', h, w)
            return model.quantize(latents)[0].cpu()  # (T', h, w)

    def decode_video(self, codes: torch.Tensor | np.ndarray, mode: str = "chunks",
                     num_frames: int | None = None, progress: bool = False) -> np.ndarray:
        """(T', h, w) codes -> (4T', H, W, 3) uint8 frames (trimmed to num_frames if given)."""
        if mode not in MODES:
            raise InputError(f"unknown video mode {mode!r}; choose one of {', '.join(MODES)}")
        codes = torch.as_tensor(codes)
        if codes.ndim != 3:
            raise InputError(f"video codes must be (T', h, w), got shape {tuple(codes.shape)}")
        model, fb, f = self.model, self.frame_batch, self.temporal_factor
        model.check_codes(codes)
        if mode == "chunks":  # each latent frame is its own clip
            step = max(1, fb // f)
            frames = np.concatenate([to_uint8(model.decode(codes[i:i + step, None], frame_batch=fb).flatten(0, 1))
                                     for i in _steps(0, len(codes), step, "decode", progress)])  # (clips * f, H, W, 3)
        else:
            with model.inference():
                z, zq = model.decode_temporal(model.embed_codes(codes.long()[None]))  # (1, C, 4T', h, w) each
                z, zq = z[0].transpose(0, 1), zq[0].transpose(0, 1)  # (4T', C, h, w)
                frames = np.concatenate([to_uint8(model.decode_frames(z[i:i + fb], zq[i:i + fb]))
                                         for i in _steps(0, len(z), fb, "decode", progress)])
        if num_frames is not None:
            if not 0 < num_frames <= len(frames):
                raise InputError(f"num_frames must be in [1, {len(frames)}] for {len(codes)} latent frames, "
                                 f"got {num_frames}")
            frames = frames[:num_frames]
        return frames
