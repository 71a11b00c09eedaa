"""Generation tasks on a model folder: text-to-image, image understanding, text-to-video, video
extension and inpainting. Builds prompts (`emu3.format`), runs the engine (`emu3.generate`) and turns
tokens into media with the vision tokenizer (`emu3.vision`).

A model folder holds the language model (released or -hf layout), its text tokenizer, and
optionally `vision_tokenizer/` and `emu3_defaults.json`. Defaults follow the checkpoint: a folder
without `emu3_defaults.json` gets the released recipe (positive suffix, negative prompt, CFG 3.0,
top-k 2048 for images, greedy text, the released chat template); our own models carry theirs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_model, model_folder, read_json
from .checkpoint import vision_folder as checkpoint_vision_folder
from .errors import CheckpointError, InputError
from .format import (
    MAX_INTERLEAVED_IMAGES,
    NEGATIVE_PROMPT,
    POSITIVE_SUFFIX,
    RELEASED_CHAT_TEMPLATE,
    Formatter,
    Image,
    Text,
    Video,
    generation_grid,
)
from .generate import Engine, Request, Sampling, image_template, video_template
from .model import Emu3LM
from .orders import border_tokens
from .tokenizer import TextTokenizer
from .vision import VisionTokenizer

DEFAULTS_FILE = "emu3_defaults.json"


@dataclass
class Defaults:
    """Generation defaults; the field values below are the released scripts'."""

    positive_suffix: str = POSITIVE_SUFFIX
    negative_prompt: str = NEGATIVE_PROMPT
    cfg_scale: float = 3.0
    ratio: str = "1:1"
    image_area: int | None = None  # None: the model config's image_area
    image_temperature: float = 1.0
    image_top_k: int = 2048
    image_top_p: float = 1.0
    text_temperature: float = 0.0  # greedy
    text_top_k: int = 0
    text_top_p: float = 1.0
    max_new_tokens: int = 1024
    chat_template: str = RELEASED_CHAT_TEMPLATE
    video_fps: float | None = None
    video_top_k: int | None = None  # None: image_top_k (the built-in model extends videos greedily: 1)
    order: str = "raster"
    # plain, or jacobi: speculative Jacobi decoding (the same distribution in fewer passes; not the same samples,
    # so plain stays the default: a seed's image is the one it always was; docs/generation.md), or rows:
    # parallel rows for whole images (not lossless; other outputs decode plain)
    decoding: str = "plain"
    jacobi_window: int = 8  # measured fastest on the built-in model (docs/generation.md)
    rows_window: int = 4  # codes the row above must be ahead with decoding="rows" (chosen on the selection split)

    @classmethod
    def load(cls, folder: Path) -> Defaults:
        path = folder / DEFAULTS_FILE
        if not path.exists():
            return cls()
        d = read_json(path)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CheckpointError(f"{path}: unknown fields {', '.join(unknown)}")
        return cls(**d)


