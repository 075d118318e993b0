"""Processes under test and load generators, each in its own OS process.

The server under test never shares a process (or a GIL, or an event loop) with the client that loads
it: on a 2-core machine an in-process client would steal the server's CPU and hide its real
ceiling. Servers log to a file rather than a pipe, so a chatty server can never block on a full pipe
while we are busy measuring; we find the listening address by polling that file.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TMP = ROOT / "bench" / "results" / "tmp"

EVALSVC_LISTENING = re.compile(r"evalsvc listening on (\S+):(\d+)")
API_KEY = re.compile(r"\bevk_[a-z2-7]{12}_[A-Za-z0-9]{38}\b")

# The server can come from another checkout (say, a commit to compare with): BENCH_EVALSVC_SRC names
# its root. The server process runs with that root as its working directory, which `python -m` puts
# first on sys.path, ahead of the editable install of this one.
EVALSVC_SRC = Path(os.environ.get("BENCH_EVALSVC_SRC") or ROOT).resolve()

# Limits that protect a shared deployment would measure the limiter rather than the server: raise
# them for the benchmark, where the serve command has them.
UNLIMITED = {
    "--create-run-rate": "1000000",
    "--create-run-burst": "1000000",
    "--max-active-runs": "1000000",
    "--max-watch-streams": "1000000",
    "--max-concurrent-rpcs": "1000000",
}
ECHO_LISTENING = re.compile(r"bench echo listening on (\S+):(\d+)")
HTTP_ECHO_LISTENING = re.compile(r"bench http echo listening on (\S+):(\d+)")
GATEWAY_LISTENING = re.compile(r"REST gateway listening on (?:https?://)?(\S+):(\d+)")  # the log names the scheme


def child_env(first: Path = ROOT) -> dict[str, str]:
    """The environment for children: the repo importable, and no buffering so logs appear at once."""
    env = dict(os.environ)
    paths = dict.fromkeys([str(first), str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def read_status_kib(pid: int, field: str) -> int:
    """A `/proc/PID/status` memory field (VmRSS, VmHWM) in KiB; 0 when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


