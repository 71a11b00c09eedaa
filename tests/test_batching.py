"""Continuous batching: a request's tokens equal Engine.generate's for it alone, whatever joins or leaves."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from emu3.batching import Batcher, Closed, QueueFull
from emu3.errors import InputError
from emu3.generate import Engine, Request, Sampling, video_template
from emu3.model import KVCache
from tests.conftest import image_request


def mixed_requests(fmt):
    v = fmt.vocab
    return [
        image_request(fmt, "a red circle", (3, 4), cfg_scale=3.0, seed=1, visual=Sampling(1.0, 8, 0.9)),
        image_request(fmt, "a blue square on the left of a much longer prompt", (2, 6), seed=2),
        Request(fmt.chat_prompt(np.zeros((2, 2), int), "what?"), max_new_tokens=9, seed=3,
                text=Sampling(0.8, 20, 0.95)),
        Request(fmt.video_prompt("rolling", (2, 2, 3)), video_template(v, fmt.image_header(2, 3), 2, 2, 3),
                negative=fmt.video_prompt("", (2, 2, 3)), cfg_scale=2.0, seed=4),
        Request(np.array([v.bos]), max_new_tokens=7, seed=5, text=Sampling(1.0, 0, 1.0),
                allowed=np.arange(10, 40), stop=(12, 13)),
        image_request(fmt, "two green triangles", (2, 3), cfg_scale=1.5, seed=6),
    ]


def test_per_row_cache_columns_equal_a_shared_column(lm):
    """One decode step with per-row columns (rows at different lengths) equals each row run alone."""
    cfg = lm.config
    torch.manual_seed(0)
    prompts = [torch.randint(0, 200, (n,)) for n in (5, 2, 7)]
    nxt = torch.tensor([3, 4, 5])
    cache = KVCache(cfg, 3, 16)
    lens = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(3, 7, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    cols = torch.arange(7)
    with torch.no_grad():
        lm.hidden_states(ids, positions=cols.expand(3, 7), key_mask=cols[None] < lens[:, None], cache=cache)
        width = int(lens.max()) + 1
        out = lm.hidden_states(nxt[:, None], positions=lens[:, None], cache=cache, start=lens.clone(),
                               key_mask=torch.arange(width)[None] < lens[:, None])[:, -1]
        for i, p in enumerate(prompts):
            alone = lm.hidden_states(torch.cat([p, nxt[i:i + 1]])[None])[0, -1]
            torch.testing.assert_close(out[i], alone, rtol=1e-4, atol=1e-4)
        # several new tokens per row at once (speculative decoding's verification pass), each seeing its row's
        # filled columns and the new ones before it, equal the rows run alone
        cache = KVCache(cfg, 3, 16)
        lm.hidden_states(ids, positions=cols.expand(3, 7), key_mask=cols[None] < lens[:, None], cache=cache)
        new = torch.tensor([[3, 9, 4], [4, 1, 1], [5, 2, 6]])
        width = int(lens.max()) + 3
        out = lm.hidden_states(new, positions=lens[:, None] + torch.arange(3), cache=cache, start=lens.clone(),
                               key_mask=torch.arange(width)[None] < lens[:, None])
        for i, p in enumerate(prompts):
            alone = lm.hidden_states(torch.cat([p, new[i]])[None])[0, -3:]
            torch.testing.assert_close(out[i], alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="per-row cache columns"):
        lm.hidden_states(nxt[:, None], cache=cache, start=lens)
    with pytest.raises(InputError, match="key_mask covers 7 columns"):
        lm.hidden_states(new, positions=lens[:, None] + torch.arange(3), cache=cache, start=lens,
                         key_mask=torch.ones(3, 7, dtype=torch.bool))


def test_jacobi_in_the_batcher_equals_jacobi_alone(lm, fmt):
    """Continuous batching with speculative Jacobi decoding: requests arriving between passes (their first
    token from their own prefill) get the tokens Engine.generate's jacobi decoding gives each alone; each
    generated token is delivered through on_token, several per step."""
    requests = mixed_requests(fmt)
    alone = [Engine(lm).generate([r], decoding="jacobi", window=6)[0].tokens.tolist() for r in requests]
    seen = {}
    b = Batcher(Engine(lm), max_rows=5, max_queue=8, decoding="jacobi", window=6)
    on_token = lambda t, tok: seen.setdefault(id(t), []).append(tok)  # noqa: E731
    tickets = [b.submit(r, on_token) for r in requests[:3]]
    b.step()
    tickets += [b.submit(r, on_token) for r in requests[3:]]
    steps = 1
    while b.step():
        steps += 1
    assert [t.result().tokens.tolist() for t in tickets] == alone
    assert [seen[id(t)] for t in tickets] == alone
    assert steps < max(map(len, alone))  # fewer passes than the longest request has tokens


def test_tokens_equal_the_engine_with_staggered_arrivals_and_departures(lm, fmt):
    requests = mixed_requests(fmt)
    alone = [Engine(lm).generate([r])[0] for r in requests]
    b = Batcher(Engine(lm), max_rows=5, max_queue=8)  # too few rows for all: some wait for others to leave
    tickets = [b.submit(r) for r in requests[:3]]
    b.step()
    b.step()
    tickets += [b.submit(r) for r in requests[3:]]
    peak = 0
    while b.step():
        peak = max(peak, b.rows_used)
        assert b.rows_used <= 5
    assert peak == 5
    for t, ref in zip(tickets, alone):
        assert t.wait(0) and t.ended_ok
        assert np.array_equal(t.result().tokens, ref.tokens) and t.result().finished == ref.finished
    assert b.idle and b.rows_used == 0


def test_fast_and_slow_engines_agree_under_continuous_batching(lm, fmt):
    requests = mixed_requests(fmt)
    out = []
    for fast in (True, False):
        b = Batcher(Engine(lm, fast=fast), max_rows=4)
        tickets = [b.submit(r) for r in requests]
        b.run_until_idle()
        out.append([t.tokens for t in tickets])
    assert out[0] == out[1]


def test_cancel_and_deadline_free_rows_and_leave_others_unchanged(lm, fmt):
    requests = mixed_requests(fmt)
    alone = [Engine(lm).generate([r])[0] for r in requests]
    b = Batcher(Engine(lm), max_rows=16)
    tickets = [b.submit(r) for r in requests]
    late = b.submit(requests[1], timeout=1e-6)
    b.step()
    b.step()
    b.cancel(tickets[0])  # a guided request: both its rows go
    b.step()
    assert tickets[0].status == "cancelled" and late.status == "timeout"
    assert sorted(r for rows in b.core.rows for r in rows) == list(range(b.rows_used))  # packed
    assert tickets[0] not in b.running and 0 < len(tickets[0].tokens) < tickets[0].total
    b.run_until_idle()
    for t, ref in list(zip(tickets, alone))[1:]:
        assert np.array_equal(t.result().tokens, ref.tokens)


def test_on_token_streams_every_token_and_a_failing_consumer_ends_only_its_request(lm, fmt):
    requests = mixed_requests(fmt)
    seen = []
    b = Batcher(Engine(lm))
    good = b.submit(requests[2], on_token=lambda t, tok: seen.append(tok))

    def broken(t, tok):
        raise RuntimeError("client went away")

    bad = b.submit(requests[0], on_token=broken)
    b.run_until_idle()
    assert seen == good.tokens and good.ended_ok
    assert bad.status == "failed" and "client went away" in str(bad.error) and len(bad.tokens) == 1


def test_bounded_queue_closing_and_bad_requests(lm, fmt):
    requests = mixed_requests(fmt)
    b = Batcher(Engine(lm), max_rows=2, max_queue=2)
    b.submit(requests[1])
    b.submit(requests[2])
    with pytest.raises(QueueFull, match="queue is full \\(2 requests waiting\\)"):
        b.submit(requests[2])
    with pytest.raises(InputError, match="ids outside"):
        b.submit(Request(np.array([10**7]), max_new_tokens=3))
    with pytest.raises(InputError, match="needs 2 rows"):
        Batcher(Engine(lm), max_rows=1).submit(requests[0])
    with pytest.raises(InputError, match="more than this server's 16"):
        Batcher(Engine(lm), max_len=16).submit(requests[0])
    b.close()
    with pytest.raises(Closed):
        b.submit(requests[1])
    b.run_until_idle()  # what was queued still finishes
    assert b.idle


def test_worker_thread_serves_concurrent_submitters(lm, fmt):
    requests = mixed_requests(fmt)
    alone = [Engine(lm).generate([r])[0] for r in requests]
    b = Batcher(Engine(lm), max_rows=6)
    b.start()
    tickets = [None] * len(requests)

    def client(i):
        time.sleep(0.01 * i)
        tickets[i] = b.submit(requests[i])
        tickets[i].wait(60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    b.stop(10)
    for t, ref in zip(tickets, alone):
        assert t.ended_ok and np.array_equal(t.result().tokens, ref.tokens)


def test_calls_run_on_the_worker_thread_between_steps(lm, fmt):
    b = Batcher(Engine(lm))
    b.start()
    try:
        assert b.call(threading.current_thread).result(10) is b._thread
        assert b.call(lambda x: x * 2, 21).result(10) == 42
        with pytest.raises(ZeroDivisionError):
            b.call(lambda: 1 / 0).result(10)
        t = b.submit(mixed_requests(fmt)[2])
        assert b.call(len, [1, 2]).result(10) == 2 and t.wait(60) and t.ended_ok
    finally:
        b.stop(10)
