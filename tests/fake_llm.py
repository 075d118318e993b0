"""A real HTTP server on 127.0.0.1 standing in for OpenAI-compatible endpoints and agent webhooks.

Replies are scripted: each request takes the next scripted reply (the last one repeats), which can
be a status, headers, a JSON or raw body, and a delay. Every request is recorded with its arrival
time, so tests can check bodies, headers, retries and backoff.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer."""

    body: Any = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw: str | None = None
    gate: threading.Event | None = None  # when set, the answer waits for it (a call held in flight)
    drip_s: float = 0.0  # when set, the body is sent a byte at a time, this long apart (a dripping endpoint)


@dataclass
class Seen:
    """One received request."""

    path: str
    headers: dict[str, str]
    body: Any
    at: float
    raw: bytes = b""  # the body as sent (what a signature covers)


def chat_reply(
    content: str, *, tool_calls: list[dict[str, Any]] | None = None, usage: tuple[int, int] = (10, 5)
) -> Reply:
    """A Chat Completions answer."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [
            {"id": f"c{i}", "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["args"])}}
            for i, c in enumerate(tool_calls)
        ]
    return Reply(
        {
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
        }
    )


def judge_reply(verdict: dict[str, Any] | str, usage: tuple[int, int] = (100, 20)) -> Reply:
    """A judge answer whose message content is the verdict (JSON, or raw text when a str)."""
    content = verdict if isinstance(verdict, str) else json.dumps(verdict)
    return chat_reply(content, usage=usage)


class FakeEndpoint:
    """The server; use as a context manager."""

    def __init__(self, *replies: Reply) -> None:
        self.script: list[Reply] = list(replies) or [chat_reply("ok")]
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                with fake._lock:
                    fake.seen.append(
                        Seen(
                            self.path,
                            {k.lower(): v for k, v in self.headers.items()},
                            json.loads(raw or b"null"),
                            time.monotonic(),
                            raw,
                        )
                    )
                    fake._arrived.notify_all()
                    reply = fake.script.pop(0) if len(fake.script) > 1 else fake.script[0]
                if reply.gate is not None:
                    reply.gate.wait(60)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                data = (reply.raw if reply.raw is not None else json.dumps(reply.body)).encode()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    if not reply.drip_s:
                        self.wfile.write(data)
                    for byte in data if reply.drip_s else b"":
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(reply.drip_s)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): that is what some tests want

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def wait_seen(self, count: int, timeout: float) -> bool:
        """Block until `count` requests have arrived (False when `timeout` seconds pass first); call it
        through asyncio.to_thread from a test's event loop."""
        with self._arrived:
            return self._arrived.wait_for(lambda: len(self.seen) >= count, timeout)

    def __enter__(self) -> FakeEndpoint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


GENERATOR_SYSTEM = "You write test inputs"  # how evalsvc's generator requests begin (evalsvc.datasets.generation)


def is_generation(body: Any) -> bool:
    """Whether a Chat Completions request is evalsvc's generator asking for dataset items."""
    return isinstance(body, dict) and str(body["messages"][0]["content"]).startswith(GENERATOR_SYSTEM)


def generator_reply(body: Any, prefix: str = "Generated prompt") -> Reply:
    """A generator answer with as many items as the request asks for (one for a conversation's next
    turn), numbered after the ones it says were already written, so every item of a generation is distinct."""
    asked = str(body["messages"][-1]["content"])
    count = asked.split("Write ", 1)[1].split(" ", 1)[0]
    wanted = int(count) if count.isdigit() else 1
    already = asked.count(prefix)
    return chat_reply(json.dumps({"items": [f"{prefix} {already + i + 1}" for i in range(wanted)]}))


@contextlib.contextmanager
def held_generator() -> Iterator[tuple[FakeEndpoint, threading.Event]]:
    """A generator endpoint whose every answer (one next turn) waits until the event is set, so that its
    callers' calls stay in flight; set when the block ends at the latest, so no request thread is left."""
    gate = threading.Event()
    with FakeEndpoint(dataclasses.replace(chat_reply(json.dumps({"items": ["next"]})), gate=gate)) as fake:
        try:
            yield fake, gate
        finally:
            gate.set()
