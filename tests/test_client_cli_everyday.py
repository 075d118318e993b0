"""evalctl's everyday edges, as a new user meets them: TLS flags given by halves (grpc aborted the process),
progress without a terminal, --fail-under given as a fraction, a server lost mid-watch, --version."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import grpc
import pytest
from evalsvc_client import AsyncEvalClient, EvalClient, builders, cli, errors, pb
from evalsvc_client._common import TLSOptions
from evalsvc_client.errors import EvalError
from rich.console import Console

from evalsvc.server import EvalServer
from tests.procs import LISTENING, ServerProcess, evalctl_run, evalsvc_run, free_port
from tests.test_client_cli import CLIENT_DIR, _env, evalctl, evalctl_started, live
from tests.test_tls import Pki, pki, tls_server

__all__ = ["live", "pki", "tls_server"]  # the fixtures, imported for the tests below

Live = tuple[ServerProcess, str]
# A run of one item whose response is given: nothing to call out to, nothing for a worker to wait for.
ONE_ITEM_SPEC = "items: [{input: x, expected_output: x, response: x}]\ntarget: provided\ngraders: [{exact_match: {}}]\n"


def one_item_spec(tmp_path: Path) -> str:
    """The path of ONE_ITEM_SPEC, written in `tmp_path`."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(ONE_ITEM_SPEC)
    return str(spec)


def keyed(server: ServerProcess) -> Live:
    """A test's own server with its bootstrap key, as `live` gives the module's."""
    key = server.bootstrap_key()
    assert key
    return server, key


