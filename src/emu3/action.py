"""FAST action tokens (Pertsch et al. 2025, as used by Emu3's vision-language-action model).

A chunk of actions (T steps x D dimensions, normalised to about [-1, 1]) becomes a short token
sequence: an orthonormal DCT-II along time for each dimension, coefficients multiplied by `scale`
and rounded (small high-frequency terms vanish), flattened frequency-major (every dimension's DC
term first, then every dimension's first harmonic, ...), then compressed by a BPE trained on such
sequences. Only the BPE is learned (`fit`); decoding inverts each step and is total: unknown ids
are dropped, a short sequence is zero-filled (missing high frequencies), a long one is cut.

What is unusual here:
- The DCT is a T x T matrix product (exact, float64) rather than a scipy dependency.
- Each quantised integer becomes one character of Unicode's private use area, so the BPE (from
  `tokenizers`) sees one "word" of symbols no normaliser or pre-tokenizer can touch; its initial
  alphabet is the whole fitted integer range, so every chunk within the range can be encoded.
- Ids are 0..vocab_size-1; where they live in the language model's vocabulary (the paper: the last
  1,024 text ids) is the sequence format's business, not this module's.

Files: one JSON (`fast_tokenizer.json`) with the settings and the BPE, written atomically.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .fsutil import atomic_file

FORMAT, VERSION = "emu3-fast-action-tokenizer", 1
FILE = "fast_tokenizer.json"
_BASE = 0xE000  # Unicode private use area: 6,400 code points, never normalised or split
_MAX_RANGE = 0xF8FF - _BASE + 1


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II as an (n, n) matrix: coefficients = M @ signal, signal = M.T @ coefficients."""
    k = np.arange(n)[:, None]
    t = np.arange(n)[None, :]
    m = np.cos(math.pi * (2 * t + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


@dataclass
class FASTConfig:
    time_horizon: int  # T: actions per chunk
    action_dim: int  # D
    scale: float = 10.0
    vocab_size: int = 1024
    min_token: int = 0  # the smallest quantised coefficient seen when fitting
    max_token: int = 0  # the largest


class ActionIds:
    """Where action tokens live in a language model's vocabulary: as in Emu3's VLA model, FAST token
    i is text id `text_size - count + i`, i.e. the last `count` BPE ids are given over to actions."""

    def __init__(self, text_size: int, count: int = 1024):
        if not 0 < count <= text_size - 256:
            raise InputError(f"{count} action ids do not fit in a text vocabulary of {text_size} ids: the "
                             "byte-level BPE needs its first 256; train the text tokenizer larger or FAST smaller")
        self.start, self.count = text_size - count, count

    def to_lm(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.count):
            raise InputError(f"action tokens must be in [0, {self.count}), got {tokens.min()}..{tokens.max()}")
        return tokens + self.start

    def from_lm(self, ids) -> np.ndarray:
        """Language-model ids -> action tokens, keeping only ids in the action range."""
        ids = np.asarray(ids, np.int64)
        return ids[(ids >= self.start) & (ids < self.start + self.count)] - self.start

    @property
    def lm_range(self) -> range:
        """The ids a constrained decoder may emit for actions."""
        return range(self.start, self.start + self.count)


class FASTTokenizer:
    def __init__(self, config: FASTConfig, bpe):
        self.config, self.bpe = config, bpe
        self._dct = dct_matrix(config.time_horizon)

    # ---- fitting ----

    @classmethod
    def fit(cls, chunks: np.ndarray, scale: float = 10.0, vocab_size: int = 1024,
            min_frequency: int = 2) -> FASTTokenizer:
        """Learn the BPE on action chunks (N, T, D)."""
        from tokenizers import Tokenizer, models, trainers

        chunks = np.asarray(chunks, np.float64)
        if chunks.ndim != 3 or not chunks.size:
            raise InputError(f"fit needs action chunks shaped (N, T, D), got {chunks.shape}")
        if not np.isfinite(chunks).all():
            raise InputError("action chunks contain NaN or infinity")
        if not scale > 0:
            raise InputError(f"scale must be > 0, got {scale}")
        n, t, d = chunks.shape
        q = np.rint(np.einsum("kt,ntd->nkd", dct_matrix(t), chunks) * scale).astype(np.int64)  # (N, T, D)
        lo, hi = int(q.min()), int(q.max())
        span = hi - lo + 1
        if span > min(vocab_size, _MAX_RANGE):
            raise InputError(f"quantised coefficients span {span} values ({lo}..{hi}) but vocab_size is {vocab_size}: "
                             "raise vocab_size, lower scale, or normalise the actions to [-1, 1]")
        config = FASTConfig(t, d, float(scale), vocab_size, lo, hi)
        alphabet = [chr(_BASE + i) for i in range(span)]
        bpe = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, initial_alphabet=alphabet,
                                      show_progress=False, special_tokens=[])
        tok = cls(config, bpe)
        bpe.train_from_iterator((tok._chars(row) for row in q.reshape(n, -1)), trainer=trainer)
        return tok

    # ---- encode / decode ----

    def _chars(self, ints: np.ndarray) -> str:
        return "".join(chr(_BASE + int(v) - self.config.min_token) for v in ints)

    def quantize(self, chunk: np.ndarray) -> np.ndarray:
        """(T, D) actions -> (T*D,) integers, frequency-major, clipped to the fitted range."""
        c = self.config
        chunk = np.asarray(chunk, np.float64)
        if chunk.shape != (c.time_horizon, c.action_dim):
            raise InputError(f"an action chunk must be ({c.time_horizon}, {c.action_dim}), got {chunk.shape}")
        if not np.isfinite(chunk).all():
            raise InputError("action chunk contains NaN or infinity")
        q = np.rint(self._dct @ chunk * c.scale).astype(np.int64)  # (T, D) coefficients, row = frequency
        return np.clip(q, c.min_token, c.max_token).reshape(-1)

    def encode(self, chunk: np.ndarray) -> list[int]:
        """(T, D) actions -> token ids in [0, vocab_size)."""
        return self.bpe.encode(self._chars(self.quantize(chunk))).ids

    def encode_batch(self, chunks: np.ndarray) -> list[list[int]]:
        return [e.ids for e in self.bpe.encode_batch([self._chars(self.quantize(ch)) for ch in chunks])]

    def decode(self, ids) -> np.ndarray:
        """Token ids -> (T, D) actions. Total: ids outside the vocabulary are dropped, symbols are cut
        to whole frequency rows, missing high frequencies are zero."""
        c = self.config
        size = self.bpe.get_vocab_size()
        pieces = [self.bpe.id_to_token(int(i)) for i in ids if 0 <= int(i) < size]
        ints = [ord(ch) - _BASE + c.min_token for p in pieces if p for ch in p]
        n = min(len(ints), c.time_horizon * c.action_dim) // c.action_dim * c.action_dim
        coef = np.zeros((c.time_horizon, c.action_dim))
        coef.reshape(-1)[:n] = ints[:n]
        return self._dct.T @ (coef / c.scale)  # (T, D)

    @property
    def max_error(self) -> float:
        """Bound on |decode(encode(x)) - x| per action for chunks inside the fitted range: rounding
        moves each coefficient by <= 0.5/scale, and the inverse DCT sums T of them, each weighted
        <= sqrt(2/T)."""
        t = self.config.time_horizon
        return 0.5 / self.config.scale * math.sqrt(2.0 / t) * t

    # ---- files ----

    def to_dict(self) -> dict:
        """The content of fast_tokenizer.json."""
        return {"format": FORMAT, "version": VERSION, **asdict(self.config), "bpe": json.loads(self.bpe.to_str())}

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / FILE
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> FASTTokenizer:
        from tokenizers import Tokenizer

        path = Path(folder)
        path = path / FILE if path.is_dir() else path
        if not path.exists():
            raise InputError(f"{path}: no FAST action tokenizer here (expected {FILE})")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a FAST action tokenizer file ({e})") from None
        if doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise InputError(f"{path}: format {doc.get('format')!r} version {doc.get('version')!r}, "
                             f"expected {FORMAT!r} version {VERSION}")
        fields = {k: doc[k] for k in FASTConfig.__dataclass_fields__}
        return cls(FASTConfig(**fields), Tokenizer.from_str(json.dumps(doc["bpe"])))
