"""Prometheus metrics of one server, and the `/metrics` endpoint that serves them.

Every `EvalServer` owns a `Metrics` with its own `CollectorRegistry` rather than the global one, so
several servers in one process (tests, embedders) never share or collide on series.

The endpoint is a tiny asyncio HTTP server on the server's own event loop instead of
prometheus-client's threaded one: the run and job gauges are counted in the database at scrape
time (fresh values, no background polling when nobody scrapes), and the database engine belongs to
the event loop. The counts are global (every replica reports the same); the rest is per process.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from evalsvc.store import stats, webhooks
from evalsvc.store.db import Database
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import run_pb2

log = logging.getLogger(__name__)

RUN_STATUSES = {
    number: name.removeprefix("RUN_STATUS_").lower()
    for name, number in run_pb2.RunStatus.items()
    if number != run_pb2.RUN_STATUS_UNSPECIFIED
}
RESULT_STATES = {
    number: name.removeprefix("RESULT_STATE_").lower()
    for name, number in run_pb2.ResultState.items()
    if number != run_pb2.RESULT_STATE_UNSPECIFIED
}
# Unary calls take milliseconds; streams (WatchRun) live for minutes, so they get their own buckets.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STREAM_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
# Model calls take up to minutes; graders are pure functions taking microseconds.
TARGET_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
GRADER_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0)
SCRAPE_QUERY_TIMEOUT_S = 5.0
# Event-loop lag: fine around the 100 ms objective (docs/operations.md), coarse beyond.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LAG_SAMPLE_INTERVAL_S = 0.1


class Metrics:
    """The server's metrics. Hooks elsewhere call the small methods here and stay one line each."""

    def __init__(self, db: Database | None = None) -> None:
        self._db = db
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "evalsvc_rpcs", "RPCs finished, by full method name and status code", ["method", "code"], registry=r
        )
        self.rpc_latency = Histogram(
            "evalsvc_rpc_latency_seconds", "Latency of unary RPCs", ["method"], buckets=RPC_BUCKETS, registry=r
        )
        self.stream_duration = Histogram(
            "evalsvc_stream_duration_seconds",
            "How long server-streaming RPCs (WatchRun) stayed open",
            ["method"],
            buckets=STREAM_BUCKETS,
            registry=r,
        )
        self.open_streams = Gauge("evalsvc_open_streams", "Server-streaming RPCs open now", ["method"], registry=r)
        self.runs = Gauge("evalsvc_runs", "Runs in the database by status (all tenants)", ["status"], registry=r)
        self.jobs_queued = Gauge("evalsvc_jobs_queued", "Jobs waiting for a worker (all tenants)", registry=r)
        self.jobs_running = Gauge("evalsvc_jobs_running", "Jobs this process is executing now", registry=r)
        self.jobs_held_up = Gauge(
            "evalsvc_jobs_held_up",
            "Jobs of this process waiting on their endpoint (a slot, a retry's backoff) or a grading process",
            registry=r,
        )
        self.evaluations = Counter(
            "evalsvc_evaluations_completed",
            "Evaluations recorded by this process, by result state",
            ["state"],
            registry=r,
        )
        self.cache_lookups = Counter(
            "evalsvc_cache_lookups",
            "Response cache lookups by this process, by kind (output, verdict) and outcome (hit, miss, failed)",
            ["kind", "outcome"],
            registry=r,
        )
        self.webhook_attempts = Counter(
            "evalsvc_webhook_attempts",
            "Webhook delivery attempts by this process, by outcome (succeeded, retrying, failed, gone)",
            ["outcome"],
            registry=r,
        )
        self.webhook_circuit_opened = Counter(
            "evalsvc_webhook_circuit_opened",
            "Times this process opened a webhook's circuit (5 failed attempts in a row, or a failed probe)",
            registry=r,
        )
        r.register(
            Tallied(
                "evalsvc_webhook_events_dropped",
                "Webhook deliveries not queued because their tenant had 10,000 waiting, by this process's writes",
                db,
                webhooks.EVENTS_DROPPED,
            )
        )
        self.target_latency = LoopHistogram(
            "evalsvc_target_latency_seconds",
            "Latency of target calls (the measured call, not warmups), by target kind",
            "target",
            TARGET_BUCKETS,
        )
        self.grader_latency = LoopHistogram(
            "evalsvc_grader_latency_seconds", "Time to grade one output, by grader kind", "grader", GRADER_BUCKETS
        )
        self.purged = Counter(
            "evalsvc_purged",
            "Deleted runs purged past --deleted-run-retention-s by this process: runs taken out of the service, "
            "and rows of purged runs deleted",
            ["what"],
            registry=r,
        )
        self.calls_refused = Counter(
            "evalsvc_calls_refused",
            "gRPC calls ended before they were served, by reason: REQUEST_TIMEOUT (the request never arrived), "
            "WAITING_CALLS_FULL (the connection's calls waiting for requests), SERVER_CALLS_FULL "
            "(--max-concurrent-rpcs), MALFORMED_REQUEST (the call ended without a request)",
            ["reason"],
            registry=r,
        )
        self.loop_restarts = Counter(
            "evalsvc_loop_restarts",
            "Times a long-lived loop ended before shutdown (failure or stray cancellation) and was restarted",
            ["loop"],
            registry=r,
        )
        self.loop_stalls = Counter(
            "evalsvc_loop_stalls",
            "Times the watchdog found a loop silent for --stall-s while work waited for it",
            ["loop"],
            registry=r,
        )
        self.loop_stalled = Gauge(
            "evalsvc_loop_stalled",
            "1 while the watchdog finds the loop stalled (health is NOT_SERVING)",
            ["loop"],
            registry=r,
        )
        r.register(self.target_latency)
        r.register(self.grader_latency)
        self.loop_lag = Histogram(
            "evalsvc_event_loop_lag_seconds",
            f"How late the event loop ran a timer that was due (sampled every {LAG_SAMPLE_INTERVAL_S:g} s): "
            "the extra wait of every RPC, stream and job at that moment",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.grader_timeouts = Counter(
            "evalsvc_grader_timeouts",
            "Gradings stopped at --grade-timeout-s (evaluation ERROR GRADER_TIMEOUT), by grader kind",
            ["grader"],
            registry=r,
        )
        self._lag_sampler: asyncio.Task[None] | None = None
        self._evaluations_by_state = {state: self.evaluations.labels(name) for state, name in RESULT_STATES.items()}
        for name in RUN_STATUSES.values():
            self.runs.labels(name)  # every status is exported, zeros included, so series never vanish
        self._rpc_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._http: asyncio.Server | None = None

    # ------------------------------------------------------------------------------------------ hooks

    def rpc_finished(self, method: str, code: str, seconds: float, *, stream: bool) -> None:
        """Count a finished RPC and observe its latency (or, for a stream, how long it was open)."""
        children = self._rpc_children.get((method, code))
        if children is None:  # label lookups take a lock; every RPC pays this, so resolve them once
            latency = self.stream_duration if stream else self.rpc_latency
            children = self._rpc_children[(method, code)] = (self.rpcs.labels(method, code), latency.labels(method))
        children[0].inc()
        children[1].observe(seconds)

    def call_refused(self, reason: str) -> None:
        self.calls_refused.labels(reason).inc()

    def loop_restarted(self, loop: str) -> None:
        """Count a supervised loop's restart."""
        self.loop_restarts.labels(loop).inc()

    def target_called(self, target: object, seconds: float) -> None:
        """Observe one target call's latency."""
        self.target_latency.observe(kind_label(target), seconds)

    def graded(self, grader: object, seconds: float) -> None:
        """Observe how long grading one output took."""
        self.grader_latency.observe(kind_label(grader), seconds)

    def grading_timed_out(self, grader: object) -> None:
        """Count a grading stopped at its time limit."""
        self.grader_timeouts.labels(kind_label(grader)).inc()

    def evaluations_recorded(self, events: Mapping[str, Sequence[pb.WatchRunResponse]]) -> None:
        """Count the results among events the recorder just committed: tallied first, then one
        increment per state (a large run's batch holds tens of thousands, and each `inc` takes a lock)."""
        tally = collections.Counter(
            event.result.state for run_events in events.values() for event in run_events if event.HasField("result")
        )
        for state, n in tally.items():
            counter = self._evaluations_by_state.get(state)
            if counter is not None:
                counter.inc(n)

    # ------------------------------------------------------------------------------------- exposition

    async def refresh(self) -> None:
        """Count runs by status and queued jobs in the database (two index scans)."""
        if self._db is None:
            return
        async with self._db.read() as conn:
            by_status = await stats.runs_by_status(conn)
            queued = await stats.queued_jobs(conn)
        for number, name in RUN_STATUSES.items():
            self.runs.labels(name).set(by_status.get(number, 0))
        self.jobs_queued.set(queued)

    async def render(self) -> bytes:
        """The exposition text; the database gauges keep their last values if counting fails."""
        try:
            await asyncio.wait_for(self.refresh(), SCRAPE_QUERY_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("metrics: counting runs and jobs failed (%s); serving the last counts", type(exc).__name__)
        return generate_latest(self.registry)

    async def serve(self, addr: str) -> int:
        """Serve GET /metrics on `addr` (host:port, port 0 picks one); returns the bound port."""
        host, _, port = addr.rpartition(":")
        self._http = await asyncio.start_server(self._handle, host.strip("[]") or None, int(port))
        bound: int = self._http.sockets[0].getsockname()[1]
        log.info("metrics at http://%s:%d/metrics", host or "0.0.0.0", bound)
        return bound

    def start_lag_sampler(self) -> None:
        """Start sampling the event loop's lag (`evalsvc_event_loop_lag_seconds`) until `close`."""
        if self._lag_sampler is None:
            self._lag_sampler = asyncio.create_task(self._sample_loop_lag(), name="metrics-loop-lag")

    async def _sample_loop_lag(self) -> None:
        """Sleep a fixed interval and observe how much later than due the loop woke us: anything
        CPU-bound on the loop (a slow grading, a huge request) shows up here as lag. Supervised: a
        failure is logged and sampling goes on; only `close` ends it."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                due = loop.time() + LAG_SAMPLE_INTERVAL_S
                await asyncio.sleep(LAG_SAMPLE_INTERVAL_S)
                self.loop_lag.observe(max(0.0, loop.time() - due))
            except Exception:
                log.exception("metrics: sampling the event loop lag failed; sampling goes on")

    async def close(self) -> None:
        """Stop serving /metrics and sampling the loop's lag."""
        if self._lag_sampler is not None:
            self._lag_sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_sampler
            self._lag_sampler = None
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
            self._http = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One HTTP/1.x request per connection: enough for Prometheus, curl and a browser."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            body, status, content_type = b"not found\n", "404 Not Found", "text/plain; charset=utf-8"
            if target.split("?", 1)[0] == "/metrics":
                if method in ("GET", "HEAD"):
                    body, status, content_type = await self.render(), "200 OK", CONTENT_TYPE_LATEST
                else:
                    body, status = b"method not allowed\n", "405 Method Not Allowed"
            headers = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            writer.write(headers.encode() + b"Connection: close\r\n\r\n" + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a broken or slow client: drop the connection
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


_KIND_CACHE: dict[type[Any], str] = {}


class LoopHistogram(Collector):
    """A histogram with one label, observed only on the event loop's thread, exported at scrape.

    prometheus_client's Histogram takes a lock twice per observation; a large run grades 250,000
    outputs, and those locks were 5% of the event loop (bench profile). Observations here are a
    bisect and two additions on plain lists: the event loop is one thread, and the scrape handler
    runs on it too, so nothing else reads or writes them meanwhile."""

    def __init__(self, name: str, documentation: str, label: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._bounds = tuple(buckets)
        self._series: dict[str, list[float]] = {}  # label value -> [count per bucket..., +Inf, sum]

    def observe(self, value: str, seconds: float) -> None:
        """Count one observation of `seconds` under label value `value`."""
        series = self._series.get(value)
        if series is None:
            series = self._series[value] = [0.0] * (len(self._bounds) + 2)
        series[bisect.bisect_left(self._bounds, seconds)] += 1  # bucket `le` bound: seconds <= bound
        series[-1] += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        for value, series in self._series.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip([*map(floatToGoString, self._bounds), "+Inf"], series[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric([value], buckets, sum_value=series[-1])
        yield family


def kind_label(obj: object) -> str:
    """`ProvidedTarget` -> `provided`, `_ExactMatch` -> `exact_match`: a bounded label value
    (user-chosen grader names would make one series per run)."""
    cls = type(obj)
    label = _KIND_CACHE.get(cls)
    if label is None:
        name = cls.__name__.lstrip("_").removesuffix("Target").removesuffix("Grader") or cls.__name__
        label = _KIND_CACHE[cls] = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    return label


class Tallied(Collector):
    """A counter of what this process's committed write transactions counted (evalsvc.store.db.tally),
    read at scrape: what a store function does inside whichever transaction calls it (a drop of webhook
    deliveries happens in the run transactions) is counted only once that transaction commits."""

    def __init__(self, name: str, documentation: str, db: Database | None, tally: str) -> None:
        self._name = name
        self._documentation = documentation
        self._db = db
        self._tally = tally

    def collect(self) -> Iterator[CounterMetricFamily]:
        counted = self._db.tallies[self._tally] if self._db is not None else 0
        yield CounterMetricFamily(self._name, self._documentation, value=counted)