def evalctl_process(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """evalctl as its own process: a crash (grpc's SIGABRT) must not take pytest with it."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CLIENT_DIR), os.environ.get("PYTHONPATH", "")])}
    environ.pop("EVALCTL_TARGET", None)
    return subprocess.run(
        [sys.executable, "-m", "evalsvc_client.cli", *args],
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- TLS flags ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "complaint"),
    [("--client-cert", "--client-cert needs --client-key"), ("--client-key", "--client-key needs --client-cert")],
)
def test_half_a_client_certificate_is_refused_in_one_line_not_a_crash(pki: Pki, flag: str, complaint: str) -> None:
    """With --ca-cert, a certificate without its key (or the key alone) aborted evalctl in grpc (exit 134)."""
    done = evalctl_process("--target", "127.0.0.1:1", "--ca-cert", str(pki.ca_file), flag, str(pki.key_file), "list")
    assert (done.returncode, done.stderr) == (cli.EXIT_ERROR, f"evalctl: {complaint}\n")


def test_a_client_key_alone_is_refused_not_dropped_for_plaintext(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--target", "127.0.0.1:1", "--client-key", str(pki.key_file), "list"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == "evalctl: --client-key needs --client-cert\n"


def test_an_unreadable_ca_cert_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.pem"
    assert cli.main(["--target", "127.0.0.1:1", "--ca-cert", str(missing), "list"]) == cli.EXIT_ERROR
    assert capsys.readouterr().err == f"evalctl: --ca-cert {missing}: cannot read it: No such file or directory\n"


@pytest.mark.parametrize("given", ["private_key", "certificate_chain"])
def test_sdk_tls_options_refuse_half_a_client_certificate(pki: Pki, given: str) -> None:
    """TLSOptions with one of the pair reached grpc, which aborted the process; now a ValueError naming both."""
    with pytest.raises(ValueError, match="private_key and certificate_chain"):
        TLSOptions(root_certificates=pki.ca.cert, **{given: pki.client.key})


# --- progress without a terminal ---------------------------------------------------------------------------------


def _counts(completed: int, total: int) -> pb.WatchRunResponse:
    return pb.WatchRunResponse(
        counts=pb.RunCounts(total_evaluations=total, completed_evaluations=completed, passed=completed)
    )


def test_without_a_terminal_progress_is_a_line_per_tenth(monkeypatch: pytest.MonkeyPatch) -> None:
    """`evalctl run spec.yaml 2>&1 | cat` printed nothing until the summary (13 s of silence for a small run)."""
    clock = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    printed = io.StringIO()
    with cli._Live(Console(file=printed, width=1000), enabled=False, plain=True) as live:
        for completed in range(1, 1001):  # one event per evaluation: 1,000 events, 10 lines
            live.update(_counts(completed, 1000))
    lines = printed.getvalue().splitlines()
    assert len(lines) == 10, lines
    assert lines[0] == "progress: 100/1000 evaluations (10%), pass rate 100.0%, 0 errors, cost $0.0000"
    assert lines[-1].startswith("progress: 1000/1000 evaluations (100%)")


def test_without_a_terminal_a_slow_run_gets_lines_ever_further_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A line each 10 s between tenths was 720 lines for a 2-hour run (the docs said a few dozen): 10 s, then twice
    as long each time up to 5 minutes."""
    clock = [1000.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    printed = io.StringIO()
    with cli._Live(Console(file=printed, width=1000), enabled=False, plain=True) as live:
        for completed in range(1, 100):  # one evaluation of 1,000 every 4 s, short of the first tenth
            clock[0] += 4
            live.update(_counts(completed, 1000))
    assert [line.split(" evaluations")[0] for line in printed.getvalue().splitlines()] == [
        "progress: 3/1000",  # 12 s: 10 s gone
        "progress: 8/1000",  # then 20 s
        "progress: 18/1000",  # 40 s
        "progress: 38/1000",  # 80 s
        "progress: 78/1000",  # 160 s
    ]
    printed.truncate(0)
    printed.seek(0)
    with cli._Live(Console(file=printed, width=1000), enabled=False, plain=True) as live:
        for completed in range(1, 7201):  # one each second for two hours, of 100,000: no tenth crossed
            clock[0] += 1
            live.update(_counts(completed, 100_000))
    assert len(printed.getvalue().splitlines()) == 27  # 5 in 310 s, then one each 5 minutes (720 before)


def test_run_piped_prints_progress_lines(live: Live, tmp_path: Path) -> None:
    (tmp_path / "qa.jsonl").write_text(
        "".join(f'{{"input": "q{i}", "expected_output": "a", "response": "a"}}\n' for i in range(40))
    )
    (tmp_path / "spec.yaml").write_text("dataset: qa.jsonl\ntarget: provided\ngraders: [{exact_match: {}}]\n")
    done = evalctl(live, "run", str(tmp_path / "spec.yaml"))
    assert done.returncode == cli.EXIT_OK, done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("progress: ")]
    assert progress and progress[-1].startswith("progress: 40/40 evaluations (100%), pass rate"), done.stderr
    forced = evalctl_run(["run", str(tmp_path / "spec.yaml")], {**_env(live), "FORCE_COLOR": "1"})
    assert forced.returncode == cli.EXIT_OK, forced.stderr  # FORCE_COLOR (CI): still lines, not the redrawn bar
    uncoloured = re.sub(r"\x1b\[[0-9;]*m", "", forced.stderr)  # the colour FORCE_COLOR asks for
    progress = [line for line in uncoloured.splitlines() if line.startswith("progress: ")]
    assert progress and progress[-1].startswith("progress: 40/40 evaluations (100%), pass rate"), forced.stderr
    quiet = evalctl(live, "run", str(tmp_path / "spec.yaml"), "--no-progress")
    assert quiet.returncode == cli.EXIT_OK and "progress: " not in quiet.stderr, quiet.stderr


# --- --fail-under as a fraction ----------------------------------------------------------------------------------


def test_fail_under_written_as_a_fraction_is_warned_of(live: Live, tmp_path: Path) -> None:
    """`--fail-under 0.9` silently meant 0.9%, where the spec's `pass_threshold: 0.9` got a warning."""
    (tmp_path / "spec.yaml").write_text(
        "items: [{input: q, expected_output: a, response: b}, {input: r, expected_output: a, response: a}]\n"
        "target: provided\ngraders: [{exact_match: {}}]\n"
    )
    done = evalctl(live, "run", str(tmp_path / "spec.yaml"), "--fail-under", "0.9")
    assert done.returncode == cli.EXIT_OK, done.stderr  # 50% reaches 0.9%: a warning, not a refusal
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --fail-under is a percentage: 0.9 means 0.9%; did you mean 90?"], done.stderr
    printed = io.StringIO()
    cli._warn_of_a_fraction(Console(file=printed, width=1000), 1.0)  # the spec's check: above 0 and at most 1
    assert printed.getvalue() == "warning: --fail-under is a percentage: 1 means 1%; did you mean 100?\n"
    whole = evalctl(live, "run", str(tmp_path / "spec.yaml"), "--fail-under", "90")
    assert whole.returncode == cli.EXIT_BELOW and "warning:" not in whole.stderr, whole.stderr


# --- a server lost mid-watch, and SIGTERM -------------------------------------------------------------------------


def test_sigterm_and_a_lost_server_while_following_name_the_run_and_the_resume(tmp_path: Path) -> None:
    """SIGTERM ended evalctl in silence; a server gone mid-watch gave 41 s of silence, then the generic error naming
    neither the run nor the watch that resumes it. No workers: the run stays PENDING."""
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'idle.db'}", tmp_path / "server.log", "--workers", "0")
    server_up = True
    try:
        idle = keyed(server)
        spec = one_item_spec(tmp_path)

        proc = evalctl_started(idle, "run", spec, "--no-progress")
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("created run "), line
        run_id = line.split()[2]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert err.splitlines()[-1] == (  # its only line when the signal came before the watch said anything
            f"evalctl: terminated (SIGTERM); run {run_id} goes on on the server (`evalctl watch {run_id} --after-seq"
            f" 0` follows it from here, `evalctl cancel {run_id}` stops it)"
        ), err

        proc = evalctl_started(idle, "watch", run_id, "--json")
        assert proc.stdout is not None and proc.stderr is not None
        assert int(json.loads(proc.stdout.readline())["seq"]) == 1
        assert server.terminate() == 0
        server_up = False
        reconnecting = proc.stderr.readline()
        assert reconnecting.startswith(f"reconnecting: the watch of run {run_id} lost its stream ("), reconnecting
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert err.endswith(
            f"(`evalctl watch {run_id} --after-seq 1` follows it from here, `evalctl cancel {run_id}` stops it)\n"
        ), err
    finally:
        if server_up:
            assert server.terminate() == 0


