"""A decode loop shaped for a GPU (gpt-fast style), for images and video: `Engine.generate(static=True)`.

On a GPU one decode step of a large model is bound by reading the weights, and what is left is launch
overhead and waiting on the host. This loop removes both for requests whose structure is known in
advance (template requests: images and video, whose length and forced ids the template gives):

- every step has the same shapes: all rows of the batch, every column of the preallocated KV cache
  read under a mask of the filled ones (`Emu3LM.decode_step`); no shape grows from step to step;
- only the decode step and the choice of the next token are compiled (`compile=True`; with CUDA
  graphs on CUDA, mode="reduce-overhead", the cache marked as a static address so that graph replays
  write into it); the prefill stays eager (`generate.Decoder.add`);
- nothing is read back inside the loop: which steps are forced (EOL, EOF, ...: the head is skipped)
  is read from the templates on the host before it starts, top-k's largest k and whether top-p is on
  come from the requests, tokens gather on the device and come back once, where the rows are cut at
  their stop ids.

A row that ends early (a stop id) keeps running to the batch's last step and its extra tokens are
dropped, so a request's tokens are exactly those of the general core (`generate.Decoder`, plain
decoding, its slow twin; tests compare them). Free text, interleaved answers and Jacobi decoding, whose
steps depend on what was sampled, stay on the general core.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .errors import InputError
from .generate import TEXT, Decoder, Engine, Request, Result, cfg_mix, sample
from .model import KVCache

BUCKET = 256  # compiled loops allocate cache lengths in multiples of this


def eligible(requests: list[Request]) -> str | None:
    """Why the requests cannot run in the static loop, or None when they can."""
    for i, r in enumerate(requests):
        if r.template is None or r.max_images:
            return f"request {i} is free text; the static loop runs template requests (images and video)"
        if (np.asarray(r.template) == TEXT).any():
            return f"request {i}'s template has free-text steps; the static loop runs images and video"
    return None


def choose_visual(model, hidden: torch.Tensor, want: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  guided: torch.Tensor, scale: torch.Tensor, seeds: torch.Tensor, step: torch.Tensor,
                  temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, visual_ids: torch.Tensor,
                  k_max: int, nucleus: bool) -> torch.Tensor:
    """The next token of n requests whose steps are visual or forced: the visual rows of the head, the
    released CFG mix for guided requests, seeded sampling; forced steps keep their id. (n,) ids.

    hidden (m, H) every cache row; cond, uncond (n,) each request's rows (uncond = cond when not guided)."""
    logits = model.logits(hidden, slice(model.config.vocab_size - visual_ids.shape[0], None))  # (m, C)
    logp = torch.log_softmax(logits, dim=-1)
    c, u = logp[cond], logp[uncond]  # (n, C)
    scores = torch.where(guided[:, None], cfg_mix(c, u, scale[:, None]), logits[cond])
    token = sample(scores, visual_ids, seeds, step, temperature, top_k, top_p, k_max, nucleus)
    return torch.where(want >= 0, want, token)


