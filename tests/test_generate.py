"""The generation engine: parity with the official recipe, CFG, constraints, sampling, fast paths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emu3.errors import InputError
from emu3.format import Image, Video
from emu3.generate import (
    GREEDY,
    VISUAL,
    Engine,
    Request,
    Sampling,
    gumbel_noise,
    image_template,
    sample,
    video_template,
)
from emu3.model import Emu3LM
from emu3.reference import llama, official_prefix_fn
from tests.conftest import image_request


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_greedy_tokens_equal_the_official_recipe(lm, fmt, cfg_scale):
    """transformers' generate with the official logits processors (unbatched CFG: a second forward per
    token with its own cache; prefix constraint) vs our engine, greedy, batch of 2 with left padding."""
    from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    v, (h, w) = fmt.vocab, (3, 4)
    prompts = ["a red circle above a square", "two blue"]
    ours = Engine(lm).generate([image_request(fmt, p, (h, w), cfg_scale=cfg_scale, visual=GREEDY) for p in prompts])

    ref = llama(lm)
    rows = [fmt.generation_prompt(p, (h, w)) for p in prompts]
    length = max(map(len, rows))
    ids = torch.tensor([[v.pad] * (length - len(r)) + r.tolist() for r in rows])
    mask = (torch.arange(length)[None] >= torch.tensor([length - len(r) for r in rows])[:, None]).long()
    negative = torch.tensor(np.stack([fmt.negative_prompt((h, w))] * 2))  # same negative text for both rows
    processors = LogitsProcessorList([PrefixConstrainedLogitsProcessor(official_prefix_fn(v, h, w), num_beams=1)])
    if cfg_scale != 1:
        processors.insert(0, UnbatchedClassifierFreeGuidanceLogitsProcessor(cfg_scale, ref, negative))
    out = ref.generate(ids, attention_mask=mask, logits_processor=processors, do_sample=False,
                       max_new_tokens=h * (w + 1) + 3, eos_token_id=v.eos, pad_token_id=v.pad)
    for mine, theirs in zip(ours, out[:, length:].tolist()):
        assert mine.finished
        theirs = theirs[:theirs.index(v.eos) + 1] if v.eos in theirs else theirs  # the rest is padding
        assert theirs[-1] == v.eos, "the official run stopped before the image's end"
        assert mine.tokens.tolist() == theirs  # whole sequences: the same tokens and the same length


def test_guided_distribution_equals_the_two_pass_method(lm, fmt):
    """The scores the sampler sees equal the official processor's output (two sequential passes) after
    restriction to the allowed tokens, for a prompt mid-image and with left padding in the batch."""
    from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

    v, grid = fmt.vocab, (3, 4)
    ref = llama(lm)
    codes = np.array([[3, 1, 4, 1], [5, 9, 2, 6], [5, 3, 5, 8]])
    prefix = fmt.image(codes)[0][len(fmt.image_header(*grid)):][:7]  # mid second row
    cond = np.concatenate([fmt.generation_prompt("a long prompt with many words", grid), prefix])
    neg = np.concatenate([fmt.negative_prompt(grid), prefix])
    template = image_template(v, *grid, known=6)  # row 1 has 1 of 4 tokens: next is visual
    for scale in (1.0, 3.0, 7.5):
        req = Request(cond, template, negative=neg, cfg_scale=scale)
        other = Request(fmt.generation_prompt("x", grid), image_template(v, *grid), negative=fmt.negative_prompt(grid),
                        cfg_scale=2.0)
        for engine in (Engine(lm), Engine(lm, fast=False)):
            scores, token_ids = engine.next_token_scores([other, req])
            ours = torch.log_softmax(scores[1][torch.isin(token_ids, torch.arange(v.visual_offset, v.size))], -1)
            with torch.no_grad():
                logits = ref(torch.tensor(cond)[None]).logits[:, -1]
                proc = UnbatchedClassifierFreeGuidanceLogitsProcessor(scale, ref, torch.tensor(neg)[None])
                theirs = torch.log_softmax(proc(torch.tensor(cond)[None], logits)[0, v.visual_offset:], -1)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_fast_paths_equal_their_twins_in_a_mixed_batch(lm, fmt):
    v = fmt.vocab
    requests = [
        image_request(fmt, "a red circle", (3, 4), cfg_scale=3.0, seed=1, visual=Sampling(1.0, 8, 0.9)),
        image_request(fmt, "a blue square on the left", (2, 6), cfg_scale=1.0, seed=2),
        Request(fmt.chat_prompt(np.zeros((2, 2), int), "what?"), max_new_tokens=9, seed=3,
                text=Sampling(0.8, 20, 0.95)),
        Request(fmt.video_prompt("rolling", (2, 2, 3)), video_template(v, fmt.image_header(2, 3), 2, 2, 3),
                negative=fmt.video_prompt("", (2, 2, 3)), cfg_scale=2.0, seed=4),
    ]
    fast = Engine(lm).generate(requests)
    slow = Engine(lm, fast=False).generate(requests)
    for a, b in zip(fast, slow):
        assert np.array_equal(a.tokens, b.tokens)
    parsed = [fmt.parse(np.concatenate([r.prompt, res.tokens])) for r, res in zip(requests, fast)]
    assert isinstance(parsed[0][-1], Image) and parsed[0][-1].codes.shape == (3, 4)
    assert isinstance(parsed[1][-1], Image) and parsed[1][-1].codes.shape == (2, 6)
    assert isinstance(parsed[3][-1], Video) and parsed[3][-1].codes.shape == (2, 2, 3) and parsed[3][-1].complete
    assert all(t < v.text_size or t == v.eos for t in fast[2].tokens)  # chat emits text only


def test_seeded_rows_do_not_depend_on_the_batch(lm, fmt):
    a = image_request(fmt, "a red circle", (3, 4), cfg_scale=3.0, seed=11)
    b = image_request(fmt, "many other words in a much longer prompt", (2, 5), cfg_scale=2.0, seed=12)
    alone = Engine(lm).generate([a])[0]
    together = Engine(lm).generate([b, a, b])[1]
    assert np.array_equal(alone.tokens, together.tokens)
    other_seed = Engine(lm).generate([Request(**{**a.__dict__, "seed": 13})])[0]
    assert not np.array_equal(alone.tokens, other_seed.tokens)


def test_sampler_matches_softmax_statistics():
    scores = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]), 0)
    rows = 40000
    ids = torch.arange(6)
    no_top_k = torch.zeros(rows, dtype=torch.long)
    picks = sample(scores.expand(rows, 6), ids, torch.arange(rows), 0, torch.ones(rows), no_top_k, torch.ones(rows))
    freq = torch.bincount(picks, minlength=6).float() / rows
    assert (freq - scores.exp()).abs().max() < 0.01
    hot = sample(scores.expand(rows, 6), ids, torch.arange(rows), 0, torch.full((rows,), 2.0),
                 torch.zeros(rows, dtype=torch.long), torch.ones(rows))
    freq = torch.bincount(hot, minlength=6).float() / rows
    assert (freq - torch.softmax(scores / 2, 0)).abs().max() < 0.01


def test_sampler_top_k_top_p_and_greedy():
    scores = torch.log_softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]), 0)
    rows, ids = 5000, torch.arange(6)
    ones, zeros = torch.ones(rows), torch.zeros(rows, dtype=torch.long)
    topk = sample(scores.expand(rows, 6), ids, torch.arange(rows), 0, ones, torch.full((rows,), 2), ones)
    assert set(topk.tolist()) == {0, 1}
    p = scores.exp()  # top_p 0.8 keeps the smallest prefix whose mass reaches 0.8
    keep = int((torch.cumsum(p, 0) - p < 0.8).sum())
    topp = sample(scores.expand(rows, 6), ids, torch.arange(rows), 0, ones, zeros, torch.full((rows,), 0.8))
    assert set(topp.tolist()) == set(range(keep))
    greedy = sample(scores.expand(4, 6), ids, torch.arange(4), 0, torch.zeros(4), zeros[:4], torch.ones(4))
    assert greedy.tolist() == [0] * 4
    noise = gumbel_noise(torch.tensor([5, 5]), 3, ids)
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], gumbel_noise(torch.tensor([5]), 4, ids)[0])


def test_templates(fmt):
    v = fmt.vocab
    t = image_template(v, 2, 3)
    assert t.tolist() == [VISUAL] * 3 + [v.eol] + [VISUAL] * 3 + [v.eol] + [v.eof, v.eoi, v.eos]
    assert len(image_template(v, 90, 90)) == 8193  # h * (w + 1) + 3, as released
    assert image_template(v, 2, 3, known=4).tolist() == [VISUAL] * 2 + [v.eol, v.eof, v.eoi, v.eos]
    vt = video_template(v, fmt.image_header(2, 3), 2, 2, 3)
    assert vt[-2:].tolist() == [v.eov, v.eos] and (vt == VISUAL).sum() == 12


def test_errors_before_any_compute(lm, fmt):
    engine = Engine(lm)
    limit = lm.config.max_position_embeddings
    with pytest.raises(InputError, match=f"more than the model's context of {limit} tokens"):
        engine.generate([Request(fmt.generation_prompt("x", (64, 64)), image_template(fmt.vocab, 64, 64))])
    with pytest.raises(InputError, match="needs a negative"):
        engine.generate([Request(np.array([1, 2]), max_new_tokens=3, cfg_scale=3.0)])
    with pytest.raises(InputError, match="outside"):
        engine.generate([Request(np.array([lm.config.vocab_size]), max_new_tokens=3)])
    for bad, message in [(dict(temperature=math.nan), "temperature"), (dict(top_k=-1), "top_k"),
                         (dict(top_p=0.0), "top_p"), (dict(top_k=2.5), "top_k")]:
        with pytest.raises(InputError, match=message):
            Sampling(**bad)
    with pytest.raises(InputError, match="cfg_scale"):
        engine.generate([Request(np.array([1]), max_new_tokens=2, negative=np.array([1]), cfg_scale=-1.0)])


def test_free_text_stops_at_eos_or_budget(lm, fmt):
    req = Request(np.array([fmt.vocab.bos]), max_new_tokens=5, text=GREEDY)
    (res,) = Engine(lm).generate([req])
    assert len(res.tokens) <= 5 and (res.finished == (res.tokens[-1] == fmt.vocab.eos))
    assert all(t < fmt.vocab.text_size for t in res.tokens[:-1])


def test_allowed_ids_and_stop_ids_per_request(lm, fmt):
    """A VLA policy decodes only action ids and ends its chunk at BOI or EOS; other rows of the batch
    keep the usual free text. Fast and slow engines agree."""
    from emu3.action import ActionIds

    v = fmt.vocab
    acts = ActionIds(v.text_size, 64)
    allowed = np.concatenate([np.asarray(acts.lm_range), [v.boi, v.eos]])
    prompt = fmt.vla_prompt("go", [], [np.zeros((2, 2), int)], acts) if max(fmt.text("go")) < acts.start \
        else np.array([v.bos])
    requests = [Request(prompt, max_new_tokens=12, allowed=allowed, stop=(v.boi, v.eos), seed=s,
                        text=Sampling(1.0, 0, 1.0)) for s in range(6)]
    requests.append(Request(np.array([v.bos]), max_new_tokens=6, seed=9, text=Sampling(1.0, 0, 1.0)))
    requests.append(Request(prompt, max_new_tokens=6, allowed=np.array([v.boi]), stop=(v.boi, v.eos)))
    fast = Engine(lm).generate(requests)
    slow = Engine(lm, fast=False).generate(requests)
    for a, b in zip(fast, slow):
        assert np.array_equal(a.tokens, b.tokens)
    for res in fast[:6]:
        assert np.isin(res.tokens, allowed).all()
        stops = np.flatnonzero(np.isin(res.tokens, [v.boi, v.eos]))
        assert res.finished == bool(len(stops)) and (not len(stops) or stops[0] == len(res.tokens) - 1)
    assert any(len(res.tokens) > 1 for res in fast[:6])
    assert all(t < v.text_size or t == v.eos for t in fast[6].tokens)  # the usual free text
    assert fast[7].tokens.tolist() == [v.boi] and fast[7].finished  # a stop id ends the row at once
    with pytest.raises(InputError, match="allowed must be a non-empty list of ids"):
        Engine(lm).generate([Request(prompt, allowed=np.array([], int))])


def interleaved_request(fmt, seed: int, max_images: int = 2, max_new_tokens: int = 60, **kw) -> Request:
    """A free-text request that may open images of 2x3 codes: its text steps may emit EOS, BOI or "a", each about
    as likely (temperature 1000: the tiny random model's head is peaky)."""
    v, grid = fmt.vocab, (2, 3)
    kw = {"text": Sampling(1000.0), "visual": Sampling(1.0), **kw}
    return Request(np.concatenate([[v.bos], fmt.text("a story")]), max_new_tokens=max_new_tokens,
                   allowed=np.array([v.eos, *fmt.text("a")]), seed=seed, max_images=max_images,
                   image_header=fmt.image_header(*grid)[1:], image_grid=grid, **kw)


def test_free_text_opens_images_the_model_chooses(lm, fmt):
    """A free-text row that emits BOI follows the image's header and grid to its end, then writes text again:
    every output parses, with complete images of the request's grid, at most max_images of them, and never
    a BOI without room for a whole image."""
    v = fmt.vocab
    per_image = 1 + len(fmt.image_header(2, 3)) - 1 + 2 * 4 + 2
    opened = []
    for seed in range(24):
        for max_new in (60, per_image + 1, per_image):  # room for two images; for one and its end; for none
            (res,) = Engine(lm).generate([interleaved_request(fmt, seed, max_new_tokens=max_new)])
            toks = res.tokens
            segments = fmt.parse(np.concatenate([[v.bos], fmt.text("a story"), toks]))
            images = [s for s in segments if isinstance(s, Image)]
            assert all(im.complete and im.codes.shape == (2, 3) for im in images)
            assert len(images) <= min(2, (max_new - 1) // per_image) and int((toks == v.boi).sum()) == len(images)
            opened.append(len(images))
    assert max(opened) == 2 and 0 in opened  # the model chose: both happen


def test_interleaved_tokens_are_the_same_in_the_batcher_and_beside_others(lm, fmt):
    """One core: a batch of interleaved, guided and plain requests gives each the tokens it gets alone,
    in Engine.generate and in the continuous batcher."""
    from emu3.batching import Batcher

    requests = [interleaved_request(fmt, s) for s in range(4)]
    requests.append(interleaved_request(fmt, 7, negative=np.array([fmt.vocab.bos]), cfg_scale=3.0))
    requests.append(image_request(fmt, "a red circle", (2, 3), visual=Sampling(1.0), seed=3))
    alone = [Engine(lm).generate([r])[0].tokens.tolist() for r in requests]
    assert [r.tokens.tolist() for r in Engine(lm).generate(requests)] == alone
    b = Batcher(Engine(lm), max_rows=4)
    tickets = [b.submit(r) for r in requests]
    b.run_until_idle()
    assert [t.result().tokens.tolist() for t in tickets] == alone


def test_guidance_mixes_visual_steps_only(lm, fmt):
    """In an interleaved answer the text is sampled as text: at a free-text step a guided request's scores
    are its conditional ones; at a visual step they are mixed."""
    v = fmt.vocab
    text_step = interleaved_request(fmt, 0, negative=np.array([v.bos]), cfg_scale=3.0)
    plain = interleaved_request(fmt, 0)
    (guided, _), (unguided, _) = Engine(lm).next_token_scores([text_step]), Engine(lm).next_token_scores([plain])
    torch.testing.assert_close(guided, unguided)
    grid = (2, 3)
    visual = image_request(fmt, "a red circle", grid, cfg_scale=3.0)
    mixed, _ = Engine(lm).next_token_scores([visual])
    alone, _ = Engine(lm).next_token_scores([image_request(fmt, "a red circle", grid)])
    assert not torch.allclose(mixed, alone)


def test_jacobi_greedy_equals_plain_in_fewer_passes(lm, fmt):
    """Speculative Jacobi decoding, greedy: every request (guided or not, an image, free text, an
    interleaved answer) gets plain decoding's tokens, whatever the window, in fewer forward passes."""
    requests = [image_request(fmt, "a red circle", (3, 4), visual=GREEDY),
                image_request(fmt, "two blue squares", (2, 5), cfg_scale=3.0, visual=GREEDY),
                Request(np.concatenate([[fmt.vocab.bos], fmt.text("a story")]), max_new_tokens=9),
                interleaved_request(fmt, 0, text=GREEDY, visual=GREEDY)]
    engine = Engine(lm)
    plain = [r.tokens.tolist() for r in engine.generate(requests)]
    for window in (1, 4, 16):
        jacobi = engine.generate(requests, decoding="jacobi", window=window)
        assert [r.tokens.tolist() for r in jacobi] == plain
        assert [r.finished for r in jacobi] == [r.finished for r in Engine(lm).generate(requests)]
    engine.generate(requests[:2])  # images: free text is not drafted, so its steps take a pass each
    plain_passes = engine.passes
    engine.generate(requests[:2], decoding="jacobi", window=16)
    assert engine.passes < plain_passes
    with pytest.raises(InputError, match="decoding must be"):
        engine.generate(requests, decoding="fast")


def test_jacobi_samples_plain_decoding_s_distribution(lm, fmt, monkeypatch):
    """Sampling with speculative Jacobi decoding draws from plain sampling's distribution: over 2,000 seeds
    (CFG 2, top-k 4, a flatter head than the fixture's), each position's token counts agree with plain
    decoding's (chi-square, p > 1e-3 at every position); the same test rejects a wrong acceptance rule
    (keep a draft with probability p, ignoring its proposal q) at p < 1e-6."""
    from scipy.stats import chi2_contingency

    import emu3.generate as generate

    flat = Emu3LM(lm.config).eval()
    flat.load_state_dict(lm.state_dict())
    with torch.no_grad():
        flat.lm_head.weight.div_(5)  # the fixture's head is 40x: here 8x, so that sampling varies
    grid = (2, 3)
    requests = [image_request(fmt, "a red circle", grid, cfg_scale=2.0, visual=Sampling(1.0, 4), seed=s)
                for s in range(2000)]
    engine = Engine(flat)

    def p_values(a, b):
        out = []
        for pos in range(a.shape[1]):
            kinds = np.unique(np.concatenate([a[:, pos], b[:, pos]]))
            if len(kinds) > 1:
                table = np.array([[np.sum(x[:, pos] == k) for k in kinds] for x in (a, b)])
                out.append(chi2_contingency(table)[1])
        return out

    plain = np.array([r.tokens for r in engine.generate(requests)])
    jacobi = np.array([r.tokens for r in engine.generate(requests, decoding="jacobi", window=6)])
    assert min(p_values(plain, jacobi)) > 1e-3
    monkeypatch.setattr(generate, "accept_draft", lambda u, p, q: u <= p)
    wrong = np.array([r.tokens for r in engine.generate(requests, decoding="jacobi", window=6)])
    assert min(p_values(plain, wrong)) < 1e-6


def test_jacobi_rows_in_a_batch_equal_rows_alone(lm, fmt):
    """Rows accept different numbers of drafts per pass; each sampled request still gets the tokens it gets
    alone (its drafts, coins and draws depend on its own seed and passes only)."""
    requests = [image_request(fmt, p, (3, 4), cfg_scale=c, visual=Sampling(1.0, 8), seed=s)
                for s, (p, c) in enumerate([("a red circle", 1.0), ("two blue", 3.0), ("a green square", 2.0)])]
    requests.append(interleaved_request(fmt, 5))
    alone = [Engine(lm).generate([r], decoding="jacobi", window=5)[0].tokens.tolist() for r in requests]
    together = Engine(lm).generate(requests, decoding="jacobi", window=5)
    assert [r.tokens.tolist() for r in together] == alone


# ---- parallel rows (emu3.zipar; not lossless) ----


def test_parallel_rows_with_a_full_window_are_plain_decoding(lm, fmt):
    """Rows that start only when the row above is complete (window >= w) give plain decoding's tokens,
    sampled and guided (the same seed and template step for every code: its slow twin); smaller windows
    write whole images (EOLs, EOF, EOI, EOS in place) in fewer passes, and a request that is not a whole
    image is refused."""
    grid = (4, 5)
    requests = [image_request(fmt, "a red circle", grid, cfg_scale=3.0, visual=Sampling(1.0, 8), seed=3),
                image_request(fmt, "two blue squares", grid, visual=Sampling(1.0, 8), seed=4),
                image_request(fmt, "a green square", grid, cfg_scale=2.0, visual=GREEDY)]
    engine = Engine(lm)
    plain = [r.tokens.tolist() for r in engine.generate(requests)]
    plain_passes = engine.passes
    for window in (5, 9):
        rows = engine.generate(requests, decoding="rows", window=window)
        assert [r.tokens.tolist() for r in rows] == plain and all(r.finished for r in rows)
    v, template = fmt.vocab, requests[0].template
    passes = {}
    for window in (1, 2, 3):
        rows = engine.generate(requests, decoding="rows", window=window)
        passes[window] = engine.passes
        for r in rows:
            t = r.tokens
            assert len(t) == len(template) and np.array_equal(t[template >= 0], template[template >= 0])
            assert np.all((t[template < 0] >= v.visual_offset) & (t[template < 0] < v.size))
    assert passes[1] < passes[2] < passes[3] < plain_passes
    # the prefill, then row r starts r * (window + 1) passes in and the last row feeds its EOL and w - 1 codes
    assert all(passes[k] == (grid[0] - 1) * (k + 1) + grid[1] for k in passes)
    with pytest.raises(InputError, match="whole images"):
        engine.generate([Request(np.array([v.bos]), max_new_tokens=3)], decoding="rows", window=2)
    with pytest.raises(InputError, match="one image grid per call"):
        engine.generate([requests[0], image_request(fmt, "x", (2, 5))], decoding="rows", window=2)


def test_tokens_at_equals_its_eager_twin(lm, fmt):
    """tokens_at (tokens at any columns under an explicit mask) gives the hidden states of hidden_states with
    per-row columns when the columns are contiguous."""
    from emu3.model import KVCache

    torch.manual_seed(2)
    ids = torch.randint(0, fmt.vocab.size, (2, 10))
    caches = [KVCache(lm.config, 2, 16) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            lm.hidden_states(ids[:, :6], cache=c)
        start = torch.tensor([6, 6])
        key_mask = torch.zeros(2, 10, dtype=torch.bool)
        key_mask[:, :6] = True
        want = lm.hidden_states(ids[:, 6:], positions=torch.arange(6, 10).expand(2, 4), key_mask=key_mask,
                                cache=caches[0], start=start)
        cols = torch.arange(6, 10).expand(2, 4)
        mask = torch.arange(16)[None, None, :] <= cols[:, :, None]  # (2, 4, 16): filled and causal
        got = lm.tokens_at(ids[:, 6:], cols, mask, caches[1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].k[:, :, :, :10], caches[0].k[:, :, :, :10])


# ---- the decode loop shaped for a GPU (emu3.graphs) ----


def test_decode_step_equals_its_eager_twin(lm, fmt):
    """decode_step (every cache column under a mask, no host checks) gives the hidden states of hidden_states
    with per-row columns over the filled columns only, for rows of different lengths."""
    from emu3.model import KVCache

    torch.manual_seed(1)
    lengths = torch.tensor([5, 9, 2])
    ids = torch.randint(0, fmt.vocab.size, (3, 9))
    caches = [KVCache(lm.config, 3, 24) for _ in range(2)]
    cols = torch.arange(9)
    with torch.no_grad():
        for cache in caches:
            lm.hidden_states(ids, positions=cols.expand(3, 9), key_mask=cols[None] < lengths[:, None], cache=cache)
        token = torch.tensor([7, 11, 13])
        fast = lm.decode_step(token, lengths, caches[0])
        width = int(lengths.max()) + 1
        slow = lm.hidden_states(token[:, None], positions=lengths[:, None],
                                key_mask=torch.arange(width)[None] < lengths[:, None], cache=caches[1],
                                start=lengths)[:, 0]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].k, caches[1].k)


def static_requests(fmt, sampling):
    grids = [(3, 4), (2, 5), (3, 4)]
    prompts = ["a red circle", "two blue", "a green square above"]
    out = [image_request(fmt, p, g, cfg_scale=c, visual=sampling, seed=s)
           for s, (p, g, c) in enumerate(zip(prompts, grids, [3.0, 1.0, 2.0]))]
    out.append(Request(fmt.video_prompt("a square moves", (2, 2, 3)),
                       video_template(fmt.vocab, fmt.video_header(2, 2, 3), 2, 2, 3), negative=fmt.negative_prompt(
                           (2, 3)), cfg_scale=3.0, visual=sampling, seed=9))
    return out


@pytest.mark.parametrize("sampling", [GREEDY, Sampling(1.0, 8), Sampling(0.9, 0, 0.8)])
def test_static_loop_gives_the_tokens_of_the_general_core(lm, fmt, sampling):
    """Images of several grids and a video, guided or not, greedy and sampled: the static loop (one shape, no
    read-back until the end) gives each request exactly the tokens plain decoding gives it."""
    requests = static_requests(fmt, sampling)
    plain = Engine(lm).generate(requests, static=False)
    engine = Engine(lm)
    static = engine.generate(requests, static=True)
    assert [r.tokens.tolist() for r in static] == [r.tokens.tolist() for r in plain]
    assert [r.finished for r in static] == [r.finished for r in plain] == [True] * 4
    assert engine.passes == max(r.steps() for r in requests)


def test_static_loop_refuses_free_text(lm, fmt):
    chat = Request(fmt.chat_prompt(np.zeros((2, 2), np.int64), "what is it?"), max_new_tokens=4)
    with pytest.raises(InputError, match="free text"):
        Engine(lm).generate([chat], static=True)
    assert len(Engine(lm).generate([chat])[0].tokens)  # the default on a CPU: the general core


def test_top_k_filters_each_row_whatever_the_other_rows_ask():
    """Rows that keep their top k beside rows that do not filter (a Jacobi window mixes visual steps, top-k
    16, with forced ones, top-k off): each row keeps its own k, computed or given by the caller."""
    from emu3.generate import filtered

    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    temperature = torch.tensor([1.0, 1.0, 0.0, 1.0])
    top_k = torch.tensor([4, 7, 0, 50])  # 0 and 50 (the whole vocabulary): no filtering
    top_p = torch.ones(4)
    for kw in ({}, {"k_max": 7, "nucleus": False}):
        kept = (filtered(scores, temperature, top_k, top_p, **kw) > -math.inf).sum(1).tolist()
        assert kept == [4, 7, 50, 50], kw
    assert (filtered(scores, temperature, torch.zeros(4, dtype=torch.long), top_p) > -math.inf).all()
