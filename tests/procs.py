"""Server subprocesses for tests that kill, stop or signal them."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

LISTENING = re.compile(r"evalsvc listening on [^ ]+:(\d+)")
HTTP_LISTENING = re.compile(r"REST gateway listening on https?://[^ ]+:(\d+)")
KEY_LINE = re.compile(r"^(evk_\S+)$", re.MULTILINE)


def free_port() -> int:
    """A port nothing listens on now, for a server that must come back on the same one after a restart."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`evalsvc serve` in a child process, with its log in a file.

    `forked`: the process is a fork of the test forker (_Forks below) rather than a fresh interpreter, which
    saves its imports (~1-2 s a start); it is the same `evalsvc serve` otherwise, signalled and waited for
    through `proc` as a Popen is (ForkedProcess)."""

    def __init__(
        self, db_url: str, log_path: Path, *extra: str, env: dict[str, str] | None = None, forked: bool = False
    ) -> None:
        self.log_path = log_path
        args = ["serve", "--grpc-addr", "127.0.0.1:0", "--db", db_url, *extra]
        environ = {**os.environ, **(env or {})}
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | ForkedProcess
        if forked:
            log_path.touch()  # there before the fork writes to it: _await_port reads it at once
            self.proc = _FORKS.spawn(args, environ, log_path)
        else:
            self._log = open(log_path, "ab")  # noqa: SIM115  (closed in wait())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "evalsvc", *args], stdout=self._log, stderr=subprocess.STDOUT, env=environ
            )
        try:
            self.port = self._await_port()
        except BaseException:
            self.kill()  # not left running after the test (a fork would outlive the forker too)
            raise

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
        if self._log is not None:
            self._log.close()
        return code


async def start_server(
    db_url: str, log_path: Path, *extra: str, env: dict[str, str] | None = None, forked: bool = False
) -> ServerProcess:
    """A ServerProcess started off the event loop (its start polls a log file), so the loop's other
    tasks keep running meanwhile; if the caller is cancelled during the start, the process is
    killed once up rather than left running after the test."""
    starting = asyncio.ensure_future(asyncio.to_thread(ServerProcess, db_url, log_path, *extra, env=env, forked=forked))
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
    done = evalsvc_run(command, {**os.environ, **(environ or {})}, timeout)
    return FailedStart(done.returncode, done.stdout + done.stderr, time.monotonic() - started)


def evalsvc_run(
    args: list[str], environ: Mapping[str, str], timeout: float = 60.0, *, umask: int = -1
) -> subprocess.CompletedProcess[str]:
    """`python -m evalsvc ARGS` with `environ` as its environment, run to its end, its output captured as
    text; TimeoutExpired (the test fails) if it runs past `timeout`. For commands that end on their own
    within seconds (a start that fails, migrate, keys): a server that starts keeps a ServerProcess.
    `umask`: the command's (-1 keeps this process's), as subprocess.run's."""
    return _FORKS.run(args, timeout, environ, umask=umask if umask >= 0 else None)


