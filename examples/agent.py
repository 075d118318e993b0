"""A small example agent behind a webhook, for `examples/webhook-agent.yaml` (an `http` target).

    python examples/agent.py [--port 8765] [--delay-s 0]

evalsvc POSTs `{"item": {"id", "input", "context", "conversation", "metadata"}}` for every evaluation and reads
back `{"content", "tool_calls", "cost_usd", "refused"}` (docs/targets.md). This agent answers capital-city and
arithmetic questions, reporting the tool it used as a tool call, and refuses anything else. `--delay-s` makes
each answer take that long, to watch a run progress at human speed (the live run page, /ui/runs/RUN_ID).
Standard library only, listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

CAPITALS = {"france": "Paris", "spain": "Madrid", "italy": "Rome", "japan": "Tokyo", "peru": "Lima"}
ARITHMETIC = re.compile(r"(-?\d+)\s*([-+*])\s*(-?\d+)")


def answer(question: str) -> dict[str, Any]:
    """The agent's reply to one question: its answer and the tool call that produced it."""
    for country, capital in CAPITALS.items():
        if country in question.lower():
            return {"content": capital, "tool_calls": [{"name": "lookup_capital", "arguments": {"country": country}}]}
    match = ARITHMETIC.search(question)
    if match:
        left, op, right = int(match[1]), match[2], int(match[3])
        value = {"+": left + right, "-": left - right, "*": left * right}[op]
        return {"content": str(value), "tool_calls": [{"name": "calculator", "arguments": {"expression": match[0]}}]}
    return {"content": "I can only answer questions about capitals and arithmetic.", "refused": True}


class AgentHandler(BaseHTTPRequestHandler):
    delay_s = 0.0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        try:
            item = json.loads(self.rfile.read(length))["item"]
        except (ValueError, KeyError, TypeError):
            self._reply(400, {"error": 'expected a JSON body {"item": {"input": ...}}'})
            return
        time.sleep(self.delay_s)  # a thread per request (ThreadingHTTPServer): others are not held up
        self._reply(200, answer(str(item.get("input", ""))))

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: evalsvc records every call; one line per request here would drown the terminal."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0 picks one)")
    parser.add_argument("--delay-s", type=float, default=0.0, help="seconds each answer takes")
    args = parser.parse_args()
    AgentHandler.delay_s = args.delay_s
    server = ThreadingHTTPServer(("127.0.0.1", args.port), AgentHandler)
    print(f"example agent listening on http://127.0.0.1:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
