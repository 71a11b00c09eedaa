"""The generation engine: batched prefill, a preallocated KV cache, CFG in one forward, structural
constraints and per-request seeded sampling, with no per-token Python work that grows with the
batch or the vocabulary.

How a step works (all rows at once):
1. logits of the last position. Classifier-free guidance runs the conditional and unconditional
   prompts as rows of the same batch; their log-softmaxes are mixed as released,
   g * (logp_cond - logp_uncond) + logp_uncond, and the sampled token is appended to both rows.
2. the structure: every row follows a template of what it may emit at each step: a forced id
   (EOL, EOF, EOI, EOS, frame headers), "any visual code" (VISUAL) or "free text" (TEXT, for chat).
   Image and video templates come from the grid, so rows of one batch can have different grids.
3. sampling: temperature (0 = greedy), top-k, top-p, separately for text and visual steps, with
   Gumbel-max noise from a counter-based hash of (seed, step, token id). A row's draws depend only on
   its own seed, so an image is the same whatever else is in the batch.

Fast paths (each with a slow twin; `Engine(fast=False)` runs the twins, tests compare tokens):
- while every active row is at a visual step, the output projection covers only the visual rows of
  the head (32,768 of 184,622 released); softmax over that subset differs from the full one by a
  per-row constant, which cancels in CFG mixing, top-k, top-p and sampling;
- when every active row's next token is forced (EOL, EOF, ...), the head is skipped;
- optional `torch.compile` of the per-step forward (`Engine(compile=True)`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError
from .model import Emu3LM, KVCache
from .tokenizer import Vocabulary

VISUAL = -1  # template value: any visual code
TEXT = -2  # template value: free text (text ids or EOS)


@dataclass
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling(temperature=0.0)


@dataclass
class Request:
    """One generation: a prompt, what it may emit (template, or free text), sampling and guidance."""

    prompt: np.ndarray
    template: np.ndarray | None = None  # per step: id, VISUAL or TEXT; None = free text up to max_new_tokens
    max_new_tokens: int = 1024
    negative: np.ndarray | None = None  # the unconditional prompt; used when cfg_scale != 1
    cfg_scale: float = 1.0
    visual: Sampling = field(default_factory=Sampling)
    text: Sampling = field(default_factory=lambda: GREEDY)
    seed: int = 0
    allowed: np.ndarray | None = None  # ids free-text steps may emit (default: the BPE ids and EOS)
    stop: tuple[int, ...] | None = None  # ids that end the row, kept in the result (default: EOS)

    def steps(self) -> int:
        return len(self.template) if self.template is not None else self.max_new_tokens


@dataclass
class Result:
    tokens: np.ndarray  # generated ids, up to and including EOS when it was reached
    finished: bool  # reached EOS (False: stopped at max_new_tokens)


def image_template(vocab: Vocabulary, h: int, w: int, known: int = 0, eos: bool = True) -> np.ndarray:
    """What follows `BOI meta IMG` (+ `known` visual tokens already in the prompt): the rest of the
    h rows of w VISUAL + EOL, then EOF, EOI (and EOS)."""
    body = np.full((h, w + 1), VISUAL, np.int64)
    body[:, w] = vocab.eol
    done = known + known // w  # every full run of w tokens came with its EOL
    tail = [vocab.eof, vocab.eoi] + ([vocab.eos] if eos else [])
    return np.concatenate([body.reshape(-1)[done:], tail])


def video_template(vocab: Vocabulary, frame_header: np.ndarray, frames: int, h: int, w: int) -> np.ndarray:
    """`frames` image strings (header forced, body VISUAL), then EOV and EOS."""
    frame = np.concatenate([frame_header, image_template(vocab, h, w, eos=False)])
    return np.concatenate([np.tile(frame, frames), [vocab.eov, vocab.eos]])


# --------------------------------------------------------------------------------------------
# Sampling


_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 arithmetic, no overflow: x < 2^32 and the constant < 2^27)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def gumbel_noise(seeds: torch.Tensor, step: int | torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise for every (row, token id), a pure function of (seed, step, token id); `step` is
    one number or one per row (continuous batching: each request counts its own steps)."""
    steps = step.to(seeds) if isinstance(step, torch.Tensor) else torch.full_like(seeds, step)
    row = _hash32(_hash32(seeds & _M32) ^ _hash32(steps & _M32))  # (R,)
    key = _hash32(row[:, None] ^ _hash32(token_ids.to(seeds.device) & _M32)[None, :])  # (R, V)
    u = (key.double() + 0.5) / 4294967296.0  # in (0, 1)
    return (-torch.log(-torch.log(u))).float()