def evalctl_run(
    args: list[str], environ: Mapping[str, str], timeout: float = 60.0, *, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m evalsvc_client.cli ARGS` (evalctl) as evalsvc_run runs evalsvc, `input` its stdin (else
    /dev/null). For commands that end on their own; one a test signals keeps a subprocess.Popen."""
    return _EVALCTL_FORKS.run(args, timeout, environ, stdin=input)


class _Forks:
    """Runs short `python -m MODULE ARGS` commands (evalsvc; evalctl) as forks of one process that has
    imported the command's modules once (~1-2 s per start of evalsvc otherwise: most of test_startup's
    time went on its hundred starts importing the same modules; ~0.3 s per evalctl command).

    Each run is still its own process, with its own environment, working directory, exit code and
    stdin/stdout/stderr (files, read back), whose `main` parses the command line and starts the server as a
    fresh `evalsvc` would; what it skips is only the imports (they start no thread and not gRPC's
    core, so forking after them is safe: the forker never opens a channel or a server). The forker is
    started on first use, one per test process and program, and ends when that process closes its pipe."""

    def __init__(self, program: str) -> None:
        self._program = program  # a key of PROGRAMS
        self._proc: subprocess.Popen[str] | None = None
        self._turn = threading.Lock()  # one request and its answer at a time (callers may be threads)

    def run(
        self,
        args: list[str],
        timeout: float,
        environ: Mapping[str, str],
        *,
        stdin: str | None = None,
        umask: int | None = None,
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", PROGRAMS[self._program][0], *args]
        with tempfile.TemporaryDirectory(prefix="evalsvc-fork-") as where:
            out, err = Path(where, "stdout"), Path(where, "stderr")
            request: dict[str, Any] = {"argv": args, "env": dict(environ), "cwd": os.getcwd()}
            request.update(out=str(out), err=str(err), timeout=timeout, umask=umask)
            if stdin is not None:
                Path(where, "stdin").write_text(stdin)
                request["in"] = str(Path(where, "stdin"))
            code = self._ask(request)["code"]
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if code is None:
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        return subprocess.CompletedProcess(command, code, stdout, stderr)

    def spawn(self, args: list[str], environ: Mapping[str, str], log_path: Path) -> ForkedProcess:
        """`python -m MODULE ARGS` forked and left running, stdout and stderr appended to `log_path`."""
        request = {"spawn": args, "env": dict(environ), "cwd": os.getcwd(), "log": str(log_path)}
        return ForkedProcess(self, int(self._ask(request)["pid"]))

    def exit_code(self, pid: int) -> int | None:
        """The exit code of spawned fork `pid` once it has exited, else None (waitpid WNOHANG, in the forker)."""
        code = self._ask({"status": pid})["code"]
        return None if code is None else int(code)

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        with self._turn:
            proc = self._started()
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline()
            if not answer:
                what = request.get("argv", request)
                raise RuntimeError(f"the test forker (tests/procs.py) exited ({proc.wait()}) on {what}")
            found: dict[str, Any] = json.loads(answer)
            return found

    def _started(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", f"from tests.procs import serve_forks; serve_forks({self._program!r})"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=Path(__file__).resolve().parents[1],
            )
        return self._proc


# A program's module (what `python -m` runs) and the modules its forker imports once, the first holding `main`.
PROGRAMS = {
    "evalsvc": ("evalsvc", ("evalsvc.cli", "evalsvc.gateway.server", "evalsvc.server")),
    "evalctl": ("evalsvc_client.cli", ("evalsvc_client.cli",)),
}
_FORKS = _Forks("evalsvc")
_EVALCTL_FORKS = _Forks("evalctl")


class ForkedProcess:
    """What ServerProcess uses of a Popen, for a process the forker spawned (its parent is the forker,
    which reaps it and tells its exit code): pid, poll, wait, send_signal, returncode."""

    def __init__(self, forks: _Forks, pid: int) -> None:
        self._forks = forks
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._forks.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["evalsvc", f"(fork {self.pid})"], timeout or 0.0)
            time.sleep(0.01)  # a child of the forker: no event to await here
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # as Popen: no signal to a process already reaped (its pid may be reused)
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def serve_forks(program: str = "evalsvc") -> None:
    """The forker's loop (in its own process): one JSON request per line on stdin, one answer per line
    on stdout: a run's exit code (None if it outlived its timeout and was killed), a spawned fork's pid,
    or a spawned fork's exit code once it has exited (None while it runs)."""
    import importlib

    modules = [importlib.import_module(name) for name in PROGRAMS[program][1]]  # imported once, for every fork
    main = modules[0].main
    if program == "evalsvc":
        from evalsvc.gateway import dialects

        dialects.available()  # the dialect modules every `serve` imports as it starts (~0.4 s a fork otherwise)
    exited: dict[int, int] = {}  # spawned forks reaped, by pid: their exit codes
    for line in sys.stdin:
        request = json.loads(line)
        answer: dict[str, Any]
        if "status" in request:
            pid = request["status"]
            if pid not in exited:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    exited[pid] = os.waitstatus_to_exitcode(status)
            answer = {"code": exited.get(pid)}
        elif "spawn" in request:
            pid = os.fork()
            if pid == 0:
                log = request["log"]
                _be_program({**request, "argv": request["spawn"], "out": log, "err": log, "append": True}, main)
            answer = {"pid": pid}
        else:
            pid = os.fork()
            if pid == 0:
                _be_program(request, main)
            answer = {"code": _reaped(pid, time.monotonic() + request["timeout"])}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def _be_program(request: dict[str, Any], main: Callable[[list[str]], int]) -> NoReturn:
    """In the fork: become `python -m MODULE ARGV` in the request's environment, directory and umask, with
    stdin (else /dev/null), stdout and stderr in its files, and exit as that command would (`sys.exit(main())`)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request.get("umask") is not None:
        os.umask(request["umask"])
    for fd, path, flags in (
        (0, request.get("in") or os.devnull, os.O_RDONLY),
        (1, request["out"], os.O_WRONLY),
        (2, request["err"], os.O_WRONLY),
    ):
        if fd and request.get("append"):
            flags |= os.O_APPEND  # a server's log: both streams into one file, after what it holds
        opened = os.open(path, flags | (os.O_CREAT if fd else 0), 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    # A stdin of its own, as a fresh process has: not the forker's request pipe's reader (and its buffer).
    sys.stdin = open(0, closefd=False, encoding=sys.stdin.encoding, errors=sys.stdin.errors)  # noqa: SIM115
    try:
        code: object = main(request["argv"])
    except SystemExit as exc:
        code = exc.code
    except BaseException:
        traceback.print_exc()  # as the interpreter reports an exception nothing caught
        code = 1
    _exit(code)


def _exit(code: object) -> NoReturn:
    """Exit as `sys.exit(code)` does, less the interpreter's teardown of every module and object the fork
    inherited from the forker, which touched all of its memory: ~0.5 s a fork, more than most failed
    starts took. What a program relies on at exit still happens, in the interpreter's order: a message
    given to sys.exit is printed (status 1), non-daemon threads are joined, atexit functions run (logging's
    flush among them), stdout and stderr are flushed. Whatever fails on the way, the fork exits here: it
    never unwinds into the forker's loop."""
    status = 1
    try:
        if code is None or isinstance(code, int):
            status = code or 0
        else:
            print(code, file=sys.stderr)
        threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter's exit does first
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status & 0xFF)  # as the OS reports a status: its low byte (-1 is 255)


def _reaped(pid: int, deadline: float) -> int | None:
    """The exit code of fork `pid` (as subprocess reports it: -N for a signal), or None once it is
    killed at `deadline`."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)  # a child of another process: no event to await here
