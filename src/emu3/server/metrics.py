"""/metrics through prometheus_client."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..batching import Ticket


class Metrics:
    """/metrics through prometheus_client, in a registry of the app's own: the batcher's state read at each
    scrape (queue, running requests and rows, tokens/s, totals), and histograms observed as things end:
    HTTP latency by path, queue wait, time to first token and generation time by route, rows per step."""

    SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

    def __init__(self, state):  # the app's state: its batcher and whether it drains
        self.state, reg = state, CollectorRegistry()
        reg.register(self)
        self.registry = reg
        self.http_total = Counter("emu3_http_requests", "HTTP requests by path and status.", ["path", "status"],
                                  registry=reg)
        self.http_seconds = Histogram("emu3_http_request_seconds", "HTTP request latency (to the last byte) by "
                                      "path.", ["path"], buckets=self.SECONDS, registry=reg)
        self.queue_wait = Histogram("emu3_queue_wait_seconds", "Time from submission to a batch slot, by route.",
                                    ["route"], buckets=self.SECONDS, registry=reg)
        self.first_token = Histogram("emu3_time_to_first_token_seconds", "Time from submission to the first "
                                     "generated token, by route.", ["route"], buckets=self.SECONDS, registry=reg)
        self.generation = Histogram("emu3_generation_seconds", "Time from submission to the end, by route.",
                                    ["route"], buckets=self.SECONDS, registry=reg)
        self.rows = Histogram("emu3_batch_rows", "KV-cache rows each batch step ran (batch occupancy).",
                              buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=reg)

    def describe(self):
        return []  # collected at scrape time

    def collect(self):
        b = self.state.batcher
        for name, text, value in (
                ("emu3_queue_length", "Requests waiting for a batch slot.", len(b.queue)),
                ("emu3_running_requests", "Requests in the running batch.", len(b.running)),
                ("emu3_running_rows", "KV-cache rows in use (a CFG request takes 2).", b.rows_used),
                ("emu3_max_rows", "KV-cache rows of the batch.", b.max_rows),
                ("emu3_tokens_per_second", "Generated tokens per second over the last 10 s.", b.tokens_per_second()),
                ("emu3_draining", "1 while the server drains before it stops.", int(self.state.draining))):
            yield GaugeMetricFamily(name, text, value=value)
        yield CounterMetricFamily("emu3_generated_tokens", "Generated tokens.", value=b.tokens_total)
        yield CounterMetricFamily("emu3_steps", "Batch steps run.", value=b.steps_total)
        ended = CounterMetricFamily("emu3_generations", "Generation requests by how they ended.", labels=["status"])
        for status, n in sorted(b.ended_total.items()):
            ended.add_metric([status], n)
        yield ended

    def http(self, path: str, status: int, seconds: float) -> None:
        self.http_total.labels(path, str(status)).inc()
        self.http_seconds.labels(path).observe(seconds)

    def ended(self, t: Ticket) -> None:
        """Batcher.on_end: a ticket's queue wait, time to first token and generation time."""
        if t.started is not None:
            self.queue_wait.labels(t.tag).observe(t.started - t.submitted)
        if t.first_token is not None:
            self.first_token.labels(t.tag).observe(t.first_token - t.submitted)
        if t.ended is not None:
            self.generation.labels(t.tag).observe(t.ended - t.submitted)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
