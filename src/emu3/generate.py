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
- optional `torch.compile` of the per-step forward (`Engine(compile=True)`);
- images and video on a GPU: a loop with static shapes, a compiled step (CUDA graphs) and no host
  synchronisation (`emu3.graphs`; `Engine.generate(static=True)` anywhere, the default on CUDA).
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
    # images inside free text (interleaved output): up to max_images times the model may emit BOI, which is
    # followed by image_header (the rest of the header: "{h}*{w}" and IMG) and an image_grid (h, w) of codes
    max_images: int = 0
    image_header: np.ndarray | None = None
    image_grid: tuple[int, int] | None = None

    def steps(self) -> int:
        return len(self.template) if self.template is not None else self.max_new_tokens

    def rows(self) -> int:
        """Cache rows: two for a guided request (conditional and unconditional), else one."""
        return 2 if self.cfg_scale != 1 else 1

    def image_steps(self) -> int:
        """Steps one image inside free text takes: BOI, the header's rest, the grid, EOF and EOI."""
        h, w = self.image_grid
        return 1 + len(self.image_header) + h * (w + 1) + 2


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


def filtered(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
             top_p: torch.Tensor, k_max: int | None = None, nucleus: bool | None = None) -> torch.Tensor:
    """The scores sampling draws from (R, V): scaled by temperature (greedy rows unscaled), then top-k and
    top-p applied (-inf = excluded), in transformers' order. `k_max` (the largest k among the rows that
    filter by top-k, 0 when none does) and `nucleus` (some row has top_p < 1), when the caller knows them,
    spare reading them back from the device (a decode loop without host synchronisation)."""
    greedy = temperature <= 0
    scaled = scores / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    v = scores.shape[1]
    filters = (top_k > 0) & (top_k < v)  # (R,) rows that keep their top k
    if k_max is None:
        k_max = int(torch.where(filters, top_k, 0).max())
    if k_max:
        k = torch.where(filters, top_k, k_max).clamp(max=k_max)  # rows that do not filter: any index, unused
        kth = torch.topk(scaled, k_max, dim=1).values.gather(1, (k - 1)[:, None])  # (R, 1)
        scaled = scaled.masked_fill((scaled < kth) & filters[:, None], -math.inf)
    if nucleus if nucleus is not None else bool((top_p < 1).any()):
        sorted_scores, order = torch.sort(scaled, dim=1, descending=True)
        probs = torch.softmax(sorted_scores, dim=1)
        above = probs.cumsum(1) - probs  # probability mass ranked strictly above each token
        drop_sorted = (above >= top_p[:, None]) & (top_p[:, None] < 1)  # rounding must not cut top_p = 1 rows
        scaled = scaled.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), -math.inf)
    return scaled


def sample(scores: torch.Tensor, token_ids: torch.Tensor, seeds: torch.Tensor, step: int | torch.Tensor,
           temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, k_max: int | None = None,
           nucleus: bool | None = None) -> torch.Tensor:
    """One token per row from (R, V) scores (log-probabilities up to a row constant; -inf = banned):
    Gumbel-max over `filtered` scores (argmax when temperature 0)."""
    noisy = filtered(scores, temperature, top_k, top_p, k_max, nucleus) + gumbel_noise(seeds, step, token_ids)
    choice = torch.where(temperature <= 0, scores.argmax(1), noisy.argmax(1))
    return token_ids.to(choice.device)[choice]