def test_a_watch_that_fails_names_the_run_and_the_resume(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The watch's reconnections used up (41 s with the server gone): the error alone, the run unnamed."""
    spec = one_item_spec(tmp_path)
    created = evalctl(live, "run", spec, "--detach")
    run_id = created.stdout.strip()
    real_watch = cli.EvalClient.watch

    def lost(self: cli.EvalClient, run: str, after_seq: int = 0, **kw: object) -> Iterator[pb.WatchRunResponse]:
        yield next(iter(real_watch(self, run, after_seq)))
        raise EvalError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")

    monkeypatch.setattr(cli.EvalClient, "watch", lost)
    server, key = live
    assert cli.main(["--target", server.target, "--api-key", key, "watch", run_id]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.splitlines()[-2:] == [
        "evalctl: UNAVAILABLE: failed to connect to all addresses",
        f"  run {run_id} was not followed to its end: `evalctl watch {run_id} --after-seq 1` follows it again from"
        " the last event shown",
    ]


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED])
def test_a_refused_key_mid_watch_is_not_offered_a_watch_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], code: grpc.StatusCode
) -> None:
    """A bad key got "run R was not followed to its end: `evalctl watch R ...` follows it again": the same refusal."""

    def refused(self: cli.EvalClient, run: str, after_seq: int = 0, **kw: object) -> Iterator[pb.WatchRunResponse]:
        raise EvalError(code, "the key was refused")
        yield  # a generator, as watch is

    monkeypatch.setattr(cli.EvalClient, "watch", refused)
    assert cli.main(["--target", "127.0.0.1:1", "watch", "run_a"]) == cli.EXIT_ERROR
    said = capsys.readouterr().err
    assert f"evalctl: {code.name}: the key was refused" in said and "not followed to its end" not in said, said


# --- versions ----------------------------------------------------------------------------------------------------


def test_evalctl_and_evalsvc_say_their_versions(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    """Neither said a version anywhere: no --version, nothing in the server's log."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"evalctl {metadata.version('evalsvc-client')}\n"
    done = evalsvc_run(["--version"], os.environ)
    assert (done.returncode, done.stdout) == (0, f"evalsvc {metadata.version('evalsvc')}\n"), done.stderr
    server, _ = live
    log = server.log_path.read_text()
    version = re.escape(metadata.version("evalsvc"))
    assert re.search(rf" evalsvc starting \(version {version}, database sqlite", log), log
    assert LISTENING.findall(log) == [str(server.port)]


# --- TLS failures named as such ----------------------------------------------------------------------------------


async def test_a_certificate_for_another_name_is_said_and_tls_server_name_overrides(
    tls_server: EvalServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server whose certificate does not hold the name called was "Nothing answers at ...: is the server
    running?"; and evalctl had no flag for the SDK's server_name_override."""
    argv = ["--target", f"127.0.0.1:{tls_server.port}", "--api-key", "evk_x", "--ca-cert", str(pki.ca_file)]
    assert await asyncio.to_thread(cli.main, [*argv, "--tls-server-name", "other.example", "list"]) == cli.EXIT_ERROR
    said = capsys.readouterr().err
    assert (
        f"  Something answers at 127.0.0.1:{tls_server.port} with TLS, but its certificate is not for the name"
        " called: call it by a name its certificate holds (--target), or give that name with --tls-server-name NAME"
    ) in said, said
    assert "Nothing answers" not in said
    # The name the certificate holds: the handshake succeeds, and the server answers (this key is no key of its).
    assert await asyncio.to_thread(cli.main, [*argv, "--tls-server-name", "localhost", "list"]) == cli.EXIT_ERROR
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def test_refused_on_one_address_of_a_name_with_tls_mentions_tls() -> None:
    """localhost: ::1 refused (grpc's last error) while 127.0.0.1 failed TLS; the hint said only "is the server
    running?"."""
    message = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv6:%5B::1%5D:50051: Failed to connect to remote"
        " host: Connection refused"
    )
    hint = errors.hint_for(grpc.StatusCode.UNAVAILABLE, "", "localhost:50051", message, tls=True)
    assert hint.startswith("Nothing answers at localhost:50051: is the server running?"), hint
    assert "grpc names only the last address it tried ([::1]:50051); another address of localhost" in hint, hint
    assert "--ca-cert, --client-cert/--client-key and --tls-server-name" in hint, hint
    assert "--tls-server-name" not in errors.hint_for(grpc.StatusCode.UNAVAILABLE, "", "localhost:50051", message)