def _need_prompt(prompt) -> None:
    """Generation is conditioned on its prompt: an empty one is refused here, as the server refuses it."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"the prompt is empty (got {prompt!r}): describe what to generate")


@dataclass
class Generated:
    """One generated image or video: its prompt, seed, codes and pixels (uint8), and the raw tokens."""

    prompt: str
    seed: int
    codes: np.ndarray  # (h, w) or (t, h, w)
    pixels: np.ndarray  # (H, W, 3) or (T, H, W, 3)
    tokens: np.ndarray
    seconds: float


@dataclass
class Picture:
    """An image inside an interleaved answer: its codes (h, w) and pixels (H, W, 3) uint8."""

    codes: np.ndarray
    pixels: np.ndarray


class Emu3:
    """Model + text tokenizer + vision tokenizer + defaults, with one method per task."""

    def __init__(self, model: Emu3LM, tokenizer: TextTokenizer, vision: VisionTokenizer | None,
                 defaults: Defaults | None = None, fast: bool = True, compile: bool = False):
        self.model, self.tokenizer, self.vision = model, tokenizer, vision
        self.defaults = defaults or Defaults()
        self.vocab = tokenizer.vocab
        if model.config.vocab_size != self.vocab.size:
            raise CheckpointError(f"the text tokenizer has {self.vocab.size} ids but the model "
                                  f"{model.config.vocab_size}")
        model.config.vocabulary()  # token ids must follow the layout
        if vision is not None and vision.model.config.codebook_size != self.vocab.codebook_size:
            raise CheckpointError(f"the vision tokenizer has {vision.model.config.codebook_size} codes but the "
                                  f"vocabulary {self.vocab.codebook_size}")
        self.engine = Engine(model, self.vocab, fast=fast, compile=compile)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike | None = None, vision_folder: str | os.PathLike | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        **kwargs) -> Emu3:
        """Load a model folder (None: the built-in model); the vision tokenizer comes from `vision_folder`,
        else from the folder's `vision_tokenizer/`, else from the folder itself when it is an -hf checkpoint
        (`emu3.checkpoint.vision_folder`)."""
        folder = model_folder(folder)
        model = load_model(folder, device=device, dtype=dtype)
        tokenizer = TextTokenizer.from_pretrained(folder)
        vision_dir = checkpoint_vision_folder(folder, vision_folder)
        vision = VisionTokenizer.from_pretrained(vision_dir, device=device) if vision_dir else None
        return cls(model, tokenizer, vision, Defaults.load(folder), **kwargs)


    def decoding(self, batch: list[Request]) -> dict:
        """Engine.generate's decoding and window for a batch: the defaults', except that parallel rows
        decode whole images only (anything else in the batch decodes plain)."""
        d = self.defaults
        if d.decoding == "rows":
            from .zipar import image_grid

            if all(image_grid(r, self.vocab) is not None for r in batch):
                return {"decoding": "rows", "window": d.rows_window}
            return {"decoding": "plain"}
        return {"decoding": d.decoding, "window": d.jacobi_window}

    def formatter(self, order: str | None = None) -> Formatter:
        """The sequence builder for this model's vocabulary, in its token order unless `order` is given."""
        return Formatter(self.tokenizer, order or self.defaults.order)

    def require_vision(self) -> VisionTokenizer:
        """The vision tokenizer, or an error saying how to give one (tasks with images or video need it)."""
        if self.vision is None:
            raise InputError("this task needs a vision tokenizer: pass one (--tokenizer DIR) or put it in the "
                             "model folder as vision_tokenizer/")
        return self.vision

    def grid(self, ratio: str | None = None, image_area: int | None = None) -> tuple[int, int]:
        area = image_area or self.defaults.image_area or self.model.config.image_area
        factor = self.vision.model.config.spatial_factor if self.vision is not None else 8
        return generation_grid(ratio or self.defaults.ratio, area, factor)

    def _image_sampling(self, temperature, top_k, top_p) -> Sampling:
        d = self.defaults
        return Sampling(d.image_temperature if temperature is None else temperature,
                        d.image_top_k if top_k is None else top_k, d.image_top_p if top_p is None else top_p)

    def _text_sampling(self, temperature, top_k, top_p) -> Sampling:
        d = self.defaults
        return Sampling(d.text_temperature if temperature is None else temperature,
                        d.text_top_k if top_k is None else top_k, d.text_top_p if top_p is None else top_p)

    def _run(self, requests: list[Request], batch_size: int, progress: bool) -> list:
        """Run requests in batches of `batch_size` with an optional progress bar (tokens/s, time left)."""
        if batch_size < 1:
            raise InputError(f"batch size must be >= 1, got {batch_size}")
        for r in requests:  # fail before any compute
            self.engine.check([r])
        bar = None
        if progress:
            from tqdm import tqdm

            total = sum(r.steps() for r in requests)
            bar = tqdm(total=total, unit="tok", dynamic_ncols=True, leave=False, delay=1.0)  # shown after 1 s
        results = []
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            done = [0]

            def on_step(step, _total, batch=batch, done=done):
                if bar is not None:
                    now = sum(min(step, r.steps()) for r in batch)
                    bar.update(now - done[0])
                    done[0] = now

            t0 = time.perf_counter()
            out = self.engine.generate(batch, on_step=on_step, **self.decoding(batch))
            seconds = time.perf_counter() - t0
            if bar is not None:
                bar.update(sum(r.steps() for r in batch) - done[0])
            results += [(r, seconds / len(batch)) for r in out]
        if bar is not None:
            bar.close()
        return results

    # ---- tasks ----

    def image_request(self, prompt: str, seed: int = 0, grid: tuple[int, int] | None = None, ratio: str | None = None,
                      image_area: int | None = None, cfg_scale: float | None = None, temperature: float | None = None,
                      top_k: int | None = None, top_p: float | None = None, negative_prompt: str | None = None,
                      suffix: str | None = None) -> Request:
        """The engine request for one text-to-image generation (the grid from `grid` or ratio and area)."""
        _need_prompt(prompt)
        fmt = self.formatter()
        h, w = grid or self.grid(ratio, image_area)
        d = self.defaults
        negative = fmt.negative_prompt((h, w), d.negative_prompt if negative_prompt is None else negative_prompt)
        return Request(fmt.generation_prompt(prompt, (h, w), d.positive_suffix if suffix is None else suffix),
                       image_template(self.vocab, h, w), negative=negative,
                       cfg_scale=d.cfg_scale if cfg_scale is None else cfg_scale,
                       visual=self._image_sampling(temperature, top_k, top_p), seed=seed)

    def image_result(self, request: Request, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes (h, w), pixels (H, W, 3) uint8) of a finished image request's tokens."""
        image = self.formatter().parse(np.concatenate([request.prompt, tokens]))[-1]
        if not (isinstance(image, Image) and image.complete):
            raise InputError("the tokens do not end in a complete image")
        return image.codes, self.require_vision().decode_image(image.codes)

    def generate_images(self, prompts: list[str], n: int = 1, ratio: str | None = None, image_area: int | None = None,
                        cfg_scale: float | None = None, seed: int = 0, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None, negative_prompt: str | None = None,
                        suffix: str | None = None, batch_size: int = 8, progress: bool = False) -> list[Generated]:
        """n images per prompt; image j of prompt i uses seed + i * n + j."""
        self.require_vision()
        if not prompts or n < 1:
            raise InputError("need at least one prompt and n >= 1")
        grid = self.grid(ratio, image_area)
        requests, meta = [], []
        for i, prompt in enumerate(prompts):
            for j in range(n):
                s = seed + i * n + j
                requests.append(self.image_request(prompt, s, grid, cfg_scale=cfg_scale, temperature=temperature,
                                                   top_k=top_k, top_p=top_p, negative_prompt=negative_prompt,
                                                   suffix=suffix))
                meta.append((prompt, s))
        out = []
        for (res, seconds), req, (prompt, s) in zip(self._run(requests, batch_size, progress), requests, meta):
            codes, pixels = self.image_result(req, res.tokens)
            out.append(Generated(prompt, s, codes, pixels, res.tokens, seconds))
        return out

    def interleaved_request(self, prompt: str, max_images: int = MAX_INTERLEAVED_IMAGES,
                            max_new_tokens: int | None = None, grid: tuple[int, int] | None = None,
                            cfg_scale: float | None = None, seed: int = 0, temperature: float | None = None,
                            top_k: int | None = None, top_p: float | None = None,
                            text_temperature: float | None = None) -> Request:
        """The engine request for an interleaved answer: `B prompt` continued by the model with text and
        images where it opens them (BOI), each image of `grid` (default: the model's), up to `max_images`.
        Guidance applies to the images; the negative twin is `B` alone, followed by the same tokens."""
        _need_prompt(prompt)
        self.require_vision()
        if not 1 <= max_images <= MAX_INTERLEAVED_IMAGES:
            raise InputError(f"max_images must be in [1, {MAX_INTERLEAVED_IMAGES}], got {max_images}")
        fmt, v = self.formatter(), self.vocab
        h, w = grid or self.grid()
        ids = np.concatenate([[v.bos], fmt.text(prompt)]).astype(np.int64)
        header = fmt.image_header(h, w)[1:]
        per_image = 1 + len(header) + h * (w + 1) + 2
        if max_new_tokens is None:  # room for every image and some text around each, within the context
            room = self.model.config.max_position_embeddings - len(ids)
            max_new_tokens = max(1, min(max_images * (per_image + 32) + 32, room))
        return Request(ids, max_new_tokens=max_new_tokens, negative=np.array([v.bos], dtype=np.int64),
                       cfg_scale=self.defaults.cfg_scale if cfg_scale is None else cfg_scale,
                       visual=self._image_sampling(temperature, top_k, top_p),
                       text=self._text_sampling(text_temperature, None, None), seed=seed,
                       max_images=max_images, image_header=header, image_grid=(h, w))

    def interleaved_result(self, request: Request, tokens: np.ndarray) -> list[Text | Picture]:
        """The segments the model wrote after the prompt, in order: Text, and Picture for complete images."""
        segments = self.formatter().parse(np.concatenate([request.prompt, tokens]), strict=False)[1:]
        out = []
        for s in segments:
            if isinstance(s, Image):
                if s.complete:
                    out.append(Picture(s.codes, self.require_vision().decode_image(s.codes)))
            elif isinstance(s, Text) and s.text.strip():
                out.append(Text(s.text.strip()))
        return out

    def generate_interleaved(self, prompt: str | list[str], max_images: int = MAX_INTERLEAVED_IMAGES,
                             max_new_tokens: int | None = None, cfg_scale: float | None = None, seed: int = 0,
                             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                             batch_size: int = 8, progress: bool = False) -> list:
        """Text and images in one output sequence, the model deciding where an image starts: the segments
        after `prompt` (format.Text and Picture), in order. Given a list of prompts, one such list per
        prompt (prompt i uses seed + i), run in batches of `batch_size`."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("need at least one prompt")
        reqs = [self.interleaved_request(p, max_images, max_new_tokens, cfg_scale=cfg_scale, seed=seed + i,
                                         temperature=temperature, top_k=top_k, top_p=top_p)
                for i, p in enumerate(prompts)]
        results = self._run(reqs, batch_size, progress)
        out = [self.interleaved_result(r, res.tokens) for r, (res, _) in zip(reqs, results)]
        return out[0] if isinstance(prompt, str) else out

    def chat_request(self, image, question: str, max_new_tokens: int | None = None, template: str | None = None,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     seed: int = 0) -> Request:
        """The engine request for a question about an image (PIL image or uint8 (H, W, 3) at model resolution)."""
        codes = self.require_vision().encode_image(image).numpy()
        prompt = self.formatter("raster").chat_prompt(codes, question, template or self.defaults.chat_template)
        if max_new_tokens is None:  # the default answer length, within what the context leaves
            room = self.model.config.max_position_embeddings - len(prompt)
            max_new_tokens = max(1, min(self.defaults.max_new_tokens, room))
        return Request(prompt, max_new_tokens=max_new_tokens,
                       text=self._text_sampling(temperature, top_k, top_p), seed=seed)

    def answer(self, tokens: np.ndarray) -> str:
        """The text of generated tokens (special tokens dropped)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def chat(self, image, question: str, max_new_tokens: int | None = None, template: str | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, progress: bool = False) -> str:
        """Answer a question about an image (PIL image or uint8 (H, W, 3) at model resolution)."""
        req = self.chat_request(image, question, max_new_tokens, template, temperature, top_k, top_p, seed)
        (res, _), = self._run([req], 1, progress)
        return self.answer(res.tokens)

    def video_request(self, prompt: str, frames: int, context: np.ndarray | None = None, ratio: str | None = None,
                      image_area: int | None = None, fps: float | None = None, cfg_scale: float | None = None,
                      seed: int = 0, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, negative_prompt: str | None = None,
                      grid: tuple[int, int] | None = None) -> Request:
        """The engine request for `frames` latent frames, continuing the codes of `context` (t, h, w) if given."""
        _need_prompt(prompt)
        self.require_vision()
        fmt = self.formatter("raster")
        h, w = grid or (context.shape[1:] if context is not None else self.grid(ratio, image_area))
        known = 0 if context is None else len(context)
        if frames < 1 + known:
            raise InputError(f"a video of {frames} latent frames cannot extend {known} given ones")
        fps = fps or self.defaults.video_fps
        cond = fmt.video_prompt(prompt, (frames, h, w), fps, context)
        neg_text = self.defaults.negative_prompt if negative_prompt is None else negative_prompt
        negative = fmt.video_prompt(neg_text, (frames, h, w), fps, context)
        template = video_template(self.vocab, fmt.image_header(h, w), frames - known, h, w)
        cfg = self.defaults.cfg_scale if cfg_scale is None else cfg_scale
        return Request(cond, template, negative=negative, cfg_scale=cfg, seed=seed,
                       visual=self._image_sampling(temperature, self.defaults.video_top_k if top_k is None else top_k,
                                                   top_p))

    def video_result(self, request: Request, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codes (t, h, w), frames (T, H, W, 3) uint8) of a finished video request's tokens."""
        video = self.formatter("raster").parse(np.concatenate([request.prompt, tokens]))[-1]
        if not (isinstance(video, Video) and video.complete):
            raise InputError("the tokens do not end in a complete video")
        return video.codes, self.require_vision().decode_video(video.codes, "causal")

    def _video(self, prompt: str, frames: int, context: np.ndarray | None, ratio, image_area, fps, cfg_scale, seed,
               temperature, top_k, top_p, negative_prompt, progress) -> Generated:
        req = self.video_request(prompt, frames, context, ratio, image_area, fps, cfg_scale, seed, temperature, top_k,
                                 top_p, negative_prompt)
        (res, seconds), = self._run([req], 1, progress)
        codes, pixels = self.video_result(req, res.tokens)
        return Generated(prompt, seed, codes, pixels, res.tokens, seconds)

    def generate_video(self, prompt: str, frames: int, ratio: str | None = None, image_area: int | None = None,
                       fps: float | None = None, cfg_scale: float | None = None, seed: int = 0,
                       temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                       negative_prompt: str | None = None, progress: bool = False) -> Generated:
        """Text-to-video: `frames` latent frames (4 video frames each), decoded in causal mode."""
        return self._video(prompt, frames, None, ratio, image_area, fps, cfg_scale, seed, temperature, top_k, top_p,
                           negative_prompt, progress)

    def extend_video(self, frames_uint8: np.ndarray, prompt: str, new_frames: int, fps: float | None = None,
                     cfg_scale: float | None = None, seed: int = 0, temperature: float | None = None,
                     top_k: int | None = None, top_p: float | None = None, negative_prompt: str | None = None,
                     progress: bool = False) -> Generated:
        """Continue a video: encode its frames (causal mode), then generate `new_frames` latent frames."""
        vision = self.require_vision()
        context = vision.encode_video(frames_uint8, "causal").numpy()
        return self._video(prompt, len(context) + new_frames, context, None, None, fps, cfg_scale, seed, temperature,
                           top_k, top_p, negative_prompt, progress)

    def inpaint(self, image, prompt: str, rings: int, cfg_scale: float | None = None, seed: int = 0,
                temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                negative_prompt: str | None = None, suffix: str | None = None, order: str | None = None,
                progress: bool = False) -> Generated:
        """Keep the outer `rings` rings of the image's codes and generate the interior. The kept border
        must be the start of the sequence, so this needs the spiral-in order: the model's own (trained
        with order=spiral), or `order="spiral"` to force it on a model trained otherwise."""
        if (order or self.defaults.order) != "spiral":
            got = f"asked for {order!r}" if order else f"this model was trained in {self.defaults.order!r} order"
            raise InputError(f"inpainting keeps the border and writes the inside, which needs the spiral-in token "
                             f"order; {got} (train one with order=spiral, or pass --order spiral, order='spiral' "
                             "in Python, to try anyway)")
        order = "spiral"
        vision = self.require_vision()
        codes = vision.encode_image(image).numpy()
        h, w = codes.shape
        fmt = self.formatter(order)
        known = border_tokens(h, w, rings)
        if known >= h * w:
            raise InputError(f"rings={rings} keeps the whole {h}x{w} code grid, which leaves nothing to inpaint; use "
                             f"at most {(min(h, w) - 1) // 2}")
        d = self.defaults
        cond = fmt.partial_image_prompt(prompt, codes, known, d.positive_suffix if suffix is None else suffix)
        neg_text = d.negative_prompt if negative_prompt is None else negative_prompt
        negative = fmt.partial_image_prompt(neg_text, codes, known)
        req = Request(cond, image_template(self.vocab, h, w, known=known), negative=negative,
                      cfg_scale=d.cfg_scale if cfg_scale is None else cfg_scale, seed=seed,
                      visual=self._image_sampling(temperature, top_k, top_p))
        (res, seconds), = self._run([req], 1, progress)
        image_out = fmt.parse(np.concatenate([cond, res.tokens]))[-1]
        assert isinstance(image_out, Image) and image_out.complete, image_out
        return Generated(prompt, seed, image_out.codes, vision.decode_image(image_out.codes), res.tokens, seconds)

