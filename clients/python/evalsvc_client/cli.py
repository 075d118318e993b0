"""evalctl: run evaluations and read them from a terminal or CI.

    evalctl validate spec.yaml                                               check a spec, without a server
    evalctl run spec.yaml [--fail-under PCT] [--junit FILE] [--jsonl FILE] [--cache replay|...] [--request-id ID]
                  [--label k=v ...]
                  create a run and follow it (a --request-id used before: that run, followed)
    evalctl rerun RUN_ID [--failed|--all] [--detach] [--fail-under PCT] [--junit FILE] [--jsonl FILE]
                  a new run of RUN_ID's errored items (--failed: failed or errored, --all: every item; an
                  item that never ran counts as errored) with its definition, followed and judged as `run`
    evalctl watch RUN_ID [--after-seq N]                                     follow a run to its end
    evalctl get RUN_ID | list [--status S] [--label k=v] [--limit N] | cancel RUN_ID | delete RUN_ID | undelete RUN_ID
    evalctl update RUN_ID [--name NAME] [--description D] [--label k=v ...] [--remove-label k ...]
                  [--annotation k=v ...] [--remove-annotation k ...] [--etag ETAG]
                  change only what is given (single label and annotation keys; the others stay)
    evalctl results RUN_ID [--state passed|failed|error|skipped ...] [--format table|jsonl|junit] [-o FILE]
                  --state repeats: `--state failed --state error` lists the results in either state (any case,
                  as list's --status is)
    evalctl report RUN_ID --html FILE                                        one self-contained HTML report
    evalctl compare BASELINE CANDIDATE [--alpha A] [--fail-on-regression] [--max-unpaired N]
                    [--show regressed|improved|...]      a grader without pairs shows "-" and NO_PAIRS
                    BASELINE: a run id, or latest:KEY=VALUE, the newest run so labelled, created before
                    CANDIDATE, that SUCCEEDED and passed (not a rerun)
    evalctl webhooks create URL [--event TYPE ...] [--request-id ID] | list | get ID
                     | update ID [--url U] [--event TYPE ...] [--enable|--disable] | delete ID
                     | rotate-secret ID [--revoke-previous]
                     | deliveries ID [--status pending|succeeded|failed] [--limit N]
    evalctl datasets create NAME [--from FILE] [--description D] [--label k=v] [--request-id ID] | list | get ID
                     | items ID (--json: one item per line) | add ID FILE [--request-id ID] | delete ID
                     FILE: a dataset file as `run` reads one (.jsonl, .csv, .yaml, .json), checked whole first
    evalctl secrets create NAME (the value from stdin; typed unseen on a terminal) | list | delete NAME
    evalctl graders list [--limit N] | get ID [--version N] | delete ID     saved graders (`saved: ID` in a spec)
    evalctl targets list [--limit N] | get ID | delete ID                   saved targets

Global, before or after the command (`evalctl --json list` or `evalctl list --json`): --target HOST:PORT
(EVALCTL_TARGET, default 127.0.0.1:50051), --api-key (EVALSVC_API_KEY), --json, --tls, --ca-cert/--client-cert/
--client-key (TLS, mTLS; a client certificate needs its key), --tls-server-name NAME. `run --detach` and
`rerun --detach` print the new run's id alone on stdout (`R=$(evalctl run spec.yaml --detach)`) and follow
nothing: --fail-under, --junit and --jsonl are refused beside --detach (`evalctl watch "$R"` takes them). JSON output
(--json, --jsonl, results --format jsonl) is proto JSON with the .proto field names (snake_case; REST's JSON is
lowerCamelCase) and every field, defaults too. A call the server does not answer (restarting, or nothing at
--target) is retried for up to 30 s (EVALSVC_RETRY_MAX_ELAPSED_S sets another bound), said once on stderr.

Verdict (run, rerun, watch; get with --fail-under): a run passes when its pass rate (percent, errors excluded) reaches
--fail-under if given, else the spec's pass_threshold (unset: every graded evaluation must pass), and at most
the spec's max_error_rate percent of its evaluations errored (unset: none may). Both are percents: validate and run
warn on stderr, and go on, when either is above 0 and at most 1 (`pass_threshold: 0.9` is 0.9%; 90% is 90), as
for a --fail-under above 0 and at most 1.
Exit codes: 0 passed; 1 did not pass, or (compare --fail-on-regression) a grader REGRESSED or no evaluation was
paired at all, or (compare --max-unpaired N) more than N evaluations were unpaired; 2 the run ended
FAILED or CANCELLED; 3 a spec, connection or RPC error, or a command line evalctl does not understand;
4 (get --fail-under; compare with a gate, of a run still executing: a partial comparison) NO VERDICT: a run
has not ended, so there is no verdict yet; 5 (compare with a gate) NO VERDICT: the runs are not comparable (a
grader's definition changed, or more than --max-unpaired evaluations, or every one, are of different items),
and no unchanged grader REGRESSED (one that did is exit 1, the not-comparable line beside it), or (any
compare) a latest:KEY=VALUE baseline names no run; 141 (quietly) stdout closed early, as in
`evalctl results RUN --format jsonl | head`; 130 Ctrl-C and 143 SIGTERM, saying
which run goes on and the `evalctl watch RUN --after-seq N` that follows it again (during the create itself:
its request_id and the `--request-id` command that follows the run if it was made, and makes it if not).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import itertools
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

from rich.console import Console, RenderableType
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.style import StyleType
from rich.table import Table
from rich.text import Text

from evalsvc_client import pb
from evalsvc_client._common import (
    RETRY_MAX_ELAPSED_VARIABLE,
    SET_UP_WRONG_RETRY_S,
    Retrying,
    RetryPolicy,
    TLSOptions,
    new_request_id,
)
from evalsvc_client.errors import EvalError, target_as_url_hint
from evalsvc_client.export import listed_explanation, listed_output, to_dict, write_jsonl, write_junit
from evalsvc_client.report import agreement_line, format_rate, render_html
from evalsvc_client.spec import (
    CACHE_MODES,
    RunSpec,
    SpecError,
    cache_mode,
    load_items,
    load_spec,
    needs_default_judge,
    plural,
)
from evalsvc_client.sync import EvalClient
from evalsvc_client.visible import for_terminal

EXIT_OK, EXIT_BELOW, EXIT_RUN_FAILED, EXIT_ERROR, EXIT_NOT_ENDED = 0, 1, 2, 3, 4
#: A gated compare of runs that are not comparable, or a compare whose `latest:KEY=VALUE` baseline names no
#: run: no verdict, and none to come by waiting (unlike 4).
EXIT_NOT_COMPARABLE = 5
#: compare's BASELINE as `latest:KEY=VALUE`: the newest run with that label, created before the candidate, that
#: SUCCEEDED and passed, not a rerun.
LATEST = "latest:"
#: Stdout was closed before evalctl finished writing (`| head`): the status of a program SIGPIPE (13) ended.
EXIT_STDOUT_CLOSED = 128 + 13
#: Ctrl-C (SIGINT, 2), as for a program the signal ended; the run evalctl was following goes on on the server.
EXIT_INTERRUPTED = 128 + 2
#: SIGTERM (15), handled as Ctrl-C is (the same line naming the run and the watch that resumes it), then
#: the status of a program SIGTERM ended. It ended evalctl in silence, the run and where to resume unsaid.
EXIT_TERMINATED = 128 + 15


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that every place that handles one handles both."""


def _interruption(signum: int) -> KeyboardInterrupt:
    """What a signal raises where Ctrl-C raises KeyboardInterrupt: Terminated for SIGTERM."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _stop_signal(error: KeyboardInterrupt) -> int:
    return signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM: `signum`) while evalctl followed a run: `last_seq` is the last event it showed, where a
    watch resumes."""

    def __init__(self, run_id: str, last_seq: int, signum: int = signal.SIGINT) -> None:
        super().__init__(run_id, last_seq)
        self.run_id = run_id
        self.last_seq = last_seq
        self.signum = signum


class CreateInterrupted(Exception):
    """Ctrl-C (or SIGTERM: `signum`) while CreateRun or RerunRun (`call`) was under way: the server may have made
    the run, whose id evalctl never learnt. `request_id` finds it again: the same call with it answers with that
    run (AIP-155), or creates it if the first never arrived. `again` is the command line that does so."""

    def __init__(self, call: str, request_id: str, again: str, signum: int) -> None:
        super().__init__(call, request_id)
        self.call = call
        self.request_id = request_id
        self.again = again
        self.signum = signum


@contextlib.contextmanager
def _creating(call: str, request_id: str, again: str) -> Iterator[None]:
    """Ctrl-C or SIGTERM during a create as `CreateInterrupted`: it ended evalctl with `terminated (SIGTERM)` alone,
    a run perhaps made and nobody told, and a CI job retried made another (evalctl's request_id, a fresh uuid,
    was said nowhere). Not a held signal: the SDK's retries may wait a minute for a rate limit."""
    try:
        yield
    except KeyboardInterrupt as exc:
        raise CreateInterrupted(call, request_id, again, _stop_signal(exc)) from None


class FollowFailed(Exception):
    """An error that ended a watch evalctl followed (the server lost for good): `error`, with the
    run and the last event shown, so the message says how to pick the run up again."""

    def __init__(self, error: EvalError, run_id: str, last_seq: int) -> None:
        super().__init__(error, run_id, last_seq)
        self.error = error
        self.run_id = run_id
        self.last_seq = last_seq


#: Errors of a watch after which watching the same run again cannot help (no such run, a seq beyond its last).
#: A refused key (UNAUTHENTICATED, PERMISSION_DENIED) is the same refusal again: its hint (the key) is what to do.
_NOT_RESUMABLE = frozenset({"NOT_FOUND", "INVALID_ARGUMENT", "OUT_OF_RANGE", "UNAUTHENTICATED", "PERMISSION_DENIED"})


_STATES = {
    "passed": pb.run.RESULT_STATE_PASSED,
    "failed": pb.run.RESULT_STATE_FAILED,
    "error": pb.run.RESULT_STATE_ERROR,
    "skipped": pb.run.RESULT_STATE_SKIPPED,
}
# The generated stubs type an enum's items() as plain ints; they are the enum's values (the same casts below).
_STATUSES = cast(
    "dict[str, pb.RunStatus]",
    {name.removeprefix("RUN_STATUS_").lower(): value for name, value in pb.run.RunStatus.items() if value},
)


def _status(value: int) -> str:
    return pb.run.RunStatus.Name(value).removeprefix("RUN_STATUS_")


def pass_rate_percent(counts: pb.RunCounts) -> float | None:
    """Passed / (passed + failed) in percent, errors excluded, as the server computes it; None with no verdicts."""
    graded = counts.passed + counts.failed
    return 100.0 * counts.passed / graded if graded else None


#: Without a terminal, a progress line each time the run crosses another tenth of its evaluations, and between
#: them, while evaluations complete, one after this many seconds, then after twice as long each time up to
#: PLAIN_PROGRESS_MAX_S: a CI log shows the run moving, and a long run's log is not one line each 10 s (720 for
#: two hours; now about 40: ten tenths, five lines in the first five minutes, then one each five).
PLAIN_PROGRESS_EVERY_S = 10.0
PLAIN_PROGRESS_MAX_S = 300.0


