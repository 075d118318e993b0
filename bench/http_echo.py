"""The bare HTTP baseline for the REST gateway: FastAPI on uvicorn, same versions, no gRPC hop.

`GET /echo/{run_id}` answers a small JSON body at once, so it measures what this framework, server,
Python and machine do per request with no service behind them; the gateway's `GET /v1/runs/{id}`
(a translation to GetRun and back) is compared with it.

`POST /v1/chat/completions` is the model stand-in of the cached scenario: an OpenAI-compatible reply
whose content is the last message's, at once.

Run: `python -m bench.http_echo --addr 127.0.0.1:0`; logs "bench http echo listening on HOST:PORT".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI

app = FastAPI()


@app.get("/echo/{run_id}")
async def echo(run_id: str) -> dict[str, Any]:
    return {"run": {"id": run_id, "status": "RUN_STATUS_SUCCEEDED"}}


@app.post("/v1/chat/completions")
async def chat(body: dict[str, Any]) -> dict[str, Any]:
    content = body["messages"][-1]["content"]
    return {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 10},
    }


async def serve(addr: str) -> None:
    host, _, port = addr.rpartition(":")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=int(port), log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    print(f"bench http echo listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="127.0.0.1:0")
    asyncio.run(serve(parser.parse_args().addr))


if __name__ == "__main__":
    main()
