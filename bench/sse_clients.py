"""Many SSE watchers through the REST gateway, with REST calls beside them.

    .venv/bin/python -m bench.sse_clients --clients 1200

Starts a real server process with its gateway, opens N SSE watches of one run (each its own HTTP
connection; the run stays PENDING, `--workers 0`, so the streams stay open), waits for every
watch's first event, then times REST GETs while they are open, and reports the server's open file
descriptors (one per HTTP connection, plus the gateway's upstream gRPC connections and the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import httpx

from bench import procs

RUN = {"items": [{"input": "q", "expectedOutput": "a"}], "target": {"echo": {}}, "graders": [{"exactMatch": {}}]}


async def first_event(client: httpx.AsyncClient, url: str, opened: list[tuple[httpx.Response, Any]]) -> None:
    response = await client.send(client.build_request("GET", url), stream=True)
    lines = response.aiter_lines()
    opened.append((response, lines))  # a dropped line iterator would close the stream when collected
    response.raise_for_status()
    async for line in lines:
        if line.startswith("event:"):
            return
    raise RuntimeError("a watch ended before its first event")


async def main(clients: int) -> dict[str, Any]:
    with procs.evalsvc_server(procs.sqlite_url("sse"), "sse", "--http-addr", "127.0.0.1:0", "--workers", "0") as srv:
        base = f"http://{procs.gateway_addr(srv)}"
        headers = {"authorization": f"Bearer {srv.api_key}"}
        limits = httpx.Limits(max_connections=clients + 50, max_keepalive_connections=clients + 50)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120, limits=limits) as client:
            run_id = (await client.post("/v1/runs", json=RUN)).json()["run"]["id"]
            opened: list[tuple[httpx.Response, Any]] = []
            started = time.monotonic()
            try:
                await asyncio.gather(*(first_event(client, f"/v1/runs/{run_id}:watch", opened) for _ in range(clients)))
                all_open_s = time.monotonic() - started
                latencies = []
                for _ in range(50):
                    t = time.monotonic()
                    (await client.get(f"/v1/runs/{run_id}")).raise_for_status()
                    latencies.append((time.monotonic() - t) * 1000)
                fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
            finally:
                for response, _ in opened:
                    await response.aclose()
    return {
        "clients": clients,
        "all_first_events_s": round(all_open_s, 2),
        "rest_get_ms_median": round(statistics.median(latencies), 1),
        "rest_get_ms_max": round(max(latencies), 1),
        "server_open_fds": fds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1200)
    print(json.dumps(asyncio.run(main(parser.parse_args().clients)), indent=2))
