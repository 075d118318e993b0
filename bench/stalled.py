"""Server memory per stalled watcher: WatchRun streams that never read while a run produces events.

    .venv/bin/python -m bench.stalled --streams 500 --items 4000

Starts a real server process, warms it up with one run of the same size, then opens N WatchRun
streams whose client never reads, over HTTP/2 connections with a tiny window (so the server cannot
push past it), creates a run of `--items` items x 2 graders that every stream watches, waits for
its end (one reading watcher), and reports the server's RSS growth per stalled stream. Then it
closes the stalled streams and reports what the server gave back, and opens a second round to show
that the memory is reused rather than grown again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import grpc

from bench import procs
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc as pb_grpc
from evalsvc.v1 import grader_pb2, item_pb2, target_pb2

STREAMS_PER_CONNECTION = 200
# A client window of 1 KiB: the server can put at most that much of a stream on the wire.
STALLED_OPTIONS = [
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1024),
    ("grpc.use_local_subchannel_pool", 1),
]


def run_request(items: int) -> pb.CreateRunRequest:
    return pb.CreateRunRequest(
        items=[
            item_pb2.Item(id=str(i), input="q", expected_output="a", response=item_pb2.Response(content="a"))
            for i in range(items)
        ],
        target=target_pb2.Target(provided=target_pb2.ProvidedTarget()),
        graders=[
            grader_pb2.Grader(name="exact", exact_match=grader_pb2.ExactMatch()),
            grader_pb2.Grader(name="contains", contains=grader_pb2.Contains(values=["a"])),
        ],
    )


async def _run_to_end(stub: pb_grpc.EvalRunServiceStub, items: int, metadata: Any) -> str:
    run_id = (await stub.CreateRun(run_request(items), metadata=metadata, timeout=120)).run.id
    async for _ in stub.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=metadata, timeout=600):
        pass
    return run_id


async def _settle(server: procs.ServerProcess) -> int:
    """The server's RSS once it stopped moving (sampled until two readings 1 s apart agree within 1%)."""
    last = server.rss_kib()
    for _ in range(30):
        await asyncio.sleep(1.0)
        now = server.rss_kib()
        if abs(now - last) <= max(256, last // 100):
            return now
        last = now
    return last


async def stalled_round(
    server: procs.ServerProcess,
    stub: pb_grpc.EvalRunServiceStub,
    streams: int,
    items: int,
    metadata: Any,
    batched: bool,
) -> dict[str, float]:
    before = await _settle(server)
    channels = [
        grpc.aio.insecure_channel(server.addr, options=[*STALLED_OPTIONS, ("bench.stalled", i)])
        for i in range(-(-streams // STREAMS_PER_CONNECTION))
    ]
    run_id = (await stub.CreateRun(run_request(items), metadata=metadata, timeout=120)).run.id
    stubs = [pb_grpc.EvalRunServiceStub(channels[i % len(channels)]) for i in range(streams)]
    calls: list[Any] = [
        stub.WatchRunBatched(pb.WatchRunBatchedRequest(run_id=run_id), metadata=metadata)
        if batched
        else stub.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=metadata)
        for stub in stubs
    ]
    await asyncio.gather(*(call.initial_metadata() for call in calls))  # open, never read
    started = time.monotonic()
    async for _ in stub.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=metadata, timeout=600):
        pass
    run_s = time.monotonic() - started
    stalled = await _settle(server)
    for call in calls:
        call.cancel()
    await asyncio.gather(*(channel.close() for channel in channels))
    closed = await _settle(server)
    return {
        "rss_before_mib": before / 1024,
        "rss_stalled_mib": stalled / 1024,
        "rss_closed_mib": closed / 1024,
        "kib_per_stalled_stream": (stalled - before) / streams,
        "run_s": run_s,
    }


async def main(streams: int, items: int, rounds: int, batched: bool, extra: list[str]) -> dict[str, Any]:
    with procs.evalsvc_server(procs.sqlite_url("stalled"), "stalled", *extra) as server:
        metadata = (("authorization", f"Bearer {server.api_key}"),)
        async with grpc.aio.insecure_channel(server.addr) as channel:
            stub = pb_grpc.EvalRunServiceStub(channel)
            await _run_to_end(stub, items, metadata)  # warm-up: caches, pools, arenas
            results = [await stalled_round(server, stub, streams, items, metadata, batched) for _ in range(rounds)]
    rpc = "WatchRunBatched" if batched else "WatchRun"
    return {"rpc": rpc, "streams": streams, "items": items, "events_per_run": items * 2 + 3, "rounds": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batched", action="store_true", help="WatchRunBatched streams instead of WatchRun")
    parser.add_argument("server_flags", nargs="*", help="extra `evalsvc serve` flags (after --)")
    args = parser.parse_args()
    print(
        json.dumps(asyncio.run(main(args.streams, args.items, args.rounds, args.batched, args.server_flags)), indent=2)
    )