class StaticLoop:
    """Runs batches of template requests on an engine's model with static shapes (see the module's text).
    `compile=True` compiles the decode step and the choice (CUDA graphs on CUDA); compiled code is kept
    for the next batch of the same rows and cache length (lengths are rounded up to multiples of BUCKET, so
    prompts of other lengths reuse it; another number of rows compiles again)."""

    def __init__(self, engine: Engine, compile: bool = False):
        self.engine = engine
        model = engine.model
        self.step_fn = model.decode_step
        self.choose_fn = choose_visual
        self.compile = compile
        self.cache = None  # ((rows, length), KVCache) kept for CUDA graphs
        if compile:
            mode = "reduce-overhead" if engine.device.type == "cuda" else None
            self.step_fn = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)
            self.choose_fn = torch.compile(choose_visual, fullgraph=True, dynamic=False, mode=mode)

    @torch.no_grad()
    def generate(self, requests: list[Request], on_step: Callable[[int, int], None] | None = None,
                 limit: int | None = None) -> list[Result]:
        """Each request's tokens as plain decoding gives them. `limit`: stop after that many steps, with the
        shapes of the whole run (a warm-up that compiles and captures what the whole run replays, timings
        of the first tokens); the results are then cut there and not finished."""
        e, v = self.engine, self.engine.vocab
        why = eligible(requests)
        if why is not None:
            raise InputError(why)
        need = e.check(requests)
        n, dev = len(requests), e.device
        rows = sum(r.rows() for r in requests)
        if self.compile:  # cache lengths in buckets, so that prompts of other lengths reuse the compiled step
            need = -(-need // BUCKET) * BUCKET
        cache = None
        if self.compile and dev.type == "cuda":
            # CUDA graphs replay on fixed addresses: one cache per shape, kept and reused (stale columns past a
            # row's length are masked), marked static so that replays write into it
            key = (rows, need)
            if self.cache is None or self.cache[0] != key:
                self.cache = None  # free the old one first
                fresh = KVCache(e.model.config, rows, need, dev, e.dtype)
                torch._dynamo.mark_static_address(fresh.k)
                torch._dynamo.mark_static_address(fresh.v)
                self.cache = (key, fresh)
            cache = self.cache[1]
        core = Decoder(e, rows, need, cache=cache)
        core.add(requests)  # the eager prefill

        # what every step does, from the templates (host side, before the loop)
        steps = max(r.steps() for r in requests)
        want = np.full((n, steps), v.pad, dtype=np.int64)  # past a request's end: a forced pad, dropped
        for i, r in enumerate(requests):
            want[i, :r.steps()] = r.template
        forced = (want >= 0).all(0)  # (steps,) no row samples: skip the head
        want_dev = torch.as_tensor(want.T.copy(), device=dev)  # (steps, n)
        c = v.codebook_size
        k_max = max(r.visual.top_k if 0 < r.visual.top_k < c else 0 for r in requests)  # 0: no row filters
        nucleus = any(r.visual.top_p < 1 for r in requests)

        owner = torch.tensor([i for i, rows in enumerate(core.rows) for _ in rows], device=dev)  # row -> request
        cond = torch.tensor([rows[0] for rows in core.rows], device=dev)
        uncond = torch.tensor([rows[-1] for rows in core.rows], device=dev)
        guided = torch.tensor([len(rows) == 2 for rows in core.rows], device=dev)
        temperature, top_k, top_p = core.samp["visual"]
        seeds, scale = core.seeds, core.scale
        step_ids = torch.arange(steps, device=dev)[:, None].expand(steps, n)  # (steps, n): the sampler's counters
        m = len(owner)
        lengths = core.lengths[:m].clone()
        hidden = core.hidden[:m].clone()
        out = torch.empty((steps, n), dtype=torch.long, device=dev)
        run = steps if limit is None else max(1, min(limit, steps))
        for s in range(run):
            if forced[s]:
                token = want_dev[s]
            else:
                token = self.choose_fn(e.model, hidden, want_dev[s], cond, uncond, guided, scale, seeds, step_ids[s],
                                       temperature, top_k, top_p, e.visual_ids, k_max, nucleus)
            out[s] = token
            if s + 1 < run:
                hidden = self.step_fn(token[owner], lengths, core.cache).clone()  # (m, H); clone: graphs reuse
                lengths += 1
            if on_step is not None:
                on_step(s + 1, steps)
        e.passes = run
        tokens = out[:run].T.cpu().numpy()  # the one read-back
        results = []
        for i, r in enumerate(requests):
            row = tokens[i, :r.steps()]
            stops = list(r.stop) if r.stop is not None else [v.eos]
            hit = np.flatnonzero(np.isin(row, stops))
            results.append(Result(row[:hit[0] + 1], True) if len(hit) else Result(row, False))
        return results

