"""Continuous batching: requests join and leave the running batch at every step.

`Engine.generate` runs a fixed batch to its end; a server needs rows that come and go. Here every
row owns a slot of one preallocated KV cache with its own length: a step writes row b's new key and
value at its column lengths[b] (`Emu3LM.hidden_states` with a per-row `start`), and every request
counts its own steps, for its template and for its seeded sampler. So a request gets the tokens that
`Engine.generate` gives it alone, whatever joins or leaves around it (test).

Unusual choices:
- rows stay packed: when a request leaves, the last rows move into its slots (a copy of their filled
  cache columns), so a step runs on rows [0, n) only;
- the conditional and unconditional rows of a CFG request join and leave together; requests are
  admitted first come, first served, each only when all its rows fit (no overtaking, no starvation);
- new prompts are prefilled right-padded straight into their slots inside the step loop (one prefill
  forward plus one decode forward in a step where requests arrive);
- the queue is bounded: `submit` raises `QueueFull` instead of letting latency grow without limit;
- thread model: any thread may `submit` and `cancel`; one worker thread runs `step` (`start` or `run`),
  and per-token callbacks run on it, so they must be quick (a server hands tokens to its event loop).
  Other PyTorch work (the vision tokenizer) goes through `call`, onto the same thread: on this CPU a
  second live thread that has run PyTorch kernels slowed the first one's by 1.8x (OpenMP teams; the
  built-in model's image went from 0.36 s to 0.63 s), so one thread does all of it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import Emu3Error, InputError
from .generate import TEXT, VISUAL, Engine, Request, Result, guided_scores, sample
from .model import KVCache


class QueueFull(Emu3Error):
    """The bounded queue has no room: try again later (HTTP 429)."""


class Closed(Emu3Error):
    """The batcher is draining or stopped and takes no new requests (HTTP 503)."""


@dataclass(eq=False)
class Ticket:
    """A submitted request and what happened to it. `status`: queued, running, then one of finished
    (emitted a stop id), length (used all its steps), cancelled, timeout or failed."""

    request: Request
    on_token: Callable[[Ticket, int], None] | None = None
    on_done: Callable[[Ticket], None] | None = None
    deadline: float | None = None  # time.monotonic() after which the request is ended ("timeout")
    tokens: list[int] = field(default_factory=list)
    status: str = "queued"
    error: BaseException | None = None
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    cancelled: bool = False
    rows: list[int] = field(default_factory=list)  # cache rows: conditional, then unconditional if guided
    _done: threading.Event = field(default_factory=threading.Event)
    _stops: frozenset = frozenset()
    _text_ok: torch.Tensor | None = None

    @property
    def total(self) -> int:
        return self.request.steps()

    @property
    def ended_ok(self) -> bool:
        return self.status in ("finished", "length")

    @property
    def done(self) -> bool:
        """Whether the ticket has ended, however it ended (`wait` blocks until it has)."""
        return self._done.is_set()

    def want(self) -> int:
        r = self.request
        return int(r.template[len(self.tokens)]) if r.template is not None else TEXT

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def result(self) -> Result:
        return Result(np.asarray(self.tokens, dtype=np.int64), self.status == "finished")


class Batcher:
    """Runs requests with continuous batching on one engine; at most `max_rows` cache rows (a CFG
    request takes two) of `max_len` columns, and at most `max_queue` requests waiting."""

    def __init__(self, engine: Engine, max_rows: int = 16, max_len: int | None = None, max_queue: int = 64):
        cfg = engine.model.config
        if max_rows < 1 or max_queue < 0:
            raise InputError(f"max_rows must be >= 1 and max_queue >= 0, got {max_rows} and {max_queue}")
        self.engine, self.max_rows, self.max_queue = engine, max_rows, max_queue
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.cache = KVCache(cfg, max_rows, self.max_len, engine.device, engine.dtype)
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=engine.device)  # filled columns per row
        self.hidden = torch.zeros(max_rows, cfg.hidden_size, dtype=engine.dtype, device=engine.device)
        self.running: list[Ticket] = []
        self.queue: deque[Ticket] = deque()
        self.lock = threading.Condition()
        self.closed = False
        self.tokens_total = 0  # generated tokens (per request, not per row), for /metrics
        self.steps_total = 0
        self.ended_total: dict[str, int] = {}  # tickets by final status
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._thread: threading.Thread | None = None
        self._stop = False
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()

    # ---- any thread ----

    def submit(self, request: Request, on_token: Callable[[Ticket, int], None] | None = None,
               timeout: float | None = None, on_done: Callable[[Ticket], None] | None = None) -> Ticket:
        """Validate and queue a request; raises InputError, QueueFull or Closed. `on_token(ticket, id)`
        runs after every generated token, `on_done(ticket)` once when the ticket ends, however it ends."""
        need = self.engine.check([request])
        if need > self.max_len:
            raise InputError(f"prompt + generated tokens = {need}, more than this server's {self.max_len} per request")
        rows = 2 if request.cfg_scale != 1 else 1
        if rows > self.max_rows:
            raise InputError(f"a guided request needs 2 rows, this batcher has {self.max_rows}")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise InputError(f"timeout must be a positive number of seconds, got {timeout}")
        t = Ticket(request, on_token, on_done, None if timeout is None else time.monotonic() + timeout)
        t._stops = frozenset(request.stop if request.stop is not None else [self.engine.vocab.eos])
        with self.lock:
            if self.closed:
                raise Closed("the server is shutting down and takes no new requests")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            self.queue.append(t)
            self.lock.notify_all()
        return t

    def call(self, fn: Callable, *args) -> Future:
        """Run fn(*args) on the worker thread before its next step; the future holds the result."""
        f: Future = Future()
        with self.lock:
            self._calls.append((fn, args, f))
            self.lock.notify_all()
        return f

    def _run_calls(self) -> None:
        while True:
            with self.lock:
                if not self._calls:
                    return
                fn, args, f = self._calls.popleft()
            if f.set_running_or_notify_cancel():
                try:
                    f.set_result(fn(*args))
                except BaseException as e:  # handed to the caller
                    f.set_exception(e)

    def cancel(self, ticket: Ticket) -> None:
        """End a request at the next step (its rows are freed then)."""
        ticket.cancelled = True
        with self.lock:
            self.lock.notify_all()

    def close(self) -> None:
        """Take no new requests; queued and running ones still finish."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds (at most 10)."""
        now = time.monotonic()
        return sum(n for t, n in list(self._recent) if t >= now - window) / window

    @property
    def rows_used(self) -> int:
        return sum(len(t.rows) for t in self.running)

    @property
    def idle(self) -> bool:
        return not self.running and not self.queue and not self._calls

    def start(self) -> threading.Thread:
        """Run `step` on a daemon thread until `stop`."""
        self._stop = False
        self._thread = threading.Thread(target=self.run, name="emu3-batcher", daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_until_idle(self) -> None:
        while self.step():
            pass

    # ---- the worker ----

    def run(self) -> None:
        """Step whenever there is work, on the calling thread, until `stop`."""
        while True:
            with self.lock:
                while not self._stop and self.idle:
                    self.lock.wait()
                if self._stop:
                    return
            self.step()

    @torch.no_grad()
    def step(self) -> bool:
        """Run pending calls, admit what fits, then one token for every running request. False when there
        was nothing to do."""
        self._run_calls()
        try:
            self._retire([t for t in self.running if self._expired(t)])
            self._admit()
            if not self.running:
                return bool(self.queue)
            chosen = self._choose()
            finished = []
            for t, tok in zip(self.running, chosen.tolist()):
                t.tokens.append(tok)
                if tok in t._stops:
                    t.status = "finished"
                elif len(t.tokens) >= t.total:
                    t.status = "length"
                if t.on_token is not None:
                    try:
                        t.on_token(t, tok)
                    except Exception as err:  # a broken consumer ends its own request only
                        t.status, t.error = "failed", err
                if t.status != "running":
                    finished.append(t)
            self.tokens_total += len(chosen)
            self.steps_total += 1
            now = time.monotonic()
            self._recent.append((now, len(chosen)))
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            keep = [t.status == "running" for t in self.running]
            self._retire(finished)
            if self.running:
                self._decode(chosen[torch.tensor(keep, device=chosen.device)])
            return True
        except Exception as err:  # the model failed (e.g. out of memory): fail what was running, stay up
            for t in self.running:
                t.status, t.error = "failed", err
            self._retire(list(self.running))
            return True

    def _expired(self, t: Ticket) -> bool:
        if t.cancelled:
            t.status = "cancelled"
        elif t.deadline is not None and time.monotonic() > t.deadline:
            t.status = "timeout"
        else:
            return False
        return True

    def _end(self, t: Ticket) -> None:
        t.ended = time.monotonic()
        t._done.set()
        self.ended_total[t.status] = self.ended_total.get(t.status, 0) + 1
        if t.on_done is not None:
            try:
                t.on_done(t)
            except Exception:  # a consumer's failure must not stop the batch
                pass

    def _retire(self, tickets: list[Ticket]) -> None:
        """Drop tickets from the batch and pack the remaining rows into [0, n)."""
        if not tickets:
            return
        gone = set(map(id, tickets))
        for t in tickets:
            self._end(t)
        self.running = [t for t in self.running if id(t) not in gone]
        new = 0
        for t in self.running:  # rows were assigned in ticket order, so a row only ever moves down
            for j, old in enumerate(t.rows):
                if old != new:
                    self.cache.move_row(old, new, int(self.lengths[old]))
                    self.lengths[new] = self.lengths[old]
                    self.hidden[new] = self.hidden[old]
                    t.rows[j] = new
                new += 1

    def _admit(self) -> None:
        """Move queued requests that fit into the batch and prefill their prompts."""
        e, v = self.engine, self.engine.vocab
        new: list[Ticket] = []
        with self.lock:
            used = self.rows_used
            while self.queue:
                t = self.queue[0]
                if self._expired(t):
                    self.queue.popleft()
                    self._end(t)
                    continue
                need = 2 if t.request.cfg_scale != 1 else 1
                if used + need > self.max_rows:
                    break
                self.queue.popleft()
                t.rows = list(range(used, used + need))
                used += need
                new.append(t)
        if not new:
            return
        prompts = []
        for t in new:
            t.status, t.started = "running", time.monotonic()
            prompts.append(np.asarray(t.request.prompt))
            if len(t.rows) == 2:
                prompts.append(np.asarray(t.request.negative))
            if t.request.allowed is not None:
                t._text_ok = torch.zeros(v.size, dtype=torch.bool, device=e.device)
                t._text_ok[torch.as_tensor(np.asarray(t.request.allowed), device=e.device)] = True
        first, m = new[0].rows[0], len(prompts)
        lens = torch.tensor([len(p) for p in prompts], device=e.device)
        width = int(lens.max())
        ids = torch.full((m, width), v.pad, dtype=torch.long)
        for i, p in enumerate(prompts):  # right padding: row i fills columns [0, len)
            ids[i, :len(p)] = torch.as_tensor(p)
        ids = ids.to(e.device)
        cols = torch.arange(width, device=e.device)
        key_mask = cols[None, :] < lens[:, None]  # (m, width)
        self.running += new
        hidden = e.hidden_states(ids, positions=cols.expand(m, width), key_mask=key_mask,
                            cache=self.cache.rows(first, first + m))  # (m, width, H)
        self.hidden[first:first + m] = hidden[torch.arange(m, device=e.device), lens - 1]
        self.lengths[first:first + m] = lens

    def _choose(self) -> torch.Tensor:
        """One token per running request (n,), as `Engine.generate` would choose it at its own step."""
        e, dev = self.engine, self.engine.device
        run = self.running
        n = len(run)
        want = torch.tensor([t.want() for t in run], device=dev)
        if e.fast and bool((want >= 0).all()):
            return want  # every next token is forced: skip the head
        guided = [i for i, t in enumerate(run) if len(t.rows) == 2]
        rows = [t.rows[0] for t in run] + [run[i].rows[1] for i in guided]
        hidden = self.hidden[torch.tensor(rows, device=dev)]  # requests' rows, then unconditional rows
        g_idx = torch.tensor(guided, dtype=torch.long, device=dev)
        u_idx = torch.arange(n, n + len(guided), device=dev)
        scale = torch.tensor([run[i].request.cfg_scale for i in guided], device=dev)[:, None]
        text_ok = e.text_ok[None]
        if any(t._text_ok is not None for t in run):
            text_ok = torch.stack([t._text_ok if t._text_ok is not None else e.text_ok for t in run])
        scores, token_ids = guided_scores(e, hidden, want, torch.zeros(n, dtype=torch.bool, device=dev),
                                          g_idx, u_idx, scale, text_ok)
        visual = (want == VISUAL).tolist()
        settings = [t.request.visual if vis else t.request.text for t, vis in zip(run, visual)]
        temperature = torch.tensor([s.temperature for s in settings], device=dev)
        top_k = torch.tensor([s.top_k for s in settings], device=dev)
        top_p = torch.tensor([s.top_p for s in settings], device=dev)
        seeds = torch.tensor([t.request.seed for t in run], dtype=torch.long, device=dev)
        steps = torch.tensor([len(t.tokens) for t in run], dtype=torch.long, device=dev)
        token = sample(scores, token_ids, seeds, steps, temperature, top_k, top_p)
        return torch.where(want >= 0, want, token)

    def _decode(self, chosen: torch.Tensor) -> None:
        """Feed each running request's new token through its rows (both rows of a guided request)."""
        dev = self.engine.device
        owner = torch.tensor([i for i, t in enumerate(self.running) for _ in t.rows], device=dev)  # row -> request
        n = len(owner)
        lengths = self.lengths[:n].clone()
        width = int(lengths.max()) + 1
        key_mask = torch.arange(width, device=dev)[None, :] < lengths[:, None]  # (n, width): filled columns
        hidden = self.engine.hidden_states(chosen[owner][:, None], positions=lengths[:, None], key_mask=key_mask,
                                      cache=self.cache.rows(0, n), start=lengths)  # (n, 1, H)
        self.hidden[:n] = hidden[:, -1]
        self.lengths[:n] += 1
