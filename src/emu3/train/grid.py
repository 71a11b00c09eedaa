"""Scaling-law grids (`emu3 scaling run GRID.json -o DIR`): train every (model size, token budget) cell
from scratch with its own warm-up and cosine schedule, score each on held-out data per task, and keep
`DIR/runs.csv` (task,params,tokens,loss) for `emu3 scaling fit`.

What is unusual:
- Resumable at two levels. A cell is an ordinary training run (DIR/cells/NAME, checkpoints every
  quarter of its steps); a finished cell writes DIR/cells/NAME/result.json atomically and is never
  trained again. Killing the grid at any moment and running the same command again continues it.
- Several processes can share a grid: each claims a cell by creating DIR/cells/NAME/CLAIM with O_EXCL
  (holding its host and pid) and takes over a claim whose process is gone. runs.csv is rewritten
  from every result.json (atomically) after each cell, so it never holds half a row.
- N is the non-embedding parameter count (embeddings and output head left out, as in Kaplan et al.
  and Chinchilla); D is the training budget in positions fed (steps x batch x sequence length).
- Held-out losses are mean next-token losses in nats over the task's output tokens only: T2I the
  visual codes of an image given its caption, I2T the caption (and E) given the image, T2V the visual
  codes of a clip given its caption. The defaults build the shapes world twice: training records from
  seed 0, held-out ones from another seed (no scene is in both except by chance).
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..fsutil import atomic_file

TASKS = ("t2i", "i2t", "t2v")
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


@dataclass
class GridConfig:
    """A grid: model sizes (overrides of the `tiny` preset) x training-token budgets, and how each cell trains.

    data: training datasets, "path[:weight]" as `emu3 train data=` takes them; heldout: task -> dataset
    folder (t2i and i2t read image records, t2v video records). Both empty: the shapes world is built in
    DIR/data with `world` and `heldout_world` record counts (the built-in tokenizers encode it)."""

    sizes: list[dict]
    tokens: list[int]
    data: list[str] = field(default_factory=list)
    heldout: dict[str, str] = field(default_factory=dict)
    text_tokenizer: str = ""  # default: the built-in model's (the data must be tokenized with it)
    world: dict = field(default_factory=lambda: {"images": 30000, "videos": 3000})
    world_weights: dict = field(default_factory=lambda: {"images": 0.8, "videos": 0.2})  # documents drawn per kind
    heldout_world: dict = field(default_factory=lambda: {"images": 256, "videos": 64})
    heldout_seed: int = 20_000
    eval_records: int = 256  # held-out records scored per task (at most)
    seq_len: int = 512
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # fraction of a cell's steps
    caption_after: float = 0.5  # image records trained as image-to-text (the I2T task)
    vision_weight: float = 0.5
    train: dict = field(default_factory=dict)  # any other `emu3 train` key=value for every cell
    seed: int = 0

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> GridConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such grid file") from None
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: a grid is a JSON object with at least 'sizes' and 'tokens'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid has {', '.join(sorted(known))}")
        missing = [k for k in ("sizes", "tokens") if k not in raw]
        if missing:
            raise InputError(f"{path}: missing {', '.join(missing)}")
        cfg = cls(**raw)
        cfg.validate(path)
        return cfg

    def validate(self, where="grid") -> None:
        if not isinstance(self.sizes, list) or not self.sizes:
            raise InputError(f"{where}: 'sizes' is a non-empty list of model sizes ({', '.join(SIZE_KEYS)})")
        for i, s in enumerate(self.sizes):
            if not isinstance(s, dict) or not s.get("hidden_size"):
                raise InputError(f"{where}: size {i} must be an object with at least hidden_size, got {s!r}")
            bad = sorted(set(s) - set(SIZE_KEYS))
            if bad:
                raise InputError(f"{where}: size {i} has unknown key(s) {', '.join(bad)}; sizes take "
                                 f"{', '.join(SIZE_KEYS)}")
        if not isinstance(self.tokens, list) or not self.tokens or not all(
                isinstance(t, (int, float)) and t >= self.seq_len * self.batch_size for t in self.tokens):
            raise InputError(f"{where}: 'tokens' is a list of budgets of at least one batch "
                             f"({self.seq_len * self.batch_size} positions), got {self.tokens!r}")
        if bool(self.data) != bool(self.heldout):
            raise InputError(f"{where}: give both 'data' and 'heldout' (or neither, for the shapes world)")
        bad = sorted(set(self.heldout) - set(TASKS))
        if bad:
            raise InputError(f"{where}: heldout tasks are {', '.join(TASKS)}, got {', '.join(bad)}")
        if not 0 < self.lr or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.warmup < 1:
            raise InputError(f"{where}: need lr > 0, 0 <= min_lr_ratio <= 1, 0 <= warmup < 1")


@dataclass
class Cell:
    size: int  # index into sizes
    tokens: int

    @property
    def name(self) -> str:
        return f"s{self.size}-d{self.tokens}"


def non_embedding_params(model) -> int:
    """Parameters outside the token embeddings and the output head."""
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def cells(cfg: GridConfig) -> list[Cell]:
    """Every cell, cheapest first (so a short session finishes many)."""
    from ..model import Emu3LM, model_config

    n = []
    for s in cfg.sizes:
        with torch.device("meta"):
            n.append(non_embedding_params(Emu3LM(model_config("tiny", None, **s))))
    out = [Cell(i, int(t)) for i in range(len(cfg.sizes)) for t in cfg.tokens]
    return sorted(out, key=lambda c: (n[c.size] * c.tokens, c.size, c.tokens))


# ---- data ----

def prepare_data(cfg: GridConfig, out: Path, progress: bool = True) -> tuple[list[str], dict[str, str], str]:
    """(training sources, held-out folder per task, text tokenizer folder); builds the shapes world when the
    grid names no data (resumable: a dataset whose index.json exists is kept)."""
    from ..checkpoint import model_folder, vision_folder

    tok = cfg.text_tokenizer
    if cfg.data:
        if not tok:
            raise InputError("a grid with its own data needs 'text_tokenizer': the folder the data was tokenized "
                             "with")
        return list(cfg.data), dict(cfg.heldout), tok
    builtin = model_folder(None)
    tok = tok or str(builtin)
    from ..tokenizer import TextTokenizer
    from ..vision import VisionTokenizer
    from ..world.build import build

    text = TextTokenizer.from_pretrained(tok)
    vision = None
    for split, counts, seed in (("train", cfg.world, cfg.seed), ("heldout", cfg.heldout_world, cfg.heldout_seed)):
        todo = {k: n for k, n in counts.items() if n and not (out / "data" / split / k / "index.json").exists()}
        if todo:
            vision = vision or VisionTokenizer.from_pretrained(vision_folder(builtin))
            build(out / "data" / split, vision, text, todo, seed, progress=progress)
    data = [f"{out / 'data' / 'train' / k}:{cfg.world_weights.get(k, 1.0)}" for k, n in cfg.world.items() if n]
    held = {"t2i": str(out / "data" / "heldout" / "images"), "i2t": str(out / "data" / "heldout" / "images"),
            "t2v": str(out / "data" / "heldout" / "videos")}
    return data, held, tok


# ---- held-out losses ----

def task_samples(task: str, folder: str, formatter, limit: int) -> list:
    """The first `limit` held-out samples of a task, with the positions that count as (ids, counted) pairs."""
    from ..data.shards import TokenDataset
    from ..format import TokenType

    ds = TokenDataset(folder)
    kind = "video" if task == "t2v" else "image"
    out = []
    for i in range(len(ds)):
        if len(out) >= limit:
            break
        r = ds[i]
        if r.kind != kind:
            continue
        cap, codes = r.fields["caption"], r.fields["codes"]
        if task == "t2i":
            s = formatter.t2i(cap, codes, loss="output")
        elif task == "i2t":
            s = formatter.i2t(codes, cap, loss="output")
        else:
            s = formatter.t2v(cap, codes, r.meta.get("fps"), loss="output")
        counted = s.loss_mask if task == "i2t" else s.loss_mask & (s.types == TokenType.VISUAL)
        out.append((s.ids, counted))
    if not out:
        raise InputError(f"{folder}: no {kind} records for the {task} held-out loss")
    return out


@torch.no_grad()
def heldout_loss(model, samples: list, pad: int, batch: int = 16) -> float:
    """Mean next-token loss (nats) over the counted positions of the samples."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(samples), batch):
        chunk = samples[s:s + batch]
        n = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)
        labels = torch.full((len(chunk), n), -100, dtype=torch.long)
        for j, (x, counted) in enumerate(chunk):
            ids[j, :len(x)] = torch.from_numpy(np.asarray(x))
            # position t predicts token t + 1
            labels[j, :len(x) - 1] = torch.from_numpy(np.where(counted[1:], x[1:], -100))
        total += float(model(ids, labels=labels))
        count += int((labels != -100).sum())
    return total / count


