"""Load generators: each runs in its own process, talks gRPC over loopback, and prints one JSON line.

`python -m bench.loadgen '{"mode": "unary", ...}'`. Every loop here is bounded twice, by a count and
by a deadline, so a server that hangs or a bug cannot make the suite run forever; the parent also
kills the process at its own timeout.

Modes:
- `unary`: `concurrency` tasks call Echo / CreateRun / GetRun back to back on one channel.
- `large`: one CreateRun, then WatchRun from seq 0 until the terminal event; optionally the server's
  event-loop lag histogram read from its /metrics around an idle window and around the run.
- `fanout`: W watchers on one run (or W bare subscribers); delivery latency of a burst of events.
- `idle`: N idle streams held open until the parent has read the server's memory.
- `pathological`: tenant B's GetRun latency alone, then while tenant A's run of huge outputs grades,
  with the server's event-loop lag histogram read from its /metrics around each window.
- `cached`: the same chat-target run twice with the response cache on: the first fills it, the second
  is served from it.
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, cast

import grpc

from bench import echo_server
from bench.workloads import (
    cached_run_request,
    large_run_request,
    model_run_request,
    pathological_run_request,
    small_run_request,
)
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as pb_grpc
from evalsvc.v1 import run_pb2

TERMINAL = {run_pb2.RUN_STATUS_SUCCEEDED, run_pb2.RUN_STATUS_FAILED, run_pb2.RUN_STATUS_CANCELLED}
STREAMS_PER_CHANNEL = 250  # below evalsvc's max_concurrent_streams (1000) per connection
LATENCY_SAMPLE_CAP = 20_000
# Call metadata: the API key of a server with authentication. Sent on every call, to the bare
# baseline too, so both sides pay the same client-side cost.
MD: tuple[tuple[str, str], ...] = ()  # keep the JSON small; an even subsample is plenty for percentiles and plots


def _emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def _subsample(values: list[float], cap: int = LATENCY_SAMPLE_CAP) -> list[float]:
    if len(values) <= cap:
        return values
    step = len(values) / cap
    return [values[int(i * step)] for i in range(cap)]


def _channels(addr: str, n: int) -> list[grpc.aio.Channel]:
    """n channels with their own TCP connection each (a local subchannel pool stops grpc sharing one)."""
    return [
        grpc.aio.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1), ("bench.channel", i)])
        for i in range(n)
    ]


def _seconds(ts: Any) -> float:
    """A google.protobuf.Timestamp as float UNIX seconds."""
    seconds: float = float(ts.seconds) + float(ts.nanos) / 1e9
    return seconds


# ------------------------------------------------------------------------------------------- unary


async def unary(args: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop load: `concurrency` callers, each sending its next call when the previous returns.

    The same client code drives the bare echo and evalsvc; only the method differs. A short untimed
    warm-up first, so connection setup and first-call costs are not in the figure.
    """
    addr, kind = args["addr"], args["kind"]
    concurrency, duration, max_calls = int(args["concurrency"]), float(args["duration_s"]), int(args["max_calls"])
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = pb_grpc.EvalRunServiceStub(channel)
        call: Callable[[], Awaitable[Any]]
        if kind == "echo":
            echo = channel.unary_unary(
                echo_server.ECHO,
                request_serializer=pb.GetRunRequest.SerializeToString,
                response_deserializer=pb.GetRunRequest.FromString,
            )
            echo_request = pb.GetRunRequest(run_id="run_0123456789abcdef0123456789")

            def call() -> Awaitable[Any]:
                return cast(Awaitable[Any], echo(echo_request, metadata=MD))

        elif kind == "create":
            create_request = small_run_request(10)

            def call() -> Awaitable[Any]:
                return cast(Awaitable[Any], stub.CreateRun(create_request, metadata=MD))

        elif kind == "get":
            # A finished run with an aggregate, as a dashboard would read it.
            created = await stub.CreateRun(small_run_request(10), metadata=MD)
            get_request = pb.GetRunRequest(run_id=created.run.id)
            if args.get("wait_terminal", True):
                async for _ in stub.WatchRun(pb.WatchRunRequest(run_id=created.run.id), timeout=30, metadata=MD):
                    pass

            def call() -> Awaitable[Any]:
                return cast(Awaitable[Any], stub.GetRun(get_request, metadata=MD))

        else:
            raise ValueError(f"unknown unary kind {kind!r}")

        measured = await closed_loop(
            call, concurrency, duration, max_calls, float(args.get("warmup_s", 0.2)), grpc.aio.AioRpcError
        )
    return {"kind": kind, **measured}


