"""One vocabulary for text, control tokens and visual codes; the Emu3 text tokenizer.

Id layout (reference section 2.2), the same structure at every size:

    [0, T)                 byte-level BPE text tokens (T = 151,643 in the released checkpoints)
    T                      <|endoftext|>  PAD
    T+1, T+2               <|im_start|>, <|im_end|>  (unused by Emu3's templates)
    T+3+i, i < 205         <|extra_i|>; EOL = extra_200, EOF = extra_201, BOS = extra_203, EOS = extra_204;
                           video markers (ours, no released template): BOV = extra_0, VID = extra_1, EOV = extra_2
    T+208, T+209, T+210    <|image token|> (IMG: ends the meta text), <|image start|> (BOI), <|image end|> (EOI)
    T+211+k, k < K         <|visual token {k:06d}|>: visual code k  (K = 32,768 released; 184,622 ids in all)

The tokenizer is the released one: Qwen's pre-tokenization regex, NFC, tiktoken's rank-ordered
BPE. It reads its ranks from any of three sources and encodes with one engine (tiktoken), so the
same text gives the same ids whichever files it came from:
- released: `emu3.tiktoken` + `emu3_vision_tokens.txt` (Emu3-Gen / -Chat / -Stage1 folders);
- transformers: `tokenizer.json` ("-hf" folders). Its BPE ids are the tiktoken ranks. transformers'
  converter writes GPT-2's pre-tokenizer into that file; we keep the released Qwen rules, which
  the weights were trained with, so ids can differ from transformers' Emu3Processor on some text;
- ours: a byte-level BPE trained with `tokenizers` (`TextTokenizer.train`), saved as tokenizer.json.

Control tokens are handled here, not by the BPE: with `allow_special=True` (the release's
behaviour) a special-token string written in the text becomes its id, and a string shaped like one
that is not in the vocabulary is an error; with `allow_special=False` the same characters are
plain text, which is what the sequence builders use for user text.
"""

from __future__ import annotations

import base64
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import tiktoken
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .errors import CheckpointError, InputError
from .fsutil import atomic_dir

PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
NUM_EXTRAS = 205
_SPECIAL_RE = re.compile(r"<\|(?:endoftext|im_start|im_end|extra_\d+|image token|image start|image end|"
                         r"visual token \d+)\|>")