class ServerProcess:
    """A server subprocess that announces its address on stderr; a context manager that always stops it."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        listening: re.Pattern[str],
        log_path: Path,
        cwd: Path = ROOT,
        before: list[list[str]] | None = None,
        expect_key: bool = False,
    ) -> None:
        self.name = name
        # A server that mints an API key on first start prints it just after it starts listening.
        self.expect_key = expect_key
        self.before = before or []
        self.argv = argv
        self.listening = listening
        self.log_path = log_path
        self.cwd = cwd
        self.addr = ""
        self.api_key = os.environ.get("BENCH_API_KEY", "")
        self._proc: subprocess.Popen[bytes] | None = None

    def target(self) -> dict[str, str]:
        """What a load generator needs to call this server: address and API key (if it has auth)."""
        return {"addr": self.addr, "api_key": self.api_key}

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self._proc is not None, "server not started"
        return self._proc.pid

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the process and wait for its listening line; returns HOST:PORT."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        for argv in self.before:
            done = subprocess.run(argv, capture_output=True, cwd=self.cwd, env=child_env(self.cwd), timeout=120)
            if done.returncode != 0:
                tail = (done.stderr + done.stdout).decode(errors="replace").strip()[-1500:]
                raise RuntimeError(f"{' '.join(argv[2:4])} failed (exit {done.returncode}): {tail}")
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=child_env(self.cwd),
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            match = self.listening.search(text)
            key = API_KEY.search(text)
            if match and (key or not self.expect_key or self.api_key):
                self.addr = f"{match.group(1)}:{match.group(2)}"
                if key and not self.api_key:
                    self.api_key = key.group(0)  # the key a first start mints for tenant "default"
                return self.addr
            if self._proc.poll() is not None:
                break
            time.sleep(0.02)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        code = self._proc.poll()
        self.stop()
        why = f"exited with code {code}" if code is not None else f"did not start listening within {timeout_s:.0f} s"
        raise RuntimeError(f"{self.name} {why}:\n{tail}")

    def rss_kib(self) -> int:
        """Resident memory now."""
        return read_status_kib(self.pid, "VmRSS")

    def hwm_kib(self) -> int:
        """Peak resident memory over the process's life (why each large-run repetition gets a fresh server)."""
        return read_status_kib(self.pid, "VmHWM")

    def log_tail(self, chars: int = 2000) -> str:
        """The end of the server's log, for error reports."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@functools.cache
def _help(*command: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "evalsvc", *command, "--help"],
        capture_output=True,
        cwd=EVALSVC_SRC,
        env=child_env(EVALSVC_SRC),
        timeout=60,
        check=False,
    )
    return done.stdout.decode(errors="replace")


def serve_flags() -> frozenset[str]:
    """The flags `evalsvc serve` accepts, so the suite works across versions that add or drop some."""
    return frozenset(re.findall(r"--[a-z][a-z0-9-]+", _help("serve")))


def has_migrate() -> bool:
    """True when this evalsvc has `evalsvc migrate` (a schema must then be migrated before serving)."""
    return bool(re.search(r"\bmigrate\b", _help()))


def evalsvc_server(db_url: str, log_name: str, *extra: str) -> ServerProcess:
    """`python -m evalsvc serve` on a free loopback port, with extra flags (e.g. `--workers 0`).

    Per-tenant rate and concurrency limits, where the server has them, are raised out of the way.
    """
    flags = serve_flags()
    limits = [arg for flag, value in UNLIMITED.items() if flag in flags and flag not in extra for arg in (flag, value)]
    argv = [sys.executable, "-m", "evalsvc", "serve", "--grpc-addr", "127.0.0.1:0", "--db", db_url, *limits, *extra]
    # Deployments run `evalsvc migrate` once before starting servers; so does the benchmark.
    before = [[sys.executable, "-m", "evalsvc", "migrate", "--db", db_url]] if has_migrate() else []
    return ServerProcess(
        "evalsvc",
        argv,
        EVALSVC_LISTENING,
        TMP / f"{log_name}.log",
        cwd=EVALSVC_SRC,
        before=before,
        expect_key="--bootstrap-key" in flags and "--bootstrap-key" not in extra,
    )


def echo_server(log_name: str) -> ServerProcess:
    """The bare grpc.aio baseline server (bench/echo_server.py) on a free loopback port."""
    argv = [sys.executable, "-m", "bench.echo_server", "--addr", "127.0.0.1:0"]
    return ServerProcess("bare echo", argv, ECHO_LISTENING, TMP / f"{log_name}.log")


def http_echo_server(log_name: str) -> ServerProcess:
    """The bare FastAPI/uvicorn baseline (bench/http_echo.py) on a free loopback port."""
    argv = [sys.executable, "-m", "bench.http_echo", "--addr", "127.0.0.1:0"]
    return ServerProcess("bare http echo", argv, HTTP_ECHO_LISTENING, TMP / f"{log_name}.log")


def gateway_addr(server: ServerProcess) -> str:
    """HOST:PORT of the REST gateway a running evalsvc server (started with --http-addr) logged."""
    match = GATEWAY_LISTENING.search(server.log_path.read_text(errors="replace"))
    if match is None:
        raise RuntimeError("the evalsvc server did not log its REST gateway's address")
    return f"{match.group(1)}:{match.group(2)}"


def wrk(wrk_path: str, url: str, api_key: str, connections: int, duration_s: float) -> dict[str, Any]:
    """Closed-loop GETs of `url` by wrk (one thread, `connections` in flight): requests/s and p99 ms."""
    argv = [wrk_path, "-t1", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--latency", url]
    if api_key:
        argv[1:1] = ["-H", f"authorization: Bearer {api_key}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\b", out, re.MULTILINE)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if rps is None or p99 is None or errors:
        raise RuntimeError(f"wrk failed or saw errors:\n{out[-1500:]}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {"rps": float(rps.group(1)), "p99_ms": float(p99.group(1)) * scale}


def finished_run_over_http(gateway: str, api_key: str) -> str:
    """Create a small run through the gateway, wait (NDJSON watch) for its end, and return its id."""
    import httpx

    body = {
        "items": [{"id": str(i), "input": "q", "expectedOutput": "a", "response": {"content": "a"}} for i in range(10)],
        "target": {"provided": {}},
        "graders": [{"name": "exact", "exactMatch": {}}],
    }
    headers = {"authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=f"http://{gateway}", headers=headers, timeout=60) as client:
        created = client.post("/v1/runs", json=body)
        created.raise_for_status()
        run_id: str = created.json()["run"]["id"]
        with client.stream("GET", f"/v1/runs/{run_id}:watch", headers={"accept": "application/x-ndjson"}) as events:
            for _ in events.iter_lines():
                pass  # the stream ends after the terminal event
    return run_id


def sqlite_url(name: str) -> str:
    """A fresh SQLite database file under bench/results/tmp (removed first if a previous run left it)."""
    TMP.mkdir(parents=True, exist_ok=True)
    path = TMP / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return f"sqlite+aiosqlite:///{path}"


def run_child(module: str, args: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run `python -m MODULE JSON` to completion and return the JSON object it prints last on stdout.

    Used for load generators and database ceilings: one fresh process per measurement, killed if it
    outlives `timeout_s`, so no loop in the suite can run unbounded.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, json.dumps(args)],
            capture_output=True,
            cwd=ROOT,
            env=child_env(),
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{module} {args.get('mode', '')} exceeded {timeout_s:.0f} s") from exc
    lines = [line for line in done.stdout.decode(errors="replace").splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        err = done.stderr.decode(errors="replace")[-3000:]
        raise RuntimeError(f"{module} {args.get('mode', '')} failed (exit {done.returncode}):\n{err}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class InteractiveChild:
    """A load generator that holds state open (idle streams) until told to finish.

    Protocol: the child prints a JSON line with `"ready": true` when its streams are open, then waits for
    a line on stdin and prints its final JSON line. This lets the parent read the server's memory
    while the streams are open and idle, without the child doing anything in between.
    """

    def __init__(self, module: str, args: dict[str, Any]) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=child_env(),
        )

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        """Block until the child reports ready (or fail after timeout_s)."""
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                    break
                line = self._proc.stdout.readline().decode(errors="replace")
                if not line:
                    break
                if line.startswith("{"):
                    parsed: dict[str, Any] = json.loads(line)
                    if parsed.get("ready"):
                        return parsed
        self.kill()
        err = self._proc.stderr.read().decode(errors="replace")[-3000:] if self._proc.stderr else ""
        raise RuntimeError(f"load generator not ready within {timeout_s:.0f} s:\n{err}")

    def proceed(self) -> None:
        """Release the child from its current phase (it then works towards its next ready line)."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(b"next\n")
        self._proc.stdin.flush()

    def finish(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Tell the child to close its streams and return its final JSON."""
        try:
            out, err = self._proc.communicate(b"next\n", timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        lines = [line for line in out.decode(errors="replace").splitlines() if line.startswith("{")]
        if self._proc.returncode != 0 or not lines:
            raise RuntimeError(f"load generator failed: {err.decode(errors='replace')[-3000:]}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    def kill(self) -> None:
        """Stop the child now (used on errors)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5)