# --- retries said ------------------------------------------------------------------------------------------------


def test_a_rate_limited_create_run_says_it_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """evalctl waited in silence while the server rate-limited CreateRun (RetryInfo 36 s, retried by the SDK)."""
    monkeypatch.setenv("EVALSVC_RETRY_MAX_ELAPSED_S", "30")  # the default: RetryInfo's 2 s waits fit in it
    server = ServerProcess(
        f"sqlite+aiosqlite:///{tmp_path / 'rate.db'}",
        tmp_path / "server.log",
        "--workers",
        "0",
        "--create-run-rate",
        "0.5",
        "--create-run-burst",
        "1",
    )
    try:
        limited = keyed(server)
        spec = one_item_spec(tmp_path)
        first = evalctl(limited, "run", spec, "--detach")
        assert first.returncode == cli.EXIT_OK and "rate-limited" not in first.stderr, first.stderr
        second = evalctl(limited, "run", spec, "--detach")
        assert second.returncode == cli.EXIT_OK, second.stderr
        said = second.stderr.splitlines()
        assert re.fullmatch(r"rate-limited \(create_run_rate\); retrying CreateRun in \d\.\d s", said[0]), said
        assert said[1].startswith("created run "), said
    finally:
        assert server.terminate() == 0


def test_evalctl_results_rides_out_a_kill_9_and_restart(tmp_path: Path) -> None:
    """`evalctl results` (and every other read) gave up after 5 attempts, 0.75-1.5 s, where a server killed with
    SIGKILL takes about 1.7 s to accept again: it failed on every restart. Now reads retry for
    EVALSVC_RETRY_MAX_ELAPSED_S (30 s by default; 60 here), saying so on stderr, and the restart is ridden out."""
    port, db = free_port(), f"sqlite+aiosqlite:///{tmp_path / 'restart.db'}"
    first = ServerProcess(db, tmp_path / "first.log", "--grpc-addr", f"127.0.0.1:{port}")
    second: ServerProcess | None = None
    try:
        key = first.bootstrap_key()
        assert key
        with EvalClient(first.target, api_key=key) as client:
            items = [builders.item("q", "a", id=f"i{i}", response="a") for i in range(3)]
            run = client.create_run(items=items, target="provided", graders=[builders.exact_match()])
            client.wait(run.id)
        first.kill()  # nothing listens on the port until the restart below
        environ = {**_env((first, key)), "EVALSVC_RETRY_MAX_ELAPSED_S": "60"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "evalsvc_client.cli", "results", run.id, "--format", "jsonl"],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        # Its one line comes once a wait reaches 1 s: past the ~1.5 s the count of attempts allowed in all.
        line = proc.stderr.readline()
        assert line == (
            "ListRunResults: UNAVAILABLE (connection refused); retrying for up to 60 s (EVALSVC_RETRY_MAX_ELAPSED_S)\n"
        ), line + proc.communicate(timeout=30)[1]
        time.sleep(3)  # more waits, untold: a line each buried the error where nothing listened
        second = ServerProcess(db, tmp_path / "second.log", "--grpc-addr", f"127.0.0.1:{port}")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == cli.EXIT_OK and err == "", err
        assert sorted(json.loads(row)["item_id"] for row in out.splitlines()) == ["i0", "i1", "i2"], out
    finally:
        if second is not None:
            assert second.terminate() == 0


def test_a_server_that_never_comes_back_fails_within_the_time_bound() -> None:
    """Retrying by time must still end: a read of an address where nothing listens fails once
    EVALSVC_RETRY_MAX_ELAPSED_S (RetryPolicy.max_elapsed_s) has passed, saying for how long it was retried, and
    told on_retry of each wait, none of which went past the bound."""
    from evalsvc_client._common import Retrying, RetryPolicy

    target = f"127.0.0.1:{free_port()}"
    seen: list[Retrying] = []
    started = time.monotonic()
    policy = RetryPolicy(max_elapsed_s=1.0)
    with (
        EvalClient(target, retry=policy, on_retry=seen.append) as client,
        pytest.raises(errors.UnavailableError) as down,
    ):
        client.get_run("run_x")
    took = time.monotonic() - started
    assert 1.0 <= took < 1.0 + 1.0, took  # the per-attempt failures are at once: refused
    assert len(seen) >= 3 and sum(r.delay_s for r in seen) <= 1.0, seen
    assert re.search(r"GetRun was tried \d+ times over 1\.\d s \(retried for up to 1 s", str(down.value))

    async def read_async() -> None:  # the async client's retries are the same CallRetries
        async with AsyncEvalClient(target, retry=RetryPolicy(max_elapsed_s=0.5)) as client:
            await client.get_run("run_x")

    with pytest.raises(errors.UnavailableError, match=r"GetRun was tried \d+ times over 0\.\d s"):
        asyncio.run(read_async())

    done = evalctl_process("--target", target, "get", "run_x", env={"EVALSVC_RETRY_MAX_ELAPSED_S": "0.5"})
    assert done.returncode == cli.EXIT_ERROR and f"Nothing answers at {target}" in done.stderr, done.stderr
    assert re.search(r"GetRun was tried \d+ times over 0\.\d s \(retried for up to 0\.5 s", done.stderr)
    bad = evalctl_process("--target", target, "get", "run_x", env={"EVALSVC_RETRY_MAX_ELAPSED_S": "soon"})
    assert bad.returncode == cli.EXIT_ERROR
    assert "EVALSVC_RETRY_MAX_ELAPSED_S='soon': give a number of seconds" in bad.stderr, bad.stderr


