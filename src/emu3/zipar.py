"""Parallel rows: images decoded several rows at a time (ZipAR-style; not lossless).

A raster image is written row by row, but a code depends mostly on the codes near it, above and to its
left. ZipAR (He et al., 2024) starts row r once the row above is `window` codes ahead of it, so many rows
advance together, one code each per forward pass: about (w + 1) + (h - 1) * (window + 1) passes for h x w
codes instead of h * (w + 1). What is unusual:
- It is not the model's distribution: a code is drawn while the rest of the row above is not written yet
  (those columns are masked out), and each EOL is fed as soon as the next row starts, before the row it
  ends is complete (its keys and values are not computed again). The exact evaluator measures what it
  costs (docs/generation.md); plain decoding stays the default.
- The KV cache is written out of raster order: every image row writes at its own raster columns
  (`Emu3LM.tokens_at`), and a token attends to the filled columns before its own.
- Seeds as plain decoding: the code at template step j is drawn with the request's seed and step j, so
  with window >= w (a row starts when the one above is complete) the tokens are plain decoding's, sampled
  or greedy (its slow twin, tested).
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError
from .generate import Engine, Request, Result, cfg_mix, image_template, sample
from .model import KVCache


def image_grid(request: Request, vocab) -> tuple[int, int] | None:
    """(h, w) when the request writes one whole image (its template is `image_template(vocab, h, w)`)."""
    t = request.template
    if t is None:
        return None
    eol = np.flatnonzero(t == vocab.eol)
    if not len(eol):
        return None
    h, w = len(eol), int(eol[0])
    if w < 1 or not np.array_equal(t, image_template(vocab, h, w, eos=bool(t[-1] == vocab.eos))):
        return None
    return h, w


@torch.no_grad()
def generate(engine: Engine, requests: list[Request], window: int) -> list[Result]:
    """Each request's image, rows `window` codes apart; one grid for the whole call."""
    v, model, dev = engine.vocab, engine.model, engine.device
    grids = {image_grid(r, v) for r in requests}
    if None in grids:
        raise InputError("parallel rows decode whole images only: every request needs an image template "
                         "(not free text, video or an image's continuation)")
    if len(grids) != 1:
        raise InputError(f"parallel rows take one image grid per call, got {sorted(grids)}")
    if not 1 <= window <= 63:
        raise InputError(f"window is from 1 to 63 codes, got {window}")
    (h, w), n = grids.pop(), len(requests)
    # cache rows: each request's conditional row, then the unconditional rows of the guided ones
    guided = [i for i, r in enumerate(requests) if r.rows() == 2]
    prompts = [r.prompt for r in requests] + [requests[i].negative for i in guided]
    uncond = list(range(n))
    for j, i in enumerate(guided):
        uncond[i] = n + j
    rows = len(prompts)
    base = torch.tensor([len(p) for p in prompts], device=dev)  # column of code (0, 0) in each cache row
    max_len = int(base.max()) + h * (w + 1)
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.config, rows, max_len, device=dev, dtype=dtype)
    filled = torch.zeros(rows, max_len, dtype=torch.bool, device=dev)
    last = []
    for i, p in enumerate(prompts):  # prefill, one row at a time (no padding: column = position)
        hs = model.hidden_states(torch.as_tensor(p, device=dev)[None], cache=cache.rows(i, i + 1))
        last.append(hs[0, -1])
        filled[i, :len(p)] = True

    cond_idx, uncond_idx = torch.arange(n, device=dev), torch.tensor(uncond, device=dev)
    is_guided = torch.tensor([r.rows() == 2 for r in requests], device=dev)
    scale = torch.tensor([r.cfg_scale for r in requests], device=dev, dtype=torch.float32)
    seeds = torch.tensor([r.seed for r in requests], device=dev)
    temperature = torch.tensor([r.visual.temperature for r in requests], device=dev, dtype=torch.float32)
    top_k = torch.tensor([r.visual.top_k for r in requests], device=dev)
    top_p = torch.tensor([r.visual.top_p for r in requests], device=dev, dtype=torch.float32)
    codes = torch.zeros(n, h, w, dtype=torch.long, device=dev)

    def choose(hidden: torch.Tensor, targets: list[tuple[int, int]]) -> None:
        """Draw codes (r, c) for every request from the hidden states (rows, m, H) that predict them."""
        m = len(targets)
        logits = model.logits(hidden, slice(v.visual_offset, v.size))  # (rows, m, C)
        logp = torch.log_softmax(logits, dim=-1)
        scores = torch.where(is_guided[:, None, None], cfg_mix(logp[cond_idx], logp[uncond_idx], scale[:, None, None]),
                             logits[cond_idx])  # (n, m, C)
        steps = torch.tensor([r * (w + 1) + c for r, c in targets], device=dev)  # the template steps
        token = sample(scores.reshape(n * m, -1), engine.visual_ids, seeds.repeat_interleave(m), steps.repeat(n),
                       temperature.repeat_interleave(m), top_k.repeat_interleave(m), top_p.repeat_interleave(m))
        token = token.view(n, m)
        for k, (r, c) in enumerate(targets):
            codes[:, r, c] = token[:, k]

    choose(torch.stack(last)[:, None], [(0, 0)])
    # row r feeds, in order: EOL of row r - 1 (r > 0), then its codes; feeding the item before code c draws c
    fed = [0] * h
    items = [w - (r == h - 1) + (r > 0) for r in range(h)]  # the last code of the last row feeds nothing
    count = 1

    columns = torch.arange(max_len, device=dev)

    def codes_fed(r: int) -> int:
        return max(0, fed[r] - (r > 0))

    while any(f < k for f, k in zip(fed, items)):
        before = [codes_fed(r) for r in range(h)]
        feed, targets, hot = [], [], []  # (rel column, token (n,)); codes drawn; their index in feed
        for r in range(h):
            if fed[r] == items[r]:
                continue
            j = fed[r]
            if r > 0 and j == 0:  # EOL of the row above, which draws code (r, 0)
                col, token, nxt = r * (w + 1) - 1, torch.full((n,), v.eol, device=dev), 0
            else:
                c = j - (r > 0)
                col, token, nxt = r * (w + 1) + c, codes[:, r, c], (c + 1 if c + 1 < w else None)
            if r > 0 and nxt is not None and before[r - 1] < min(w, nxt + window):
                continue  # the row above is not `window` codes ahead yet
            if nxt is not None:
                hot.append(len(feed))
                targets.append((r, nxt))
            feed.append((col, token))
            fed[r] += 1
        rel = torch.tensor([c for c, _ in feed], device=dev)  # (k,)
        cols = base[:, None] + rel[None, :]  # (rows, k)
        ids = torch.stack([t for _, t in feed], 1)  # (n, k)
        ids = torch.cat([ids, ids[guided]]) if guided else ids  # (rows, k): the unconditional rows too
        now = filled.clone()
        now.scatter_(1, cols, True)
        mask = now[:, None, :] & (columns[None, None, :] <= cols[:, :, None])  # (rows, k, S)
        hidden = model.tokens_at(ids, cols, mask, cache)  # (rows, k, H)
        filled = now
        count += 1
        if targets:
            choose(hidden[:, hot], targets)
    engine.passes = count
    out = []
    for i, r in enumerate(requests):
        body = torch.cat([codes[i], torch.full((h, 1), v.eol, device=dev)], 1).reshape(-1).cpu().numpy()
        tail = r.template[h * (w + 1):]
        out.append(Result(np.concatenate([body, tail]).astype(np.int64), bool(len(tail) and tail[-1] == v.eos)))
    return out