def sample(scores: torch.Tensor, token_ids: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor,
           temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """One token per row from (R, V) scores (log-probabilities up to a row constant; -inf = banned).
    Order as in transformers: temperature, top-k, top-p; then Gumbel-max (argmax when temperature 0)."""
    greedy = temperature <= 0
    scaled = scores / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    v = scores.shape[1]
    k = torch.where((top_k <= 0) | (top_k >= v), torch.full_like(top_k, v), top_k)
    if bool((k < v).any()):
        kth = torch.topk(scaled, int(k.max()), dim=1).values.gather(1, (k - 1)[:, None])  # (R, 1)
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    if bool((top_p < 1).any()):
        sorted_scores, order = torch.sort(scaled, dim=1, descending=True)
        probs = torch.softmax(sorted_scores, dim=1)
        above = probs.cumsum(1) - probs  # probability mass ranked strictly above each token
        drop_sorted = (above >= top_p[:, None]) & (top_p[:, None] < 1)  # rounding must not cut top_p = 1 rows
        scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), -math.inf)
    noisy = scaled + gumbel_noise(seeds, step, token_ids)
    choice = torch.where(greedy, scores.argmax(1), noisy.argmax(1))
    return token_ids.to(choice.device)[choice]


# --------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Runs batches of `Request`s on one model. `fast=False` runs the slow twins of every fast path."""

    def __init__(self, model: Emu3LM, vocab: Vocabulary | None = None, fast: bool = True, compile: bool = False):
        self.model = model.eval()
        self.vocab = vocab or model.config.vocabulary()
        if self.vocab.size != model.config.vocab_size:
            raise InputError(f"the tokenizer has {self.vocab.size} ids but the model {model.config.vocab_size}")
        self.fast = fast
        # the model's forward to hidden states (compiled with compile=True); the batcher calls it too
        self.hidden_states = torch.compile(model.hidden_states, dynamic=True) if compile else model.hidden_states
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        v = self.vocab
        self.all_ids = torch.arange(v.size, device=self.device)
        self.visual_ids = torch.arange(v.visual_offset, v.size, device=self.device)
        self.text_ok = torch.zeros(v.size, dtype=torch.bool, device=self.device)  # free text: BPE ids and EOS
        self.text_ok[: v.text_size] = True
        self.text_ok[v.eos] = True
        self.visual_ok = torch.zeros(v.size, dtype=torch.bool, device=self.device)
        self.visual_ok[v.visual_offset:] = True

    def check(self, requests: list[Request]) -> int:
        """Validate before any compute; returns the cache length needed."""
        if not requests:
            raise InputError("no requests")
        limit = self.model.config.max_position_embeddings
        need = 0
        for i, r in enumerate(requests):
            for name, ids in (("prompt", r.prompt), ("negative prompt", r.negative)):
                if ids is None:
                    continue
                ids = np.asarray(ids)
                if ids.ndim != 1 or len(ids) == 0:
                    raise InputError(f"request {i}: the {name} must be a non-empty 1-D array of ids")
                if ids.min() < 0 or ids.max() >= self.vocab.size:
                    raise InputError(f"request {i}: the {name} has ids outside [0, {self.vocab.size})")
            if not (math.isfinite(r.cfg_scale) and r.cfg_scale >= 0):
                raise InputError(f"request {i}: cfg_scale must be a finite number >= 0, got {r.cfg_scale}")
            if r.cfg_scale != 1 and r.negative is None:
                raise InputError(f"request {i}: cfg_scale {r.cfg_scale} needs a negative (unconditional) prompt")
            for name, ids in (("allowed", r.allowed), ("stop", r.stop)):
                if ids is not None:
                    ids = np.asarray(ids)
                    if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or ids.max() >= self.vocab.size:
                        raise InputError(f"request {i}: {name} must be a non-empty list of ids in "
                                         f"[0, {self.vocab.size})")
            if r.template is None and r.max_new_tokens < 1:
                raise InputError(f"request {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
            longest = max(len(r.prompt), len(r.negative) if r.negative is not None and r.cfg_scale != 1 else 0)
            total = longest + r.steps()
            if total > limit:
                raise InputError(f"request {i}: prompt ({longest} tokens) + up to {r.steps()} generated tokens = "
                                 f"{total}, more than the model's context of {limit} tokens")
            need = max(need, total)
        return need

    @torch.no_grad()
    def generate(self, requests: list[Request], on_step: Callable[[int, int], None] | None = None) -> list[Result]:
        """Run the requests as one batch until every row has emitted EOS or used its steps."""
        run = _Run(self, requests)
        v = self.vocab
        for step in range(run.steps):
            want = run.templates[:, step]
            forced = want >= 0
            if self.fast and bool((forced | run.done).all()):
                token = want  # nothing to choose: skip the head
            else:
                scores, token_ids = run.scores(step)
                temperature, top_k, top_p = run.sampling(want)
                token = sample(scores, token_ids, run.seeds, step, temperature, top_k, top_p)
                token = torch.where(forced, want, token)
            token = torch.where(run.done, torch.full_like(token, v.pad), token)
            run.out[:, step] = token
            run.done = run.done | (token[:, None] == run.stops).any(1) | (step + 1 >= run.lengths)
            if bool(run.done.all()):
                break
            run.advance(token, step)
            if on_step is not None:
                on_step(step + 1, run.steps)
        results = []
        for i, r in enumerate(requests):
            toks = run.out[i, : min(step + 1, r.steps())].cpu().numpy()
            end = np.flatnonzero(np.isin(toks, r.stop if r.stop is not None else [v.eos]))
            results.append(Result(toks[: end[0] + 1] if len(end) else toks, bool(len(end))))
        return results

    @torch.no_grad()
    def next_token_scores(self, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided, constrained scores the sampler sees for each request's first generated token:
        (scores (n, V'), token ids (V',)); scores are log-probabilities up to a per-row constant."""
        return _Run(self, requests).scores(0)


def guided_scores(e: Engine, hidden: torch.Tensor, want: torch.Tensor, done: torch.Tensor, g_idx: torch.Tensor,
                  u_idx: torch.Tensor, scale: torch.Tensor, text_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Constrained, guided scores (n, V') and their token ids (V',) for n requests.

    hidden (rows, H): the n requests' rows first, then one unconditional row per guided request;
    want (n,): template value of each request's step; g_idx: the guided requests, u_idx: their
    unconditional rows, scale (len(g_idx), 1); text_ok (1 or n, V): what free-text steps may emit."""
    v = e.vocab
    visual_step = want == VISUAL
    only_visual = e.fast and bool((visual_step | done | (want >= 0)).all())
    if only_visual:  # the visual rows of the head only
        logits, token_ids = e.model.logits(hidden, slice(v.visual_offset, v.size)), e.visual_ids
    else:
        logits, token_ids = e.model.logits(hidden), e.all_ids
    n = len(want)
    scores = logits[:n]
    if len(g_idx):
        logp = torch.log_softmax(logits, dim=-1)
        mixed = scale * (logp[g_idx] - logp[u_idx]) + logp[u_idx]
        scores = scores.index_copy(0, g_idx, mixed)
    if not only_visual:
        allowed = torch.where(visual_step[:, None], e.visual_ok[None], text_ok)  # (n, V)
        scores = scores.masked_fill(~allowed, -math.inf)
    return scores, token_ids


class _Run:
    """The state of one batch: padded prompts, cache, templates, per-row sampling settings."""

    def __init__(self, engine: Engine, requests: list[Request]):
        engine.check(requests)
        self.engine = e = engine
        v, dev = e.vocab, e.device
        n = len(requests)
        guided = [i for i, r in enumerate(requests) if r.cfg_scale != 1]
        prompts = [np.asarray(r.prompt) for r in requests] + [np.asarray(requests[i].negative) for i in guided]
        rows = len(prompts)
        self.p_len = p_len = max(len(p) for p in prompts)
        self.steps = steps = max(r.steps() for r in requests)
        ids = torch.full((rows, p_len), v.pad, dtype=torch.long)
        self.key_mask = torch.ones((rows, p_len + steps), dtype=torch.bool)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at column p_len - 1
            ids[i, p_len - len(p):] = torch.as_tensor(p)
            self.key_mask[i, : p_len - len(p)] = False
        ids, self.key_mask = ids.to(dev), self.key_mask.to(dev)
        positions = (self.key_mask[:, :p_len].long().cumsum(1) - 1).clamp(min=0)
        templates = torch.full((n, steps), v.pad, dtype=torch.long)
        for i, r in enumerate(requests):
            t = torch.as_tensor(r.template) if r.template is not None else torch.full((r.max_new_tokens,), TEXT)
            templates[i, :len(t)] = t
        self.templates = templates.to(dev)
        self.lengths = torch.tensor([r.steps() for r in requests], device=dev)
        self.cond_of = torch.tensor(list(range(n)) + guided, device=dev)  # the request each row follows
        self.g_idx = torch.tensor(guided, dtype=torch.long, device=dev)
        self.u_idx = torch.arange(n, rows, device=dev)
        self.scale = torch.tensor([requests[i].cfg_scale for i in guided], device=dev)[:, None]
        self.seeds = torch.tensor([r.seed for r in requests], dtype=torch.long, device=dev)
        self.text_ok = e.text_ok[None]  # (1 or n, V): what free-text steps may emit
        if any(r.allowed is not None for r in requests):
            self.text_ok = e.text_ok[None].repeat(n, 1)
            for i, r in enumerate(requests):
                if r.allowed is not None:
                    self.text_ok[i] = False
                    self.text_ok[i, torch.as_tensor(np.asarray(r.allowed), device=dev)] = True
        stops = [list(r.stop) if r.stop is not None else [v.eos] for r in requests]
        width = max(len(x) for x in stops)
        self.stops = torch.tensor([x + [-1] * (width - len(x)) for x in stops], device=dev)  # (n, S), -1 = none
        self.samp = {kind: [torch.tensor([getattr(getattr(r, kind), a) for r in requests], device=dev)
                            for a in ("temperature", "top_k", "top_p")] for kind in ("visual", "text")}
        self.cache = KVCache(e.model.config, rows, p_len + steps, dev, e.dtype)
        self.hidden = e.hidden_states(ids, positions=positions, key_mask=self.key_mask[:, :p_len],
                                      cache=self.cache)[:, -1]
        self.last_pos = positions[:, -1]
        self.out = torch.full((n, steps), v.pad, dtype=torch.long, device=dev)
        self.done = torch.zeros(n, dtype=torch.bool, device=dev)

    def scores(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return guided_scores(self.engine, self.hidden, self.templates[:, step], self.done, self.g_idx, self.u_idx,
                             self.scale, self.text_ok)

    def sampling(self, want: torch.Tensor):
        visual_step = want == VISUAL
        return (torch.where(visual_step, a, b) for a, b in zip(self.samp["visual"], self.samp["text"]))

    def advance(self, token: torch.Tensor, step: int) -> None:
        """Feed the chosen tokens (each unconditional row gets its request's token) through the model."""
        self.last_pos = self.last_pos + 1
        start = self.p_len + step
        self.hidden = self.engine.hidden_states(token[self.cond_of][:, None], positions=self.last_pos[:, None],
                                           key_mask=self.key_mask[:, :start + 1], cache=self.cache, start=start)[:, -1]