def test_a_client_set_up_wrong_for_what_answers_is_told_at_once_not_after_the_whole_retry_bound() -> None:
    """A port that closes each connection before any call (what TLS not matching looks like) and a name that
    does not resolve were retried for the whole 30 s bound, ~25 'retrying' lines before the TLS hint; a
    restart refuses, which the bound is for. Such calls are retried for SET_UP_WRONG_RETRY_S only."""
    from evalsvc_client._common import SET_UP_WRONG_RETRY_S, RetryPolicy

    with socket.socket() as closing:
        closing.bind(("127.0.0.1", 0))
        closing.listen(64)
        stop = threading.Event()

        def close_each() -> None:
            closing.settimeout(0.1)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    closing.accept()[0].close()

        closer = threading.Thread(target=close_each, daemon=True)
        closer.start()
        try:
            for target, said in (
                (f"127.0.0.1:{closing.getsockname()[1]}", "most likely TLS does not match"),
                ("no-such-host.invalid:50051", "The name in no-such-host.invalid:50051 does not resolve"),
            ):
                started = time.monotonic()
                with (
                    EvalClient(target, retry=RetryPolicy(max_elapsed_s=30.0)) as client,
                    pytest.raises(errors.UnavailableError) as failed,
                ):
                    client.get_run("run_x")
                took = time.monotonic() - started
                assert took < SET_UP_WRONG_RETRY_S + 3.0, (target, took)
                assert failed.value.set_up_wrong and said in str(failed.value), (target, str(failed.value))
        finally:
            stop.set()
            closer.join()


def test_retry_policy_is_bounded_by_time_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default bound is 30 s (as long as a watch rides out a restart), or EVALSVC_RETRY_MAX_ELAPSED_S, and no
    longer 5 attempts; waits are capped exponential with jitter."""
    from evalsvc_client._common import RetryPolicy

    monkeypatch.delenv("EVALSVC_RETRY_MAX_ELAPSED_S")  # tests/conftest.py sets 1.5 s for the suite
    policy = RetryPolicy()
    assert (policy.max_elapsed_s, policy.max_attempts) == (30.0, None)
    assert all(0.05 <= policy.backoff(1) <= 0.1 and 1.0 <= policy.backoff(9) <= 2.0 for _ in range(100))
    monkeypatch.setenv("EVALSVC_RETRY_MAX_ELAPSED_S", "45")
    assert RetryPolicy().max_elapsed_s == 45.0

    # A server's RetryInfo is a floor on the wait, but a wait past the bound is not taken: the error says why.
    def limited(delay: float) -> EvalError:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        return errors.ResourceExhaustedError(code, "slow down", reason="CREATE_RUN_RATE", retry_delay=delay)

    assert RetryPolicy(max_elapsed_s=30).start("CreateRun").wait_after(limited(2.0)) == 2.0
    retries = RetryPolicy(max_elapsed_s=30).start("CreateRun")
    assert retries.wait_after(limited(36.0)) is None
    final = retries.final(limited(36.0))
    assert final.retry_delay == 36.0 and isinstance(final, errors.ResourceExhaustedError)
    assert "the server asked for a wait of 36.0 s before CreateRun is tried again" in str(final), final


def test_only_an_unbroken_run_of_set_up_wrong_failures_ends_the_retries_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call in flight when its server is killed fails "Socket closed" (read as a handshake that failed), then
    is refused while the server restarts: timed from the call's start, a call 2 s old lost its 30 s ride-out.
    The 2 s are of failures that all say the client is set up wrong, and the final error says why it stopped."""
    from evalsvc_client import _common
    from evalsvc_client._common import SET_UP_WRONG_RETRY_S, RetryPolicy

    clock = [100.0]
    monkeypatch.setattr(_common.time, "monotonic", lambda: clock[0])
    closed = errors.UnavailableError(grpc.StatusCode.UNAVAILABLE, "Socket closed", set_up_wrong=True)
    refused = errors.UnavailableError(grpc.StatusCode.UNAVAILABLE, "Connection refused")
    dying = RetryPolicy(max_elapsed_s=30).start("GetRun")
    for error in (refused, closed, refused, refused, closed, refused):  # 3 s apart: past 2 s, never 2 s of them
        assert dying.wait_after(error) is not None
        clock[0] += 3.0
    wrong = RetryPolicy(max_elapsed_s=30).start("GetRun")
    assert wrong.wait_after(closed) is not None
    clock[0] += SET_UP_WRONG_RETRY_S / 2
    assert wrong.wait_after(closed) is not None
    clock[0] += SET_UP_WRONG_RETRY_S / 2
    assert wrong.wait_after(closed) is None
    assert "retried for up to 2 s while every attempt failed so" in str(wrong.final(closed))


