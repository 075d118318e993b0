"""Server subprocesses for tests that kill, stop or signal them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LISTENING = re.compile(r"evalsvc listening on [^ ]+:(\d+)")
HTTP_LISTENING = re.compile(r"REST gateway listening on https?://[^ ]+:(\d+)")
KEY_LINE = re.compile(r"^(evk_\S+)$", re.MULTILINE)


def free_port() -> int:
    """A port nothing listens on now, for a server that must come back on the same one after a restart."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`evalsvc serve` in a child process, with its log in a file."""

    def __init__(self, db_url: str, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115  (closed in wait())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evalsvc", "serve", "--grpc-addr", "127.0.0.1:0", "--db", db_url, *extra],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.port = self._await_port()

    def _await_port(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.findall(self.log_path.read_text(errors="replace"))
            if found:
                return int(found[-1])
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
            time.sleep(0.05)  # polling a log file: there is no event to await across processes
        raise TimeoutError(f"server did not start:\n{self.log_path.read_text()}")

    def bootstrap_key(self, timeout: float = 30.0) -> str | None:
        """The key a first start printed, if this process printed one. A start logs that it listens
        before it mints the key (the last step that can fail), then prints either the key or how to
        make one: this waits for that line, rather than reading the log once (which raced the mint)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_path.read_text(errors="replace")
            found = KEY_LINE.findall(text)
            if found:
                return found[-1]
            if "API keys: " in text or self.proc.poll() is not None or time.monotonic() > deadline:
                return None
            time.sleep(0.05)  # polling a log file: there is no event to await across processes

    def http_port(self) -> int:
        """The REST gateway's port (a server started with --http-addr), from its start's log line."""
        found = HTTP_LISTENING.findall(self.log_path.read_text(errors="replace"))
        assert found, f"no REST gateway in the log:\n{self.log_path.read_text()}"
        return int(found[-1])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """kill -9: no cleanup of any kind."""
        self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def terminate(self) -> int:
        """SIGTERM and wait for a clean exit."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._log.close()
        return code


async def start_server(db_url: str, log_path: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """A ServerProcess started off the event loop (its start polls a log file), so the loop's other
    tasks keep running meanwhile; if the caller is cancelled during the start, the process is
    killed once up rather than left running after the test."""
    starting = asyncio.ensure_future(asyncio.to_thread(ServerProcess, db_url, log_path, *extra, env=env))
    try:
        return await asyncio.shield(starting)
    except asyncio.CancelledError:
        (await starting).kill()
        raise


@dataclass(frozen=True)
class FailedStart:
    """An `evalsvc serve` that exited on its own: its exit code, everything it wrote, how long it ran."""

    code: int
    output: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        """Lines at error level: evalsvc's own (text log format) and grpc core's (`E1203 12:00:00...`)."""
        return [line for line in self.output.splitlines() if " ERROR " in line or GRPC_CORE_ERROR.match(line)]


GRPC_CORE_ERROR = re.compile(r"^E\d{4} ")

# Python's start and evalsvc's imports take a second or two on a quiet machine; the bound leaves
# room for a busy one. What it guards against is a server that never exits.
QUICK_S = 15.0


def assert_failed_cleanly(failed: FailedStart, code: int, *named: str) -> str:
    """Exit code `code` within QUICK_S, exactly one error line naming each of `named`, no traceback."""
    assert failed.code == code, failed.output
    assert failed.seconds < QUICK_S, failed.output
    assert len(failed.error_lines) == 1, failed.output
    line = failed.error_lines[0]
    for part in named:
        assert part in line, failed.output
    assert "Traceback" not in failed.output
    assert "evalsvc stopped" not in failed.output  # it never started: the error line is all it says
    assert "evk_" not in failed.output  # no key minted by a start that failed
    return line


def failed_start(
    db_url: str, *extra: str, timeout: float = 60.0, environ: Mapping[str, str] | None = None
) -> FailedStart:
    """Run `evalsvc serve` (with `environ` added to the environment) expecting it not to start;
    TimeoutExpired (the test fails) if it hangs."""
    return _failed(["serve", "--grpc-addr", "127.0.0.1:0", "--db", db_url, *extra], timeout, environ)


def failed_gateway(*extra: str, timeout: float = 60.0, environ: Mapping[str, str] | None = None) -> FailedStart:
    """Run the standalone `evalsvc gateway` (on a free port, unless `extra` says otherwise) expecting it
    not to start; TimeoutExpired (the test fails) if it hangs."""
    return _failed(["gateway", "--http-addr", "127.0.0.1:0", *extra], timeout, environ)


def _failed(command: list[str], timeout: float, environ: Mapping[str, str] | None) -> FailedStart:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "evalsvc", *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(environ or {})},
    )
    return FailedStart(done.returncode, done.stdout + done.stderr, time.monotonic() - started)