@dataclass(frozen=True)
class Vocabulary:
    """The id layout: `text_size` BPE ids, 211 control tokens, then `codebook_size` visual codes."""

    text_size: int = 151643
    codebook_size: int = 32768

    def __post_init__(self) -> None:
        if self.text_size < 256:
            raise InputError(f"a byte-level vocabulary needs at least 256 text tokens, got {self.text_size}")
        if self.codebook_size < 1:
            raise InputError(f"codebook_size must be >= 1, got {self.codebook_size}")

    # control tokens
    @property
    def pad(self) -> int:
        return self.text_size

    def extra(self, i: int) -> int:
        if not 0 <= i < NUM_EXTRAS:
            raise InputError(f"extra token index must be in [0, {NUM_EXTRAS}), got {i}")
        return self.text_size + 3 + i

    @property
    def eol(self) -> int:
        return self.extra(200)

    @property
    def eof(self) -> int:
        return self.extra(201)

    @property
    def bos(self) -> int:
        return self.extra(203)

    @property
    def eos(self) -> int:
        return self.extra(204)

    @property
    def bov(self) -> int:
        return self.extra(0)

    @property
    def vid(self) -> int:
        return self.extra(1)

    @property
    def eov(self) -> int:
        return self.extra(2)

    @property
    def img(self) -> int:
        return self.text_size + 3 + NUM_EXTRAS

    @property
    def boi(self) -> int:
        return self.img + 1

    @property
    def eoi(self) -> int:
        return self.img + 2

    # visual codes
    @property
    def visual_offset(self) -> int:
        return self.img + 3

    @property
    def size(self) -> int:
        return self.visual_offset + self.codebook_size

    def visual(self, code):
        """Code(s) -> id(s); works on ints and numpy/torch arrays."""
        return code + self.visual_offset

    def code(self, token_id):
        """Id(s) -> code(s)."""
        return token_id - self.visual_offset

    def is_visual(self, token_id) -> bool:
        return self.visual_offset <= token_id < self.size

    def is_text(self, token_id) -> bool:
        return 0 <= token_id < self.text_size

    # names
    def special_tokens(self) -> dict[str, int]:
        """Every control and visual token string with its id, in id order."""
        names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(NUM_EXTRAS)),
                 "<|image token|>", "<|image start|>", "<|image end|>",
                 *(f"<|visual token {k:06d}|>" for k in range(self.codebook_size))]
        return {name: self.text_size + i for i, name in enumerate(names)}

    def special_id(self, name: str) -> int:
        """Id of a control/visual token string; a clear error for strings not in this vocabulary."""
        m = re.fullmatch(r"<\|(?:extra_(\d+)|visual token (\d+))\|>", name)
        if m and m.group(1) is not None:
            if int(m.group(1)) >= NUM_EXTRAS or m.group(1) != str(int(m.group(1))):
                raise InputError(f"unknown special token {name}: extras are <|extra_0|> .. <|extra_{NUM_EXTRAS - 1}|>")
            return self.extra(int(m.group(1)))
        if m and m.group(2) is not None:
            k = int(m.group(2))
            if len(m.group(2)) != 6 or not 0 <= k < self.codebook_size:
                raise InputError(f"unknown special token {name}: visual tokens are <|visual token 000000|> .. "
                                 f"<|visual token {self.codebook_size - 1:06d}|>")
            return self.visual(k)
        fixed = {"<|endoftext|>": self.pad, "<|im_start|>": self.pad + 1, "<|im_end|>": self.pad + 2,
                 "<|image token|>": self.img, "<|image start|>": self.boi, "<|image end|>": self.eoi}
        if name not in fixed:
            raise InputError(f"unknown special token {name}")
        return fixed[name]

    def special_name(self, token_id: int) -> str:
        if self.is_visual(token_id):
            return f"<|visual token {self.code(token_id):06d}|>"
        i = token_id - self.text_size
        if i < 0 or i >= self.visual_offset - self.text_size:
            raise InputError(f"id {token_id} is not a control or visual token of this vocabulary "
                             f"(range [{self.text_size}, {self.size}))")
        if i < 3:
            return ("<|endoftext|>", "<|im_start|>", "<|im_end|>")[i]
        if i < 3 + NUM_EXTRAS:
            return f"<|extra_{i - 3}|>"
        return ("<|image token|>", "<|image start|>", "<|image end|>")[i - 3 - NUM_EXTRAS]


# --------------------------------------------------------------------------------------------
# Byte-level BPE token strings (GPT-2's printable mapping, used by tokenizer.json files)