def test_the_sdk_says_nothing_of_its_retries_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    """A library's user sees no line of evalctl's: on_retry is None unless given."""
    from evalsvc_client._common import Retrying, RetryPolicy

    seen: list[Retrying] = []
    quiet = cli.EvalClient("127.0.0.1:1", retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))
    told = cli.EvalClient(
        "127.0.0.1:1", retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01), on_retry=seen.append
    )
    for client in (quiet, told):
        with client, pytest.raises(EvalError):
            client.get_run("run_x")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert [(r.call, r.error.code, r.attempt) for r in seen] == [("GetRun", grpc.StatusCode.UNAVAILABLE, 1)]


# --- small things ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "line"), [("repetitions", "0 or unset: 1"), ("warmup_runs", "0 or unset: none")])
def test_a_negative_count_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, line: str) -> None:
    """`validate` said "valid: ... 1 repetition" of `repetitions: -1`."""
    (tmp_path / "spec.yaml").write_text(
        f"items: [{{input: x, response: x}}]\ntarget: provided\ngraders: [{{exact_match: {{}}}}]\n{key}: -1\n"
    )
    assert cli.main(["validate", str(tmp_path / "spec.yaml")]) == cli.EXIT_ERROR
    assert f"  {key}: -1 is not a count: 0 or more ({line})" in capsys.readouterr().err.splitlines()


def test_the_sdk_reads_evalsvc_api_key_as_evalctl_does(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """`EvalClient("127.0.0.1:50051")` ignored EVALSVC_API_KEY: UNAUTHENTICATED where evalctl worked."""
    server, key = live
    monkeypatch.setenv("EVALSVC_API_KEY", key)
    with cli.EvalClient(server.target) as client:
        assert isinstance(list(client.list_runs(limit=1)), list)

    async def async_key() -> str | None:
        client = AsyncEvalClient(server.target)
        await client.close()
        return client.options.api_key

    assert asyncio.run(async_key()) == key
    assert cli.EvalClient(server.target, api_key="evk_given").options.api_key == "evk_given"
    assert cli.EvalClient(server.target, api_key="").options.metadata() == ()  # "": no key, whatever is set


def test_listings_say_one_run_and_no_targets(live: Live, tmp_path: Path) -> None:
    """ "showing the newest 1 runs", "1 errors", and an empty listing printed a table of headers alone."""
    (tmp_path / "spec.yaml").write_text(
        "items: [{input: x, expected_output: x}, {input: y, expected_output: y, response: y}]\n"
        "target: provided\ngraders: [{exact_match: {}}]\nmax_error_rate: 100\n"
    )
    for _ in range(2):
        ran = evalctl(live, "run", str(tmp_path / "spec.yaml"), "--no-progress")
        assert ran.returncode == cli.EXIT_OK, ran.stderr
    assert ", 1 error, cost $" in ran.stderr, ran.stderr
    listed = evalctl(live, "list", "--limit", "1")
    assert listed.stderr.startswith("showing the newest 1 run; more exist: --limit 100 shows more"), listed.stderr
    empty = evalctl(live, "targets", "list")
    assert (empty.returncode, empty.stdout, empty.stderr) == (cli.EXIT_OK, "", "no targets\n")


# --- a signal during the create ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("stop", "code"), [(cli.Terminated, 128 + 15), (KeyboardInterrupt, 128 + 2)])
def test_a_signal_during_create_run_says_the_request_id_that_finds_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stop: type[KeyboardInterrupt],
    code: int,
) -> None:
    """SIGTERM while CreateRun was under way said `terminated (SIGTERM)` alone: a run perhaps made, nobody told, its
    request_id (a fresh uuid) said nowhere, and the CI job's retry made another."""
    spec = one_item_spec(tmp_path)
    sent: list[str] = []

    def interrupted(self: cli.EvalClient, request: pb.runs.CreateRunRequest) -> pb.runs.CreateRunResponse:
        sent.append(request.request_id)
        raise stop

    monkeypatch.setattr(cli.EvalClient, "create_run_from", interrupted)
    assert cli.main(["--target", "127.0.0.1:1", "run", spec]) == code
    (request_id,) = sent
    said = capsys.readouterr().err.splitlines()
    assert said[-1] == (
        f"evalctl: {cli._STOPPED[code - 128]} during CreateRun: a run may have been created (request_id {request_id});"
        f" `evalctl run {spec} --request-id {request_id}` follows that run if it was, and creates it if not"
        " (`evalctl list --limit 5` lists the newest runs)"
    ), said
    assert cli.main(["--target", "127.0.0.1:1", "run", spec, "--request-id", request_id]) == code
    assert sent[-1] == request_id  # the command said sends the same key


