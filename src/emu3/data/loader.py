"""The training loader: mixes tokenized datasets by weight, turns records into Emu3 sequences, packs
them into fixed-length rows, and can save and restore its exact position.

- Sampling: each dataset is walked in a fresh permutation every epoch (seeded by seed, dataset and
  epoch); which dataset the next document comes from is drawn with the loader's own RNG.
- Ranks: the stream of rows does not depend on the number of processes. Every rank packs the same
  global batch (batch_size x world rows) and keeps rows [rank * batch_size, (rank + 1) * batch_size),
  so N processes see exactly the batches of one process with N times the batch, the loader state
  is the same on every rank, and a run can resume with another number of processes.
- Formatting (emu3.format): image records become text-to-image samples (caption dropped with
  probability `drop_caption`) or, with probability `caption_after`, image-to-text samples; videos
  become text-to-video or, with probability `video_extension`, extension samples; QA records chat
  samples; text records `BOS text EOS`; interleaved records interleaved samples. Stored text ids are
  used as they are where text stands between control tokens; QA text, which the chat template joins
  with template text, is decoded and formatted as a string, so that it is tokenized as prompts are.
- Packing: documents are appended whole; one that does not fit starts the next row (the row is
  padded), so no image is ever split. A document longer than a row is skipped and counted (text
  documents are cut to the row instead).
- A batch carries, per position, the target (the next token of the same document, or -100), its
  loss weight (`vision_weight` for visual codes, 1 otherwise, 0 where the sample's loss mask is
  off), and document ids for the attention mask (emu3.model masks across documents).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from ..format import RELEASED_CHAT_TEMPLATE, Formatter, Sample, TokenType
from .shards import Record, TokenDataset


@dataclass
class MixPolicy:
    """How records become training sequences."""

    drop_caption: float = 0.1
    caption_after: float = 0.0  # image records formatted as image-to-text
    video_extension: float = 0.0  # video records trained as extension samples
    t2i_loss: str = "all"  # "output": only the image (quality fine-tuning)
    i2t_loss: str = "output"  # "output": only the caption
    vision_weight: float = 0.5
    answer_weight: float = 1.0  # the loss weight of QA answers (a one-word answer is a tiny share of a batch)
    chat_template: str = RELEASED_CHAT_TEMPLATE
    extension_context: str = "half"  # latent frames given to an extension sample: half, or "random" (1 .. T-1)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L), -100 = no target
    weights: torch.Tensor  # (B, L) float
    document_ids: torch.Tensor  # (B, L)

    @property
    def tokens(self) -> int:
        return int((self.targets != -100).sum())


class Loader:
    def __init__(self, sources: list[tuple[str, float]], formatter: Formatter, seq_len: int, batch_size: int,
                 policy: MixPolicy | None = None, seed: int = 0, rank: int = 0, world: int = 1):
        if not sources:
            raise InputError("no training data: give at least one tokenized dataset")
        if seq_len < 8 or batch_size < 1:
            raise InputError(f"need seq_len >= 8 and batch_size >= 1, got {seq_len} and {batch_size}")
        self.fmt, self.vocab = formatter, formatter.vocab
        self.seq_len, self.batch_size, self.policy = seq_len, batch_size, policy or MixPolicy()
        self.seed, self.rank, self.world = seed, rank, world
        self.datasets = [TokenDataset(path) for path, _ in sources]
        weights = np.array([w for _, w in sources], dtype=np.float64)
        if (weights <= 0).any() or not np.isfinite(weights).all():
            raise InputError(f"dataset weights must be positive, got {weights.tolist()}")
        self.p = weights / weights.sum()
        want = {"text_size": self.vocab.text_size, "codebook_size": self.vocab.codebook_size}
        for (path, _), ds in zip(sources, self.datasets):
            if ds.vocab != want:
                raise InputError(f"{path} was tokenized with vocabulary {ds.vocab}, the model uses {want}")
            if len(ds) == 0:
                raise InputError(f"{path} has no records")
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.cursors = [[0, 0] for _ in self.datasets]  # (epoch, position in the epoch's order)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # source -> (epoch, order)
        self.pending: Sample | None = None
        self.stats = {"documents": 0, "skipped_too_long": 0, "truncated": 0, "rows": 0,
                      "per_source": [0] * len(self.datasets)}

    # ---- records and documents ----

    def _order(self, source: int, epoch: int) -> np.ndarray:
        if self._orders.get(source, (None,))[0] != epoch:
            perm = np.random.Generator(np.random.PCG64([self.seed, source, epoch])).permutation(
                len(self.datasets[source]))
            self._orders[source] = (epoch, perm)
        return self._orders[source][1]

    def _next_record(self, source: int) -> Record:
        epoch, pos = self.cursors[source]
        order = self._order(source, epoch)
        if pos >= len(order):
            epoch, pos = epoch + 1, 0
            order = self._order(source, epoch)
        self.cursors[source] = [epoch, pos + 1]
        return self.datasets[source][int(order[pos])]

    def document(self, record: Record) -> Sample | None:
        f, p, rng, dec = self.fmt, self.policy, self.rng, self.fmt.tok.decode
        k = record.kind
        if k == "image":
            caption, codes = record.fields["caption"], record.fields["codes"]
            if rng.random() < p.caption_after:
                return f.i2t(codes, caption, loss=p.i2t_loss)
            return f.t2i(caption, codes, p.drop_caption, rng, loss=p.t2i_loss)
        if k == "video":
            caption, codes, fps = record.fields["caption"], record.fields["codes"], record.meta.get("fps")
            if len(codes) > 1 and rng.random() < p.video_extension:
                given = len(codes) // 2 if p.extension_context == "half" else int(rng.integers(1, len(codes)))
                return f.video_extension(caption, codes, given, fps)
            return f.t2v(caption, codes, fps, p.drop_caption, rng, loss=p.t2i_loss)
        if k == "qa":
            x = record.fields
            more = [(dec(x[f"q{i}"]), dec(x[f"a{i}"])) for i in range(1, record.meta.get("turns", 1))]
            doc = f.chat(x["codes"], dec(x["question"]), dec(x["answer"]), p.chat_template, more)
            doc.weight = p.answer_weight
            return doc
        if k == "text":
            return f.text_sample(record.fields["text"])
        if k == "interleaved":
            return f.interleaved([record.fields[f"s{i}"] for i in range(len(record.meta["segments"]))])
        if k == "vla":
            from ..action import ActionIds

            m, x = record.meta, record.fields
            frames = [([x[f"v{j}_{i}"] for i in range(m["views"])], x[f"a{j}"]) for j in range(m["frames"])]
            return f.vla(x["instruction"], frames, ActionIds(self.vocab.text_size, m["action_count"]))
        return None  # preference records train with DPO, not here

    def _next_document(self) -> Sample:
        while True:
            source = int(self.rng.choice(len(self.p), p=self.p))
            doc = self.document(self._next_record(source))
            if doc is None:
                continue
            if len(doc) > self.seq_len:
                if (doc.types == TokenType.TEXT).all():
                    self.stats["truncated"] += 1
                    doc = Sample(doc.ids[:self.seq_len], doc.loss_mask[:self.seq_len], doc.types[:self.seq_len])
                else:
                    self.stats["skipped_too_long"] += 1
                    continue
            self.stats["documents"] += 1
            self.stats["per_source"][source] += 1
            return doc

    # ---- packing ----

    def _row(self):
        n, v, w = self.seq_len, self.vocab, self.policy.vision_weight
        ids = np.full(n, v.pad, np.int64)
        targets = np.full(n, -100, np.int64)
        weights = np.zeros(n, np.float32)
        docs = np.zeros(n, np.int64)
        pos, d = 0, 0
        while True:
            doc = self.pending if self.pending is not None else self._next_document()
            self.pending = None
            if pos and pos + len(doc) > n:
                self.pending = doc  # does not fit: it opens the next row
                break
            m = len(doc)
            ids[pos:pos + m] = doc.ids
            docs[pos:pos + m] = d
            targets[pos:pos + m - 1] = np.where(doc.loss_mask[1:], doc.ids[1:], -100)  # predict the next token
            weights[pos:pos + m - 1] = np.where(doc.loss_mask[1:],
                                                np.where(doc.types[1:] == TokenType.VISUAL, w, doc.weight), 0.0)
            pos, d = pos + m, d + 1
            if pos >= n:
                break
        docs[pos:] = d  # the padding is a document of its own
        self.stats["rows"] += 1
        return ids, targets, weights, docs

    def next_batch(self) -> Batch:
        """This rank's rows of the next global batch."""
        rows = [self._row() for _ in range(self.batch_size * self.world)]
        mine = rows[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        ids, targets, weights, docs = (torch.from_numpy(np.stack(x)) for x in zip(*mine))
        return Batch(ids, targets, weights, docs)

    # ---- state ----

    def state_dict(self) -> dict:
        pending = None
        if self.pending is not None:
            pending = {k: getattr(self.pending, k).tolist() for k in ("ids", "loss_mask", "types")}
            pending["weight"] = self.pending.weight
        return {"rng": self.rng.bit_generator.state, "cursors": self.cursors, "pending": pending,
                "stats": dict(self.stats), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise InputError(f"loader state was saved with seed {state['seed']}, this run uses {self.seed}")
        if len(state["cursors"]) != len(self.datasets):
            raise InputError(f"loader state has {len(state['cursors'])} datasets, this run {len(self.datasets)}")
        self.rng.bit_generator.state = state["rng"]
        self.cursors = [list(c) for c in state["cursors"]]
        p = state["pending"]
        self.pending = None if p is None else Sample(np.asarray(p["ids"], np.int64), np.asarray(p["loss_mask"], bool),
                                                     np.asarray(p["types"], np.uint8), p.get("weight", 1.0))
        self.stats = {k: (list(v) if isinstance(v, list) else v) for k, v in state["stats"].items()}


# --------------------------------------------------------------------------------------------
# Preference pairs (DPO)


@dataclass
class PairBatch:
    """Each pair as two right-padded rows: prompt + chosen, prompt + rejected."""

    chosen: torch.Tensor  # (B, L)
    chosen_mask: torch.Tensor  # (B, L) bool: positions whose next token is part of the continuation
    rejected: torch.Tensor
    rejected_mask: torch.Tensor
    index: torch.Tensor  # (B,) record index in the preference dataset (for the reference log-probs)


class PairLoader:
    """Walks the preference records of one dataset in a per-epoch permutation; like `Loader`, every
    rank draws the global batch and keeps its slice."""

    def __init__(self, path: str, pad: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.ds = TokenDataset(path)
        self.indices = np.array([i for i in range(len(self.ds)) if self.ds[i].kind == "preference"])
        if len(self.indices) == 0:
            raise InputError(f"{path} has no preference records")
        self.pad, self.batch_size, self.seed, self.rank, self.world = pad, batch_size, seed, rank, world
        self.cursor = [0, 0]

    def _order(self, epoch: int) -> np.ndarray:
        perm = np.random.Generator(np.random.PCG64([self.seed, 7, epoch])).permutation(len(self.indices))
        return self.indices[perm]

    def next_batch(self) -> PairBatch:
        picked = []
        for _ in range(self.batch_size * self.world):
            epoch, pos = self.cursor
            order = self._order(epoch)
            if pos >= len(order):
                epoch, pos, order = epoch + 1, 0, self._order(epoch + 1)
            self.cursor = [epoch, pos + 1]
            picked.append(int(order[pos]))
        return pair_batch(self.ds, picked[self.rank * self.batch_size:(self.rank + 1) * self.batch_size], self.pad)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = list(state["cursor"])


def pair_batch(ds: TokenDataset, indices: list[int], pad: int) -> PairBatch:
    rows = {"chosen": [], "rejected": []}
    for i in indices:
        r = ds[i].fields
        for side in rows:
            rows[side].append((r["prompt"], r[side]))
    out = {}
    for side, pairs in rows.items():
        length = max(len(p) + len(c) for p, c in pairs)
        ids = np.full((len(pairs), length), pad, np.int64)
        mask = np.zeros((len(pairs), length), bool)
        for j, (p, c) in enumerate(pairs):
            ids[j, :len(p) + len(c)] = np.concatenate([p, c])
            mask[j, len(p) - 1:len(p) + len(c) - 1] = True  # these positions predict the continuation
        out[side], out[side + "_mask"] = torch.from_numpy(ids), torch.from_numpy(mask)
    return PairBatch(out["chosen"], out["chosen_mask"], out["rejected"], out["rejected_mask"], torch.tensor(indices))
