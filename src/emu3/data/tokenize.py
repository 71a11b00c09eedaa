"""`emu3 tokenize-dataset`: media and text -> token shards (tokenize on the edge, train on ids).

Inputs, scanned in a fixed order:
- a folder: every image or video file with a caption beside it (`x.jpg` + `x.txt`, or `x.json` with
  "caption", or "question" + "answer" for a QA record);
- a JSONL manifest, one record per line, paths relative to the manifest:
      {"image": "a.jpg", "caption": "..."}          {"video": "b.mp4", "caption": "...", "fps": 8}
      {"image": "a.jpg", "question": "...", "answer": "..."}          {"text": "..."}
      {"image": "a.jpg", "question": "...", "answer": "...", "follow_ups": [["...", "..."], ...]}
      {"segments": [{"text": "..."}, {"image": "a.jpg"}, ...]}
      {"prompt_ids": [...], "chosen": [...], "rejected": [...]}     (DPO: the exact ids)
- webdataset tar shards: members grouped by key (`key.jpg` + `key.txt` / `key.json`), one output
  shard per tar file.

Work is split into shards of a fixed range of inputs, so a killed run resumes by redoing only the
shards missing from index.json, with no duplicates. Worker processes each load the tokenizers once.
A record that cannot be used (unreadable file, no caption, too large, ...) is skipped and counted
under its reason in the shard's index entry.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import media
from ..errors import Emu3Error, InputError
from ..fsutil import atomic_file
from .shards import FORMAT, VERSION, Record, qa_record, read_index, shard_name, write_index, write_shard

MEDIA_SUFFIXES = media.IMAGE_SUFFIXES | media.VIDEO_SUFFIXES


def _text(x) -> bool:
    """A string with something in it besides whitespace."""
    return isinstance(x, str) and bool(x.strip())


@dataclass
class Task:
    shard: int
    items: list[dict] | None = None  # already-parsed records (folder, JSONL)
    tar: str | None = None  # or a webdataset tar file


@dataclass
class Settings:
    text_tokenizer: str
    vision_tokenizer: str | None
    fps: float | None = None
    max_frames: int | None = None
    frame_limit: int = media.MAX_VIDEO_FRAMES
    video_mode: str = "causal"


# --------------------------------------------------------------------------------------------
# Scanning


def _sidecar(path: Path) -> dict | None:
    txt, js = path.with_suffix(".txt"), path.with_suffix(".json")
    if js.exists():
        return json.loads(js.read_text(encoding="utf-8"))
    if txt.exists():
        return {"caption": txt.read_text(encoding="utf-8").strip()}
    return None


def _folder_items(folder: Path) -> list[dict]:
    items = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES:
            key = "video" if p.suffix.lower() in media.VIDEO_SUFFIXES and p.suffix.lower() != ".gif" else "image"
            if p.suffix.lower() == ".gif" and media.probe(p) == "video":
                key = "video"
            side = _sidecar(p)
            items.append({key: str(p), **(side or {}), "_source": str(p), **({} if side else {"_error": "no caption"})})
    return items


def _jsonl_items(path: Path) -> list[dict]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not an object")
        except ValueError as e:
            items.append({"_source": f"{path}:{n}", "_error": f"bad JSON line ({e})"})
            continue
        for key in ("image", "video"):
            if isinstance(item.get(key), str):
                item[key] = str(path.parent / item[key])
        for seg in item.get("segments", []) if isinstance(item.get("segments"), list) else []:
            if isinstance(seg, dict) and isinstance(seg.get("image"), str):
                seg["image"] = str(path.parent / seg["image"])
        items.append({**item, "_source": f"{path}:{n}"})
    return items


def scan(inputs: list[str | os.PathLike], shard_size: int) -> list[Task]:
    """The deterministic list of shard tasks for these inputs."""
    if shard_size < 1:
        raise InputError(f"shard size must be >= 1, got {shard_size}")
    tasks: list[Task] = []
    items: list[dict] = []

    def flush():
        while items:
            tasks.append(Task(len(tasks), items[:shard_size]))
            del items[:shard_size]

    for inp in map(Path, inputs):
        if not inp.exists():
            raise InputError(f"{inp}: no such file or folder")
        if inp.is_dir():
            items += _folder_items(inp)
        elif inp.suffix == ".jsonl":
            items += _jsonl_items(inp)
        elif inp.suffix == ".tar":
            flush()
            tasks.append(Task(len(tasks), tar=str(inp)))
        else:
            raise InputError(f"{inp}: inputs are folders, .jsonl manifests or .tar (webdataset) shards")
    flush()
    return tasks


# --------------------------------------------------------------------------------------------
# Workers


class _Worker:
    def __init__(self, settings: Settings, share: int, thread_setting: int | str | None):
        """`share`: the cores this worker may use (all of them in-process, a part of them in a pool)."""
        import math

        from .. import threads
        from ..tokenizer import TextTokenizer
        from ..vision import VisionTokenizer

        self.s = settings
        self.text = TextTokenizer.from_pretrained(settings.text_tokenizer)
        self.vision = VisionTokenizer.from_pretrained(settings.vision_tokenizer) if settings.vision_tokenizer else None
        side = math.isqrt(self.vision.processor.max_pixels) if self.vision else 0  # the largest image it encodes
        flops = threads.vq_flops(self.vision.model, side, side) if self.vision else 0.0
        n = threads.explicit(thread_setting) or min(share, threads.choose(flops))
        threads.configure(flops, n)

    def ids(self, text) -> np.ndarray:
        if not isinstance(text, str):
            raise InputError("text fields must be strings")
        return np.asarray(self.text.encode(text, allow_special=False), np.int64)

    def _vision(self):
        if self.vision is None:
            raise InputError("media records need a vision tokenizer")
        return self.vision

    def image(self, path) -> np.ndarray:
        return self._vision().encode_image(media.open_image(path)).numpy()

    def record(self, item: dict) -> Record:
        if "_error" in item:
            raise InputError(item["_error"])
        if "prompt_ids" in item or "chosen" in item:
            fields = {}
            for key, name in (("prompt_ids", "prompt"), ("chosen", "chosen"), ("rejected", "rejected")):
                ids = np.asarray(item.get(key, []), dtype=np.int64)
                if ids.ndim != 1 or ids.size == 0:
                    raise InputError(f"preference record needs a non-empty id list {key!r}")
                fields[name] = ids
            return Record("preference", fields)
        if "segments" in item:
            segs, kinds = {}, []
            for i, seg in enumerate(item["segments"]):
                if "image" in seg:
                    segs[f"s{i}"], kind = self.image(seg["image"]), "image"
                elif "text" in seg:
                    segs[f"s{i}"], kind = self.ids(seg["text"]), "text"
                else:
                    raise InputError("a segment needs 'text' or 'image'")
                kinds.append(kind)
            if not kinds:
                raise InputError("no segments")
            return Record("interleaved", segs, {"segments": kinds})
        if "video" in item:
            caption = item.get("caption")
            if not caption:
                raise InputError("no caption")
            vision = self._vision()
            video = vision.read_video(item["video"], fps=item.get("fps", self.s.fps), max_frames=self.s.max_frames,
                                      frame_limit=self.s.frame_limit)
            codes = vision.encode_video(video.frames, self.s.video_mode).numpy()
            return Record("video", {"caption": self.ids(caption), "codes": codes},
                          {"fps": video.fps, "frames": len(video.frames), "mode": self.s.video_mode})
        if "image" in item:
            codes = self.image(item["image"])
            if "question" in item or "answer" in item:
                # checked here, not when training formats the record (a blank answer would stop the run)
                if not _text(item.get("answer")):
                    raise InputError("a QA record needs an answer")
                if not isinstance(item.get("question", ""), str):
                    raise InputError("a QA record's question must be a string")
                follow_ups = item.get("follow_ups", [])
                if not isinstance(follow_ups, list):
                    raise InputError("follow_ups must be a list of [question, answer] pairs")
                for i, turn in enumerate(follow_ups):
                    if not (isinstance(turn, list) and len(turn) == 2 and isinstance(turn[0], str) and _text(turn[1])):
                        raise InputError(f"follow_ups[{i}] must be a [question, answer] pair with an answer")
                turns = [(item.get("question", ""), item["answer"]), *follow_ups]
                return qa_record(codes, [(self.ids(q), self.ids(a)) for q, a in turns])
            if not item.get("caption"):
                raise InputError("no caption")
            return Record("image", {"caption": self.ids(item["caption"]), "codes": codes})
        if "text" in item:
            ids = self.ids(item["text"])
            if not len(ids):
                raise InputError("empty text")
            return Record("text", {"text": ids})
        raise InputError("unknown record: needs image, video, text, segments or prompt_ids")

    def run(self, task: Task, out: Path) -> dict:
        records, skipped, which, n = [], Counter(), [], 0
        # tar members live in a temporary folder only while the generator runs: consume it lazily
        for item in task.items if task.items is not None else _tar_items(Path(task.tar)):
            n += 1
            try:
                records.append(self.record(item))
            except (Emu3Error, OSError, ValueError, KeyError, TypeError) as e:
                skipped[_reason(e)] += 1
                which.append([str(item.get("_source", f"shard {task.shard} input {n}")), _reason(e)])
        entry = write_shard(out, task.shard, records)
        entry.update(inputs=n, skipped=dict(skipped), skipped_inputs=which)
        return entry


def _tar_items(path: Path):
    """Webdataset samples: members grouped by key (the name up to the first dot of its basename)."""
    try:
        tar = tarfile.open(path)
    except (tarfile.TarError, OSError) as e:
        yield {"_source": str(path), "_error": f"unreadable tar ({e})"}
        return
    with tar, tempfile.TemporaryDirectory() as tmp:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in tar.getmembers():
            if m.isfile():
                base = os.path.basename(m.name)
                key = os.path.join(os.path.dirname(m.name), base.split(".", 1)[0])
                ext = base.split(".", 1)[1].lower() if "." in base else ""
                groups.setdefault(key, {})[ext] = m
        for n, (key, members) in enumerate(sorted(groups.items())):
            item: dict = {"_source": f"{path}:{key}"}
            for ext, m in members.items():
                data = tar.extractfile(m).read()
                if ext == "txt":
                    item["caption"] = data.decode("utf-8", errors="replace").strip()
                elif ext == "json":
                    try:
                        item.update(json.loads(data))
                    except ValueError as e:
                        item["_error"] = f"bad JSON ({e})"
                elif f".{ext}" in MEDIA_SUFFIXES:
                    local = Path(tmp) / f"{n}.{ext}"  # the media readers take paths; the name is ours
                    local.write_bytes(data)
                    item["video" if f".{ext}" in media.VIDEO_SUFFIXES - {".gif"} else "image"] = str(local)
            yield item


def _reason(e: Exception) -> str:
    """A short, path-free reason for the skip counters."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = re.sub(r"^\S*[/\\]\S*: ", "", msg)  # drop a leading path
    msg = re.sub(r"\(.*\)$", "", msg).strip()  # and the library's details
    return msg[:120]


