"""Continuous batching: requests join and leave the running batch at every step.

`Engine.generate` runs a fixed batch to its end; a server needs rows that come and go. Both run on the
same core, `emu3.generate.Decoder` (per-row cache lengths, per-request steps, templates, guidance and
sampling); this module adds the queue, admission, deadlines, cancellation and callbacks. So a request
gets the tokens that `Engine.generate` gives it alone, whatever joins or leaves around it (test).

Unusual choices:
- requests are admitted first come, first served, each only when all its rows fit (a CFG request's
  conditional and unconditional rows join and leave together; no overtaking, no starvation);
- new prompts are prefilled into their rows inside the step loop (one prefill forward plus one decode
  forward in a step where requests arrive);
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
from .generate import TEXT, Decoder, Engine, Request, Result


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
    first_token: float | None = None  # time.monotonic() of its first generated token
    ended: float | None = None
    tag: str = ""  # what the caller files it under (a server: the route), for its metrics
    cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event)

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

    def __init__(self, engine: Engine, max_rows: int = 16, max_len: int | None = None, max_queue: int = 64,
                 on_end: Callable[[Ticket], None] | None = None, on_step: Callable[[int], None] | None = None,
                 decoding: str = "plain", window: int = 16):
        """`on_end(ticket)` runs once for every ticket as it ends and `on_step(rows)` after every step with the
        rows that step ran (both on the worker thread; for metrics). decoding="jacobi": every step is a
        speculative Jacobi pass with `window` drafts per request (emu3.generate.Decoder)."""
        cfg = engine.model.config
        if max_rows < 1 or max_queue < 0:
            raise InputError(f"max_rows must be >= 1 and max_queue >= 0, got {max_rows} and {max_queue}")
        self.engine, self.max_rows, self.max_queue = engine, max_rows, max_queue
        self.on_end, self.on_step = on_end, on_step
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        slack = window + 1 if decoding == "jacobi" else 0  # a pass writes its drafts past the request's end
        self.core = Decoder(engine, max_rows, self.max_len + slack, decoding, window)
        self.running: list[Ticket] = []  # in the core's order
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
               timeout: float | None = None, on_done: Callable[[Ticket], None] | None = None, tag: str = "") -> Ticket:
        """Validate and queue a request; raises InputError, QueueFull or Closed. `on_token(ticket, id)`
        runs after every generated token, `on_done(ticket)` once when the ticket ends, however it ends."""
        self.engine.check([request], self.max_len)
        if request.rows() > self.max_rows:
            raise InputError(f"a guided request needs 2 rows, this batcher has {self.max_rows}")
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise InputError(f"timeout must be a positive number of seconds, got {timeout}")
        t = Ticket(request, on_token, on_done, None if timeout is None else time.monotonic() + timeout, tag=tag)
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
        return self.core.rows_used

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
            rows = self.rows_used
            chosen, ended, stopped = self.core.step_tokens()  # one token per request, or a jacobi pass's
            finished = []
            now = time.monotonic()
            for t, toks, end, stop in zip(self.running, chosen, ended.tolist(), stopped.tolist()):
                if not t.tokens and toks:
                    t.first_token = now
                for k, tok in enumerate(toks):
                    t.tokens.append(tok)
                    if end and k == len(toks) - 1:
                        t.status = "finished" if stop else "length"
                    if t.on_token is not None:
                        try:
                            t.on_token(t, tok)
                        except Exception as err:  # a broken consumer ends its own request only
                            t.status, t.error = "failed", err
                            break
                if t.status != "running":
                    finished.append(t)
            made = sum(map(len, chosen))
            self.tokens_total += made
            self.steps_total += 1
            now = time.monotonic()
            self._recent.append((now, made))
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            if self.on_step is not None:
                self.on_step(rows)
            self._retire(finished)
            if self.running:
                self.core.feed()
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
        if self.on_end is not None:
            try:
                self.on_end(t)
            except Exception:  # metrics must not stop the batch
                pass
        if t.on_done is not None:
            try:
                t.on_done(t)
            except Exception:  # a consumer's failure must not stop the batch
                pass

    def _retire(self, tickets: list[Ticket]) -> None:
        """Drop tickets from the batch (the core packs the rows that remain)."""
        if not tickets:
            return
        gone = set(map(id, tickets))
        for t in tickets:
            self._end(t)
        self.core.remove([i for i, t in enumerate(self.running) if id(t) in gone])
        self.running = [t for t in self.running if id(t) not in gone]

    def _admit(self) -> None:
        """Move queued requests that fit into the batch and prefill their prompts."""
        new: list[Ticket] = []
        with self.lock:
            used = self.rows_used
            while self.queue:
                t = self.queue[0]
                if self._expired(t):
                    self.queue.popleft()
                    self._end(t)
                    continue
                if used + t.request.rows() > self.max_rows:
                    break
                self.queue.popleft()
                used += t.request.rows()
                new.append(t)
        if not new:
            return
        for t in new:
            t.status, t.started = "running", time.monotonic()
        self.running += new
        self.core.add([t.request for t in new])
