"""Every Emu3 token sequence: the builders of training samples and prompts, and the parser.

Layouts (B = BOS, E = EOS; `meta` is plain text tokenized like any other text):

    image        BOI "{h}*{w}" IMG  row_0 EOL ... row_{h-1} EOL  EOF EOI           released
    video        BOV "{t}*{h}*{w}[@{fps}]" VID  image_0 ... image_{t-1}  EOV        ours (see below)
    T2I          B caption image E                (caption dropped with prob p -> unconditional)
    I2T          B image caption E                (loss on caption and E)
    chat         B "You are a helpful assistant. USER: " image question ". ASSISTANT:" answer E
                 follow-up turns (training only): ... answer " USER: " question ". ASSISTANT:" answer ... E
    generation   B prompt + suffix BOI "{h}*{w}" IMG   and its negative twin (released defaults)
    T2V          B caption video E;   video extension: the same, loss only after the context frames
    interleaved  B (text | image)* E, at most 8 images
    text         B text E

Video (no released template). The papers describe `[BOS] caption [SOV] meta [SOT] vision tokens
[EOV] [EOS]` with EOL per row and EOF per frame. We map SOV/SOT/EOV to three unused extras (BOV =
<|extra_0|>, VID = <|extra_1|>, EOV = <|extra_2|>), put the latent frame count, grid and frame rate
in the meta text, and write every latent frame as a complete released image string. So each frame
is a valid image to the parser and to a model pretrained on images, the EOF that closes a frame is
the paper's frame break, and continuing a video means appending image strings.

Captions and text may be given as strings or as already-tokenized text ids (training data stores
ids; within a template, as in chat, strings are joined first so the BPE sees the released text).

Visual tokens may be written in another order (`emu3.orders`); EOL then follows every w tokens in
sequence order. Every sample carries a per-token loss mask (mask[i]: ids[i] is a training target)
and a per-token type (text, visual code, or markup: markers, EOL/EOF and meta).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from .errors import InputError
from .orders import from_sequence, permutation, to_sequence
from .tokenizer import TextTokenizer

RELEASED_CHAT_TEMPLATE = "You are a helpful assistant. USER: {image_prompt}{text_prompt}. ASSISTANT:"
STAGE1_TEMPLATE = "{image_prompt}{text_prompt}"
# Later turns of a conversation about one image, as the -hf processor's chat template lays them out.
FOLLOW_UP_TEMPLATE = " USER: {text_prompt}. ASSISTANT:"
POSITIVE_SUFFIX = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
                   "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
                   "username, blurry.")
MAX_INTERLEAVED_IMAGES = 8


class TokenType(IntEnum):
    TEXT = 0  # BPE text, BOS, EOS, PAD
    VISUAL = 1  # visual codes
    MARKUP = 2  # BOI/IMG/EOI, BOV/VID/EOV, EOL, EOF and the meta text


@dataclass
class Sample:
    """A token sequence for training: ids, loss_mask[i] (ids[i] is a target), types[i] (TokenType), and
    a loss weight for its text targets (visual targets weigh the policy's vision_weight)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    types: np.ndarray
    weight: float = 1.0

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PreferencePair:
    """DPO data: a prompt and two continuations, stored as the exact generated ids."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray


# ---- parser output ----


@dataclass
class Text:
    text: str


@dataclass
class Image:
    """A parsed image. `known` marks the positions the sequence filled; complete means all of them,
    with the released structure. `problem` says what is wrong when it is not complete."""

    codes: np.ndarray  # (h, w) int64; unknown positions are 0
    known: np.ndarray  # (h, w) bool
    complete: bool = True
    problem: str | None = None


@dataclass
class Video:
    codes: np.ndarray  # (t, h, w) int64
    known: np.ndarray  # (t, h, w) bool
    fps: float | None = None
    complete: bool = True
    problem: str | None = None


class ParseError(InputError):
    """A sequence that does not have the structure it claims (only raised with strict=True)."""


MAX_ASPECT = 5  # the released processor refuses images whose long side is more than 5 times the short one


def generation_grid(ratio: str = "1:1", image_area: int = 518400, factor: int = 8) -> tuple[int, int]:
    """Token grid (h, w) for a "W:H" aspect ratio and a pixel area, rounded half to even (as released)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", ratio or "")
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise InputError(f"aspect ratio must be 'W:H' with positive integers, got {ratio!r}")
    if image_area <= 0 or factor <= 0:
        raise InputError(f"image_area and factor must be positive, got {image_area} and {factor}")
    w, h = int(m.group(1)), int(m.group(2))
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InputError(f"aspect ratio {ratio} is {max(w, h) / min(w, h):.3g} to 1, above the limit of {MAX_ASPECT} "
                         "(the released image processor's)")
    target = (image_area / (h * w)) ** 0.5
    th, tw = int(round(h * target / factor)), int(round(w * target / factor))
    if th < 1 or tw < 1:
        raise InputError(f"aspect ratio {ratio} at an area of {image_area} pixels gives an empty grid {th}x{tw}")
    return th, tw


class _Seq:
    """Accumulates (ids, type, loss) runs."""

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.types: list[np.ndarray] = []
        self.loss: list[np.ndarray] = []

    def add(self, ids, kind: TokenType | np.ndarray, loss: bool) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        kinds = np.full(len(ids), kind, np.uint8) if isinstance(kind, (int, TokenType)) else kind
        self.ids.append(ids)
        self.types.append(kinds)
        self.loss.append(np.full(len(ids), loss, bool))

    def __len__(self) -> int:
        return sum(len(x) for x in self.ids)

    def sample(self) -> Sample:
        cat = np.concatenate
        s = Sample(cat(self.ids), cat(self.loss), cat(self.types))
        s.loss_mask[0] = False  # nothing predicts the first token
        return s


class Formatter:
    """Builds and parses Emu3 sequences for one tokenizer (and one visual token order)."""

    def __init__(self, tokenizer: TextTokenizer, order: str = "raster", block: int = 4):
        self.tok = tokenizer
        self.vocab = tokenizer.vocab
        permutation(1, 1, order, block)  # validates the order name
        self.order, self.block = order, block

    # ---- pieces ----

    def text(self, text: str | np.ndarray) -> np.ndarray:
        """User text -> ids (special-token strings in it stay plain text); or already-tokenized text
        ids, checked to be text ids, as they are."""
        if isinstance(text, str):
            return np.asarray(self.tok.encode(text, allow_special=False), dtype=np.int64)
        ids = np.asarray(text, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab.text_size):
            raise InputError(f"text ids must be in [0, {self.vocab.text_size}), got [{ids.min()}, {ids.max()}]")
        return ids

    def _codes(self, codes, ndim: int) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != ndim or codes.size == 0 or codes.dtype.kind not in "iu":
            shape = "(h, w)" if ndim == 2 else "(t, h, w)"
            raise InputError(f"visual codes must be a non-empty integer array {shape}, got {codes.shape} {codes.dtype}")
        k = self.vocab.codebook_size
        if codes.min() < 0 or codes.max() >= k:
            raise InputError(f"visual codes must be in [0, {k}), got values in [{codes.min()}, {codes.max()}]")
        return codes.astype(np.int64)

    def image(self, codes) -> tuple[np.ndarray, np.ndarray]:
        """(h, w) codes -> the image string's ids and types."""
        codes = self._codes(codes, 2)
        h, w = codes.shape
        v = self.vocab
        head = self.image_header(h, w)
        seq = v.visual(to_sequence(codes, self.order, self.block)).reshape(h, w)
        body = np.concatenate([seq, np.full((h, 1), v.eol)], axis=1).reshape(-1)  # (h * (w + 1),)
        ids = np.concatenate([head, body, [v.eof, v.eoi]])
        types = np.full(len(ids), TokenType.MARKUP, np.uint8)
        types[len(head):len(head) + len(body)][body != v.eol] = TokenType.VISUAL
        return ids, types

    def image_header(self, h: int, w: int) -> np.ndarray:
        """BOI "{h}*{w}" IMG: the end of a generation prompt."""
        if h < 1 or w < 1:
            raise InputError(f"image grid must be at least 1x1, got {h}x{w}")
        return np.concatenate([[self.vocab.boi], self.text(f"{h}*{w}"), [self.vocab.img]])

    def video_header(self, t: int, h: int, w: int, fps: float | None = None) -> np.ndarray:
        """BOV "{t}*{h}*{w}[@{fps}]" VID."""
        if min(t, h, w) < 1:
            raise InputError(f"video grid must be at least 1x1x1, got {t}x{h}x{w}")
        meta = f"{t}*{h}*{w}" + (f"@{fps:g}" if fps else "")
        return np.concatenate([[self.vocab.bov], self.text(meta), [self.vocab.vid]])

    def video(self, codes, fps: float | None = None) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(t, h, w) codes -> ids, types, and the index where each frame's image string starts."""
        codes = self._codes(codes, 3)
        head = self.video_header(*codes.shape, fps)
        ids, types, starts = [head], [np.full(len(head), TokenType.MARKUP, np.uint8)], []
        pos = len(head)
        for frame in codes:
            fi, ft = self.image(frame)
            starts.append(pos)
            ids.append(fi)
            types.append(ft)
            pos += len(fi)
        ids.append([self.vocab.eov])
        types.append(np.array([TokenType.MARKUP], np.uint8))
        return np.concatenate(ids).astype(np.int64), np.concatenate(types), starts

    # ---- training samples ----

    def _caption(self, caption, drop: float, rng):
        if not 0.0 <= drop <= 1.0:
            raise InputError(f"caption dropout must be in [0, 1], got {drop}")
        if drop > 0.0:
            if rng is None:
                raise InputError("caption dropout needs an rng (numpy Generator) so that it is reproducible")
            if rng.random() < drop:
                return ""
        return caption

    def t2i(self, caption: str, codes, drop_caption: float = 0.0, rng=None, loss: str = "all") -> Sample:
        """B caption image E. loss="all" (pretraining) or "output" (the image and E, as generated)."""
        _check_loss(loss)
        s = _Seq()
        s.add([self.vocab.bos], TokenType.TEXT, False)
        s.add(self.text(self._caption(caption, drop_caption, rng)), TokenType.TEXT, loss == "all")
        ids, types = self.image(codes)
        n_head = int(np.argmax(ids == self.vocab.img)) + 1
        s.add(ids[:n_head], types[:n_head], loss == "all")
        s.add(ids[n_head:], types[n_head:], True)
        s.add([self.vocab.eos], TokenType.TEXT, True)
        return s.sample()

    def i2t(self, codes, caption: str, loss: str = "output") -> Sample:
        """B image caption E; by default the loss covers only the caption and E."""
        _check_loss(loss)
        if not (caption.strip() if isinstance(caption, str) else len(caption)):
            raise InputError("an image-to-text sample needs a non-empty caption")
        s = _Seq()
        s.add([self.vocab.bos], TokenType.TEXT, False)
        ids, types = self.image(codes)
        s.add(ids, types, loss == "all")
        s.add(self.text(caption), TokenType.TEXT, True)
        s.add([self.vocab.eos], TokenType.TEXT, True)
        return s.sample()

    def chat_prompt(self, codes, question: str, template: str = RELEASED_CHAT_TEMPLATE) -> np.ndarray:
        """The understanding prompt (released template: a period is always appended to the question)."""
        return self._chat(codes, question, template).sample().ids

    def _chat(self, codes, question: str, template: str) -> _Seq:
        if "{image_prompt}" not in template or "{text_prompt}" not in template:
            raise InputError("a chat template needs {image_prompt} and {text_prompt}")
        before, rest = template.split("{image_prompt}", 1)
        between, after = rest.split("{text_prompt}", 1)
        s = _Seq()
        s.add([self.vocab.bos], TokenType.TEXT, False)
        if before:
            s.add(self.text(before), TokenType.TEXT, False)
        ids, types = self.image(codes)
        s.add(ids, types, False)
        s.add(self.text(between + question + after), TokenType.TEXT, False)
        return s

    def chat(self, codes, question: str, answer: str, template: str = RELEASED_CHAT_TEMPLATE,
             follow_ups: list[tuple[str, str]] | tuple = ()) -> Sample:
        """Chat prompt + answer (+ follow-up turns: FOLLOW_UP_TEMPLATE + answer each) + E; loss on the
        answers and E. Follow-ups ask more about the same image for the price of a few text tokens."""
        s = self._chat(codes, question, template)
        for i, (q, a) in enumerate([(question, answer), *follow_ups]):
            if not a.strip():
                raise InputError(f"a chat sample needs non-empty answers (turn {i + 1} has none)")
            if i:
                s.add(self.text(FOLLOW_UP_TEMPLATE.format(text_prompt=q)), TokenType.TEXT, False)
            s.add(self.text(a), TokenType.TEXT, True)
        s.add([self.vocab.eos], TokenType.TEXT, True)
        return s.sample()

    def t2v(self, caption: str, codes, fps: float | None = None, drop_caption: float = 0.0, rng=None,
            loss: str = "all") -> Sample:
        """B caption video E."""
        return self.video_extension(caption, codes, 0, fps, drop_caption, rng, loss)

    def video_extension(self, caption: str, codes, context_frames: int, fps: float | None = None,
                        drop_caption: float = 0.0, rng=None, loss: str = "output") -> Sample:
        """B caption video E where the first `context_frames` latent frames are given: with
        loss="output" only the frames after them (and EOV, E) are targets."""
        _check_loss(loss)
        codes = self._codes(codes, 3)
        if not 0 <= context_frames < len(codes):
            raise InputError(f"context_frames must be in [0, {len(codes)}) for {len(codes)} latent frames, "
                             f"got {context_frames}")
        s = _Seq()
        s.add([self.vocab.bos], TokenType.TEXT, False)
        s.add(self.text(self._caption(caption, drop_caption, rng)), TokenType.TEXT, loss == "all")
        ids, types, starts = self.video(codes, fps)
        cut = starts[context_frames] if context_frames else int(np.argmax(ids == self.vocab.vid)) + 1
        s.add(ids[:cut], types[:cut], loss == "all")
        s.add(ids[cut:], types[cut:], True)
        s.add([self.vocab.eos], TokenType.TEXT, True)
        return s.sample()

    def text_sample(self, text) -> Sample:
        """B text E: language data."""
        if not len(text):
            raise InputError("a text sample needs text")
        s = _Seq()
        s.add([self.vocab.bos], TokenType.TEXT, False)
        s.add(self.text(text), TokenType.TEXT, True)
        s.add([self.vocab.eos], TokenType.TEXT, True)
        return s.sample()

    def interleaved(self, segments: list, loss: str = "all") -> Sample:
        """B (text | (h, w) codes)* E, at most 8 images; text as a string or as 1-D text ids."""
        _check_loss(loss)
        if not segments:
            raise InputError("an interleaved sample needs at least one segment")
        is_image = [not isinstance(x, str) and np.asarray(x).ndim == 2 for x in segments]
        n_images = sum(is_image)
        if n_images > MAX_INTERLEAVED_IMAGES:
            raise InputError(f"an interleaved sample holds at most {MAX_INTERLEAVED_IMAGES} images, got {n_images}")
        s = _Seq()
        s.add([self.vocab.bos], TokenType.TEXT, False)
        for x, image in zip(segments, is_image):
            if image:
                ids, types = self.image(x)
                s.add(ids, types, True)
            else:
                s.add(self.text(x), TokenType.TEXT, True)
        s.add([self.vocab.eos], TokenType.TEXT, True)
        return s.sample()

    # ---- vision-language-action ----

    def _instruction(self, instruction: str, actions) -> np.ndarray:
        ids = self.text(instruction)
        if np.isin(ids, np.asarray(actions.lm_range)).any():
            raise InputError(f"the instruction {instruction!r} tokenizes into ids {actions.lm_range.start}.. that "
                             "are reserved for action tokens; rephrase it or give actions fewer ids")
        return ids

    def _frame(self, s: _Seq, views, loss: bool) -> None:
        if not len(views):
            raise InputError("a frame needs at least one view (e.g. the table and the wrist camera)")
        for codes in views:
            ids, types = self.image(codes)
            s.add(ids, types, loss)

    def vla(self, instruction: str, frames: list, actions) -> Sample:
        """B instruction (view+ action-chunk)+ E, the Emu3 VLA layout: a window of frames, each the
        images of its camera views followed by the FAST tokens of the action chunk taken there
        (`actions`: an emu3.action.ActionIds, mapping them onto the last text ids). Loss on views and
        actions (the loader weighs visual codes by vision_weight), none on the instruction. A chunk
        ends where the next frame's BOI or the final E begins, so no extra marker is needed.
        frames: [(views, tokens)]: views a list of (h, w) code arrays, tokens 1-D FAST tokens."""
        if not frames:
            raise InputError("a VLA sample needs at least one frame")
        s = _Seq()
        s.add([self.vocab.bos], TokenType.TEXT, False)
        s.add(self._instruction(instruction, actions), TokenType.TEXT, False)
        for views, tokens in frames:
            self._frame(s, views, True)
            if not len(tokens):
                raise InputError("an action chunk needs at least one token")
            s.add(actions.to_lm(tokens), TokenType.TEXT, True)
        s.add([self.vocab.eos], TokenType.TEXT, True)
        return s.sample()

    def vla_prompt(self, instruction: str, history: list, views, actions) -> np.ndarray:
        """The policy's prompt: B instruction, earlier (views, tokens) frames, then the current views;
        the model continues with action ids (actions.lm_range) and ends the chunk with BOI or E."""
        s = _Seq()
        s.add([self.vocab.bos], TokenType.TEXT, False)
        s.add(self._instruction(instruction, actions), TokenType.TEXT, False)
        for past, tokens in history:
            self._frame(s, past, False)
            s.add(actions.to_lm(tokens), TokenType.TEXT, False)
        self._frame(s, views, False)
        return s.sample().ids

    # ---- prompts ----

    def generation_prompt(self, prompt: str, grid: tuple[int, int], suffix: str = "") -> np.ndarray:
        """B prompt+suffix BOI "{h}*{w}" IMG. Released checkpoints use suffix=POSITIVE_SUFFIX."""
        return np.concatenate([[self.vocab.bos], self.text(prompt + suffix), self.image_header(*grid)])

    def partial_image_prompt(self, prompt: str, codes, known_tokens: int, suffix: str = "") -> np.ndarray:
        """B prompt+suffix, then the image string of `codes` cut after its first `known_tokens` visual
        tokens (in this formatter's order, EOL after every w): the model continues the rest. With
        order="spiral" and known_tokens = orders.border_tokens(h, w, k), this inpaints the interior."""
        codes = self._codes(codes, 2)
        h, w = codes.shape
        if not 0 <= known_tokens <= h * w:
            raise InputError(f"known_tokens must be in [0, {h * w}] for a {h}x{w} grid, got {known_tokens}")
        ids, _ = self.image(codes)
        head = len(self.image_header(h, w))
        cut = head + known_tokens + known_tokens // w  # every full run of w tokens brings its EOL
        return np.concatenate([[self.vocab.bos], self.text(prompt + suffix), ids[:cut]])

    def negative_prompt(self, grid: tuple[int, int], negative: str = "") -> np.ndarray:
        """The unconditional twin for CFG. Released checkpoints use negative=NEGATIVE_PROMPT; models
        trained with caption dropout use the empty caption."""
        return self.generation_prompt(negative, grid)

    def video_prompt(self, prompt: str, grid: tuple[int, int, int], fps: float | None = None,
                     context=None) -> np.ndarray:
        """B prompt BOV meta VID [context frames]: text-to-video, or video extension with context."""
        parts = [[self.vocab.bos], self.text(prompt), self.video_header(*grid, fps)]
        if context is not None:
            context = self._codes(context, 3)
            if context.shape[1:] != tuple(grid[1:]) or len(context) >= grid[0]:
                raise InputError(f"context frames {context.shape} must match the grid {grid[1:]} and be fewer "
                                 f"than the {grid[0]} frames of the video")
            parts += [self.image(f)[0] for f in context]
        return np.concatenate(parts).astype(np.int64)

    def preference_pair(self, prompt, chosen, rejected) -> PreferencePair:
        """Validate a DPO triple of id sequences (the exact tokens generated after `prompt`)."""
        arrays = []
        for name, x in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            x = np.asarray(x, dtype=np.int64).reshape(-1)
            if len(x) == 0:
                raise InputError(f"preference pair: {name} is empty")
            if x.min() < 0 or x.max() >= self.vocab.size:
                raise InputError(f"preference pair: {name} has ids outside [0, {self.vocab.size})")
            arrays.append(x)
        return PreferencePair(*arrays)

    # ---- parsing ----

    def parse(self, ids, strict: bool = True) -> list[Text | Image | Video]:
        """Ids -> text segments, images and videos. Stops at the first EOS; BOS and PAD are skipped.

        strict=True raises ParseError on any structural problem; strict=False returns what can be
        recovered, with complete=False, a `known` mask and the problem stated (never a silent shape).
        """
        ids = [int(x) for x in np.asarray(ids).reshape(-1)]
        v = self.vocab
        out: list = []
        text: list[int] = []
        i = 0

        def flush():
            if text:
                out.append(Text(self.tok.decode(text)))
                text.clear()

        while i < len(ids):
            t = ids[i]
            if t == v.eos:
                break
            if t in (v.bos, v.pad):
                i += 1
            elif t == v.boi:
                flush()
                image, i = self._parse_image(ids, i, strict)
                out.append(image)
            elif t == v.bov:
                flush()
                video, i = self._parse_video(ids, i, strict)
                out.append(video)
            elif v.is_text(t):
                text.append(t)
                i += 1
            else:
                name = v.special_name(t) if 0 <= t < v.size else str(t)
                _fail(strict, f"unexpected {name} at position {i} outside an image or video")
                i += 1
        flush()
        return out

    def _read_meta(self, ids: list[int], i: int, end_marker: int, pattern: str, what: str):
        """Meta text from ids[i] up to end_marker -> (match or None, index after the marker, problem)."""
        j = i
        while j < len(ids) and self.vocab.is_text(ids[j]) and j - i < 64:
            j += 1
        if j >= len(ids):
            return None, j, f"{what} truncated in its header"
        meta = self.tok.decode(ids[i:j])
        m = re.fullmatch(pattern, meta)
        if ids[j] != end_marker or m is None:
            return None, j, f"{what} header {meta!r} is not followed by its marker or does not match '{pattern}'"
        return m, j + 1, None

    def _parse_image(self, ids: list[int], i: int, strict: bool) -> tuple[Image, int]:
        v = self.vocab
        m, i, problem = self._read_meta(ids, i + 1, v.img, r"(\d+)\*(\d+)", "image")
        if m is None:
            _fail(strict, problem)
            return Image(np.zeros((0, 0), np.int64), np.zeros((0, 0), bool), False, problem), i
        h, w = int(m.group(1)), int(m.group(2))
        seq: list[int] = []
        problem = None
        row = 0  # visual tokens in the current row
        rows = 0
        while True:
            if i >= len(ids):
                problem = f"image truncated after {len(seq)} of {h * w} visual tokens"
                break
            t = ids[i]
            if v.is_visual(t):
                if row == w or rows == h:
                    problem = f"image row {rows} has more than {w} visual tokens"
                    break
                seq.append(v.code(t))
                row += 1
            elif t == v.eol:
                if row != w:
                    problem = f"image row {rows} has {row} visual tokens, expected {w}"
                    break
                rows, row = rows + 1, 0
            elif t == v.eof:
                if rows != h or row:
                    problem = f"image ends after {rows} rows of {h}"
                    break
                if i + 1 >= len(ids) or ids[i + 1] != v.eoi:
                    problem = "image frame end (EOF) is not followed by the image end (EOI)"
                    i += 1
                    break
                i += 2
                break
            else:
                name = v.special_name(t) if 0 <= t < v.size and not v.is_text(t) else f"text id {t}"
                problem = f"unexpected {name} inside a {h}x{w} image at position {i}"
                break
            i += 1
        _fail(strict and problem is not None, problem)
        codes = np.zeros(h * w, np.int64)
        known = np.zeros(h * w, bool)
        perm = permutation(h, w, self.order, self.block)
        codes[perm[:len(seq)]] = seq
        known[perm[:len(seq)]] = True
        if problem is None:
            codes = from_sequence(np.asarray(seq, np.int64), h, w, self.order, self.block).reshape(-1)
        return Image(codes.reshape(h, w), known.reshape(h, w), problem is None, problem), i

    def _parse_video(self, ids: list[int], i: int, strict: bool) -> tuple[Video, int]:
        v = self.vocab
        m, i, problem = self._read_meta(ids, i + 1, v.vid, r"(\d+)\*(\d+)\*(\d+)(?:@([0-9.]+))?", "video")
        if m is None:
            _fail(strict, problem)
            empty = np.zeros((0, 0, 0), np.int64)
            return Video(empty, empty.astype(bool), None, False, problem), i
        t, h, w = (int(m.group(k)) for k in (1, 2, 3))
        fps = float(m.group(4)) if m.group(4) else None
        codes = np.zeros((t, h, w), np.int64)
        known = np.zeros((t, h, w), bool)
        problem = None
        for f in range(t):
            if i >= len(ids) or ids[i] != v.boi:
                problem = f"video truncated after {f} of {t} frames" if i >= len(ids) else \
                    f"video frame {f} does not start with an image start (BOI) at position {i}"
                break
            frame, i = self._parse_image(ids, i, strict)
            if frame.codes.shape != (h, w):
                problem = f"video frame {f} is {frame.codes.shape[0]}x{frame.codes.shape[1]}, expected {h}x{w}"
                break
            codes[f], known[f] = frame.codes, frame.known
            if not frame.complete:
                problem = f"video frame {f}: {frame.problem}"
                break
        if problem is None:
            if i < len(ids) and ids[i] == v.eov:
                i += 1
            else:
                problem = "video does not end with the video end marker (EOV)"
        _fail(strict and problem is not None, problem)
        return Video(codes, known, fps, problem is None, problem), i


def _check_loss(loss: str) -> None:
    if loss not in ("all", "output"):
        raise InputError(f"loss must be 'all' or 'output', got {loss!r}")


def _fail(condition: bool, problem: str | None) -> None:
    if condition:
        raise ParseError(problem)