_worker: _Worker | None = None


def _init(settings: Settings, share: int, thread_setting: int | str | None) -> None:
    global _worker
    _worker = _Worker(settings, share, thread_setting)


def _run(args) -> dict:
    task, out = args
    return _worker.run(task, out)


# --------------------------------------------------------------------------------------------
# Driver


def tokenize_dataset(inputs: list, out: str | os.PathLike, settings: Settings, workers: int = 1,
                     shard_size: int = 1000, progress: bool = True, threads: int | str | None = None) -> dict:
    """Tokenize `inputs` into the dataset folder `out`, resuming from the shards already there. `threads`:
    PyTorch threads per worker (default: emu3.threads' policy within the worker's share of the cores)."""
    from ..checkpoint import vq_layout
    from ..tokenizer import TextTokenizer

    out = Path(out)
    tasks = scan(inputs, shard_size)
    text = TextTokenizer.from_pretrained(settings.text_tokenizer)
    vocab = {"text_size": text.vocab.text_size, "codebook_size": text.vocab.codebook_size}
    vision = str(Path(settings.vision_tokenizer).resolve()) if settings.vision_tokenizer else None
    factor = vq_layout(Path(vision))[1].spatial_factor if vision else None
    out.mkdir(parents=True, exist_ok=True)
    if (out / "index.json").exists():
        index = read_index(out)
        if index["vocab"] != vocab:
            raise InputError(f"{out} was tokenized with vocabulary {index['vocab']}, not {vocab}: use another folder")
        if index.get("vision_tokenizer", vision) != vision:
            raise InputError(f"{out} was tokenized with the vision tokenizer {index['vision_tokenizer']}, not "
                             f"{vision}: use another folder")
    else:
        # the tokenizers are recorded so that training and export know them (a model folder needs both)
        index = {"format": FORMAT, "version": VERSION, "vocab": vocab, "inputs": [str(i) for i in inputs],
                 "text_tokenizer": str(Path(settings.text_tokenizer).resolve()), "vision_tokenizer": vision,
                 "spatial_factor": factor, "shards": []}
        write_index(out, index)
    done = {s["name"] for s in index["shards"]}
    todo = [t for t in tasks if shard_name(t.shard) not in done]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="shard", desc="tokenize", dynamic_ncols=True)

    def finish(entry):
        index["shards"].append(entry)
        index["shards"].sort(key=lambda s: s["name"])
        write_index(out, index)
        if bar is not None:
            bar.update(1)

    from ..threads import cores

    if workers <= 1:
        _init(settings, cores(), threads)
        for t in todo:
            finish(_run((t, out)))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, _init, (settings, max(1, cores() // workers), threads)) as pool:
            for entry in pool.imap_unordered(_run, [(t, out) for t in todo]):
                finish(entry)
    if bar is not None:
        bar.close()
    result = summary(index)
    with atomic_file(out / SKIPPED_REPORT) as tmp:  # every skipped input and why, in input order
        tmp.write_text("".join(f"{source}\t{reason}\n" for source, reason in result["skipped_inputs"]),
                       encoding="utf-8")
    return result


SKIPPED_REPORT = "skipped.tsv"


def summary(index: dict) -> dict:
    skipped: Counter = Counter()
    kinds: Counter = Counter()
    which: list = []
    for s in index["shards"]:
        skipped.update(s.get("skipped", {}))
        kinds.update(s.get("kinds", {}))
        which += s.get("skipped_inputs", [])
    return {"shards": len(index["shards"]), "records": sum(s["records"] for s in index["shards"]),
            "tokens": sum(s["tokens"] for s in index["shards"]), "kinds": dict(kinds), "skipped": dict(skipped),
            "skipped_inputs": which}