def test_sigterm_during_rerun_run_says_the_request_id(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    sent: list[str | None] = []

    def interrupted(self: cli.EvalClient, run_id: str, **kw: Any) -> pb.Run:
        sent.append(kw["request_id"])
        raise cli.Terminated

    monkeypatch.setattr(cli.EvalClient, "rerun_run", interrupted)
    assert cli.main(["--target", "127.0.0.1:1", "rerun", "run_a", "--failed"]) == 128 + 15
    (request_id,) = sent
    assert request_id
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"evalctl: terminated (SIGTERM) during RerunRun: a run may have been created (request_id {request_id});"
        f" `evalctl rerun run_a --failed --request-id {request_id}` follows that run if it was, and creates it if"
        " not (`evalctl list --limit 5` lists the newest runs)"
    )
    # The same request again, --cache included (another cache mode under the same request_id is a conflict).
    assert cli.main(["--target", "127.0.0.1:1", "rerun", "run_a", "--cache", "replay"]) == 128 + 15
    assert f"`evalctl rerun run_a --cache replay --request-id {sent[-1]}`" in capsys.readouterr().err


def test_sigterm_ends_a_watch_whose_reader_has_stalled(live: Live, tmp_path: Path) -> None:
    """`timeout 600 evalctl watch R --json | slow_consumer` hung until SIGKILL: SIGTERM was held while evalctl wrote
    an event, the write blocked on the full pipe, and Python retried it after the handler. It ends now, naming the
    seq of the last event written whole (the one cut short is shown again on resume)."""
    (tmp_path / "qa.jsonl").write_text(
        "".join(f'{{"input": "q{i}", "expected_output": "a", "response": "a"}}\n' for i in range(60))
    )
    (tmp_path / "spec.yaml").write_text("dataset: qa.jsonl\ntarget: provided\ngraders: [{exact_match: {}}]\n")
    done = evalctl(live, "run", str(tmp_path / "spec.yaml"), "--no-progress")
    assert done.returncode == cli.EXIT_OK, done.stderr
    run_id = done.stderr.splitlines()[0].split()[2]
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ: a page, filled by a few events
    with open(tmp_path / "err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evalsvc_client.cli", "watch", run_id, "--json"],
            env=_env(live),
            stdout=write_end,
            stderr=err,
        )
    os.close(write_end)
    try:
        waiting = 0.0
        while _unread(read_end) < 4096 - 1024 and waiting < 30:  # the pipe full: evalctl blocks writing
            time.sleep(0.1)  # polling another process's pipe: no event to await
            waiting += 0.1
        assert _unread(read_end) >= 4096 - 1024, "the pipe never filled: the test would prove nothing"
        wchan = Path(f"/proc/{proc.pid}/wchan")
        while not wchan.read_text().endswith("pipe_write") and waiting < 30:  # blocked in the write: what hung
            time.sleep(0.1)
            waiting += 0.1
        assert wchan.read_text().endswith("pipe_write"), wchan.read_text()  # (anon_)pipe_write, by kernel
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    written = b""
    while chunk := os.read(read_end, 65536):
        written += chunk
    os.close(read_end)
    whole = [json.loads(line) for line in written.split(b"\n")[:-1]]  # the last, cut short or empty, left out
    said = (tmp_path / "err").read_text()
    assert whole and f"`evalctl watch {run_id} --after-seq {whole[-1]['seq']}` follows it from here" in said, said


def _unread(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_a_second_signal_while_one_is_held_stops_at_once() -> None:
    """A second SIGTERM while one was held only replaced the first: whatever blocked inside went on blocking."""
    deferred = cli._Deferred()
    with pytest.raises(cli.Terminated), deferred.held():
        deferred(signal.SIGINT, None)  # held
        deferred(signal.SIGTERM, None)  # at once
        pytest.fail("the second signal was held too")
    with pytest.raises(KeyboardInterrupt) as stopped, deferred.held():
        deferred(signal.SIGINT, None)
    assert not isinstance(stopped.value, cli.Terminated)  # held until the block ended, and raised as itself


def test_client_options_read_evalsvc_api_key_as_the_clients_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """`EvalClient(options=ClientOptions(target=...))` sent no key where `EvalClient(target)` sent the environment's
    (clients/README.md said both read it)."""
    from evalsvc_client._common import ClientOptions

    monkeypatch.setenv("EVALSVC_API_KEY", "evk_env")
    with cli.EvalClient(options=ClientOptions(target="127.0.0.1:1")) as client:
        assert client.options.api_key == "evk_env"
        assert client.options.metadata() == (("authorization", "Bearer evk_env"),)
    assert ClientOptions(api_key="").metadata() == ()
    assert ClientOptions(api_key="evk_given").api_key == "evk_given"


def test_on_retry_beside_options_is_used_not_dropped() -> None:
    from evalsvc_client._common import ClientOptions, Retrying, RetryPolicy

    seen: list[Retrying] = []
    options = ClientOptions(target="127.0.0.1:1", retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01))
    with cli.EvalClient(options=options, on_retry=seen.append) as client, pytest.raises(EvalError):
        client.get_run("run_x")
    assert [r.call for r in seen] == ["GetRun"]
    with pytest.raises(TypeError, match="on_retry was given both"):
        cli.EvalClient(options=ClientOptions(on_retry=print), on_retry=seen.append)