def data_image_area(data: list[str]) -> int | None:
    """The generation area (pixels) of the datasets' most common image grid, so that a model trained on them
    draws images of their size (None when they hold none)."""
    from .config import TrainConfig
    from .trainer import data_info

    info = data_info(TrainConfig(data=data))
    if info.grid and info.spatial_factor:
        return info.grid[0] * info.grid[1] * info.spatial_factor ** 2
    return None


def check_lengths(cfg: GridConfig, held: dict[str, str], tok: str) -> None:
    """Every held-out sample must fit a training row: the loader skips documents longer than seq_len, so a
    task whose samples do not fit would be scored without ever being trained (a first grid here trained on
    no video at all: its clips were 334 tokens, its rows 320)."""
    from ..format import Formatter
    from ..tokenizer import TextTokenizer

    fmt = Formatter(TextTokenizer.from_pretrained(tok), "raster")
    for task, folder in held.items():
        longest = max(len(ids) for ids, _ in task_samples(task, folder, fmt, cfg.eval_records))
        if longest > cfg.seq_len:
            raise InputError(f"{task} samples are up to {longest} tokens, longer than seq_len {cfg.seq_len}: "
                             f"training skips such documents, so {task} would never be trained; raise seq_len")


# ---- running ----

def _claim(folder: Path) -> bool:
    """Claim a cell for this process; False when another live process on this host holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "CLAIM"
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder == me:
                return True
            if holder.get("host") == me["host"] and not _alive(holder.get("pid", -1)):
                lock.unlink(missing_ok=True)  # its process is gone: take it over
                continue
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def write_runs(out: Path) -> int:
    """DIR/runs.csv from every finished cell; returns the rows written."""
    rows = []
    for result in sorted((out / "cells").glob("*/result.json")):
        r = json.loads(result.read_text())
        rows += [{"task": t, "params": r["params"], "tokens": r["tokens"], "loss": r["loss"][t]} for t in TASKS
                 if t in r["loss"]]
    rows.sort(key=lambda r: (r["task"], r["params"], r["tokens"]))
    with atomic_file(out / "runs.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["task", "params", "tokens", "loss"])
        w.writeheader()
        w.writerows(rows)
    return len(rows)


def init_model(folder: Path, text, data: list[str], size: dict, seed: int, max_positions: int) -> None:
    """A freshly initialised model folder to train from scratch (kept when it exists): `size`'s shape,
    the vocabulary of `text`, images of the data's size, and the from-scratch generation defaults (so a
    model exported from a run that started here prompts with its data's bare captions)."""
    from ..checkpoint import save_model
    from ..model import Emu3LM, model_config
    from .trainer import SCRATCH_DEFAULTS

    if (folder / "config.json").exists():
        return
    area = data_image_area(data)
    model = Emu3LM(model_config("tiny", text.vocab, max_position_embeddings=max_positions,
                                **({"image_area": area} if area else {}), **size))
    model.init_weights(torch.Generator().manual_seed(seed))
    save_model(model, folder, tokenizer=text, extra_files={"emu3_defaults.json": SCRATCH_DEFAULTS})