async def closed_loop(
    call: Callable[[], Awaitable[Any]],
    concurrency: int,
    duration: float,
    max_calls: int,
    warmup_s: float,
    failure: type[Exception],
) -> dict[str, Any]:
    """`concurrency` callers, each sending its next call when the previous returns, for `duration`
    seconds after an unmeasured warm-up; a `failure` is counted by its code and not timed."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    calls = 0
    measuring = False
    deadline = 0.0

    async def caller() -> None:
        nonlocal calls
        while time.perf_counter() < deadline and calls < max_calls:
            start = time.perf_counter()
            try:
                await call()
            except failure as exc:
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                errors[code] = errors.get(code, 0) + 1
                continue
            if measuring:
                latencies.append((time.perf_counter() - start) * 1000)
                calls += 1

    deadline = time.perf_counter() + warmup_s
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    measuring = True
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "calls": calls,
        "errors": errors,
        "elapsed_s": elapsed,
        "rps": calls / elapsed,
        "latency_ms": _subsample(latencies),
    }


async def http(args: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop HTTP GETs of `url` (the bare FastAPI echo, or the gateway's GET /v1/runs/{id})."""
    import httpx

    headers = {"authorization": f"Bearer {args['api_key']}"} if args.get("api_key") else {}
    limits = httpx.Limits(max_connections=int(args["concurrency"]), max_keepalive_connections=int(args["concurrency"]))
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=30) as client:

        async def call() -> None:
            response = await client.get(args["url"])
            response.raise_for_status()

        measured = await closed_loop(
            call,
            int(args["concurrency"]),
            float(args["duration_s"]),
            int(args["max_calls"]),
            float(args.get("warmup_s", 0.2)),
            httpx.HTTPError,
        )
    return {"kind": "http", **measured}


# ------------------------------------------------------------------------------------------- large


async def _watch_events(stub: Any, run_id: str, timeout_s: float, *, batched: bool) -> AsyncIterator[Any]:
    """A run's events from seq 0, through WatchRunBatched (many per message) or WatchRun (one each)."""
    if not batched:
        async for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=timeout_s, metadata=MD):
            yield event
        return
    request = pb.WatchRunBatchedRequest(run_id=run_id)
    async for batch in stub.WatchRunBatched(request, timeout=timeout_s, metadata=MD):
        for event in batch.events:
            yield event