def test_the_async_client_awaits_an_async_on_retry() -> None:
    from evalsvc_client._common import Retrying, RetryPolicy

    seen: list[Retrying] = []

    async def told(retrying: Retrying) -> None:
        await asyncio.sleep(0)
        seen.append(retrying)

    async def call() -> None:
        async with AsyncEvalClient(
            "127.0.0.1:1", retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.01), on_retry=told
        ) as client:
            with pytest.raises(EvalError):
                await client.get_run("run_x")

    asyncio.run(call())
    assert [r.call for r in seen] == ["GetRun"]


# --- listing runs by time, name and filter -------------------------------------------------------------------------


def _listed_ids(done: subprocess.CompletedProcess[str]) -> list[str]:
    """The run ids of an `evalctl list` table, top to bottom."""
    assert done.returncode == cli.EXIT_OK, done.stderr
    return re.findall(r"\brun_[0-9a-f]+\b", done.stdout)


def test_list_narrows_by_since_name_and_filter_and_lists_the_oldest_first(live: Live) -> None:
    """`evalctl list` listed the newest runs by status, label or dataset only: "the last day's nightly runs,
    oldest first" could not be asked."""
    server, key = live
    tag = f"cli-{os.urandom(3).hex()}"
    with cli.EvalClient(server.target, api_key=key) as client:
        made = [
            client.create_run(
                target=pb.Target(echo=pb.target.EchoTarget()),
                graders=[pb.Grader(exact_match=pb.grader.ExactMatch())],
                items=[pb.Item(input="x", expected_output="x")],
                display_name=f"{name} {tag}",
                labels={"team": team},
            ).id
            for name, team in (("Nightly-1", "a"), ("adhoc", "a"), ("nightly-2", "b"))
        ]
    assert _listed_ids(evalctl(live, "list", "--name", tag, "--oldest-first")) == made
    assert _listed_ids(evalctl(live, "list", "--name", tag)) == made[::-1]
    assert _listed_ids(evalctl(live, "list", "--name", f"NIGHTLY-2 {tag}", "--since", "1h")) == [made[2]]
    assert _listed_ids(evalctl(live, "list", "--name", tag, "--since", "2999-01-01T00:00:00+01:00")) == []
    both = evalctl(live, "list", "--filter", 'labels.team = "a" AND display_name:"nightly"', "--name", tag)
    assert _listed_ids(both) == [made[0]]
    cut = evalctl(live, "list", "--name", tag, "--oldest-first", "--limit", "1")
    assert _listed_ids(cut) == made[:1] and cut.stderr.startswith("showing the oldest 1 run; more exist")
    quoted = evalctl(live, "list", "--name", f'"{tag}\\')  # quotes and backslashes are the name's own
    assert _listed_ids(quoted) == []

    wrong = evalctl(live, "list", "--filter", "display_name = a OR display_name = b")
    assert wrong.returncode == cli.EXIT_ERROR and "filter: at character 18: OR is not supported" in wrong.stderr
    late = evalctl(live, "list", "--since", "yesterday")
    assert late.returncode == cli.EXIT_ERROR and "'yesterday' is neither a duration" in late.stderr


def test_list_reads_the_basic_view_for_its_table_and_whole_runs_for_json(
    live: Live, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table shows names, statuses and counts: each run's definition (up to MBs) is not fetched for it."""
    server, key = live
    views: list[int] = []
    listed = cli.EvalClient.list_runs

    def spied(self: cli.EvalClient, **kwargs: Any) -> Iterator[pb.Run]:
        views.append(kwargs["view"])
        return listed(self, **kwargs)

    monkeypatch.setattr(cli.EvalClient, "list_runs", spied)
    for flags in ([], ["--json"]):
        assert cli.main(["--target", server.target, "--api-key", key, *flags, "list", "--limit", "1"]) == cli.EXIT_OK
    assert views == [pb.runs.RUN_VIEW_BASIC, pb.runs.RUN_VIEW_FULL]
    assert '"target"' in capsys.readouterr().out  # --json: the whole run