def run_cell(cfg: GridConfig, cell: Cell, out: Path, data: list[str], held: dict[str, str], tok: str,
             progress: bool = False) -> dict:
    """Train one cell (resuming its checkpoint) and score it; writes and returns its result.json."""
    from ..checkpoint import load_model
    from ..format import Formatter
    from ..tokenizer import TextTokenizer
    from . import state
    from .config import TrainConfig
    from .trainer import train

    folder = out / "cells" / cell.name
    text = TextTokenizer.from_pretrained(tok)
    init = out / "init" / f"s{cell.size}"  # one initialisation per size, shared by its cells
    init_model(init, text, data, cfg.sizes[cell.size], cfg.seed, max(cfg.seq_len, 1024))
    per_step = cfg.seq_len * cfg.batch_size
    steps = max(1, math.ceil(cell.tokens / per_step))
    train_cfg = TrainConfig(**{
        "model": str(init), "data": data, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "steps": steps,
        "lr": cfg.lr, "min_lr": cfg.lr * cfg.min_lr_ratio, "warmup": min(steps - 1, max(1, round(cfg.warmup * steps))),
        "caption_after": cfg.caption_after, "vision_weight": cfg.vision_weight, "save_every": max(1, steps // 4),
        "keep_last": 1, "log_every": 10, "seed": cfg.seed, "out": str(folder / "run"), "parallel": "none",
        **cfg.train})
    t0 = time.perf_counter()
    before = state.latest(folder / "run")  # a killed grid left this cell's checkpoint: training resumes it
    summary = train(train_cfg, progress=progress)
    model = load_model(init, dtype=torch.float32)
    state.load_model_state(state.latest(folder / "run"), model)
    fmt = Formatter(text, "raster")
    losses = {t: heldout_loss(model, task_samples(t, held[t], fmt, cfg.eval_records), text.vocab.pad)
              for t in TASKS if t in held}
    result = {"cell": cell.name, "size": cfg.sizes[cell.size], "params": non_embedding_params(model),
              "tokens": steps * per_step, "steps": steps, "loss": losses, "train_loss": summary["loss"],
              "seconds": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(),
              "resumed_from": before.name if before is not None else None}
    with atomic_file(folder / "result.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2))
    return result


def run_grid(grid: str | os.PathLike, out: str | os.PathLike, progress: bool = True, limit: int | None = None,
             log=print) -> dict:
    """Run (or continue) every cell of a grid; returns {"done": n, "skipped": n (held by other processes),
    "rows": runs.csv rows}. `limit`: stop after training this many cells (for tests and short sessions)."""
    cfg = GridConfig.from_json(grid)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "grid.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        if {k: before.get(k) for k in ("seq_len", "batch_size", "lr", "min_lr_ratio", "warmup", "train", "seed")} \
                != {k: asdict(cfg)[k] for k in ("seq_len", "batch_size", "lr", "min_lr_ratio", "warmup", "train",
                                                 "seed")}:
            raise InputError(f"{out} holds a grid trained with other settings ({saved}); use another folder")
    with atomic_file(saved) as tmp:
        tmp.write_text(json.dumps(asdict(cfg), indent=2))
    data, held, tok = prepare_data(cfg, out, progress)
    check_lengths(cfg, held, tok)
    done = skipped = trained = 0
    for cell in cells(cfg):
        folder = out / "cells" / cell.name
        if (folder / "result.json").exists():
            done += 1
            continue
        if limit is not None and trained >= limit:
            break
        if not _claim(folder):
            skipped += 1
            continue
        try:
            r = run_cell(cfg, cell, out, data, held, tok, progress=False)
        finally:
            (folder / "CLAIM").unlink(missing_ok=True)
        trained += 1
        done += 1
        rows = write_runs(out)
        if progress:
            log(f"{cell.name}: N={r['params']:,} D={r['tokens']:,} " + " ".join(
                f"{t}={v:.4f}" for t, v in r["loss"].items()) + f" ({r['seconds']:.0f} s; runs.csv {rows} rows)")
    rows = write_runs(out)
    return {"done": done, "skipped": skipped, "cells": len(cells(cfg)), "rows": rows}
