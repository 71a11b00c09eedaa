"""Tokenized datasets on disk: numpy token shards plus a JSON index.

    DATASET/
      index.json                   format, vocabulary, and one entry per *finished* shard
      shard-00000.tokens.npy       int32: every field of every record, concatenated (memory-mapped)
      shard-00000.records.json     per record: kind, {field: [offset, *shape]}, meta

Why this format and not MosaicML MDS or webdataset: training reads token ids only, at random, from
many processes; a flat .npy memory-maps with no extra dependency and no decoding, and the records
file says where each field lies. A shard is written to temporary names and renamed, and only then
added to index.json (also written atomically), so a killed tokenizer leaves either a finished shard
or nothing the index points to.

Record kinds and their fields (all int arrays; text fields are token ids):
    image        caption, codes (h, w)
    video        caption, codes (t, h, w)                       meta: fps, frames
    qa           codes (h, w), question, answer, q1, a1, ...     meta: turns (when more than one)
    text         text
    interleaved  s0, s1, ... (text ids or (h, w) codes)          meta: segments ["text", "image", ...]
    preference   prompt, chosen, rejected                        (DPO: the exact generated ids)
    vla          instruction, v{frame}_{view} codes (h, w), a{frame} FAST action tokens
                                                                 meta: frames, views, action_count
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, InputError
from ..fsutil import atomic_file

FORMAT = "emu3-tokens"
VERSION = 1
KINDS = ("image", "video", "qa", "text", "interleaved", "preference", "vla")


@dataclass
class Record:
    kind: str
    fields: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)


def qa_record(codes: np.ndarray, turns: list[tuple[np.ndarray, np.ndarray]]) -> Record:
    """A QA record: one image and (question ids, answer ids) turns, the first as question/answer."""
    (q, a), *more = turns
    fields = {"codes": codes, "question": q, "answer": a}
    for i, (q, a) in enumerate(more, 1):
        fields[f"q{i}"], fields[f"a{i}"] = q, a
    return Record("qa", fields, {"turns": len(turns)} if more else {})


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def write_shard(folder: Path, index: int, records: list[Record]) -> dict:
    """Write one shard (atomically, file by file); returns its index entry (without bookkeeping)."""
    chunks, entries, offset = [], [], 0
    for r in records:
        if r.kind not in KINDS:
            raise InputError(f"unknown record kind {r.kind!r}")
        fields = {}
        for name, arr in r.fields.items():
            arr = np.asarray(arr)
            if arr.dtype.kind not in "iu":
                raise InputError(f"record field {name} must be integer ids, got {arr.dtype}")
            chunks.append(arr.reshape(-1).astype(np.int32))
            fields[name] = [offset, *arr.shape]
            offset += arr.size
        entries.append({"kind": r.kind, "fields": fields, "meta": r.meta})
    name = shard_name(index)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, np.int32)
    with atomic_file(folder / f"{name}.tokens.npy") as tmp:
        np.save(tmp, tokens)
    with atomic_file(folder / f"{name}.records.json") as tmp:
        tmp.write_text(json.dumps(entries, separators=(",", ":")))
    kinds: dict[str, int] = {}
    for r in records:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    return {"name": name, "records": len(records), "tokens": int(tokens.size), "kinds": kinds,
            "grids": image_grids(entries)}


def image_grids(entries: list[dict]) -> dict[str, int]:
    """{"HxW": records} of the code grids in a shard's record entries (a video counts its frame grid);
    training reads these to give a model trained from scratch the image size of its data."""
    grids: dict[str, int] = {}
    for e in entries:
        shapes = {tuple(f[-2:]) for name, f in e["fields"].items() if _visual(e, name) and len(f) >= 3}
        for h, w in shapes:
            grids[f"{h}x{w}"] = grids.get(f"{h}x{w}", 0) + 1
    return grids


def _visual(entry: dict, name: str) -> bool:
    kind = entry["kind"]
    if kind in ("image", "qa", "video"):
        return name == "codes"
    if kind == "interleaved":
        return entry["meta"]["segments"][int(name[1:])] == "image"
    return kind == "vla" and name.startswith("v")


def read_index(folder: Path) -> dict:
    path = folder / "index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{folder}: not a tokenized dataset (no index.json); make one with emu3 tokenize-dataset") \
            from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} index")
    return index


def write_index(folder: Path, index: dict) -> None:
    with atomic_file(folder / "index.json") as tmp:
        tmp.write_text(json.dumps(index, indent=1))


class TokenDataset:
    """Random access to the records of a tokenized dataset (memory-mapped, opened lazily per shard)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.shards = sorted(self.index["shards"], key=lambda s: s["name"])
        self.starts = np.cumsum([0] + [s["records"] for s in self.shards])
        self._open: dict[int, tuple[np.ndarray, list]] = {}

    @property
    def vocab(self) -> dict:
        return self.index["vocab"]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.shards:
            for k, n in s["kinds"].items():
                out[k] = out.get(k, 0) + n
        return out

    def shard(self, i: int) -> tuple[np.ndarray, list]:
        """Shard i's tokens (memory-mapped int32) and its records, opened once."""
        if i not in self._open:
            name = self.shards[i]["name"]
            tokens = np.load(self.folder / f"{name}.tokens.npy", mmap_mode="r")
            records = json.loads((self.folder / f"{name}.records.json").read_text())
            self._open[i] = (tokens, records)
        return self._open[i]

    def __getitem__(self, idx: int) -> Record:
        if not 0 <= idx < len(self):
            raise IndexError(idx)
        s = int(np.searchsorted(self.starts, idx, side="right")) - 1
        tokens, records = self.shard(s)
        entry = records[idx - int(self.starts[s])]
        fields = {}
        for name, (offset, *shape) in entry["fields"].items():
            n = int(np.prod(shape)) if shape else 1
            fields[name] = np.asarray(tokens[offset:offset + n], dtype=np.int64).reshape(shape)
        return Record(entry["kind"], fields, entry.get("meta", {}))