async def large(args: dict[str, Any]) -> dict[str, Any]:
    """CreateRun of items x graders, then drain WatchRunBatched (or WatchRun, `batched: false`) from seq 0
    to the terminal event.

    Wall time is measured at the client (what a user waits for); the server's own execution time
    (create_time to end_time of the terminal run) is reported beside it, so delivery and execution
    can be told apart. With `metrics_port`, the server's loop-lag buckets are read around an idle
    window of `idle_s` before the run and around the run itself (CreateRun to terminal event).
    """
    addr, items, graders, timeout_s = args["addr"], int(args["items"]), int(args["graders"]), float(args["timeout_s"])
    metrics_port = int(args.get("metrics_port") or 0)
    request = large_run_request(items, graders)
    lag: dict[str, dict[str, float]] = {}
    async with grpc.aio.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.EvalRunServiceStub(channel)
        if metrics_port:
            before_idle = await _loop_lag_buckets(metrics_port)
            await asyncio.sleep(float(args["idle_s"]))
            before_run = await _loop_lag_buckets(metrics_port)
            lag["idle"] = _bucket_delta(before_idle, before_run)
        started_wall = time.time()
        started = time.perf_counter()
        created = await stub.CreateRun(request, timeout=timeout_s, metadata=MD)
        create_s = time.perf_counter() - started
        total = created.run.counts.total_evaluations
        events = results = 0
        timeline: list[tuple[float, int]] = [(0.0, 0)]
        next_mark = 0
        terminal: run_pb2.Run | None = None
        last_event_time = 0.0
        sized = size_sum = 0
        async for event in _watch_events(stub, created.run.id, timeout_s, batched=bool(args.get("batched", True))):
            if event.HasField("heartbeat"):
                continue
            events += 1
            if event.HasField("result"):
                results += 1
                if sized < 1000:
                    sized += 1
                    size_sum += event.ByteSize()
                if results >= next_mark:
                    timeline.append((time.perf_counter() - started, event.counts.completed_evaluations))
                    next_mark += max(1, total // 200)
            elif event.HasField("run") and event.run.status in TERMINAL:
                terminal = event.run
                last_event_time = _seconds(event.event_time)
                break
        e2e_s = time.perf_counter() - started
        timeline.append((e2e_s, results))
        if metrics_port:
            lag["run"] = _bucket_delta(before_run, await _loop_lag_buckets(metrics_port))
    if terminal is None:
        raise RuntimeError("the watch ended without a terminal event")
    return {
        "items": items,
        "graders": graders,
        "evaluations": total,
        "status": run_pb2.RunStatus.Name(terminal.status),
        "events": events,
        "results": results,
        "create_s": create_s,
        "e2e_s": e2e_s,
        "server_s": _seconds(terminal.end_time) - _seconds(terminal.create_time),
        "terminal_commit_after_s": last_event_time - started_wall,
        "mean_event_bytes": size_sum / max(1, sized),
        "timeline": timeline,
        "lag": lag,
    }


async def cached(args: dict[str, Any]) -> dict[str, Any]:
    """One run of `items` chat-target items with the cache on (filling it), then the same run again:
    wall time of each from CreateRun to the terminal event, and the second run's cache hits."""
    addr, items, timeout_s = args["addr"], int(args["items"]), float(args["timeout_s"])
    request = cached_run_request(items, args["model_base_url"])
    timings: list[float] = []
    runs: list[run_pb2.Run] = []
    async with grpc.aio.insecure_channel(addr, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.EvalRunServiceStub(channel)
        for _ in range(2):
            started = time.perf_counter()
            created = await stub.CreateRun(request, timeout=timeout_s, metadata=MD)
            async for event in _watch_events(stub, created.run.id, timeout_s, batched=True):
                if event.HasField("run") and event.run.status in TERMINAL:
                    runs.append(event.run)
                    break
            timings.append(time.perf_counter() - started)
    if len(runs) != 2:
        raise RuntimeError("a watch ended without a terminal event")
    return {
        "items": items,
        "fill_s": timings[0],
        "cached_s": timings[1],
        "status": run_pb2.RunStatus.Name(runs[1].status),
        "cache_hits": runs[1].aggregate.cache_hits,
        "passed": runs[1].counts.passed,
    }


async def stream_bare(args: dict[str, Any]) -> dict[str, Any]:
    """Drain N messages of the given size from one bare server stream: the one-stream ceiling."""
    addr, count, size = args["addr"], int(args["messages"]), int(args["message_bytes"])
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.unary_stream(echo_server.STREAM)
        received = 0
        started = time.perf_counter()
        async for _ in call(
            echo_server.BROADCAST_REQUEST.pack(count, size), timeout=float(args["timeout_s"]), metadata=MD
        ):
            received += 1
        elapsed = time.perf_counter() - started
    return {"messages": received, "elapsed_s": elapsed, "messages_per_s": received / elapsed}


# ------------------------------------------------------------------------------------------ fan-out


async def _gather_bounded(tasks: list[asyncio.Task[None]], timeout_s: float) -> bool:
    """Wait for every task; cancel the rest after timeout_s. True when all finished in time."""
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return not pending


class _GatedModel:
    """An OpenAI-compatible chat endpoint on loopback that answers each call with its last message's
    content, but only once `gate` is set: the fan-out's watched run produces no result before then.
    Plain asyncio HTTP/1.1 with keep-alive: enough for the server's own client and ten calls."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.base_url = ""

    @classmethod
    async def start(cls) -> _GatedModel:
        model = cls()
        model._server = await asyncio.start_server(model._serve, "127.0.0.1", 0)
        port = model._server.sockets[0].getsockname()[1]
        model.base_url = f"http://127.0.0.1:{port}/v1"
        return model

    async def close(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                await self.gate.wait()
                content = body.get("messages", [{}])[-1].get("content", "")
                reply = json.dumps(
                    {
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
                    }
                ).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(reply)}\r\n\r\n".encode()
                    + reply
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def fanout_evalsvc(args: dict[str, Any]) -> dict[str, Any]:
    """W watchers on one run; latency from each result event's event_time to its arrival.

    The watched run must not produce results before every watcher is subscribed, but a run starts
    executing the moment it is created. So its target is a model this process stands in for (an
    OpenAI-compatible endpoint on loopback, `_GatedModel`) that answers only once the last watcher is
    ready. (A blocker run ahead of it no longer works: claims are shared fairly among runs.) A
    repetition in which any result was committed before the last watcher was ready is still reported
    as invalid rather than silently mixing catch-up reads into live-delivery latency.
    """
    addr, watchers, k = args["addr"], int(args["watchers"]), int(args["events"])
    timeout_s = float(args["timeout_s"])
    channels = _channels(addr, max(1, -(-watchers // STREAMS_PER_CHANNEL)))
    # Cross-replica mode: runs are created (and executed) on another replica than the watchers'.
    control = grpc.aio.insecure_channel(
        args.get("create_addr") or addr, options=[("grpc.max_send_message_length", 64 << 20)]
    )
    model = await _GatedModel.start()
    all_ready = model.gate
    try:
        stub = pb_grpc.EvalRunServiceStub(control)
        target = (await stub.CreateRun(model_run_request(k, model.base_url), timeout=30, metadata=MD)).run.id
        started = time.time()
        ready = 0
        ready_at = 0.0
        latencies: list[float] = []
        commit_times: list[float] = []
        complete = 0

        async def watcher(i: int) -> None:
            nonlocal ready, ready_at, complete
            wstub = pb_grpc.EvalRunServiceStub(channels[i % len(channels)])
            first = True
            async for event in wstub.WatchRun(pb.WatchRunRequest(run_id=target), timeout=timeout_s, metadata=MD):
                now = time.time()
                if first:
                    first = False
                    ready += 1
                    if ready == watchers:
                        ready_at = now
                        all_ready.set()
                if event.HasField("result"):
                    committed = _seconds(event.event_time)
                    latencies.append((now - committed) * 1000)
                    if i == 0:
                        commit_times.append(committed)
                elif event.HasField("run") and event.run.status in TERMINAL:
                    complete += 1
                    return

        tasks = [asyncio.create_task(watcher(i)) for i in range(watchers)]
        finished = await _gather_bounded(tasks, timeout_s)
    finally:
        await asyncio.gather(*(c.close() for c in channels), control.close())
        await model.close()
    early = sum(1 for t in commit_times if t < ready_at) if ready_at else len(commit_times)
    return {
        "watchers": watchers,
        "ready": ready,
        "complete": complete,
        "finished": finished,
        "connect_s": (ready_at - started) if ready_at else None,
        "events_per_watcher": len(commit_times),
        "early_results": early,
        "valid": finished and ready == watchers and early == 0 and bool(commit_times),
        "latency_ms": _subsample(latencies),
    }


async def fanout_bare(args: dict[str, Any]) -> dict[str, Any]:
    """W bare subscribers; one burst of K stamped messages; latency from stamp to arrival."""
    addr, watchers, k = args["addr"], int(args["watchers"]), int(args["events"])
    timeout_s, size = float(args["timeout_s"]), int(args.get("message_bytes", 200))
    channels = _channels(addr, max(1, -(-watchers // STREAMS_PER_CHANNEL)))
    control = grpc.aio.insecure_channel(addr)
    try:
        ready = 0
        all_ready = asyncio.Event()
        latencies: list[float] = []
        complete = 0
        started = time.time()
        ready_at = 0.0

        async def subscriber(i: int) -> None:
            nonlocal ready, complete, ready_at
            subscribe = channels[i % len(channels)].unary_stream(echo_server.SUBSCRIBE)
            received = 0
            async for message in subscribe(b"", timeout=timeout_s, metadata=MD):
                now = time.time()
                if message == echo_server.HELLO:
                    ready += 1
                    if ready == watchers:
                        ready_at = now
                        all_ready.set()
                    continue
                stamp, _ = echo_server.STAMP.unpack(message[: echo_server.STAMP.size])
                latencies.append((now - stamp) * 1000)
                received += 1
                if received == k:
                    complete += 1
                    return

        tasks = [asyncio.create_task(subscriber(i)) for i in range(watchers)]
        await asyncio.wait_for(all_ready.wait(), timeout_s)
        await asyncio.sleep(0.2)  # let the last subscribers settle into their wait, as evalsvc's watchers have
        broadcast = control.unary_unary(echo_server.BROADCAST)
        reply = await broadcast(echo_server.BROADCAST_REQUEST.pack(k, size), timeout=timeout_s, metadata=MD)
        subscribers, dropped = struct.unpack("<II", reply)
        finished = await _gather_bounded(tasks, timeout_s)
    finally:
        await asyncio.gather(*(c.close() for c in channels), control.close())
    return {
        "watchers": watchers,
        "ready": ready,
        "complete": complete,
        "finished": finished,
        "subscribers": subscribers,
        "dropped": dropped,
        "connect_s": ready_at - started,
        "valid": finished and dropped == 0,
        "latency_ms": _subsample(latencies),
    }


# --------------------------------------------------------------------------------------------- idle


async def idle(args: dict[str, Any]) -> dict[str, Any]:
    """Open N idle streams and hold them while the parent reads the server's memory.

    Two phases, each acknowledged on stdout and released by a line on stdin: first a few warm-up
    streams (so one-off costs such as the first connection's buffers are in the "before" figure),
    then the N measured streams. A stream counts as open once its first message arrived.
    """
    addr, kind, n = args["addr"], args["kind"], int(args["streams"])
    warm, timeout_s = int(args.get("warm_streams", 10)), float(args["timeout_s"])
    channels = _channels(addr, max(1, -(-(n + warm) // STREAMS_PER_CHANNEL)))
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    try:
        run_id = ""
        if kind == "evalsvc":
            stub = pb_grpc.EvalRunServiceStub(channels[0])
            run_id = (await stub.CreateRun(small_run_request(1), timeout=30, metadata=MD)).run.id
        opened = 0
        wanted = 0
        reached = asyncio.Event()

        async def stream(i: int) -> None:
            nonlocal opened
            channel = channels[i % len(channels)]
            if kind == "evalsvc":
                calls: Any = pb_grpc.EvalRunServiceStub(channel).WatchRun(
                    pb.WatchRunRequest(run_id=run_id), metadata=MD
                )
            else:
                calls = channel.unary_stream(echo_server.SUBSCRIBE)(b"", metadata=MD)
            first = True
            async for _ in calls:
                if first:
                    first = False
                    opened += 1
                    if opened >= wanted:
                        reached.set()

        async def open_streams(count: int) -> float:
            nonlocal wanted
            wanted += count
            reached.clear()
            started = time.perf_counter()
            tasks.extend(asyncio.create_task(stream(len(tasks) + i)) for i in range(count))
            await asyncio.wait_for(reached.wait(), timeout_s)
            return time.perf_counter() - started

        await open_streams(warm)
        _emit({"ready": True, "phase": "warm"})
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout_s)
        open_s = await open_streams(n)
        _emit({"ready": True, "phase": "open", "open_s": open_s})
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), timeout_s)
        alive = sum(1 for t in tasks if not t.done())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in channels))
    return {"streams": n, "open_s": open_s, "alive_at_end": alive}


async def _loop_lag_buckets(metrics_port: int) -> dict[str, float]:
    """The server's cumulative `evalsvc_event_loop_lag_seconds` buckets (`le` -> count) from /metrics."""
    reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
    writer.write(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    text = (await asyncio.wait_for(reader.read(), 30)).decode()
    writer.close()
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith('evalsvc_event_loop_lag_seconds_bucket{le="'):
            bound = line.split('"', 2)[1]
            buckets[bound] = float(line.rsplit(" ", 1)[1])
    return buckets


def _bucket_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The observations between two reads of a cumulative histogram, bucket by bucket."""
    return {le: after[le] - before.get(le, 0.0) for le in after}


async def pathological(args: dict[str, Any]) -> dict[str, Any]:
    """Tenant B (its own key) reads its run with GetRun in a closed loop, first alone for `duration_s`,
    then for `duration_s` right after tenant A (the server's first key) creates a run of `items` huge
    outputs; A's run is then followed to its end. The loop-lag buckets are read before and after each
    window, so the parent can tell the lag while A's run graded from the lag without it."""
    addr, duration = args["addr"], float(args["duration_s"])
    b_md = (("authorization", f"Bearer {args['b_key']}"),)
    metrics_port = int(args["metrics_port"])
    async with grpc.aio.insecure_channel(addr) as a_channel, grpc.aio.insecure_channel(addr) as b_channel:
        a_stub, b_stub = pb_grpc.EvalRunServiceStub(a_channel), pb_grpc.EvalRunServiceStub(b_channel)
        own = await b_stub.CreateRun(small_run_request(10), metadata=b_md)
        async for _ in b_stub.WatchRun(pb.WatchRunRequest(run_id=own.run.id), timeout=60, metadata=b_md):
            pass
        get_request = pb.GetRunRequest(run_id=own.run.id)

        def get() -> Awaitable[Any]:
            return cast(Awaitable[Any], b_stub.GetRun(get_request, metadata=b_md))

        def measure() -> Coroutine[Any, Any, dict[str, Any]]:
            return closed_loop(get, int(args["concurrency"]), duration, 1_000_000, 0.2, grpc.aio.AioRpcError)

        before_alone = await _loop_lag_buckets(metrics_port)
        alone = await measure()
        before_run = await _loop_lag_buckets(metrics_port)
        request = pathological_run_request(int(args["items"]), int(args["numbers"]))
        started = time.perf_counter()
        created = await a_stub.CreateRun(request, metadata=MD, timeout=120)
        during = await measure()
        status = run_pb2.RUN_STATUS_UNSPECIFIED
        async for event in a_stub.WatchRun(
            pb.WatchRunRequest(run_id=created.run.id), timeout=float(args["run_timeout_s"]), metadata=MD
        ):
            if event.HasField("run"):
                status = event.run.status
        run_s = time.perf_counter() - started
        after_run = await _loop_lag_buckets(metrics_port)
    return {
        "alone": alone,
        "during": during,
        "run_s": run_s,
        "run_status": run_pb2.RunStatus.Name(status),
        "overlapped": run_s > during["elapsed_s"],
        "lag_alone": _bucket_delta(before_alone, before_run),
        "lag_during": _bucket_delta(before_run, after_run),
    }


MODES: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
    "unary": unary,
    "http": http,
    "large": large,
    "stream_bare": stream_bare,
    "fanout_evalsvc": fanout_evalsvc,
    "fanout_bare": fanout_bare,
    "idle": idle,
    "pathological": pathological,
    "cached": cached,
}


def main() -> None:
    """Run the mode named in the JSON argument and print its result as the last JSON line."""
    global MD
    args = json.loads(sys.argv[1])
    if args.get("api_key"):
        MD = (("authorization", f"Bearer {args['api_key']}"),)
    _emit(asyncio.run(MODES[args["mode"]](args)))


if __name__ == "__main__":
    main()