def _byte_to_unicode() -> dict[int, str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_UNICODE = _byte_to_unicode()
UNICODE_TO_BYTE = {u: b for b, u in BYTE_TO_UNICODE.items()}


def token_string_to_bytes(s: str) -> bytes:
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise CheckpointError(f"token {s!r} is not a byte-level BPE token (character {e} has no byte)") from None


def token_bytes_to_string(b: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[x] for x in b)


def _hf_tokenizer(model) -> Tokenizer:
    """A `tokenizers` pipeline with Emu3's normalisation and pre-tokenization around a BPE model."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return tok


# --------------------------------------------------------------------------------------------
# The tokenizer


MAX_RESERVED = 8 * 257


def _reserved_tokens(n: int) -> list[bytes]:
    """Byte strings no UTF-8 text contains (bytes 0xF8-0xFF never occur in it) that are still
    ordinary BPE tokens, each the merge of two earlier ones: a prefix 0xFF (0xFF - k), then the
    prefix followed by each byte; so they also survive tokenizer.json (which stores merges)."""
    out: list[bytes] = []
    for k in range(8):
        prefix = bytes([0xFF, 0xFF - k])
        out += [prefix] + [prefix + bytes([j]) for j in range(256)]
    return out[:n]


class TextTokenizer:
    """Emu3's text tokenizer over a `Vocabulary`: encode(text) -> ids, decode(ids) -> text."""

    def __init__(self, ranks: dict[bytes, int], codebook_size: int):
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise CheckpointError("BPE ranks must be exactly 0 .. n-1")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise CheckpointError(f"a byte-level BPE needs all 256 single bytes; {len(missing)} are missing")
        self.vocab = Vocabulary(len(ranks), codebook_size)
        self.ranks = ranks
        self._enc = tiktoken.Encoding("emu3", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})

    # ---- loading ----

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> TextTokenizer:
        """Read emu3.tiktoken + emu3_vision_tokens.txt (released) or tokenizer.json (transformers, ours)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: no such folder")
        if (folder / "emu3.tiktoken").exists():
            return cls._from_released(folder)
        if (folder / "tokenizer.json").exists():
            return cls._from_tokenizer_json(folder / "tokenizer.json")
        raise CheckpointError(f"{folder}: no tokenizer files (emu3.tiktoken + emu3_vision_tokens.txt, or "
                              "tokenizer.json)")

    @classmethod
    def _from_released(cls, folder: Path) -> TextTokenizer:
        ranks = {}
        with open(folder / "emu3.tiktoken", "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError as e:
                    where = folder / "emu3.tiktoken"
                    raise CheckpointError(f"{where}: line {n} is not '<base64> <rank>' ({e})") from None
        vision_file = folder / "emu3_vision_tokens.txt"
        if not vision_file.exists():
            raise CheckpointError(f"{vision_file}: missing (it lists the image and visual tokens)")
        lines = [t.strip() for t in vision_file.read_text(encoding="utf-8").splitlines() if t.strip()]
        head = ["<|image token|>", "<|image start|>", "<|image end|>"]
        if lines[:3] != head:
            raise CheckpointError(f"{vision_file}: must start with {', '.join(head)}; got {lines[:3]}")
        codebook = len(lines) - 3
        for k, line in enumerate(lines[3:]):
            if line != f"<|visual token {k:06d}|>":
                raise CheckpointError(f"{vision_file}: line {k + 4} is {line!r}, expected <|visual token {k:06d}|>")
        return cls(ranks, codebook)

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> TextTokenizer:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data["model"]
            assert model["type"] == "BPE"
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as e:
            raise CheckpointError(f"{path}: not a BPE tokenizer.json ({type(e).__name__}: {e})") from None
        # Emu3's control and visual tokens; other added tokens (transformers adds "<image>") are not ours.
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if _SPECIAL_RE.fullmatch(t["content"])}
        if "<|endoftext|>" not in specials:
            raise CheckpointError(f"{path}: no <|endoftext|> token, so this is not an Emu3 vocabulary")
        text_size = specials["<|endoftext|>"]
        ranks = {token_string_to_bytes(s): i for s, i in model["vocab"].items() if i < text_size}
        if len(ranks) != text_size:
            raise CheckpointError(f"{path}: {len(ranks)} BPE tokens below <|endoftext|> (id {text_size}); "
                                  "expected one per id")
        codebook = sum(1 for s in specials if s.startswith("<|visual token "))
        vocab = Vocabulary(text_size, codebook)
        expected = vocab.special_tokens()
        wrong = [(s, i, expected.get(s)) for s, i in specials.items() if expected.get(s) != i]
        if wrong or len(specials) != len(expected):
            s, i, want = wrong[0] if wrong else ("(count)", len(specials), len(expected))
            raise CheckpointError(f"{path}: not the Emu3 id layout: {s} has id {i}, expected {want}")
        return cls(ranks, codebook)

    # ---- saving and training ----

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write tokenizer.json (loadable by `tokenizers` and transformers' PreTrainedTokenizerFast)."""
        with atomic_dir(folder) as tmp:
            (tmp / "tokenizer.json").write_text(self._tokenizer_json(), encoding="utf-8")
            specials = {"bos_token": "<|extra_203|>", "eos_token": "<|extra_204|>", "pad_token": "<|endoftext|>"}
            (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                      "model_max_length": 1_000_000_000, **specials}
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def _tokenizer_json(self) -> str:
        vocab = {token_bytes_to_string(b): i for b, i in self.ranks.items()}
        merges = []
        for b, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            if len(b) > 1:
                left, right = self._split(b, rank)
                merges.append((token_bytes_to_string(left), token_bytes_to_string(right)))
        tok = _hf_tokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                                for s in self.vocab.special_tokens()])
        return tok.to_str(pretty=True)

    def _split(self, token: bytes, rank: int) -> tuple[bytes, bytes]:
        """The last merge that builds `token` under tiktoken's rule (lowest-rank pair first)."""
        parts = [bytes([x]) for x in token]
        while len(parts) > 2:
            best = min(range(len(parts) - 1), key=lambda i: self.ranks.get(parts[i] + parts[i + 1], 1 << 62))
            merged = parts[best] + parts[best + 1]
            if self.ranks.get(merged, 1 << 62) >= rank:
                raise CheckpointError(f"BPE token {token!r} cannot be built from lower-ranked tokens")
            parts[best:best + 2] = [merged]
        return parts[0], parts[1]

    @classmethod
    def train(cls, texts, vocab_size: int, codebook_size: int, min_frequency: int = 2,
              reserved: int = 0) -> TextTokenizer:
        """Train a byte-level BPE (Qwen pre-tokenization, NFC) on an iterable of strings.

        `reserved` more ids follow the BPE's at the top of the text range and no text ever encodes
        to them: room for action tokens (emu3.action.ActionIds), which Emu3's VLA model puts on the
        last text ids. See _reserved_tokens."""
        if vocab_size < 256:
            raise InputError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        if not 0 <= reserved <= MAX_RESERVED:
            raise InputError(f"reserved must be in [0, {MAX_RESERVED}], got {reserved}")
        tok = _hf_tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        ranks = {token_string_to_bytes(s): i for s, i in tok.get_vocab().items()}
        n = len(ranks)
        ranks.update({b: n + i for i, b in enumerate(_reserved_tokens(reserved))})
        return cls(ranks, codebook_size)

    # ---- encode / decode ----

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Text -> ids (NFC first). With allow_special, special-token strings become their ids (as released)."""
        text = unicodedata.normalize("NFC", text)
        if not allow_special:
            return self._enc.encode_ordinary(text)
        ids: list[int] = []
        pos = 0
        for m in _SPECIAL_RE.finditer(text):
            if m.start() > pos:
                ids.extend(self._enc.encode_ordinary(text[pos:m.start()]))
            ids.append(self.vocab.special_id(m.group()))
            pos = m.end()
        if pos < len(text):
            ids.extend(self._enc.encode_ordinary(text[pos:]))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids -> text; control and visual tokens as their strings (dropped with skip_special_tokens)."""
        ids = [int(x) for x in ids]
        if not ids or (min(ids) >= 0 and max(ids) < self.vocab.text_size):  # text only: one call
            return self._enc.decode_bytes(ids).decode("utf-8", errors="replace")
        out = bytearray()
        run: list[int] = []
        size = self.vocab.size
        for i in ids:
            if 0 <= i < self.vocab.text_size:
                run.append(i)
                continue
            if not 0 <= i < size:
                raise InputError(f"id {i} is outside the vocabulary [0, {size})")
            if run:
                out += self._enc.decode_bytes(run)
                run = []
            if not skip_special_tokens:
                out += self.vocab.special_name(i).encode()
        if run:
            out += self._enc.decode_bytes(run)
        return out.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab.size