def target_probs(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """(R, V) the distribution `sample` draws from: softmax of the filtered scores; one-hot at the argmax for
    greedy rows."""
    probs = torch.softmax(filtered(scores, temperature, top_k, top_p), dim=1)
    greedy = torch.zeros_like(probs).scatter_(1, scores.argmax(1, keepdim=True), 1.0)
    return torch.where((temperature <= 0)[:, None], greedy, probs)


def accept_draft(u: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Speculative sampling's rule: a draft drawn from q is kept with probability min(1, p / q) (u uniform)."""
    return u * q <= p


def uniform_noise(seeds: torch.Tensor, key: int | torch.Tensor) -> torch.Tensor:
    """(R,) uniform (0, 1) numbers, a pure function of (seed, key) (speculative decoding's coins)."""
    keys = key.to(seeds) if isinstance(key, torch.Tensor) else torch.full_like(seeds, key)
    return ((_hash32(_hash32(seeds & _M32) ^ _hash32(keys & _M32) ^ 0x5BD1E995).double() + 0.5) / 4294967296.0).float()


# --------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Runs batches of `Request`s on one model. `fast=False` runs the slow twins of every fast path."""

    def __init__(self, model: Emu3LM, vocab: Vocabulary | None = None, fast: bool = True, compile: bool = False):
        self.model = model.eval()
        self.vocab = vocab or model.config.vocabulary()
        if self.vocab.size != model.config.vocab_size:
            raise InputError(f"the tokenizer has {self.vocab.size} ids but the model {model.config.vocab_size}")
        self.fast, self.compile = fast, compile
        # the model's forward to hidden states (compiled with compile=True)
        self.hidden_states = torch.compile(model.hidden_states, dynamic=True) if compile else model.hidden_states
        self.static = None  # the static loop (emu3.graphs), made on first use
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

    def check(self, requests: list[Request], max_len: int | None = None) -> int:
        """Validate before any compute (the one place every caller's requests are checked: the library,
        the command line and the server); returns the cache length the longest needs. `max_len`: a lower
        limit than the model's context (a server's)."""
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
            if r.max_images:
                if r.template is not None:
                    raise InputError(f"request {i}: images inside free text (max_images) need a free-text request, "
                                     "not a template")
                if r.image_header is None or r.image_grid is None:
                    raise InputError(f"request {i}: max_images {r.max_images} needs image_header and image_grid")
            longest = max(len(r.prompt), len(r.negative) if r.negative is not None and r.cfg_scale != 1 else 0)
            total = longest + r.steps()
            if total > limit:
                raise InputError(f"request {i}: prompt ({longest} tokens) + up to {r.steps()} generated tokens = "
                                 f"{total}, more than the model's context of {limit} tokens")
            if max_len is not None and total > max_len:
                raise InputError(f"request {i}: prompt + generated tokens = {total}, more than this server's "
                                 f"{max_len} per request")
            need = max(need, total)
        return need

    @torch.no_grad()
    def generate(self, requests: list[Request], on_step: Callable[[int, int], None] | None = None,
                 decoding: str = "plain", window: int = 16, static: bool | None = None) -> list[Result]:
        """Run the requests as one batch until every one has emitted a stop id or used its steps.
        decoding="jacobi": speculative Jacobi decoding (`Decoder.jacobi_pass`) with `window` drafts per
        request: the same distribution as plain decoding (greedy: the same tokens) in fewer forward passes.
        decoding="rows": parallel rows (`emu3.zipar`, not lossless): whole images, row r starting when the row
        above is `window` codes ahead.
        static: plain decoding of images and video in the loop shaped for a GPU (`emu3.graphs.StaticLoop`:
        the same tokens); None = on CUDA when the requests allow it."""
        if decoding not in ("plain", "jacobi", "rows"):
            raise InputError(f"decoding must be 'plain', 'jacobi' or 'rows', got {decoding!r}")
        if decoding == "rows":
            from . import zipar

            self.check(requests)
            return zipar.generate(self, requests, window)
        if static is not False and decoding == "plain":
            from .graphs import StaticLoop, eligible

            why = eligible(requests)
            if static and why is not None:
                raise InputError(why)
            if why is None and (static or (self.device.type == "cuda" and self.fast)):
                if self.static is None:
                    self.static = StaticLoop(self, compile=self.compile)
                return self.static.generate(requests, on_step)
        need = self.check(requests)
        jacobi = decoding == "jacobi"
        core = Decoder(self, sum(r.rows() for r in requests), need + (window + 1 if jacobi else 0), decoding, window)
        core.add(requests)
        out = [[] for _ in requests]
        index = list(range(len(requests)))  # core position -> request
        finished = [False] * len(requests)
        total, passes = max(r.steps() for r in requests), 0
        while core.n:
            accepted, ended, stopped = core.step_tokens()
            passes += 1
            for j, toks in enumerate(accepted):
                out[index[j]] += toks
            done = ended.nonzero().flatten().tolist()
            for j in done:
                finished[index[j]] = bool(stopped[j])
            if done:
                core.remove(done)
                index = [k for j, k in enumerate(index) if j not in set(done)]
            if core.n:
                core.feed()
                if on_step is not None:
                    on_step(max(map(len, out)), total)
        self.passes = passes + jacobi  # forward passes of the last call, the prefill included (measurements)
        return [Result(np.asarray(t, dtype=np.int64), f) for t, f in zip(out, finished)]

    @torch.no_grad()
    def next_token_scores(self, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        """The guided, constrained scores the sampler sees for each request's first generated token:
        (scores (n, V'), token ids (V',)); scores are log-probabilities up to a per-row constant."""
        core = Decoder(self, sum(r.rows() for r in requests), self.check(requests))
        core.add(requests)
        return core.scores(core.want())


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The released classifier-free guidance on log-probabilities: scale * (log p_c - log p_u) + log p_u
    (shared by the general core and the static loop, so both mix the same way)."""
    return scale * (cond - uncond) + uncond


def guided_scores(e: Engine, hidden: torch.Tensor, want: torch.Tensor, g_idx: torch.Tensor, u_idx: torch.Tensor,
                  scale: torch.Tensor, text_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Constrained, guided scores (n, V') and their token ids (V',) for n requests.

    hidden (rows, H): the n requests' rows first, then one unconditional row per guided request;
    want (n,): template value of each request's step; g_idx: the guided requests, u_idx: their
    unconditional rows, scale (len(g_idx), 1); text_ok (1 or n, V): what free-text steps may emit.
    Guidance mixes the visual steps only: text inside an interleaved answer is sampled as text."""
    v = e.vocab
    visual_step = want == VISUAL
    only_visual = e.fast and bool((visual_step | (want >= 0)).all())
    if only_visual:  # the visual rows of the head only
        logits, token_ids = e.model.logits(hidden, slice(v.visual_offset, v.size)), e.visual_ids
    else:
        logits, token_ids = e.model.logits(hidden), e.all_ids
    n = len(want)
    scores = logits[:n]
    if len(g_idx):
        logp = torch.log_softmax(logits, dim=-1)
        mixed = cfg_mix(logp[g_idx], logp[u_idx], scale)
        mixed = torch.where(visual_step[g_idx, None], mixed, scores[g_idx])
        scores = scores.index_copy(0, g_idx, mixed)
    if not only_visual:
        allowed = torch.where(visual_step[:, None], e.visual_ok[None], text_ok)  # (n, V)
        scores = scores.masked_fill(~allowed, -math.inf)
    return scores, token_ids


class Decoder:
    """The one decoding core: the requests being decoded, their rows of one preallocated KV cache, and a
    step (constraints, guidance, sampling). `Engine.generate` adds a fixed batch and runs it to its end;
    `emu3.batching.Batcher` adds and removes requests between steps.

    Every cache row has its own length: prompts are prefilled right-padded into their rows, and a step
    writes row b's key and value at its column lengths[b], at position lengths[b]. Every request counts
    its own steps, for its template and its seeded sampler, so a request's tokens do not depend on what
    else is decoded beside it. Rows stay packed: when a request leaves, the rows after it move down (a
    copy of their filled columns), so a step runs on rows [0, rows_used) only; a guided request's two
    rows (conditional, unconditional) are adjacent, join and leave together.

    Per request (packed in running order; tensors so that a step has no per-request Python work): its
    template (what each step may emit), step counter, total steps, seed, stop ids, what free text may
    emit, sampling settings for visual and text steps, guidance scale. A free-text request with
    `max_images` opens an image when it emits BOI: its template gets the image's header and grid from
    the next step on (`Request.image_header`, `image_grid`), then it is back in free text."""

    def __init__(self, engine: Engine, max_rows: int, max_len: int, decoding: str = "plain", window: int = 16,
                 cache: KVCache | None = None):
        """`cache`: one to reuse (at least max_rows x max_len; the static loop keeps one for CUDA graphs)."""
        e, cfg, dev = engine, engine.model.config, engine.device
        if decoding not in ("plain", "jacobi"):
            raise InputError(f"decoding must be 'plain' or 'jacobi', got {decoding!r}")
        if decoding == "jacobi" and not 1 <= window <= 63:
            raise InputError(f"the Jacobi window must be 1-63 tokens, got {window}")
        self.engine, self.max_rows, self.max_len = e, max_rows, max_len
        self.decoding, self.window = decoding, window
        self.last: torch.Tensor | None = None  # plain: the tokens chosen last, to feed
        c = e.vocab.codebook_size  # jacobi: per request, its pending token (chosen, not fed), drafts, proposals
        self.pending = torch.zeros(0, dtype=torch.long, device=dev)
        self.fresh = torch.zeros(0, dtype=torch.bool, device=dev)  # added, first token not chosen yet
        self.passes = torch.zeros(0, dtype=torch.long, device=dev)
        self.drafts = torch.zeros((0, window), dtype=torch.long, device=dev)
        self.proposal = torch.zeros((0, window, c), device=dev)
        self.cache = cache if cache is not None else KVCache(cfg, max_rows, max_len, dev, e.dtype)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=dev)  # filled columns per row
        self.hidden = torch.zeros(max_rows, cfg.hidden_size, dtype=e.dtype, device=dev)
        self.requests: list[Request] = []
        self.rows: list[list[int]] = []  # per request: its cache rows (conditional, then unconditional)
        long, dev_kw = torch.long, {"device": dev}
        self.template = torch.zeros((0, max_len), dtype=long, **dev_kw)
        self.step = torch.zeros(0, dtype=long, **dev_kw)
        self.total = torch.zeros(0, dtype=long, **dev_kw)
        self.seeds = torch.zeros(0, dtype=long, **dev_kw)
        self.stops = torch.full((0, 1), -1, dtype=long, **dev_kw)  # (n, S), -1 = none
        self.scale = torch.ones(0, **dev_kw)
        self.images = torch.zeros(0, dtype=long, **dev_kw)  # images opened in free text
        self.max_images = torch.zeros(0, dtype=long, **dev_kw)
        self.image_need = torch.zeros(0, dtype=long, **dev_kw)  # steps an image takes, +1 for the end
        self.text_ok: torch.Tensor | None = None  # (n, V) when some request has its own, else the engine's
        self.samp = {kind: [torch.zeros(0, **dev_kw), torch.zeros(0, dtype=long, **dev_kw), torch.ones(0, **dev_kw)]
                     for kind in ("visual", "text")}

    @property
    def n(self) -> int:
        return len(self.requests)

    @property
    def rows_used(self) -> int:
        return sum(len(r) for r in self.rows)

    def add(self, requests: list[Request]) -> None:
        """Prefill checked requests (`Engine.check`) into the next free rows; the caller made sure they fit."""
        e, v, dev = self.engine, self.engine.vocab, self.engine.device
        first = used = self.rows_used
        prompts = []
        for r in requests:
            self.rows.append(list(range(used, used + r.rows())))
            used += r.rows()
            prompts.append(np.asarray(r.prompt))
            if r.rows() == 2:
                prompts.append(np.asarray(r.negative))
        if used > self.max_rows:
            raise InputError(f"{used} rows needed, this decoder has {self.max_rows}")
        self.requests += requests
        m = len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        width = int(lens.max())
        ids = torch.full((m, width), v.pad, dtype=torch.long)
        for i, p in enumerate(prompts):  # right padding: row i fills columns [0, len)
            ids[i, :len(p)] = torch.as_tensor(p)
        cols = torch.arange(width, device=dev)
        hidden = e.hidden_states(ids.to(dev), positions=cols.expand(m, width), key_mask=cols[None, :] < lens[:, None],
                                 cache=self.cache.rows(first, first + m))  # (m, width, H)
        self.hidden[first:first + m] = hidden[torch.arange(m, device=dev), lens - 1]
        self.lengths[first:first + m] = lens

        templates = torch.full((len(requests), self.max_len), v.pad, dtype=torch.long)
        for i, r in enumerate(requests):
            t = torch.as_tensor(r.template) if r.template is not None else torch.full((r.max_new_tokens,), TEXT)
            templates[i, :len(t)] = t
        cat = lambda old, new: torch.cat([old, torch.as_tensor(new, device=dev).to(old.dtype)])  # noqa: E731
        self.template = cat(self.template, templates)
        self.step = cat(self.step, [0] * len(requests))
        self.total = cat(self.total, [r.steps() for r in requests])
        self.seeds = cat(self.seeds, [r.seed for r in requests])
        self.scale = cat(self.scale, [r.cfg_scale for r in requests])
        self.images = cat(self.images, [0] * len(requests))
        self.max_images = cat(self.max_images, [r.max_images for r in requests])
        self.image_need = cat(self.image_need, [r.image_steps() + 1 if r.max_images else 0 for r in requests])
        for kind in ("visual", "text"):
            self.samp[kind] = [cat(old, [getattr(getattr(r, kind), a) for r in requests])
                               for old, a in zip(self.samp[kind], ("temperature", "top_k", "top_p"))]
        stops = [list(r.stop) if r.stop is not None else [v.eos] for r in requests]
        width = max(self.stops.shape[1], *map(len, stops))
        old = torch.nn.functional.pad(self.stops, (0, width - self.stops.shape[1]), value=-1)
        self.stops = torch.cat([old, torch.tensor([x + [-1] * (width - len(x)) for x in stops], device=dev)])
        k = len(requests)
        self.pending = cat(self.pending, [e.vocab.pad] * k)
        self.fresh = cat(self.fresh, [True] * k)
        self.passes = cat(self.passes, [0] * k)
        self.drafts = torch.cat([self.drafts, torch.full((k, self.window), e.vocab.pad, dtype=torch.long, device=dev)])
        self.proposal = torch.cat([self.proposal, torch.zeros((k,) + self.proposal.shape[1:], device=dev)])
        own = [self._text_ok(r) for r in requests]
        if self.text_ok is not None or any(x is not None for x in own):
            before = self.text_ok if self.text_ok is not None else e.text_ok[None].repeat(self.n - len(requests), 1)
            self.text_ok = torch.cat([before, torch.stack([x if x is not None else e.text_ok for x in own])])

    def _text_ok(self, r: Request) -> torch.Tensor | None:
        """What request r's free-text steps may emit, when not the engine's default (BPE ids and EOS)."""
        e, v = self.engine, self.engine.vocab
        if r.allowed is None and not r.max_images:
            return None
        ok = e.text_ok.clone()
        if r.allowed is not None:
            ok[:] = False
            ok[torch.as_tensor(np.asarray(r.allowed), device=e.device)] = True
        if r.max_images:
            ok[v.boi] = True  # while there is room for a whole image (choose)
        return ok

    def want(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """What each request's step may emit (an id, VISUAL or TEXT): (n,), or for the requests `idx`."""
        idx = torch.arange(self.n, device=self.template.device) if idx is None else idx
        return self.template[idx, self.step[idx]]

    def scores(self, want: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Constrained, guided scores of the running requests, or of the requests `idx` (`guided_scores`)."""
        dev = self.engine.device
        picked = range(self.n) if idx is None else idx.tolist()
        guided = [j for j, i in enumerate(picked) if len(self.rows[i]) == 2]
        rows = [self.rows[i][0] for i in picked] + [self.rows[picked[j]][1] for j in guided]
        hidden = self.hidden[torch.tensor(rows, device=dev)]  # requests' rows, then unconditional rows
        g_idx = torch.tensor(guided, dtype=torch.long, device=dev)
        u_idx = torch.arange(len(picked), len(picked) + len(guided), device=dev)
        text_ok = self.text_ok if self.text_ok is not None else self.engine.text_ok[None]
        if idx is not None and text_ok.shape[0] > 1:
            text_ok = text_ok[idx]
        scale = self.scale if idx is None else self.scale[idx]
        return guided_scores(self.engine, hidden, want, g_idx, u_idx, scale[g_idx][:, None], text_ok)

    def choose(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """One token for every running request (n,), or for the requests `idx`, each at its own step."""
        want = self.want(idx)
        self._allow_images()
        forced = want >= 0
        if self.engine.fast and bool(forced.all()):
            return want  # nothing to choose: skip the head
        scores, token_ids = self.scores(want, idx)
        pick = (lambda x: x) if idx is None else (lambda x: x[idx])  # noqa: E731
        visual = want == VISUAL
        temperature, top_k, top_p = (torch.where(visual, pick(a), pick(b))
                                     for a, b in zip(self.samp["visual"], self.samp["text"]))
        token = sample(scores, token_ids, pick(self.seeds), pick(self.step), temperature, top_k, top_p)
        return torch.where(forced, want, token)

    def _allow_images(self) -> None:
        """Free text may open an image (BOI) while the request has images left and room for a whole one."""
        if self.text_ok is not None and bool((self.max_images > 0).any()):
            room = (self.images < self.max_images) & (self.total - self.step >= self.image_need)
            boi = self.engine.vocab.boi
            self.text_ok[:, boi] = torch.where(self.max_images > 0, room, self.text_ok[:, boi])

    def record(self, token: torch.Tensor, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Count a step with the chosen tokens (n,), or those of the requests `idx`: returns (ended, stopped),
        both bool: the request emitted a stop id (stopped) or used all its steps. A free-text request that
        emitted BOI gets the image's header and grid in its template from the next step on."""
        v = self.engine.vocab
        idx = torch.arange(self.n, device=self.template.device) if idx is None else idx
        want = self.want(idx)
        opened = idx[(want == TEXT) & (token == v.boi) & (self.max_images[idx] > 0)].tolist()
        self.step[idx] += 1
        for i in opened:  # rare: Python work only when an image opens
            self._open_image(i, int(self.step[i]))
        stopped = (token[:, None] == self.stops[idx]).any(1)
        return stopped | (self.step[idx] >= self.total[idx]), stopped

    # ---- one step of either decoding, for Engine.generate and the batcher ----

    def step_tokens(self) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """Every running request's next tokens (plain decoding: one; jacobi: those a pass accepted; a request
        added since the last call first gets its first token from its prefill, as plain decoding does), and
        (ended, stopped) (n,) bool as `record` gives them. Then `remove` the ended ones and `feed`."""
        if self.decoding == "plain":
            token = self.choose()
            ended, stopped = self.record(token)
            self.last = token
            return [[t] for t in token.tolist()], ended, stopped
        fresh = self.fresh.nonzero().flatten()
        if len(fresh):
            first = self.choose(fresh)
            first_ended, first_stopped = self.record(first, fresh)
            self.pending[fresh] = first
            self.fresh[fresh] = False
            self._redraft(torch.zeros(self.n, dtype=torch.long, device=first.device), None, None, fresh)
        out, ended, stopped = self.jacobi_pass()
        for j, i in enumerate(fresh.tolist()):
            if first_ended[j]:
                out[i], ended[i], stopped[i] = [int(first[j])], True, first_stopped[j]
            else:
                out[i] = [int(first[j])] + out[i]
        return out, ended, stopped

    def feed(self) -> None:
        """After `step_tokens` and `remove`: plain decoding feeds the chosen tokens through the model (jacobi
        passes feed their own)."""
        if self.decoding == "plain" and self.n:
            self.decode(self.last)

    def _open_image(self, i: int, s: int) -> None:
        """Request i emitted BOI in free text: its template gets the image's header and grid from step s on."""
        r, v = self.requests[i], self.engine.vocab
        part = torch.as_tensor(np.concatenate([r.image_header, image_template(v, *r.image_grid, eos=False)]),
                               device=self.template.device)
        self.template[i, s:s + len(part)] = part
        self.images[i] += 1

    def remove(self, idx: list[int]) -> None:
        """Drop requests (positions in running order) and pack the remaining rows into [0, rows_used)."""
        gone = set(idx)
        keep = [i for i in range(self.n) if i not in gone]
        self.requests = [self.requests[i] for i in keep]
        rows = [self.rows[i] for i in keep]
        new = 0
        for r in rows:  # rows were assigned in request order, so a row only ever moves down
            for j, old in enumerate(r):
                if old != new:
                    self.cache.move_row(old, new, int(self.lengths[old]))
                    self.lengths[new] = self.lengths[old]
                    self.hidden[new] = self.hidden[old]
                    r[j] = new
                new += 1
        self.rows = rows
        k = torch.tensor(keep, dtype=torch.long, device=self.engine.device)
        for name in ("template", "step", "total", "seeds", "stops", "scale", "images", "max_images", "image_need",
                     "pending", "fresh", "drafts", "proposal", "passes", "last"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name)[k])
        if self.text_ok is not None:
            self.text_ok = self.text_ok[k]
        self.samp = {kind: [x[k] for x in xs] for kind, xs in self.samp.items()}

    # ---- speculative Jacobi decoding ----

    def _window_want(self, first: torch.Tensor, length: int, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(n, length) template values of steps first[i] + k (of the requests `idx`, default all); past a
        request's end: PAD (forced, ignored)."""
        cols = first[:, None] + torch.arange(length, device=first.device)[None, :]
        total, template = (self.total, self.template) if idx is None else (self.total[idx], self.template[idx])
        inside = cols < total[:, None]
        vals = template.gather(1, cols.clamp(max=template.shape[1] - 1))
        return torch.where(inside, vals, torch.full_like(vals, self.engine.vocab.pad))

    def _redraft(self, keep: torch.Tensor, probs: torch.Tensor | None, token_ids: torch.Tensor | None,
                 idx: torch.Tensor | None = None) -> None:
        """New drafts for steps step .. step + window - 1 (of every request, or of the requests `idx`): where a
        distribution from the last pass covers the step (probs (n, window + 1, V'), its window index =
        keep + 1 + k), a token drawn from it (the Jacobi update; the proposal is that distribution), else one
        drawn uniformly over the visual codes; forced steps take their id, free-text steps are not drafted."""
        v, dev, w = self.engine.vocab, self.engine.device, self.window
        full = idx is None
        idx = torch.arange(self.n, device=dev) if full else idx
        want = self._window_want(self.step[idx], w, idx)  # (n, w)
        n, c = len(idx), v.codebook_size
        proposal = torch.full((n, w, c), 1.0 / c, device=dev)
        if probs is not None:
            src = keep[:, None] + 1 + torch.arange(w, device=dev)[None, :]  # (n, w) window index of each step
            covered = src <= self.window
            visual = probs[:, :, -c:] if token_ids is not None and len(token_ids) > c else probs
            gathered = visual.gather(1, src.clamp(max=self.window)[:, :, None].expand(n, w, c))
            mass = gathered.sum(-1, keepdim=True)
            ok = covered[:, :, None] & (mass > 0)
            proposal = torch.where(ok, gathered / mass.clamp(min=1e-30), proposal)
        keys = (3 << 28) + self.passes[idx][:, None] * 64 + torch.arange(w, device=dev)[None, :]  # (n, w)
        visual_ids = self.engine.visual_ids
        g = gumbel_noise(self.seeds[idx].repeat_interleave(w), keys.reshape(-1), visual_ids).view(n, w, c)
        drafts = visual_ids[(proposal.log().masked_fill(proposal <= 0, -math.inf) + g).argmax(2)]
        drafts = torch.where(want >= 0, want, torch.where(want == VISUAL, drafts, torch.full_like(drafts, v.pad)))
        self.drafts[idx], self.proposal[idx] = drafts, proposal

    def jacobi_pass(self) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """One forward pass over every request's pending token and its drafts: the drafts are verified in
        order with the speculative-sampling rule (accept d with probability min(1, p(d) / q(d)), p the
        distribution plain decoding samples at that step, q the draft's proposal); the first rejected one
        is replaced by a draw from the residual max(0, p - q) (renormalised), or, when every draft held,
        a bonus token is drawn from the next step's p. The accepted drafts enter the cache; the new token
        becomes the pending one; the later steps are drafted again. Returns the tokens each request
        accepted this pass (drafts and the new one, cut at a stop id or its end), and (ended, stopped) as
        `record` does."""
        e, v, dev, w = self.engine, self.engine.vocab, self.engine.device, self.window
        n = self.n
        self._allow_images()
        owner = torch.tensor([i for i, rows in enumerate(self.rows) for _ in rows], device=dev)  # row -> request
        m = len(owner)
        feed = torch.cat([self.pending[:, None], self.drafts], 1)  # (n, w + 1)
        lengths = self.lengths[:m].clone()
        width = int(lengths.max()) + w + 1
        key_mask = torch.arange(width, device=dev)[None, :] < lengths[:, None]
        hidden = e.hidden_states(feed[owner], positions=lengths[:, None] + torch.arange(w + 1, device=dev)[None, :],
                                 key_mask=key_mask, cache=self.cache.rows(0, m), start=lengths)  # (m, w + 1, H)
        # the distributions of steps step .. step + w (the drafts' and the bonus's), all at once
        want = self._window_want(self.step, w + 1)  # (n, w + 1)
        guided = [i for i, rows in enumerate(self.rows) if len(rows) == 2]
        cond = torch.tensor([rows[0] for rows in self.rows], device=dev)
        h = hidden.shape[-1]
        flat = hidden[cond].reshape(n * (w + 1), h)
        uncond = torch.tensor([self.rows[i][1] for i in guided], dtype=torch.long, device=dev)
        g_req = torch.tensor(guided, dtype=torch.long, device=dev)
        g_idx = (g_req[:, None] * (w + 1) + torch.arange(w + 1, device=dev)[None, :]).reshape(-1)
        u_flat = hidden[uncond].reshape(len(guided) * (w + 1), h)
        u_idx = torch.arange(n * (w + 1), n * (w + 1) + len(g_idx), device=dev)
        text_ok = self.text_ok if self.text_ok is not None else e.text_ok[None]
        if text_ok.shape[0] > 1:
            text_ok = text_ok.repeat_interleave(w + 1, 0)
        scale = self.scale.repeat_interleave(w + 1)[g_idx][:, None]
        scores, token_ids = guided_scores(e, torch.cat([flat, u_flat]), want.reshape(-1), g_idx, u_idx, scale,
                                          text_ok)
        visual = want.reshape(-1) == VISUAL
        rep = lambda x: x.repeat_interleave(w + 1)  # noqa: E731
        samp = [torch.where(visual, rep(a), rep(b)) for a, b in zip(self.samp["visual"], self.samp["text"])]
        probs = target_probs(scores, *samp).reshape(n, w + 1, -1)  # (n, w + 1, V')
        c = v.codebook_size
        offset = v.visual_offset if len(token_ids) == c else 0  # token id -> column of probs
        # verify the drafts in order, all at once: the leading run of accepted drafts, then one draw at the
        # first refusal (from the residual), or at the bonus step when every draft held (from p)
        rows = torch.arange(n, device=dev)
        d, wd = self.drafts, want[:, :w]
        drafted = (wd == VISUAL) | (wd >= 0)
        p_d = probs[:, :w].gather(2, (d - offset).clamp(0, probs.shape[2] - 1)[:, :, None])[:, :, 0]  # (n, w)
        q_d = self.proposal.gather(2, (d - v.visual_offset).clamp(0, c - 1)[:, :, None])[:, :, 0]
        key = self.passes * 64
        ks = torch.arange(w, device=dev)
        u = uniform_noise(self.seeds.repeat_interleave(w), ((1 << 28) + key[:, None] + ks[None, :]).reshape(-1))
        ok = drafted & ((wd >= 0) | accept_draft(u.view(n, w), p_d, q_d))
        accepted = ok.long().cumprod(1).sum(1)  # (n,) drafts accepted; the draw happens at window index accepted
        p = probs[rows, accepted]  # (n, V')
        q = self.proposal[rows, accepted.clamp(max=w - 1)]  # (n, c)
        at = want[rows, accepted]
        refused = (accepted < w) & (at == VISUAL)
        q_cols = q if offset else torch.cat([torch.zeros_like(p[:, :-c]), q], 1)
        residual = (p - torch.where(refused[:, None], q_cols, torch.zeros_like(q_cols))).clamp(min=0)
        mass = residual.sum(1, keepdim=True)
        residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
        g = gumbel_noise(self.seeds, (2 << 28) + key + accepted, token_ids)
        new = token_ids[(residual.log().masked_fill(residual <= 0, -math.inf) + g).argmax(1)]
        new = torch.where(at >= 0, at, new)
        # accepted tokens per request: drafts[:accepted] then the new one, cut at a stop id or the end
        out, ended, stopped = [], torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        steps, totals, stops = self.step.tolist(), self.total.tolist(), self.stops.tolist()
        drafts, acc, new_l = self.drafts.tolist(), accepted.tolist(), new.tolist()
        for i in range(n):
            toks = drafts[i][:acc[i]] + [new_l[i]]
            toks = toks[:totals[i] - steps[i]]
            for j, t in enumerate(toks):
                if t in stops[i]:
                    toks, stopped[i] = toks[:j + 1], True
                    break
            ended[i] = bool(stopped[i]) or steps[i] + len(toks) >= totals[i]
            out.append(toks)
        # the cache keeps the pending token and the accepted drafts; the new token is pending
        self.lengths[:m] += 1 + accepted[owner]
        for i, toks in enumerate(out):  # images inside free text open as in `record`
            for j, t in enumerate(toks):
                if t == v.boi and int(self.max_images[i]) > 0 and int(want[i, j]) == TEXT:
                    self._open_image(i, int(self.step[i]) + j + 1)
        self.step += torch.tensor([len(t) for t in out], device=dev)
        self.pending = new
        self.passes += 1
        self._redraft(accepted, probs, token_ids)
        return out, ended.to(dev), stopped.to(dev)

    def decode(self, token: torch.Tensor) -> None:
        """Feed each running request's new token (n,) through its rows (both rows of a guided request)."""
        dev = self.engine.device
        owner = torch.tensor([i for i, rows in enumerate(self.rows) for _ in rows], device=dev)  # row -> request
        m = len(owner)
        lengths = self.lengths[:m].clone()
        width = int(lengths.max()) + 1
        key_mask = torch.arange(width, device=dev)[None, :] < lengths[:, None]  # (m, width): filled columns
        hidden = self.engine.hidden_states(token[owner][:, None], positions=lengths[:, None], key_mask=key_mask,
                                           cache=self.cache.rows(0, m), start=lengths)  # (m, 1, H)
        self.hidden[:m] = hidden[:, -1]
        self.lengths[:m] += 1