class _Live:
    """The progress display: a rich bar on a terminal; otherwise (`2>&1 | tee log`, CI) whole `progress:` lines,
    one per tenth of the evaluations completed and between them one after PLAIN_PROGRESS_EVERY_S, the wait doubling
    up to PLAIN_PROGRESS_MAX_S, so a log
    is never silent for the length of a run (it was: 13 s of nothing, then the summary) nor flooded.

    Its cost is the run's cost_usd, target and judges (the target's alone showed $0.0000 for a run whose spend
    was all judges'): taken from each run event and added to from each result after it, as the server adds it
    up: a job's output once, however many graders' results carry its cost, and no output or verdict that came
    from the response cache."""

    def __init__(self, console: Console, enabled: bool, plain: bool = False) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._cost = 0.0
        self._paid_outputs: set[tuple[str, int]] = set()  # (item id, repetition): one target call each
        self._console = console
        self._plain = plain and not enabled
        self._plain_tenth = 0  # the tenths of the evaluations the last line reported
        self._plain_completed = 0
        self._plain_at = time.monotonic()
        self._plain_every = PLAIN_PROGRESS_EVERY_S
        if enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("pass {task.fields[rate]}"),
                TextColumn("errors {task.fields[errors]}"),
                TextColumn("${task.fields[cost]:.4f}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )

    def __enter__(self) -> _Live:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("run", total=None, rate="-", errors=0, cost=0.0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def _spent_on(self, result: pb.Result) -> float:
        """What a result adds to the run's cost_usd."""
        spent = 0.0 if result.verdict_cached else result.scoring_cost_usd
        output = (result.item_id, result.repetition)
        if not result.cached and output not in self._paid_outputs:
            self._paid_outputs.add(output)
            spent += result.cost_usd
        return spent

    def update(self, event: pb.WatchRunResponse) -> None:
        if event.HasField("result"):
            self._cost += self._spent_on(event.result)
        if event.HasField("run"):
            self._cost = event.run.cost_usd
        if self._plain:
            self._plain_line(event.counts)
        if self._progress is None or self._task is None:
            return
        counts = event.counts
        rate = pass_rate_percent(counts)
        description = _status(event.run.status).lower() if event.HasField("run") else "running"
        self._progress.update(
            self._task,
            description=description,
            total=counts.total_evaluations or None,
            completed=counts.completed_evaluations,
            rate=format_rate(rate),
            errors=counts.errored,
            cost=self._cost,
        )

    def _plain_line(self, counts: pb.RunCounts) -> None:
        total, completed = counts.total_evaluations, counts.completed_evaluations
        if not total or completed <= self._plain_completed:
            return
        tenth = completed * 10 // total
        now = time.monotonic()
        if tenth <= self._plain_tenth:
            if now - self._plain_at < self._plain_every:
                return
            self._plain_every = min(2 * self._plain_every, PLAIN_PROGRESS_MAX_S)
        self._plain_tenth, self._plain_completed, self._plain_at = tenth, completed, now
        self._console.print(
            f"progress: {completed}/{total} evaluations ({100 * completed // total}%),"
            f" pass rate {format_rate(pass_rate_percent(counts))}, {plural(counts.errored, 'error')},"
            f" cost ${self._cost:.4f}"
        )


def _client(args: argparse.Namespace, console: Console) -> EvalClient:
    url = target_as_url_hint(args.target)
    if url:  # refused before any call: grpc took the URL for a host name, and evalctl said nothing answered there
        raise ValueError(f"{url} (--target or EVALCTL_TARGET)")
    retry = RetryPolicy()
    return EvalClient(
        args.target, api_key=args.api_key, tls=_tls(args), retry=retry, on_retry=_retry_lines(console, retry)
    )


#: A watch that keeps failing to reconnect says so again after this many failures in a row.
RECONNECTING_EVERY = 10


def _retry_lines(console: Console, policy: RetryPolicy) -> Callable[[Retrying], None]:
    """The SDK's retries (silent to a library's user) as lines on stderr: evalctl waited without a word while the
    server rate-limited CreateRun (36 s) or while its watch reconnected to a server gone (41 s, then an error).
    Other retries of a call are told once, when a wait first reaches a second (a blip shorter than that goes
    unsaid), with the bound `policy` retries for: a line a wait, 20 and more of them over 30 s where nothing
    listened (`--target 127.0.0.1:1`), buried the error and its hint. Quiet then until the call is answered
    or fails; a call's first retry starts a new outage."""
    told = False

    def say(retrying: Retrying) -> None:
        nonlocal told
        error, delay = retrying.error, retrying.delay_s
        told = told and retrying.attempt > 1  # a call's first retry starts a new outage, whatever its kind
        if retrying.call == "WatchRun":
            if retrying.attempt == 1 or retrying.attempt % RECONNECTING_EVERY == 0:
                console.print(
                    f"reconnecting: the watch of run {retrying.run_id} lost its stream ({error.code.name});"
                    f" trying again in {_seconds(delay)} (failure {retrying.attempt} in a row)"
                )
        elif error.code.name == "RESOURCE_EXHAUSTED" and error.retry_delay is not None:
            which = error.metadata.get("quota") or error.reason.lower() or "server busy"
            console.print(f"rate-limited ({which}); retrying {retrying.call} in {_seconds(delay)}")
        elif delay >= 1 and not told:
            told = True
            refused = " (connection refused)" if "connection refused" in error.message.lower() else ""
            # A client set up wrong (TLS not matching, a name that does not resolve) stops far sooner.
            bound = _seconds(SET_UP_WRONG_RETRY_S if error.set_up_wrong else policy.max_elapsed_s)
            console.print(
                f"{retrying.call}: {error.code.name}{refused}; retrying for up to {bound}"
                f" ({RETRY_MAX_ELAPSED_VARIABLE})"
            )

    return say


def _seconds(delay: float) -> str:
    return f"{delay:.0f} s" if delay >= 10 else f"{delay:.1f} s"


def _tls(args: argparse.Namespace) -> TLSOptions | None:
    """The TLS flags as TLSOptions, None for plaintext: --tls, --ca-cert, --tls-server-name or a client certificate
    turns TLS on.
    A certificate without its key (or a key alone) is refused before grpc sees it: grpc aborted the process
    (SIGABRT, exit 134), and a key alone was dropped silently, the call going out in plaintext."""
    if bool(args.client_cert) != bool(args.client_key):
        raise ValueError("--client-cert needs --client-key" if args.client_cert else "--client-key needs --client-cert")
    if not (args.ca_cert or args.client_cert or args.tls or args.tls_server_name):
        return None
    return TLSOptions(
        root_certificates=_read_flag_file("--ca-cert", args.ca_cert),
        certificate_chain=_read_flag_file("--client-cert", args.client_cert),
        private_key=_read_flag_file("--client-key", args.client_key),
        server_name_override=args.tls_server_name or None,
    )


def _read_flag_file(flag: str, path: str | None) -> bytes | None:
    """The file a flag names, or a ValueError naming the flag (OSError's words named the file only)."""
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _summary(console: Console, run: pb.Run) -> None:
    counts = run.counts
    rate = pass_rate_percent(counts)
    console.print(
        f"run {run.id} {_status(run.status)}{_deleted(run)}:"
        f" {counts.completed_evaluations}/{counts.total_evaluations}"
        f" evaluations, pass rate {format_rate(rate)}, {plural(counts.errored, 'error')},"
        f" cost ${run.cost_usd:.4f}"  # target and judges (aggregate.total_cost_usd is the target's alone)
        + (f" ({run.error.code}: {for_terminal(run.error.message)})" if run.HasField("error") else "")
    )
    for grader in run.aggregate.graders:
        if grader.HasField("agreement"):  # items with human_verdicts: how far the grader can be trusted
            console.print(f"  {for_terminal(grader.grader)} {agreement_line(grader.agreement)}", markup=False)


def _deleted(run: pb.Run) -> str:
    """What the summary line says after a soft-deleted run's status (delete_time set), else nothing: `get` of a
    deleted run read as any other's."""
    if not run.HasField("delete_time"):
        return ""
    return f" (deleted {_when(run.delete_time)}; `evalctl undelete {run.id}` restores it until the server purges it)"


class _Deferred:
    """Ctrl-C (and SIGTERM) held back while a block runs and raised when it ends (KeyboardInterrupt as usual
    elsewhere): a watch interrupted between printing an event and counting it as printed told the user to resume
    before an event they had seen. A handler that defers, rather than a blocked signal: blocked in the main
    thread, SIGINT went to one of grpc's threads and never woke the main one from its wait.

    Never held across a write that may block (`interruptible`), nor past a second signal: a signal came while
    `watch --json` wrote to a reader that had stalled, Python retried the write after the handler, and evalctl
    blocked until SIGKILL (`timeout 600 evalctl watch R --json | slow_consumer`). A write cut so is not counted:
    the watch resumes before its event, shown again (a line perhaps cut short first), never after it, missed."""

    def __init__(self) -> None:
        self._inside = False
        self._pending: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self._inside and self._pending is None:
            self._pending = signum
        else:  # outside, or a second signal: at once
            self._pending = None
            raise _interruption(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """This handler for SIGINT and SIGTERM while the block runs (from the main thread only, as signal requires)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._inside = True
        try:
            yield
        finally:
            self._inside = False
        self._raise_pending()

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Inside `held`: a block a signal (one held already, or one that comes) interrupts at once, as a write to a
        pipe whose reader has stalled must be."""
        self._inside = False
        self._raise_pending()
        try:
            yield
        finally:
            self._inside = True

    def _raise_pending(self) -> None:
        if self._pending is not None:
            signum, self._pending = self._pending, None
            raise _interruption(signum)


def _follow(client: EvalClient, run_id: str, after_seq: int, args: argparse.Namespace, console: Console) -> pb.Run:
    """Watch to the end: JSON lines of events with --json, the progress bar on a terminal; returns the final run.
    Ctrl-C (or SIGTERM) raises `Interrupted` with the last seq shown, an error that ends the watch `FollowFailed`
    (unless watching again cannot help: no such run)."""
    final: pb.Run | None = None
    shown = after_seq
    show_progress = not args.json and not args.no_progress
    deferred = _Deferred()
    try:
        with deferred.installed(), _Live(console, show_progress and _a_terminal(sys.stderr), show_progress) as live:
            for event in client.watch(run_id, after_seq):
                with deferred.held():  # an event is counted as shown once written whole, and then at once
                    if args.json and args.command == "watch":
                        line = json.dumps(to_dict(event), sort_keys=True) + "\n"
                        with deferred.interruptible():  # the reader may stall: a signal must not wait for it
                            sys.stdout.write(line)
                            sys.stdout.flush()
                            shown = event.seq  # written whole: counted at once, not after leaving the block
                    else:
                        shown = event.seq
                live.update(event)
                if event.HasField("run"):
                    final = event.run
    except KeyboardInterrupt as exc:
        raise Interrupted(run_id, shown, _stop_signal(exc)) from None
    except EvalError as exc:
        if exc.code.name in _NOT_RESUMABLE:
            raise
        raise FollowFailed(exc, run_id, shown) from None
    return final if final is not None and final.status in pb.TERMINAL_STATUSES else client.get_run(run_id)


def _verdict(run: pb.Run, fail_under: float | None, console: Console) -> int:
    """One verdict, printed and returned as the exit code: --fail-under when given replaces the run's own
    pass_threshold (whose verdict the server computed as overall_passed); the run's max_error_rate
    applies either way. A run that has not ended has no verdict yet (`get` of a RUNNING run said "the
    run ended RUNNING")."""
    if run.status not in pb.TERMINAL_STATUSES:
        console.print(f"NO VERDICT: the run is {_status(run.status)}; `evalctl watch {run.id}` waits for its end")
        return EXIT_NOT_ENDED
    if run.status != pb.run.RUN_STATUS_SUCCEEDED:
        console.print(f"FAILED: the run ended {_status(run.status)}")
        return EXIT_RUN_FAILED
    rate = pass_rate_percent(run.counts)
    errors_within, errors = _errors_against_bar(run)
    if fail_under is not None:
        rate_reached = rate is not None and rate >= fail_under
        passed = rate_reached and errors_within
        bar = f"--fail-under {fail_under:g}%"
    elif not run.HasField("overall_passed"):
        return EXIT_OK
    else:
        threshold = run.pass_threshold if run.HasField("pass_threshold") else 100.0
        rate_reached = rate is not None and rate >= threshold - 1e-9  # the server's comparison, for the wording
        passed = run.overall_passed  # the server's verdict: both bars
        if run.HasField("pass_threshold"):
            bar = f"the run's pass_threshold {run.pass_threshold:g}%"
        else:
            bar = (
                "100% (the run has no pass_threshold: every graded evaluation must pass; --fail-under PCT sets another)"
            )
    relation = "reaches" if rate_reached else "is below"
    console.print(f"{'PASSED' if passed else 'FAILED'}: pass rate {format_rate(rate)} {relation} {bar}; {errors}")
    return EXIT_OK if passed else EXIT_BELOW


def _errors_against_bar(run: pb.Run) -> tuple[bool, str]:
    """Whether the run's errored evaluations are within its max_error_rate, and a clause saying so: errors
    are not in the pass rate, so a run whose 9 evaluations of 10 errored passed on the one graded."""
    counts = run.counts
    total = counts.passed + counts.failed + counts.errored
    clause = f"{counts.errored} of {total} evaluations errored"
    if not run.HasField("max_error_rate"):  # created before the bar existed: its verdict has none
        return True, clause
    allowed = run.max_error_rate
    within = counts.errored * 100 <= allowed * total + 1e-9
    if counts.errored:
        clause += f" ({100 * counts.errored / total:.1f}%"
        clause += (", within" if within else ", over") + f" the run's max_error_rate {allowed:g}%)"
    return within, clause


def _results(client: EvalClient, run_id: str, states: Sequence[str] = ()) -> Iterator[pb.Result]:
    """A run's results, in any of `states` (all when none): one state is sent as `state`, which every server
    takes; several as `states`."""
    wanted = sorted({_STATES[state] for state in states})
    if len(wanted) == 1:
        return client.list_results(run_id, state=wanted[0], page_size=1000)
    return client.list_results(run_id, states=wanted, page_size=1000)


def _check_outputs(*paths: str | None) -> None:
    """Refuse, before any call, an output file evalctl could not write: one in a directory that does not exist,
    or a directory (`run --jsonl missing/r.jsonl` ran the whole run, then failed naming its temporary file)."""
    for path in paths:
        if not path:
            continue
        where = Path(path)
        if where.is_dir():
            raise ValueError(f"cannot write {path}: it is a directory")
        if not where.parent.is_dir():
            raise ValueError(f"cannot write {path}: no such directory {str(where.parent)!r}")


@contextlib.contextmanager
def _whole_file(path: str) -> Iterator[str]:
    """A path to write `path` through: a file beside it, put in its place once written whole and removed
    otherwise. Written in place, an export cut short (Ctrl-C, a dropped connection while paging the
    results) left a truncated file that a CI step then read as the run's results. An error writing the
    file beside it names `path`, the file the user asked for."""
    partial = f"{path}.partial"
    try:
        try:
            yield partial
            os.replace(partial, path)
        except OSError as exc:
            if exc.filename not in (partial, path):
                raise
            raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def _export(client: EvalClient, run: pb.Run, args: argparse.Namespace) -> None:
    if getattr(args, "jsonl", None):
        with _whole_file(args.jsonl) as partial, open(partial, "w", encoding="utf-8") as handle:
            write_jsonl(_results(client, run.id), handle)
    if getattr(args, "junit", None):
        with _whole_file(args.junit) as partial:
            write_junit(run, _results(client, run.id), partial)


def _check_follow_flags(args: argparse.Namespace) -> None:
    """Refuse, before any call, what `run`, `rerun` and `watch` do only while following a run: --fail-under,
    --junit and --jsonl beside --detach, which follows nothing (`run --detach --fail-under 99 --junit jd.xml`
    exited 0 with no file and no word, a CI gate silently gone); and an output evalctl could not write."""
    if getattr(args, "detach", False):
        flags = (("--fail-under", args.fail_under), ("--junit", args.junit), ("--jsonl", args.jsonl))
        given = [flag for flag, value in flags if value is not None]
        if given:
            named = " and ".join(given)
            raise ValueError(
                f"with --detach nothing follows the run, so {named} would do nothing; give {named} to"
                " `evalctl watch RUN_ID`"
            )
    _check_outputs(args.jsonl, args.junit)


def cmd_run(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    _check_follow_flags(args)
    spec = load_spec(Path(args.spec))
    _print_spec_warnings(console, spec)
    if args.cache:
        spec.create_request.cache_mode = cache_mode(args.cache)
    if args.request_id:
        spec.create_request.request_id, spec.request_id_given = args.request_id, True
    spec.create_request.labels.update(dict(args.label))
    request = spec.request()
    if not request.request_id:  # made here, not by the SDK, so that an interrupted create can say it
        request.request_id = new_request_id()
    called = time.time()
    # The same request again: --cache too, which the request carries (a different request under the same
    # request_id is REQUEST_ID_CONFLICT).
    given = [*(["--cache", args.cache] if args.cache else []), *(f"--label={k}={v}" for k, v in args.label)]
    with _creating(
        "CreateRun",
        request.request_id,
        shlex.join(["evalctl", "run", args.spec, *given, "--request-id", request.request_id]),
    ):
        created = client.create_run_from(request)
    return _follow_created(client, created.run, args, console, _created_words(spec, created, called))


CLOCK_SKEW_S = 60.0  # how far behind this machine's clock the server's may be without `run` misreporting


def _created_words(spec: RunSpec, created: pb.runs.CreateRunResponse, called: float) -> str:
    """What `run` says of the run CreateRun answered with. A request_id (the spec's or --request-id) may name a
    run made before (CreateRun then answers with it, AIP-155), which "created run" misreported. Only a named
    request_id can meet one (evalctl's own are fresh uuids, and a retry of this call is this call).

    CreateRunResponse does not say whether the run is new (the server knows; the response has only the run and
    its job count), so evalctl judges by the run: one CreateRun just made is PENDING (the proto's promise), so a
    run in any other status existed before, whenever it was made (a retry seconds after the first run ended
    said "created run" of it); and a run created before the call began, by more than a server clock behind
    this machine's may be (CLOCK_SKEW_S), existed too. What neither catches, a run made less than a minute
    ago and still PENDING, says "created"; and a run this call made whose answer was lost, found by the SDK's
    retry once it had begun, says "already existed" (it had, by the retry)."""
    run = created.run
    if spec.request_id_given and _existed(run, called):
        when = run.create_time.ToDatetime(tzinfo=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (
            f"run {run.id} already existed for request_id {spec.create_request.request_id!r} (created {when}); "
            "following it"
        )
    return f"created run {run.id} ({plural(created.job_count, 'job')})"


def _existed(run: pb.Run, called: float) -> bool:
    """Whether a run a create answered with (CreateRun, RerunRun) existed before the call began at `called`
    (see `_created_words`): it is no longer PENDING, or was created before the call by more than CLOCK_SKEW_S."""
    return run.status != pb.run.RUN_STATUS_PENDING or run.create_time.ToNanoseconds() < (called - CLOCK_SKEW_S) * 1e9


#: Which items of its source a rerun of each scope holds, as the server selects them: an item that never ran
#: (its run cancelled, or stopped on its budget) counts as errored, and "the 5 errored items" of a cancelled
#: run named items that had never run.
_RERUN_WORDS = {
    "errored": "errored or not run",
    "failed_or_errored": "failed, errored or not run",
    "all": "every item",
}


def cmd_rerun(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    """A new run of an ended run's errored (--failed: failed or errored; --all: every) items, with its stored
    definition, followed to its end as `run` follows one: the same progress, exports, verdict and exit codes."""
    _check_follow_flags(args)
    scope = "all" if args.all else "failed_or_errored" if args.failed else "errored"
    request_id = args.request_id or new_request_id()
    called = time.time()
    flags = {"errored": "", "failed_or_errored": " --failed", "all": " --all"}[scope]
    flags += f" --cache {args.cache}" if args.cache else ""
    try:
        with _creating("RerunRun", request_id, f"evalctl rerun {args.run_id}{flags} --request-id {request_id}"):
            run = client.rerun_run(
                args.run_id,
                scope=scope,
                request_id=request_id,
                cache_mode=cache_mode(args.cache) if args.cache else pb.cache.CACHE_MODE_UNSPECIFIED,
            )
    except EvalError as exc:
        # The server's words name RerunScope values, not evalctl's flags.
        if exc.reason == "NOTHING_TO_RERUN" and scope != "all":
            exc.message, exc.hint = _nothing_to_rerun(exc.metadata.get("run_id") or args.run_id, scope)
        raise
    jobs = run.counts.total_items * run.repetitions
    created = (
        f"created run {run.id} ({plural(jobs, 'job')}): a rerun of {plural(run.counts.total_items, 'item')}"
        f" ({_RERUN_WORDS[scope]}) of run {run.rerun_of}"
    )
    if args.request_id and _existed(run, called):
        created = f"run {run.id} already existed for request_id {args.request_id!r}: following it"
    return _follow_created(client, run, args, console, created)


def _nothing_to_rerun(run_id: str, scope: str) -> tuple[str, str]:
    """A NOTHING_TO_RERUN refusal in evalctl's words, its message and hint: the server's named
    RERUN_SCOPE_ITEMS_ERRORED and RERUN_SCOPE_ITEMS_ALL, which a user of the command line cannot type."""
    selected = "errored" if scope == "errored" else "failed or errored"
    message = (
        f"nothing to rerun: no item of run {run_id} is {selected} (every evaluation of every item has a result,"
        f" and none is {selected})"
    )
    hint = (
        "`evalctl rerun RUN_ID --failed` reruns the failed or errored items, `--all` every item"
        if scope == "errored"
        else "`evalctl rerun RUN_ID --all` reruns every item"
    )
    return message, hint.replace("RUN_ID", run_id)


def _follow_created(client: EvalClient, run: pb.Run, args: argparse.Namespace, console: Console, created: str) -> int:
    """What `run` and `rerun` do with the run they created: say so (`created`, unless --json, on stderr), exit at
    once with --detach (the run's id alone on stdout), else follow it to its end, export its results, print it
    and return its verdict. Ctrl-C from the announcement on raises `Interrupted`, which names the run."""
    try:
        if not args.json:
            console.print(created)
        if args.detach:  # the run id alone on stdout (`R=$(evalctl run spec.yaml --detach)`), or the run as JSON
            if args.json:
                _print_json(to_dict(run))
            else:
                print(run.id)
            return EXIT_OK
        final = _follow(client, run.id, 0, args, console)
    except KeyboardInterrupt as exc:  # before the watch began (in it, _follow raises Interrupted with its seq)
        raise Interrupted(run.id, 0, _stop_signal(exc)) from None
    _export(client, final, args)
    if args.json:
        _print_json(to_dict(final))
    else:
        _summary(console, final)
    return _verdict(final, args.fail_under, console)


def cmd_watch(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    _check_follow_flags(args)
    final = _follow(client, args.run_id, args.after_seq, args, console)
    _export(client, final, args)
    if not args.json:
        _summary(console, final)
    return _verdict(final, args.fail_under, console)


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    """Check a spec and its dataset as `run` would, without a server."""
    path = Path(args.spec)
    try:
        spec = load_spec(path)
    except SpecError as exc:
        if args.json:
            _print_json({"valid": False, "problems": [{"path": p.path, "message": p.message} for p in exc.problems]})
        else:
            _print_spec_error(console, exc)
        return EXIT_ERROR
    _print_spec_warnings(console, spec)
    for judged in needs_default_judge(spec.request().graders):  # validate's alone: `run` meets the server's answer
        console.print(
            f"warning: {judged} names no model and endpoint of its own: the server's default judge grades it, and"
            " a server started without one (--judge-base-url, --judge-model) refuses the run"
        )
    if args.json:
        _print_json({"valid": True, "problems": [], "request": to_dict(spec.request())})
    else:
        console.print(f"{path}: valid: {spec.describe()}")
    return EXIT_OK


def _print_spec_warnings(console: Console, spec: RunSpec) -> None:
    """A line on stderr for each likely mistake of a valid spec (RunSpec.warnings), which does not fail it."""
    for warning in spec.warnings():
        console.print(f"warning: {warning}")


def _print_spec_error(console: Console, error: SpecError) -> None:
    console.print(f"evalctl: {error.source}: {plural(len(error.problems), 'problem')}")
    for problem in error.problems:
        console.print(f"  {problem}")
    console.print("  every spec key, target kind and grader option: docs/spec.md")


def cmd_report(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    _check_outputs(args.html)
    run = client.get_run(args.run_id)
    page = render_html(run, _results(client, run.id))
    Path(args.html).write_text(page, encoding="utf-8")
    console.print(
        f"wrote {args.html}: {_status(run.status)} run {run.id}, pass rate {format_rate(pass_rate_percent(run.counts))}"
    )
    return EXIT_OK


def cmd_get(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    run = client.get_run(args.run_id)
    if args.json:
        _print_json(to_dict(run))
    else:
        _summary(_console(), run)  # the run is the output: stdout (`evalctl get RUN > f` left f empty)
    return _verdict(run, args.fail_under, console) if args.fail_under is not None else EXIT_OK


def cmd_list(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    labels = dict(args.label)
    statuses = [_STATUSES[s] for s in args.status]
    runs = list(
        client.list_runs(
            statuses=statuses,
            labels=labels,
            dataset_id=args.dataset_id,
            limit=args.limit + 1,  # one more than shown: whether there are more
            show_deleted=args.show_deleted,
            filter=_run_filter(args),
            order_by="create_time" if args.oldest_first else "",
            # The table shows names, statuses and counts: not the definitions (up to MBs each); --json is whole.
            view=pb.runs.RUN_VIEW_FULL if args.json else pb.runs.RUN_VIEW_BASIC,
        )
    )
    more = len(runs) > args.limit
    runs = runs[: args.limit]
    if more:  # the listing stopped at 50 in silence
        console.print(_more_listed(len(runs), "runs", args.limit, "oldest" if args.oldest_first else "newest"))
    if args.json:
        _print_json([to_dict(r) for r in runs])
        return EXIT_OK
    table = _Table("id", "name", "status", "progress", "pass rate", "created")
    for run in runs:
        rate = pass_rate_percent(run.counts)
        table.add_row(
            run.id,
            run.display_name,
            _status(run.status) + (" (deleted)" if run.HasField("delete_time") else ""),
            f"{run.counts.completed_evaluations}/{run.counts.total_evaluations}",
            format_rate(rate),
            run.create_time.ToDatetime().isoformat(timespec="seconds") + "Z",
        )
    _print_table(table, "runs")  # the listing is the output: stdout, unlike progress and messages
    return EXIT_OK


#: The singular of each kind of thing listed.
_ONE = {"runs": "run", "deliveries": "delivery", "graders": "grader", "targets": "target"}


def _more_listed(shown: int, what: str, limit: int, first: str = "newest") -> str:
    """The stderr line of a listing cut at its --limit (stdout keeps the listing alone)."""
    things = _ONE.get(what, what) if shown == 1 else what
    return f"showing the {first} {shown} {things}; more exist: --limit {max(2 * limit, 100)} shows more"


def _run_filter(args: argparse.Namespace) -> str:
    """ListRuns' filter of `evalctl list`: --filter, and the terms --since and --name stand for, joined by AND."""
    terms = [args.filter] if args.filter else []
    if args.since is not None:
        terms.append(f'create_time >= "{args.since}"')
    if args.name:
        terms.append(f"display_name:{_quoted(args.name)}")
    return " AND ".join(terms)


def _quoted(text: str) -> str:
    """A string of a ListRuns filter: in double quotes, each backslash and double quote escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _since(text: str) -> str:
    """A --since: a duration back from now (`30m`, `24h`, `7d`, `2w`) or an RFC 3339 time, as the RFC 3339 time
    (UTC) a filter compares create_time with."""
    when: datetime.datetime | None = None
    try:
        if found := _DURATION.fullmatch(text.strip()):
            back = datetime.timedelta(seconds=int(found.group(1)) * _UNIT_SECONDS[found.group(2)])
            when = datetime.datetime.now(datetime.UTC) - back
        else:
            when = datetime.datetime.fromisoformat(text.strip().upper())
    except (ValueError, OverflowError):  # not a time; a duration back past year 1
        when = None
    if when is None or when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 24h, 7d, 2w) nor an RFC 3339 time with its zone"
            " (2026-01-02T15:04:05Z)"
        )
    return when.astimezone(datetime.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _print_table(table: Table, what: str) -> None:
    """A listing's table on stdout; an empty one is `no runs` (or the like) on stderr instead, not a table of
    headers alone (stdout stays empty: a script counting lines counts none)."""
    if table.row_count:
        _console().print(table)
    else:
        _console(stderr=True).print(f"no {what}")


def cmd_change(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    """cancel, delete or undelete: one call on the run, which is the output (stdout); delete and undelete say
    what they did on stderr, as `datasets delete` does (delete printed the run's summary alone, which read as
    if nothing had changed)."""
    change = {"cancel": client.cancel_run, "delete": client.delete_run, "undelete": client.undelete_run}[args.command]
    run = change(args.run_id)
    if not args.json and args.command == "delete":
        console.print(
            f"deleted run {run.id}: `evalctl undelete {run.id}` restores it until the server purges it"
            " (--deleted-run-retention-s after its deletion, 30 days by default)"
        )
    elif not args.json and args.command == "undelete":
        console.print(f"restored run {run.id}")
    if args.json:
        _print_json(to_dict(run))
    else:
        _summary(_console(), run)
    return EXIT_OK


def cmd_update(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    """UpdateRun with an update mask of exactly what was given: --label and --remove-label (and the
    annotations') change those keys alone, never the map whole. The changed run is the output (stdout)."""
    if (
        args.name is None
        and args.description is None
        and not args.label
        and not args.remove_label
        and not args.annotation
        and not args.remove_annotation
    ):
        raise ValueError(
            "update: nothing to change; give --name, --description, --label, --remove-label, --annotation"
            " or --remove-annotation"
        )
    run = client.update_run(
        args.run_id,
        display_name=args.name,
        description=args.description,
        set_labels=dict(args.label),
        remove_labels=args.remove_label,
        set_annotations=dict(args.annotation),
        remove_annotations=args.remove_annotation,
        etag=args.etag,
    )
    if args.json:
        _print_json(to_dict(run))
        return EXIT_OK
    console.print(f"updated run {run.id}")
    _summary(_console(), run)
    if run.labels:
        _console().print("labels: " + for_terminal(_labels_text(run.labels)), markup=False)
    return EXIT_OK


def cmd_results(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    _check_outputs(args.output)
    fmt = "jsonl" if args.json and args.format == "table" else args.format
    results = _results(client, args.run_id, args.state)
    if fmt == "junit":
        if args.output:
            with _whole_file(args.output) as partial:
                write_junit(client.get_run(args.run_id), results, partial)
        else:
            write_junit(client.get_run(args.run_id), results, "/dev/stdout")
    elif fmt == "jsonl":
        if args.output:
            with _whole_file(args.output) as partial, open(partial, "w", encoding="utf-8") as handle:
                write_jsonl(results, handle)
        else:
            write_jsonl(results, sys.stdout)
    else:
        table = _Table("item", "rep", "grader", "state", "score", "explanation")
        for result in results:
            state = pb.run.ResultState.Name(result.state).removeprefix("RESULT_STATE_")
            explanation = result.error_reason or listed_explanation(result)
            table.add_row(
                result.item_id, str(result.repetition), result.grader, state, f"{result.score:.2f}", explanation
            )
        if args.output:
            with open(args.output, "w", encoding="utf-8") as handle:
                Console(file=handle, width=200).print(table)
        else:
            _print_table(table, "results")
    return EXIT_OK


_CHANGES = cast(
    "dict[str, pb.comparison.ComparisonChange]",
    {
        name.removeprefix("COMPARISON_CHANGE_").lower(): value
        for name, value in pb.comparison.ComparisonChange.items()
        if value
    },
)


def _unpaired_reason_name(value: int) -> str:
    """An UnpairedReason as `compare --show unpaired` lists it (`one_run`, `item_changed`...); "-" for
    UNSPECIFIED, which servers from before the field return on unpaired evaluations too."""
    if not value:
        return "-"
    return _enum_name(pb.comparison.UnpairedReason, value, "UNPAIRED_REASON_").lower()


def _verdict_name(value: int) -> str:
    return _enum_name(pb.comparison.ComparisonVerdict, value, "COMPARISON_VERDICT_")


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    """An enum value's name without its prefix, or its number for a value newer than this evalctl (proto3
    keeps a value it does not know; naming it raised ValueError and lost the listing it was in)."""
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def _comparison_row(g: pb.comparison.GraderComparison) -> list[str]:
    """One grader's table row. Without pairs its rates and tests are "-": "0.0% -> 0.0%, p 1" read as a
    comparison that found no change when nothing was compared."""

    def measured(text: str) -> str:
        return text if g.pairs else "-"

    return [
        f"{g.grader} (definition changed)" if g.definition_changed else g.grader or "(overall)",
        str(g.pairs),
        measured(format_rate(100 * g.baseline_pass_rate)),  # as `run` and `get` print a rate: 13/16 is 81.3% in each
        measured(format_rate(100 * g.candidate_pass_rate)),
        measured(f"{100 * g.pass_rate_delta:+.1f} [{100 * g.delta_ci_low:+.1f}, {100 * g.delta_ci_high:+.1f}]"),
        f"+{g.improved} -{g.regressed}",
        measured(f"{g.mcnemar_p_value:.3g}"),
        measured(f"{g.mean_score_delta:+.3f} [{g.score_delta_ci_low:+.3f}, {g.score_delta_ci_high:+.3f}]"),
        str(g.unpaired),
        _verdict_name(g.verdict),
    ]


def comparison_gate_failures(
    comparison: pb.RunComparison, fail_on_regression: bool, max_unpaired: int | None
) -> list[str]:
    """Why a comparison fails the gates asked for, one line each; none when it passes. With no pairs at all
    --fail-on-regression fails: no grader can have REGRESSED when nothing was compared, and a gate that
    passes then passes a candidate that errored on every item or was graded under other grader names."""
    failures = []
    overall = comparison.overall
    if fail_on_regression:
        if not overall.pairs:
            failures.append(
                f"no pairs: no evaluation was graded in both runs ({overall.unpaired} unpaired), so nothing"
                " was compared; same item ids and grader names in both runs, errors excluded, make pairs"
            )
        regressed = [g.grader for g in comparison.graders if g.verdict == pb.comparison.COMPARISON_VERDICT_REGRESSED]
        if regressed:
            failures.append(f"regressed at alpha {comparison.alpha:g}: {for_terminal(', '.join(regressed))}")
    if max_unpaired is not None and overall.unpaired > max_unpaired:
        failures.append(
            f"{overall.unpaired} evaluations unpaired (missing from a run, or ERROR or SKIPPED in either),"
            f" more than --max-unpaired {max_unpaired}"
        )
    return failures


def comparison_not_comparable(
    comparison: pb.RunComparison, fail_on_regression: bool, max_unpaired: int | None
) -> str | None:
    """The one NO VERDICT line of a gated compare of runs that are not comparable, or None when they are:
    a grader whose definition changed under its name (its evaluations pair nothing, NO_PAIRS), or
    evaluations of different items under the same id (more than --max-unpaired of them; with
    --fail-on-regression, also when nothing else was paired). Neither is evidence about the candidate, either
    way: a stricter grader made the same outputs "REGRESSED", a lenient one could hide a regression."""
    reasons = []
    changed = [g.grader for g in comparison.graders if g.definition_changed]
    if changed:
        reasons.append(
            f"the definition of grader {for_terminal(', '.join(changed))} differs between the runs"
            " (rerun the baseline with it)"
        )
    items = comparison.changed_items
    if items and (
        (max_unpaired is not None and items > max_unpaired) or (fail_on_regression and not comparison.overall.pairs)
    ):
        bound = f", more than --max-unpaired {max_unpaired}" if max_unpaired is not None else ""
        reasons.append(
            f"{items} evaluations are of different items in the two runs under the same item id{bound}"
            " (compare runs of the same dataset)"
        )
    if not reasons:
        return None
    return "NO VERDICT: the runs are not comparable: " + "; ".join(reasons)


def cmd_compare(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    baseline = args.baseline
    if isinstance(baseline, tuple):  # latest:KEY=VALUE
        key, value = baseline
        baseline = _latest_labelled(client, key, value, args.candidate)
        if baseline is None:
            console.print(
                f"NO VERDICT: there is no baseline: no run labelled {key}={value} created before the candidate"
                f" SUCCEEDED and passed, a rerun aside (label one: evalctl update RUN_ID --label {key}={value})",
                markup=False,
            )
            return EXIT_NOT_COMPARABLE
        console.print(
            f"baseline: {baseline}, the newest run labelled {key}={value} created before the candidate that"
            " SUCCEEDED and passed (not a rerun)",
            markup=False,
        )
    comparison = client.compare_runs(baseline, args.candidate, alpha=args.alpha)
    if args.json:
        _print_json(to_dict(comparison))
    else:
        level = 100 * (1 - comparison.alpha)
        table = _Table(
            "grader",
            "pairs",
            "baseline",
            "candidate",
            f"delta pp [{level:g}% CI]",
            "changed",
            "McNemar p",
            f"score delta [{level:g}% CI]",
            "unpaired",
            "verdict",
            title=f"{comparison.candidate_run_id} vs baseline {comparison.baseline_run_id}"
            + (" (partial: a run is still executing)" if comparison.partial else ""),
            caption=(
                f"{comparison.changed_items} evaluations are of different items in the two runs: not paired"
                if comparison.changed_items
                else None
            ),
        )
        for grader in [*comparison.graders, comparison.overall]:
            table.add_row(*_comparison_row(grader))
        _console().print(table)
        if args.show:
            # Unpaired evaluations say why: of one run, of different items, of a changed grader, or not graded.
            why = args.show == "unpaired"
            columns = ["item", "rep", "grader", *(["why unpaired"] if why else [])]
            items = _Table(*columns, "baseline output", "candidate output", "candidate explanation")
            shown = client.list_comparison_items(
                comparison.baseline_run_id, comparison.candidate_run_id, change=_CHANGES[args.show], page_size=100
            )
            for _, item in zip(range(args.limit), shown, strict=False):
                items.add_row(
                    item.item_id,
                    str(item.repetition),
                    item.grader,
                    *([_unpaired_reason_name(item.unpaired_reason)] if why else []),
                    listed_output(item.baseline),
                    listed_output(item.candidate),
                    item.candidate.error_reason or listed_explanation(item.candidate),
                )
            _console().print(items)
    gated = args.fail_on_regression or args.max_unpaired is not None
    if comparison.partial and gated:
        console.print(_no_comparison_verdict(client, comparison))
        return EXIT_NOT_ENDED
    not_comparable = (
        comparison_not_comparable(comparison, args.fail_on_regression, args.max_unpaired) if gated else None
    )
    # A grader that kept its definition and REGRESSED fails the gate whatever else changed (a changed grader
    # pairs nothing, so it cannot be one): NO VERDICT first hid a real regression behind another grader's edit.
    # So does a candidate whose unchanged graders paired nothing over the same items (it errored throughout).
    regressed = any(g.verdict == pb.comparison.COMPARISON_VERDICT_REGRESSED for g in comparison.graders)
    unchanged = [g for g in comparison.graders if not g.definition_changed]
    unpaired = bool(unchanged) and not comparison.overall.pairs and not comparison.changed_items
    if not_comparable and not (args.fail_on_regression and (regressed or unpaired)):
        console.print(not_comparable, markup=False)
        return EXIT_NOT_COMPARABLE
    failures = comparison_gate_failures(comparison, args.fail_on_regression, args.max_unpaired)
    for failure in [*failures, *([not_comparable] if not_comparable else [])]:
        console.print(failure, markup=False)
    return EXIT_BELOW if failures else EXIT_OK


def _latest_labelled(client: EvalClient, key: str, value: str, candidate: str) -> str | None:
    """The id of the newest run labelled key=value, created before the candidate, that SUCCEEDED and passed
    its own bar (`overall_passed`), and is not a rerun; or None. A CI job compares each run with the last
    good one of its main branch (`latest:branch=main`) without keeping that run's id between jobs.

    Before the candidate: with two pipelines overlapping and the later run ending first, the earlier
    candidate was compared with a newer run, which turned its regressions into improvements. Not a rerun: a
    rerun keeps its source's labels but holds only the items it reran (its failed ones), so it paired 5 of
    40 evaluations and a candidate that regressed on the other 15 items passed the gate. Passed: a main run
    that failed its own bar is no baseline to hold a candidate to."""
    created = client.get_run(candidate).create_time.ToJsonString()
    labelled = client.list_runs(
        labels={key: value},
        statuses=[pb.run.RUN_STATUS_SUCCEEDED],
        filter=f'create_time < "{created}" AND overall_passed = true',
        page_size=20,
        limit=1000,  # runs read lazily, a page at a time, until one is the baseline; reruns are few
        view=pb.runs.RUN_VIEW_BASIC,
    )
    return next((run.id for run in labelled if run.id != candidate and not run.rerun_of), None)


def _no_comparison_verdict(client: EvalClient, comparison: pb.RunComparison) -> str:
    """The NO VERDICT line of a gated compare of a partial comparison (a run still executing), as `get
    --fail-under` says of a run that has not ended: a gate judged on the pairs there were so far passed a
    candidate that regressed once its run ended."""
    executing = []
    for run_id in dict.fromkeys([comparison.baseline_run_id, comparison.candidate_run_id]):
        run = client.get_run(run_id)
        if run.status not in pb.TERMINAL_STATUSES:
            executing.append(run)
    if not executing:  # it ended since: the comparison still covers only what there was then
        return "NO VERDICT: the comparison is partial (a run was still executing); compare again"
    states = ", ".join(f"run {run.id} is {_status(run.status)}" for run in executing)
    waits = " and ".join(f"`evalctl watch {run.id}`" for run in executing)
    return (
        f"NO VERDICT: the comparison is partial: {states}; {waits} waits for its end, then compare again"
        " (a gate judges ended runs only)"
    )


_DELIVERY_STATUSES = cast(
    "dict[str, pb.webhooks.WebhookDeliveryStatus]",
    {
        name.removeprefix("WEBHOOK_DELIVERY_STATUS_").lower(): value
        for name, value in pb.webhooks.WebhookDeliveryStatus.items()
        if value
    },
)
WEBHOOK_EVENT_TYPES = ("run.created", "run.started", "run.succeeded", "run.failed", "run.cancelled")


def _print_webhooks(args: argparse.Namespace, webhooks: Sequence[pb.Webhook]) -> None:
    if args.json:
        _print_json([to_dict(w) for w in webhooks] if args.webhooks_command == "list" else to_dict(webhooks[0]))
        return
    table = _Table("id", "url", "events", "enabled", "description")
    for webhook in webhooks:
        enabled = "yes" if webhook.enabled else f"no {webhook.disabled_reason}".strip()
        table.add_row(webhook.id, webhook.url, " ".join(webhook.event_types), enabled, webhook.description)
    _print_table(table, "webhooks")
    if webhooks and webhooks[0].signing_secret:  # create and rotate-secret: shown this once
        print(f"signing secret (shown only now): {webhooks[0].signing_secret}")
    elif args.webhooks_command == "create":  # a --request-id used before: the webhook it made, its secret unsaid
        _console(stderr=True).print(
            f"webhook {webhooks[0].id} already existed for --request-id {args.request_id}; its signing secret was"
            f" shown only when it was made (`evalctl webhooks rotate-secret {webhooks[0].id}` makes a new one)"
        )


def cmd_webhooks(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    command = args.webhooks_command
    if command == "deliveries":
        status = _DELIVERY_STATUSES.get(args.status or "", pb.webhooks.WEBHOOK_DELIVERY_STATUS_UNSPECIFIED)
        listed = client.list_webhook_deliveries(args.webhook_id, status=status)
        deliveries = list(itertools.islice(listed, args.limit + 1))  # one more than shown: whether there are more
        if len(deliveries) > args.limit:
            deliveries = deliveries[: args.limit]
            console.print(_more_listed(len(deliveries), "deliveries", args.limit))
        if args.json:
            _print_json([to_dict(d) for d in deliveries])
            return EXIT_OK
        table = _Table("id", "event", "run", "status", "attempts", "last code", "last error")
        for d in deliveries:
            status_name = pb.webhooks.WebhookDeliveryStatus.Name(d.status).removeprefix("WEBHOOK_DELIVERY_STATUS_")
            code = str(d.last_response_code or "-")
            table.add_row(d.id, d.event_type, d.run_id, status_name, str(d.attempts), code, d.last_error)
        _print_table(table, "deliveries")
        return EXIT_OK
    if command == "delete":
        client.delete_webhook(args.webhook_id)
        if not args.json:
            console.print(f"deleted webhook {args.webhook_id}")
        return EXIT_OK
    if command == "create":
        webhooks = [
            client.create_webhook(
                args.url,
                event_types=args.event,
                description=args.description,
                enabled=not args.disabled,
                request_id=args.request_id,
            )
        ]
    elif command == "list":
        webhooks = list(client.list_webhooks())
    elif command == "get":
        webhooks = [client.get_webhook(args.webhook_id)]
    elif command == "update":
        if args.url is None and not args.event and args.description is None and args.enabled is None:
            raise ValueError(
                "webhooks update: nothing to change; give --url, --event, --description, --enable or --disable"
            )
        webhooks = [
            client.update_webhook(
                args.webhook_id,
                url=args.url,
                event_types=args.event or None,
                description=args.description,
                enabled=args.enabled,
            )
        ]
    else:
        webhooks = [client.rotate_webhook_secret(args.webhook_id, revoke_previous=args.revoke_previous)]
    _print_webhooks(args, webhooks)
    return EXIT_OK


#: AddDatasetItems requests are cut to at most this many items and (serialized) bytes: a quarter of the
#: smallest max_message_bytes a server may be configured with (256 KiB; 16 MiB by default), so each fits
#: whatever the server's setting, and well under its 10,000 items per call. An item larger than this goes
#: alone, and the server says whether it fits.
ADD_CHUNK_ITEMS = 1000
ADD_CHUNK_BYTES = 64 * 1024


def item_chunks(items: Sequence[pb.Item]) -> Iterator[list[pb.Item]]:
    """`items` in order, cut into AddDatasetItems requests of at most ADD_CHUNK_ITEMS and ADD_CHUNK_BYTES."""
    chunk: list[pb.Item] = []
    size = 0
    for item in items:
        item_size = item.ByteSize() + 8  # the field's tag and length in the request
        if chunk and (len(chunk) >= ADD_CHUNK_ITEMS or size + item_size > ADD_CHUNK_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item_size
    if chunk:
        yield chunk


def _dataset_file(path: str) -> list[pb.Item]:
    """The items of a dataset file, read and checked whole (by spec.load_items, as `run` reads a spec's
    dataset) before anything is sent: a bad row refuses the file, naming its line, with nothing written."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{path}: a directory, not a dataset file")
    if not file.is_file():
        raise ValueError(f"{path}: no such dataset file")
    try:
        return load_items(file)
    except SpecError as exc:  # each problem names the file and line: one line each, without the spec's hint
        problems = [str(problem) for problem in exc.problems]
        if len(problems) == 1:
            raise ValueError(problems[0]) from None
        raise ValueError(
            f"{path}: {plural(len(problems), 'problem')}\n" + "\n".join(f"  {p}" for p in problems)
        ) from None


def _chunk_request_id(request_id: str | None, n: int) -> str | None:
    """The request_id of the `n`th AddDatasetItems chunk of a command given `--request-id` (None without one:
    the SDK makes each a fresh one): derived from it, so that the same command again (the same file, so the same
    chunks) replays each chunk it added before and adds only the rest. A uuid5, whatever the given id's length,
    which the server bounds (128 characters) as it does every request_id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"evalctl:{request_id}#items-{n}")) if request_id else None


def _add_items(
    client: EvalClient,
    dataset: pb.Dataset,
    items: Sequence[pb.Item],
    source: str,
    console: Console,
    request_id: str | None,
) -> pb.Dataset:
    """Append `items` (read from `source`) in chunks (`item_chunks`); the dataset after the last. Each chunk has
    its own request_id (`_chunk_request_id`), so the SDK's retries of a chunk whose answer was lost add nothing
    twice, nor, with --request-id, does the command run again. A chunk the server refuses stops the rest, after a
    line saying how many of the file's items the dataset has (adding the file again adds again what was added,
    unless --request-id was given)."""
    added = 0
    for n, chunk in enumerate(item_chunks(items)):
        try:
            dataset = client.add_dataset_items(dataset.id, chunk, request_id=_chunk_request_id(request_id, n)).dataset
        except EvalError as exc:
            if exc.reason == "REQUEST_ID_CONFLICT" and request_id:  # the server names the chunk's derived id
                exc.message = (
                    f"--request-id {request_id} was used before to add other items (its chunk {n + 1}), or to add"
                    " them to another dataset"
                )
                exc.hint = "give a new --request-id, or the same file and dataset as the command that used it"
            if added:
                console.print(
                    f"evalctl: dataset {dataset.id} has the first {added} of the {len(items)} items of {source};"
                    " the rest were not added, for the error below"
                )
            else:
                console.print(f"evalctl: no item of {source} was added to dataset {dataset.id}, for the error below")
            raise
        added += len(chunk)
    return dataset


def _when(timestamp: Any) -> str:
    return timestamp.ToDatetime().isoformat(timespec="seconds") + "Z" if timestamp.seconds else "-"


def _print_datasets(args: argparse.Namespace, datasets: Sequence[pb.Dataset]) -> None:
    if args.json:
        _print_json([to_dict(d) for d in datasets] if args.datasets_command == "list" else to_dict(datasets[0]))
        return
    table = _Table("id", "name", "items", "created", "updated", "description", "labels")
    for dataset in datasets:
        table.add_row(
            dataset.id,
            dataset.display_name,
            str(dataset.item_count),
            _when(dataset.create_time),
            _when(dataset.update_time),
            dataset.description,
            ", ".join(f"{key}={value}" for key, value in sorted(dataset.labels.items())),
        )
    _print_table(table, "datasets")


def cmd_datasets(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    command = args.datasets_command
    if command == "items":
        listed = client.list_dataset_items(args.dataset_id, page_size=1000)
        if args.json:  # one Item per line, as `datasets create --from` and `run` read a .jsonl dataset
            for item in listed:
                sys.stdout.write(json.dumps(to_dict(item), sort_keys=True) + "\n")
            return EXIT_OK
        table = _Table("id", "input", "expected output", "response")
        for item in listed:
            table.add_row(item.id, item.input, item.expected_output, item.response.content)
        _print_table(table, "items")
        return EXIT_OK
    if command == "delete":
        client.delete_dataset(args.dataset_id)
        if not args.json:
            console.print(f"deleted dataset {args.dataset_id}")
        return EXIT_OK
    if command == "create":
        items = _dataset_file(args.from_file) if args.from_file else []  # read whole before the dataset exists
        dataset = client.create_dataset(
            args.name, description=args.description, labels=dict(args.label), request_id=args.request_id
        )
        if items:
            dataset = _add_items(client, dataset, items, args.from_file, console, args.request_id)
            if not args.json:
                console.print(f"added {plural(len(items), 'item')} from {args.from_file}")
        datasets = [dataset]
    elif command == "add":
        items = _dataset_file(args.file)
        datasets = [_add_items(client, client.get_dataset(args.dataset_id), items, args.file, console, args.request_id)]
        if not args.json:
            console.print(f"added {plural(len(items), 'item')} from {args.file}")
    elif command == "list":
        datasets = list(client.list_datasets())
    else:
        datasets = [client.get_dataset(args.dataset_id)]
    _print_datasets(args, datasets)
    return EXIT_OK


def _saved_rows(
    args: argparse.Namespace, listed: Iterator[Any], what: str, get: Callable[[], Any]
) -> tuple[list[Any], bool]:
    """The saved graders or targets a `list` (at most --limit; stderr says when more exist) or `get` shows,
    and whether it was a listing."""
    if args.saved_command == "list":
        found = list(itertools.islice(listed, args.limit + 1))  # one more than shown: whether there are more
        if len(found) > args.limit:
            found = found[: args.limit]
            _console(stderr=True).print(_more_listed(len(found), what, args.limit))
        return found, True
    return [get()], False


def _labels_text(labels: Any) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(labels.items()))


def cmd_graders(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    """graders list|get|delete: the saved graders a spec names (`saved: ID`)."""
    if args.saved_command == "delete":
        client.delete_grader(args.grader_id)
        if not args.json:
            console.print(f"deleted grader {args.grader_id} (every version; runs that used it keep their copies)")
        return EXIT_OK
    graders, listing = _saved_rows(
        args, client.list_graders(), "graders", lambda: client.get_grader(args.grader_id, args.version)
    )
    if args.json:
        _print_json([to_dict(g) for g in graders] if listing else to_dict(graders[0]))
        return EXIT_OK
    table = _Table("id", "name", "kind", "version", "created", "description", "labels")
    for grader in graders:
        table.add_row(
            grader.id,
            grader.display_name,
            grader.grader.WhichOneof("kind") or "-",
            f"{grader.version} of {grader.latest_version}",
            _when(grader.version_create_time),
            grader.description,
            _labels_text(grader.labels),
        )
    _print_table(table, "graders")
    return EXIT_OK


def cmd_targets(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    """targets list|get|delete: the saved targets runs name."""
    if args.saved_command == "delete":
        client.delete_target(args.target_id)
        if not args.json:
            console.print(f"deleted target {args.target_id} (runs that used it keep their copies)")
        return EXIT_OK
    targets, listing = _saved_rows(args, client.list_targets(), "targets", lambda: client.get_target(args.target_id))
    if args.json:
        _print_json([to_dict(t) for t in targets] if listing else to_dict(targets[0]))
        return EXIT_OK
    table = _Table("id", "name", "kind", "created", "description", "labels")
    for target in targets:
        table.add_row(
            target.id,
            target.display_name,
            target.target.WhichOneof("kind") or "-",
            _when(target.create_time),
            target.description,
            _labels_text(target.labels),
        )
    _print_table(table, "targets")
    return EXIT_OK


def _secret_value(name: str) -> str:
    """A secret's value: typed without echo when stdin is a terminal, else stdin read whole with one trailing
    newline dropped (`printf` or `echo` into it, or `< file`). Never an argument: that lands in the shell's
    history and in `ps` for every user of the machine."""
    if sys.stdin.isatty():
        try:
            value = getpass.getpass(f"value of secret {name} (not shown): ")
        except EOFError:
            value = ""
    else:
        value = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    if not value:
        raise ValueError(
            f"secrets create {name}: the value is empty; give it on stdin (`evalctl secrets create {name} < FILE`)"
        )
    if "\n" in value or "\r" in value:  # the server's "1-8192 printable ASCII characters" did not say why
        where = "still ends with a line break" if value.endswith(("\n", "\r")) else "holds a line break"
        raise ValueError(
            f"secrets create {name}: the value {where} after dropping stdin's one trailing newline; a secret is"
            f" one line: give it without the extra newline (`printf %s VALUE | evalctl secrets create {name}`)"
        )
    return value


def cmd_secrets(args: argparse.Namespace, client: EvalClient, console: Console) -> int:
    command = args.secrets_command
    if command == "delete":
        client.delete_secret(args.name)
        if not args.json:
            console.print(f"deleted secret {args.name.upper()}")
        return EXIT_OK
    if command == "create":
        secrets = [client.create_secret(args.name, _secret_value(args.name))]
    else:
        secrets = list(client.list_secrets())
    if args.json:
        _print_json([to_dict(s) for s in secrets] if command == "list" else to_dict(secrets[0]))
        return EXIT_OK
    table = _Table("name", "set")
    for secret in secrets:
        table.add_row(secret.name, _when(secret.create_time))
    _print_table(table, "secrets")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """argparse, except that a command line it cannot parse exits EXIT_ERROR. Its usual 2 is the exit
    code of a run that ended FAILED or CANCELLED: a CI step that mistyped a flag reported a failed run."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def _global_flags(with_defaults: bool) -> _Parser:
    """The global flags, for the top parser (`evalctl --json list`) and each command's (`evalctl list --json`).
    Only the top parser's have defaults (from the environment): a command's copy sets a flag only when it is
    given there, since argparse copies every value a command's parser holds over the top parser's, and a
    default there would undo the flag given before the command."""

    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    flags = _Parser(add_help=False)
    target = os.environ.get("EVALCTL_TARGET", "127.0.0.1:50051")
    flags.add_argument(
        "--target",
        default=default(target),
        help="HOST:PORT of the gRPC port (EVALCTL_TARGET); a call it does not answer is retried for up to 30 s"
        " (EVALSVC_RETRY_MAX_ELAPSED_S)",
    )
    flags.add_argument("--api-key", default=default(os.environ.get("EVALSVC_API_KEY")), help="or EVALSVC_API_KEY")
    flags.add_argument("--json", action="store_true", default=default(False), help="machine-readable output on stdout")
    flags.add_argument(
        "--tls", action="store_true", default=default(False), help="use TLS with the system's root certificates"
    )
    flags.add_argument("--ca-cert", default=default(None), help="PEM root certificates (enables TLS)")
    flags.add_argument("--client-cert", default=default(None), help="PEM client certificate chain, for mTLS")
    flags.add_argument("--client-key", default=default(None), help="PEM private key of --client-cert")
    flags.add_argument(
        "--tls-server-name",
        default=default(None),
        metavar="NAME",
        help="the name the server's certificate must hold, when not --target's host (enables TLS)",
    )
    return flags


def package_version() -> str:
    """evalsvc-client's installed version (importlib.metadata), else the source tree's `__version__`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evalsvc-client")
    except PackageNotFoundError:
        from evalsvc_client import __version__

        return __version__


def parser() -> argparse.ArgumentParser:
    common = _global_flags(with_defaults=False)
    top = _Parser(
        prog="evalctl",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
        parents=[_global_flags(with_defaults=True)],
    )
    top.add_argument("--version", action="version", version=f"evalctl {package_version()}")
    sub = top.add_subparsers(dest="command", required=True)

    def follow_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fail-under", type=_percent, metavar="PCT", help="exit 1 when the pass rate (%%) is lower")
        p.add_argument("--no-progress", action="store_true", help="no progress (bar, or lines without a terminal)")
        p.add_argument("--junit", metavar="FILE", help="write the results as JUnit XML when the run ends")
        p.add_argument("--jsonl", metavar="FILE", help="write the results as JSON Lines when the run ends")

    run = sub.add_parser("run", parents=[common], help="create a run from a spec file and follow it")
    run.add_argument("spec", help="YAML or JSON run spec")
    run.add_argument("--detach", action="store_true", help="create the run and exit without following it")
    run.add_argument(
        "--request-id",
        help="idempotency key, over the spec's request_id: the same key gives the same run (one already made is"
        " followed)",
    )
    run.add_argument(
        "--cache", choices=sorted(CACHE_MODES), help="response cache mode, over the spec's cache_mode (docs/targets.md)"
    )
    run.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_label,
        help="label the run (repeat), over the spec's label of that key; e.g. branch=main, for"
        " `compare latest:branch=main`",
    )
    follow_flags(run)
    run.set_defaults(handler=cmd_run)

    def request_id_flag(p: argparse.ArgumentParser, made: str) -> None:
        """--request-id for a command that creates what the API makes idempotent by request_id (AIP-155): the
        same command again in CI made duplicates."""
        p.add_argument(
            "--request-id",
            help=f"idempotency key: the same key and command give the same {made} (nothing is made twice)",
        )

    rerun = sub.add_parser(
        "rerun", parents=[common], help="a new run of an ended run's errored items (same definition), followed"
    )
    rerun.add_argument("run_id", help="the ended run to take the definition and items from")
    which = rerun.add_mutually_exclusive_group()
    which.add_argument("--failed", action="store_true", help="rerun the items that failed or errored")
    which.add_argument("--all", action="store_true", help="rerun every item")
    rerun.add_argument("--detach", action="store_true", help="create the run and exit without following it")
    request_id_flag(rerun, "new run of RUN_ID")
    rerun.add_argument(
        "--cache",
        "--cache-mode",
        dest="cache",
        choices=sorted(CACHE_MODES),
        help="response cache mode of the new run; default: the source's, refresh for --failed/--all of a "
        "read_write run (a cached output would come back unchanged)",
    )
    follow_flags(rerun)
    rerun.set_defaults(handler=cmd_rerun)

    watch = sub.add_parser("watch", parents=[common], help="follow a run to its end (--json: one event per line)")
    watch.add_argument("run_id")
    watch.add_argument("--after-seq", type=int, default=0)
    follow_flags(watch)
    watch.set_defaults(handler=cmd_watch)

    get = sub.add_parser("get", parents=[common], help="show a run")
    get.add_argument("run_id")
    get.add_argument("--fail-under", type=_percent, metavar="PCT", help="exit 1 when the pass rate (%%) is lower")
    get.set_defaults(handler=cmd_get)

    listing = sub.add_parser("list", parents=[common], help="list runs, newest first (or --oldest-first)")
    listing.add_argument("--status", action="append", default=[], choices=sorted(_STATUSES), type=str.lower)
    listing.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", type=_label)
    listing.add_argument("--dataset-id", default="")
    listing.add_argument(
        "--limit", type=_at_least(1), default=50, help="at most this many, newest first (stderr says when more exist)"
    )
    listing.add_argument("--show-deleted", action="store_true", help="list soft-deleted runs too (until purged)")
    listing.add_argument(
        "--filter",
        default="",
        metavar="EXPR",
        help='only runs matching EXPR (README "Listing runs"), e.g. \'labels.team = "a" AND overall_passed = false\'',
    )
    listing.add_argument(
        "--since",
        type=_since,
        metavar="DURATION|TIME",
        help="only runs created since: 30m, 24h, 7d, 2w or an RFC 3339 time",
    )
    listing.add_argument("--name", default="", metavar="TEXT", help="only runs whose name contains TEXT (any case)")
    listing.add_argument("--oldest-first", action="store_true", help="list the oldest runs first")
    listing.set_defaults(handler=cmd_list)

    for name, about in (
        ("cancel", "cancel a run"),
        ("delete", "delete a run (cancelling it if active); undelete restores it until it is purged"),
        ("undelete", "restore a deleted run"),
    ):
        change = sub.add_parser(name, parents=[common], help=about)
        change.add_argument("run_id")
        change.set_defaults(handler=cmd_change)

    update = sub.add_parser(
        "update", parents=[common], help="rename a run or change its description, labels or annotations"
    )
    update.add_argument("run_id")
    update.add_argument("--name", help="the new display name")
    update.add_argument("--description", help="the new description")
    update.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", type=_label, help="set this label (repeat)"
    )
    update.add_argument("--remove-label", action="append", default=[], metavar="KEY", help="remove this label")
    update.add_argument(
        "--annotation", action="append", default=[], metavar="KEY=VALUE", type=_label, help="set this annotation"
    )
    update.add_argument(
        "--remove-annotation", action="append", default=[], metavar="KEY", help="remove this annotation"
    )
    update.add_argument("--etag", default="", help="change only if the run is still at this etag (`get --json`)")
    update.set_defaults(handler=cmd_update)

    results = sub.add_parser("results", parents=[common], help="a run's results")
    results.add_argument("run_id")
    results.add_argument(
        "--state",
        action="append",
        default=[],
        choices=sorted(_STATES),
        type=str.lower,  # any case: `--state FAILED`, as the server's own names are written, was refused
        help="only results in this state, any case; repeat for any of several (--state failed --state error)",
    )
    results.add_argument("--format", choices=["table", "jsonl", "junit"], default="table")
    results.add_argument("-o", "--output", metavar="FILE")
    results.set_defaults(handler=cmd_results)

    validate = sub.add_parser("validate", help="check a spec and its dataset without a server (docs/spec.md)")
    validate.add_argument("spec", help="YAML or JSON run spec")
    validate.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="the problems (or the request) as JSON on stdout"
    )
    validate.set_defaults(handler=cmd_validate)

    report = sub.add_parser("report", parents=[common], help="write a self-contained HTML report of a run")
    report.add_argument("run_id")
    report.add_argument("--html", required=True, metavar="FILE", help="the HTML file to write")
    report.set_defaults(handler=cmd_report)

    compare = sub.add_parser("compare", parents=[common], help="paired comparison of two runs (docs/compare.md)")
    compare.add_argument(
        "baseline",
        type=_baseline,
        help="the baseline run id, or latest:KEY=VALUE: the newest run with that label, created before the"
        " candidate, that SUCCEEDED and passed, not a rerun (none: exit 5)",
    )
    compare.add_argument("candidate", help="the candidate run id")
    compare.add_argument("--alpha", type=_alpha, default=0.05, help="significance level, from 1e-9 to 0.5")
    compare.add_argument(
        "--fail-on-regression", action="store_true", help="exit 1 when any grader REGRESSED, or nothing was paired"
    )
    compare.add_argument(
        "--max-unpaired",
        type=_at_least(0),
        metavar="N",
        help="exit 1 when more than N evaluations are unpaired (default: any number)",
    )
    compare.add_argument("--show", choices=sorted(_CHANGES), help="also list the evaluations with this change")
    compare.add_argument("--limit", type=_at_least(1), default=20, help="at most this many listed by --show")
    compare.set_defaults(handler=cmd_compare)

    webhooks = sub.add_parser("webhooks", help="manage webhooks notified when runs end (docs/webhooks.md)")
    hooks = webhooks.add_subparsers(dest="webhooks_command", required=True)
    event_help = f"event type to deliver (repeat); one of {', '.join(WEBHOOK_EVENT_TYPES)}"
    create = hooks.add_parser("create", parents=[common], help="register a webhook; prints its secret once")
    create.add_argument("url")
    create.add_argument("--event", action="append", default=[], choices=WEBHOOK_EVENT_TYPES, help=event_help)
    create.add_argument("--description", default="")
    create.add_argument("--disabled", action="store_true", help="register it without delivering yet")
    request_id_flag(create, "webhook")
    hooks.add_parser("list", parents=[common], help="list webhooks")
    for name, text in [("get", "show a webhook"), ("delete", "delete a webhook and its deliveries")]:
        hooks.add_parser(name, parents=[common], help=text).add_argument("webhook_id")
    update = hooks.add_parser("update", parents=[common], help="change a webhook's url, events, description, state")
    update.add_argument("webhook_id")
    update.add_argument("--url")
    update.add_argument("--event", action="append", default=[], choices=WEBHOOK_EVENT_TYPES, help=event_help)
    update.add_argument("--description")
    state = update.add_mutually_exclusive_group()
    state.add_argument("--enable", dest="enabled", action="store_const", const=True, help="(re)start deliveries")
    state.add_argument("--disable", dest="enabled", action="store_const", const=False, help="stop deliveries")
    rotate = hooks.add_parser("rotate-secret", parents=[common], help="replace the signing secret; prints it once")
    rotate.add_argument("webhook_id")
    rotate.add_argument("--revoke-previous", action="store_true", help="stop signing with the old secret now")
    deliveries = hooks.add_parser("deliveries", parents=[common], help="a webhook's deliveries, newest first")
    deliveries.add_argument("webhook_id")
    deliveries.add_argument("--status", choices=sorted(_DELIVERY_STATUSES), type=str.lower)
    deliveries.add_argument(
        "--limit", type=_at_least(1), default=50, help="at most this many, newest first (stderr says when more exist)"
    )
    webhooks.set_defaults(handler=cmd_webhooks)

    datasets = sub.add_parser("datasets", help="manage datasets: named sets of items runs evaluate (dataset_id)")
    sets = datasets.add_subparsers(dest="datasets_command", required=True)
    create = sets.add_parser("create", parents=[common], help="create a dataset, with the items of a file")
    create.add_argument("name", help="its display name")
    create.add_argument(
        "--from", dest="from_file", metavar="FILE", help="items from a .jsonl, .csv, .yaml or .json file (docs/spec.md)"
    )
    create.add_argument("--description", default="")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", type=_label)
    request_id_flag(create, "dataset, its items added once")
    sets.add_parser("list", parents=[common], help="list datasets, newest first")
    for name, text in [
        ("get", "show a dataset"),
        ("items", "a dataset's items in order (--json: one per line, as a .jsonl dataset file)"),
        ("delete", "delete a dataset and its items (runs made from it keep theirs)"),
    ]:
        sets.add_parser(name, parents=[common], help=text).add_argument("dataset_id")
    add = sets.add_parser("add", parents=[common], help="append the items of a file to a dataset")
    add.add_argument("dataset_id")
    add.add_argument("file", help="a .jsonl, .csv, .yaml or .json dataset file, as `run` reads (docs/spec.md)")
    request_id_flag(add, "items, added once")
    datasets.set_defaults(handler=cmd_datasets)

    secrets = sub.add_parser("secrets", help="manage your secrets (provider keys) targets and judges name")
    keys = secrets.add_subparsers(dest="secrets_command", required=True)
    create = keys.add_parser(
        "create", parents=[common], help="set a secret to the value on stdin (typed unseen on a terminal)"
    )
    create.add_argument("name", help="the name targets and judges use (api_key_secret, secret:NAME)")
    keys.add_parser("list", parents=[common], help="list secrets: names and when set, never values")
    keys.add_parser("delete", parents=[common], help="delete a secret").add_argument("name")

    for noun, handler, about in (
        ("graders", cmd_graders, "saved graders, which specs name with `saved: ID`"),
        ("targets", cmd_targets, "saved targets"),
    ):
        saved = sub.add_parser(noun, help=f"list, show or delete {about}")
        saved.set_defaults(handler=handler)
        actions = saved.add_subparsers(dest="saved_command", required=True)
        listed = actions.add_parser("list", parents=[common], help=f"list {noun}, newest first")
        listed.add_argument(
            "--limit",
            type=_at_least(1),
            default=50,
            help="at most this many, newest first (stderr says when more exist)",
        )
        one = noun.removesuffix("s")
        shown = actions.add_parser("get", parents=[common], help=f"show a {one}")
        shown.add_argument(f"{one}_id")
        if noun == "graders":
            shown.add_argument("--version", type=_at_least(0), default=0, help="this version (default: the latest)")
        actions.add_parser("delete", parents=[common], help=f"delete a {one}").add_argument(f"{one}_id")
    secrets.set_defaults(handler=cmd_secrets)
    return top


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _percent(text: str) -> float:
    """A --fail-under value: a percentage (150 was a gate no run could pass, -5 one every run passed)."""
    value = _number(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage between 0 and 100")
    return value


def _warn_of_a_fraction(console: Console, fail_under: float | None) -> None:
    """A warning for a --fail-under written as other tools write a fraction (0.9 for 90%), as for a spec's
    pass_threshold (RunSpec.warnings): it was taken as 0.9%, a gate nearly every run passes, silently. A
    warning, not a refusal, as there: 0.5% may be meant."""
    if fail_under is not None and 0 < fail_under <= 1:  # as RunSpec.warnings: `--fail-under 1.0` is 1%
        console.print(
            f"warning: --fail-under is a percentage: {fail_under:g} means {fail_under:g}%;"
            f" did you mean {fail_under * 100:g}?"
        )


def _alpha(text: str) -> float:
    """A --alpha: a significance level from 1e-9 to 0.5 (docs/compare.md); 0 was quietly taken as the default 0.05."""
    value = _number(text)
    if not 1e-9 <= value <= 0.5:
        raise argparse.ArgumentTypeError(f"{text} is not a significance level from 1e-9 to 0.5")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    """The type of a count flag: a whole number of at least `minimum` (--limit 0 listed nothing and succeeded;
    -1 failed in islice's words)."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text} is not a count of at least {minimum}")
        return value

    return count


def _label(text: str) -> tuple[str, str]:
    """A --label KEY=VALUE, a filter or a label to set (`--label foo` failed with "dictionary update sequence
    element #0")."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def _baseline(text: str) -> str | tuple[str, str]:
    """compare's BASELINE: a run id, or `latest:KEY=VALUE` as the label (KEY, VALUE) that names one."""
    labelled = text.removeprefix(LATEST)
    if labelled == text:
        return text
    key, sep, value = labelled.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a run id nor latest:KEY=VALUE")
    return key, value


def _console(stderr: bool = False) -> Console:
    """A console that wraps only on a terminal: piped or captured output keeps each line whole."""
    console = Console(stderr=stderr, soft_wrap=True, markup=False)
    if not _a_terminal(sys.stderr if stderr else sys.stdout):
        console.width = 1000  # tables size to their content, never to an assumed 80 columns
    return console


class _Table(Table):
    """A table of what tenants and targets wrote (outputs, explanations, names, URLs): every str cell is shown as
    written, as a Text (no rich markup: `[/x]` in an explanation made `results -o FILE` fail, `[red]` vanished),
    with its control characters spelled out (`visible.for_terminal`: `\\x1b[31m`). An agent under test
    recoloured or rewrote CI log lines through `compare --show`'s cells."""

    def add_row(
        self, *renderables: RenderableType | None, style: StyleType | None = None, end_section: bool = False
    ) -> None:
        cells = (Text(for_terminal(cell)) if isinstance(cell, str) else cell for cell in renderables)
        super().add_row(*cells, style=style, end_section=end_section)


def _a_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal, by its file descriptor: rich's Console.is_terminal is true under FORCE_COLOR
    (set in many CI systems for colour), which gave a CI log the redrawn bar, and lines cut at 80 columns, instead
    of whole `progress:` lines."""
    try:
        return os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _main(argv: Sequence[str] | None) -> int:
    args = parser().parse_args(argv)
    console = _console(stderr=True)
    _warn_of_a_fraction(console, getattr(args, "fail_under", None))
    try:
        if args.command == "validate":
            code: int = args.handler(args, console)
        else:
            client = _client(args, console)
            try:
                code = args.handler(args, client, console)
            except (Interrupted, CreateInterrupted, KeyboardInterrupt):
                raise  # the channel is left open: see `_interrupted`
            except BaseException:
                client.close()
                raise
            client.close()
        sys.stdout.flush()  # a reader gone early (`| head`) shows here, not in Python's complaint at exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except Interrupted as exc:
        # One line, not KeyboardInterrupt's traceback: the run is the server's, and a watch picks it up again.
        return _interrupted(
            console,
            f"evalctl: {_STOPPED[exc.signum]}; run {exc.run_id} goes on on the server"
            f" (`evalctl watch {exc.run_id} --after-seq {exc.last_seq}` follows it from here,"
            f" `evalctl cancel {exc.run_id}` stops it)",
            exc.signum,
        )
    except CreateInterrupted as exc:
        return _interrupted(
            console,
            f"evalctl: {_STOPPED[exc.signum]} during {exc.call}: a run may have been created (request_id"
            f" {exc.request_id}); `{exc.again}` follows that run if it was, and creates it if not"
            " (`evalctl list --limit 5` lists the newest runs)",
            exc.signum,
        )
    except KeyboardInterrupt as exc:
        return _interrupted(console, f"evalctl: {_STOPPED[_stop_signal(exc)]}", _stop_signal(exc))
    except SpecError as exc:
        _print_spec_error(console, exc)
    except FollowFailed as exc:
        _print_eval_error(console, exc.error)
        console.print(
            f"  run {exc.run_id} was not followed to its end: `evalctl watch {exc.run_id} --after-seq {exc.last_seq}`"
            " follows it again from the last event shown"
        )
    except EvalError as exc:
        _print_eval_error(console, exc)
    except (OSError, ValueError) as exc:
        console.print(f"evalctl: {exc}")
    return EXIT_ERROR


_STOPPED: dict[int, str] = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}


def _print_eval_error(console: Console, exc: EvalError) -> None:
    """The error, its message and field violations spelled out as `for_terminal` does (they may quote what a
    target answered, or a name a tenant gave)."""
    message = for_terminal(exc.message)
    console.print(f"evalctl: {exc.code.name}: {message}" + (f" ({exc.reason})" if exc.reason else ""))
    for path, why in exc.field_violations:
        console.print(f"  {for_terminal(path)}: {for_terminal(why)}")
    if exc.hint:
        console.print(f"  {for_terminal(exc.hint)}")


def _interrupted(console: Console, message: str, signum: int = signal.SIGINT) -> int:
    """Say why evalctl stops; EXIT_INTERRUPTED. The channel is left open (`main`): Ctrl-C can break into
    grpc's own code in the middle of a call (a watch), and closing the channel then waited for that call
    for good (the process hung after the message, until killed). Nothing is left to clean up: the run is
    the server's."""
    console.print(message)
    return 128 + signum


def _stdout_closed() -> int:
    """Stop quietly when the reader of stdout has gone (`evalctl results RUN --format jsonl | head`), as a program
    that SIGPIPE ends does: no message, status 141. Stdout goes to /dev/null first, or Python's flush at exit would
    complain of the broken pipe again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_STDOUT_CLOSED


if __name__ == "__main__":
    sys.exit(main())
