"""What the sync and async clients share: options, retry policy, channel arguments and request building."""

from __future__ import annotations

import difflib
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from google.protobuf import json_format

from evalsvc_client import pb
from evalsvc_client.errors import EvalError

#: Codes a call is retried on when it is idempotent (or carries a request_id).
RETRYABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


#: How long a call whose transport says the client is set up wrong (`EvalError.set_up_wrong`: TLS not matching,
#: a name that does not resolve) is still retried, within `max_elapsed_s`: a first error of a dropped
#: connection may read so, and a server restarting then refuses (retried for the whole bound).
SET_UP_WRONG_RETRY_S = 2.0

#: The variable a RetryPolicy's default `max_elapsed_s` comes from (evalctl's too: it has no flag for it).
RETRY_MAX_ELAPSED_VARIABLE = "EVALSVC_RETRY_MAX_ELAPSED_S"
#: How long a call safe to repeat is retried by default: about as long as a watch rides out a restart.
DEFAULT_RETRY_MAX_ELAPSED_S = 30.0


def retry_max_elapsed_default() -> float:
    """EVALSVC_RETRY_MAX_ELAPSED_S when set (seconds, 0 or more), else DEFAULT_RETRY_MAX_ELAPSED_S; ValueError
    naming the variable when it is not such a number."""
    text = os.environ.get(RETRY_MAX_ELAPSED_VARIABLE, "").strip()
    if not text:
        return DEFAULT_RETRY_MAX_ELAPSED_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{RETRY_MAX_ELAPSED_VARIABLE}={text!r}: give a number of seconds, 0 or more (such as 30)")
    return seconds


@dataclass(frozen=True)
class RetryPolicy:
    """How a unary call safe to repeat is retried: capped exponential backoff with jitter (each wait between half
    and all of `initial_backoff_s * multiplier**n`, at most `max_backoff_s`), a server's RetryInfo.retry_delay a
    floor on the wait, for as long as `max_elapsed_s` after the call's first attempt.

    Bounded by time, not by a count: 5 attempts gave up after 0.75-1.5 s, and a server killed and started
    again takes about 1.7 s to accept connections, so every read failed across every restart (a watch rode it
    out). No wait goes past the bound (the last one is cut short so the last attempt starts at it), nor is one
    taken when the server's retry_delay alone would pass it; each attempt has the client's `timeout_s`. So a
    call that keeps failing ends within `max_elapsed_s` plus one attempt's `timeout_s` (within `max_elapsed_s`
    when nothing listens: refused connections fail at once), its error saying how long it retried.
    `max_attempts` bounds the count as well (None: as many as fit; 1: no retries)."""

    max_attempts: int | None = None
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    retryable_codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES
    #: Seconds after a call's first attempt that a retry may still start: 30, or EVALSVC_RETRY_MAX_ELAPSED_S.
    max_elapsed_s: float = field(default_factory=retry_max_elapsed_default)

    def should_retry(self, error: EvalError, attempt: int) -> bool:
        """Whether `error` is one to retry after `attempt` (1-based) attempts, as far as the count goes (the time
        bound is `CallRetries`')."""
        if error.code not in self.retryable_codes or (self.max_attempts is not None and attempt >= self.max_attempts):
            return False
        # RESOURCE_EXHAUSTED without RetryInfo (items or graders per run) is not helped by waiting, except the
        # server-wide concurrent-RPC limit, which carries no ErrorInfo at all.
        return not (error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay is None and error.reason)

    def backoff(self, attempt: int, error: EvalError | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1` (before the time bound cuts it)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(attempt - 1, 0))
        delay = random.uniform(ceiling / 2, ceiling)
        if error is not None and error.retry_delay is not None:
            delay = max(delay, error.retry_delay)
        return delay

    def start(self, call: str) -> CallRetries:
        """The retries of one call (`call`: its RPC's name), its clock started now."""
        return CallRetries(self, call)


class CallRetries:
    """One unary call's attempts under a RetryPolicy, for the sync and async clients alike: after each failed
    attempt, how long to wait before the next one, or the error to raise."""

    def __init__(self, policy: RetryPolicy, call: str) -> None:
        self.policy = policy
        self.call = call
        #: Attempts failed so far.
        self.attempts = 0
        self._started = time.monotonic()
        self._asked_past_bound: float | None = None  # a RetryInfo wait that alone would pass the bound
        # Since when every failure has said the client is set up wrong (`EvalError.set_up_wrong`), and whether
        # that run of them ended the retries: a call in flight when a server dies reads "Socket closed" too,
        # then refused while it restarts, so the run of them is timed, not the call.
        self._set_up_wrong_since: float | None = None
        self._set_up_wrong_cut = False

    def wait_after(self, error: EvalError) -> float | None:
        """Count a failed attempt; the seconds to wait before the next, or None when there is none (the error is
        not one to retry, or the count or the time bound is reached)."""
        self.attempts += 1
        if not self.policy.should_retry(error, self.attempts):
            return None
        now = time.monotonic()
        if not error.set_up_wrong:
            self._set_up_wrong_since = None
        elif self._set_up_wrong_since is None:
            self._set_up_wrong_since = now
        elif now - self._set_up_wrong_since >= SET_UP_WRONG_RETRY_S:
            self._set_up_wrong_cut = True
            return None
        left = self._started + self.policy.max_elapsed_s - now
        if error.retry_delay is not None and error.retry_delay > left > 0:
            self._asked_past_bound = error.retry_delay
            return None
        if left <= 0:
            return None
        return min(self.policy.backoff(self.attempts, error), left)

    def final(self, error: EvalError) -> EvalError:
        """The error to raise: `error`, saying how long the call was retried when it was, or that the server's
        retry_delay was past the bound (not waited for: the call would have ended after it)."""
        bound = f"{self.policy.max_elapsed_s:g} s: RetryPolicy.max_elapsed_s, or {RETRY_MAX_ELAPSED_VARIABLE}"
        if self._asked_past_bound is not None:
            return error.with_hint(
                f"the server asked for a wait of {self._asked_past_bound:.1f} s before {self.call} is tried again,"
                f" past the time its retries may take (up to {bound})"
            )
        if self.attempts < 2:
            return error
        elapsed = time.monotonic() - self._started
        if self._set_up_wrong_cut:
            bound = f"{SET_UP_WRONG_RETRY_S:g} s while every attempt failed so: a retry alone will not help"
        return error.with_hint(
            f"{self.call} was tried {self.attempts} times over {elapsed:.1f} s (retried for up to {bound})"
        )


@dataclass(frozen=True)
class WatchPolicy:
    """How `watch` reconnects: backoff between attempts, and how many failures in a row it tolerates.

    The failure count resets whenever the stream delivers anything (an event or a heartbeat).
    """

    max_consecutive_failures: int = 30
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    resumable_codes: frozenset[grpc.StatusCode] = frozenset(
        {
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.INTERNAL,  # a connection torn down mid-frame (RST_STREAM) surfaces as INTERNAL
        }
    )

    def backoff(self, failures: int, error: EvalError | None = None) -> float:
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(failures - 1, 0))
        delay = random.uniform(ceiling / 2, ceiling)
        if error is not None and error.retry_delay is not None:
            delay = max(delay, error.retry_delay)
        return delay

    def should_resume(self, error: EvalError, failures: int) -> bool:
        """Whether to reconnect after `failures` failures in a row."""
        if error.code == grpc.StatusCode.INTERNAL and error.reason == "INTERNAL":
            return False  # the server's own INTERNAL (a bug) carries ErrorInfo; transport ones do not
        return error.code in self.resumable_codes and failures < self.max_consecutive_failures


@dataclass(frozen=True)
class TLSOptions:
    """TLS for the channel: root certificates (None = system roots), and a client certificate for mTLS."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        # grpc aborts the whole process (SIGABRT, "Check failed: private_key != nullptr") on one without the other.
        if (self.private_key is None) != (self.certificate_chain is None):
            given, missing = (
                ("certificate_chain", "private_key")
                if self.private_key is None
                else ("private_key", "certificate_chain")
            )
            raise ValueError(
                f"TLSOptions: {given} was given without {missing}: a client certificate (mTLS) needs both"
                " private_key and certificate_chain"
            )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.private_key,
            certificate_chain=self.certificate_chain,
        )


@dataclass(frozen=True)
class Retrying:
    """A retry a client is about to wait for, as `on_retry` (ClientOptions, EvalClient, AsyncEvalClient) gets it:
    a unary call's (`CreateRun` rate-limited with RetryInfo waits that long) or a watch's reconnection. The
    clients say nothing by default (a DEBUG/INFO log record only); a program or CLI shows these as it likes."""

    #: The RPC: "CreateRun", "GetRun", ..., or "WatchRun" for a watch reconnecting.
    call: str
    #: Why: the error of the attempt that failed (`error.reason` "CREATE_RUN_RATE", `error.retry_delay`, ...).
    error: EvalError
    #: Attempts failed so far (a watch's: failures in a row since its stream last delivered anything).
    attempt: int
    #: Seconds until the next attempt.
    delay_s: float
    #: A watch's run and the seq it resumes after ("" and 0 for unary calls).
    run_id: str = ""
    after_seq: int = 0


@dataclass(frozen=True)
class ClientOptions:
    """Connection and call settings shared by `EvalClient` and `AsyncEvalClient`.

    `api_key` None (the default, here as in the clients' keyword arguments) is the key in EVALSVC_API_KEY when
    these options are made, as evalctl's --api-key defaults to it: a program that passes no key sends the
    environment's, to whatever target it calls. `api_key=""` sends none, whatever the environment holds."""

    target: str = "127.0.0.1:50051"
    api_key: str | None = None
    tls: TLSOptions | None = None
    #: Per-attempt deadline of unary calls, in seconds.
    timeout_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    watch: WatchPolicy = field(default_factory=WatchPolicy)
    channel_options: Sequence[tuple[str, Any]] = ()
    #: Called before each retry's wait (see `Retrying`); None, the default: retries are silent. It is called in the
    #: calling thread (the event loop's, for AsyncEvalClient, which awaits what it returns if that is awaitable),
    #: so it should be quick; an exception it raises ends the call with that exception, retries and all.
    on_retry: Callable[[Retrying], object] | None = None

    def __post_init__(self) -> None:
        if self.api_key is None:  # EvalClient(options=ClientOptions(...)) ignored EVALSVC_API_KEY, its kwargs read it
            object.__setattr__(self, "api_key", api_key_or_environment(None))

    def retrying(self, retrying: Retrying) -> object:
        """on_retry's answer (None without one): the async client awaits it when awaitable."""
        return None if self.on_retry is None else self.on_retry(retrying)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def grpc_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            # Reconnect quickly after a server restart; the calls' own retries add the backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # The server accepts client pings at most every 10 s (docs/security.md); stay well above it.
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
        if self.tls is not None and self.tls.server_name_override:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        options.extend(self.channel_options)
        return options


#: The variable a client's key comes from when none is given, as evalctl's --api-key does.
API_KEY_VARIABLE = "EVALSVC_API_KEY"


def api_key_or_environment(api_key: str | None) -> str | None:
    """`api_key`, or when None EVALSVC_API_KEY (`EvalClient("127.0.0.1:50051")` ignored it, where evalctl reads
    it); "" sends no key whatever the environment holds."""
    return (os.environ.get(API_KEY_VARIABLE) or None) if api_key is None else api_key


def client_options(
    options: ClientOptions | None, on_retry: Callable[[Retrying], object] | None, **settings: Any
) -> ClientOptions:
    """A client's ClientOptions: `options`, or those made of its keyword `settings`. An `on_retry` given beside
    `options` is added to them (it was dropped in silence); TypeError when they have another already."""
    if options is None:
        return ClientOptions(**settings, on_retry=on_retry)
    if on_retry is None or on_retry is options.on_retry:
        return options
    if options.on_retry is not None:
        raise TypeError("on_retry was given both as an argument and in options: give it once")
    return replace(options, on_retry=on_retry)


def rpc_name(request: Any) -> str:
    """The RPC a request message is for: CreateRunRequest -> "CreateRun"."""
    return type(request).__name__.removesuffix("Request")


def new_request_id() -> str:
    """A fresh idempotency key."""
    return str(uuid.uuid4())


TargetLike = pb.Target | Mapping[str, Any] | str
GraderLike = pb.Grader | Mapping[str, Any]
ItemLike = pb.Item | Mapping[str, Any]


def to_target(target: TargetLike) -> pb.Target:
    """A Target from a message, a proto-JSON mapping ({"provided": {}}) or a kind name ("provided", "echo")."""
    if isinstance(target, pb.Target):
        return target
    if isinstance(target, str):
        return json_format.ParseDict({_target_kind_name(target): {}}, pb.Target())
    from evalsvc_client.spec import parse_message  # the spec checker builds on this module

    return parse_message(target, pb.Target, "target")


def _target_kind_name(kind: str) -> str:
    """A target kind that needs no settings (provided, echo), or a ValueError saying how to write the others."""
    kinds = pb.Target.DESCRIPTOR.oneofs_by_name["kind"].fields
    bare = [f.name for f in kinds if f.message_type is not None and not f.message_type.fields]
    if kind in bare:
        return kind
    configured = [f.name for f in kinds if f.name not in bare]
    if kind in configured:
        raise ValueError(f"target kind {kind!r} needs settings: write it as {{{kind}: {{...}}}} (docs/spec.md)")
    found = difflib.get_close_matches(kind, [f.name for f in kinds], n=1)
    hint = f"did you mean {found[0]!r}? " if found else ""
    raise ValueError(
        f"unknown target kind {kind!r}: {hint}a target is {' or '.join(bare)} by name, or a mapping with one of"
        f" {', '.join(configured)} ({{chat: {{endpoint: {{base_url: ...}}, model: ...}}}}; docs/spec.md)"
    )


def to_grader(grader: GraderLike) -> pb.Grader:
    """A Grader from a message or a proto-JSON mapping ({"name": "exact", "exact_match": {}}), checked as specs are:
    a ValueError names each unknown key with the closest valid one, and each bad enum value with the valid ones."""
    from evalsvc_client.spec import parse_message

    return grader if isinstance(grader, pb.Grader) else parse_message(grader, pb.Grader, "grader")


def to_item(item: ItemLike) -> pb.Item:
    """An Item from a message or a proto-JSON mapping ({"input": ..., "expected_output": ...}), checked as specs are."""
    from evalsvc_client.spec import parse_message

    return item if isinstance(item, pb.Item) else parse_message(item, pb.Item, "item")


def create_run_request(
    *,
    target: TargetLike,
    graders: Iterable[GraderLike],
    items: Iterable[ItemLike] | None = None,
    dataset_id: str = "",
    item_ids: Iterable[str] = (),
    display_name: str = "",
    description: str = "",
    labels: Mapping[str, str] | None = None,
    pass_threshold: float | None = None,
    max_error_rate: float | None = None,
    repetitions: int = 0,
    warmup_runs: int = 0,
    trigger: pb.run.Trigger = pb.run.TRIGGER_UNSPECIFIED,
    request_id: str | None = None,
    max_cost_usd: float | None = None,
    annotations: Mapping[str, str] | None = None,
    cache_mode: pb.cache.CacheMode | str = pb.cache.CACHE_MODE_UNSPECIFIED,
) -> pb.runs.CreateRunRequest:
    """A CreateRunRequest; a request_id is generated when none is given, so retries stay idempotent. `cache_mode`
    is a CacheMode or its short name (`off`, `read_write`, `refresh`, `replay`)."""
    if isinstance(cache_mode, str):
        from evalsvc_client.spec import cache_mode as cache_mode_named

        cache_mode = cache_mode_named(cache_mode, "cache_mode")
    request = pb.runs.CreateRunRequest(
        request_id=request_id or new_request_id(),
        dataset_id=dataset_id,
        item_ids=list(item_ids),
        items=[to_item(i) for i in items or ()],
        target=to_target(target),
        graders=[to_grader(g) for g in graders],
        display_name=display_name,
        description=description,
        labels=dict(labels or {}),
        repetitions=repetitions,
        warmup_runs=warmup_runs,
        trigger=trigger,
        annotations=dict(annotations or {}),
        cache_mode=cache_mode,
    )
    if max_cost_usd is not None:
        request.max_cost_usd = max_cost_usd
    if pass_threshold is not None:
        request.pass_threshold = pass_threshold
    if max_error_rate is not None:
        request.max_error_rate = max_error_rate
    return request


#: RerunRun's scopes by their short names (`rerun_run(run_id, scope="all")`; evalctl's flags).
RERUN_SCOPES: dict[str, pb.runs.RerunScope] = {
    "errored": pb.runs.RERUN_SCOPE_ITEMS_ERRORED,
    "failed_or_errored": pb.runs.RERUN_SCOPE_ITEMS_FAILED_OR_ERRORED,
    "all": pb.runs.RERUN_SCOPE_ITEMS_ALL,
}


def rerun_run_request(
    run_id: str,
    *,
    scope: pb.runs.RerunScope | str = pb.runs.RERUN_SCOPE_ITEMS_ERRORED,
    request_id: str | None = None,
    trigger: pb.run.Trigger = pb.run.TRIGGER_UNSPECIFIED,
    cache_mode: pb.cache.CacheMode | str = pb.cache.CACHE_MODE_UNSPECIFIED,
) -> pb.runs.RerunRunRequest:
    """A RerunRun request; `scope` is a RerunScope or its short name ("errored", "failed_or_errored", "all"),
    a missing request_id a fresh one (so that retries reuse it). `cache_mode` is a CacheMode or its short
    name; unspecified is the server's choice (the source's mode; REFRESH for a failed-or-errored or whole
    rerun of a READ_WRITE run)."""
    if isinstance(cache_mode, str):
        from evalsvc_client.spec import cache_mode as cache_mode_named

        cache_mode = cache_mode_named(cache_mode, "cache_mode")
    if isinstance(scope, str):
        name = scope.lower().removeprefix("rerun_scope_").removeprefix("items_")
        if name not in RERUN_SCOPES:
            raise ValueError(f"unknown rerun scope {scope!r}; one of {', '.join(RERUN_SCOPES)}")
        scope = RERUN_SCOPES[name]
    return pb.runs.RerunRunRequest(
        run_id=run_id, scope=scope, request_id=request_id or new_request_id(), trigger=trigger, cache_mode=cache_mode
    )


def update_run_request(
    run_id: str,
    *,
    display_name: str | None,
    description: str | None,
    labels: Mapping[str, str] | None,
    annotations: Mapping[str, str] | None,
    etag: str,
    set_labels: Mapping[str, str] | None = None,
    remove_labels: Iterable[str] = (),
    set_annotations: Mapping[str, str] | None = None,
    remove_annotations: Iterable[str] = (),
) -> pb.runs.UpdateRunRequest:
    """An UpdateRunRequest whose update mask names exactly the fields given (not None); with `etag`, the run is
    changed only if it is still at that etag (AIP-154). `set_labels` and `remove_labels` (and the annotations')
    change single keys (mask paths `labels.KEY`; one key to remove may be a string), leaving the map's other keys
    as they are; ValueError when
    combined with the whole map, or when one key is both set and removed."""
    given = {"display_name": display_name, "description": description, "labels": labels, "annotations": annotations}
    fields: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    request = pb.runs.UpdateRunRequest(run_id=run_id, run=pb.Run(**fields, etag=etag))
    request.update_mask.paths.extend(fields)
    for name, whole, setting, removing in (
        ("labels", labels, set_labels, remove_labels),
        ("annotations", annotations, set_annotations, remove_annotations),
    ):
        # One key given as a string: `remove_labels="team"` removed the keys t, e, a and m.
        setting, removing = dict(setting or {}), [removing] if isinstance(removing, str) else list(removing)
        if (setting or removing) and whole is not None:
            raise ValueError(f"update_run: give {name} (the whole map) or set_/remove_{name} (single keys), not both")
        both = sorted(set(setting) & set(removing))
        if both:
            raise ValueError(f"update_run: {name} key {both[0]!r} is both set and removed")
        getattr(request.run, name).update(setting)
        request.update_mask.paths.extend(f"{name}.{mask_key(key)}" for key in [*setting, *removing])
    return request


def mask_key(key: str) -> str:
    """A map key as an update mask path segment (AIP-161): as it is when an identifier, else in backticks
    (a backtick in it doubled)."""
    return key if key.isidentifier() and key.isascii() else "`" + key.replace("`", "``") + "`"


def list_results_request(
    run_id: str, *, state: pb.run.ResultState, states: Iterable[pb.run.ResultState], page_size: int
) -> pb.runs.ListRunResultsRequest:
    return pb.runs.ListRunResultsRequest(run_id=run_id, state=state, states=list(states), page_size=page_size)


def list_runs_request(
    *,
    statuses: Iterable[pb.run.RunStatus] = (),
    labels: Mapping[str, str] | None = None,
    dataset_id: str = "",
    page_size: int = 0,
    show_deleted: bool = False,
    filter: str = "",
    order_by: str = "",
    view: pb.runs.RunView = pb.runs.RUN_VIEW_UNSPECIFIED,
) -> pb.runs.ListRunsRequest:
    return pb.runs.ListRunsRequest(
        statuses=list(statuses),
        labels=dict(labels or {}),
        dataset_id=dataset_id,
        page_size=page_size,
        show_deleted=show_deleted,
        filter=filter,
        order_by=order_by,
        view=view,
    )


def create_webhook_request(
    url: str, *, event_types: Iterable[str], description: str, enabled: bool, request_id: str | None
) -> pb.webhooks.CreateWebhookRequest:
    """A CreateWebhookRequest; empty event_types means the server's default (the terminal run events)."""
    return pb.webhooks.CreateWebhookRequest(
        webhook=pb.Webhook(url=url, event_types=list(event_types), description=description, enabled=enabled),
        request_id=request_id or new_request_id(),
    )


def update_webhook_request(
    webhook_id: str,
    *,
    url: str | None,
    event_types: Iterable[str] | None,
    description: str | None,
    enabled: bool | None,
) -> pb.webhooks.UpdateWebhookRequest:
    """An UpdateWebhookRequest whose update mask names exactly the fields given (not None)."""
    given: dict[str, Any] = {"url": url, "description": description, "enabled": enabled}
    fields = {name: value for name, value in given.items() if value is not None}
    request = pb.webhooks.UpdateWebhookRequest(webhook_id=webhook_id, webhook=pb.Webhook(**fields))
    if event_types is not None:
        request.webhook.event_types.extend(event_types)
        fields["event_types"] = event_types
    request.update_mask.paths.extend(fields)
    return request


def is_terminal(event: pb.WatchRunResponse) -> bool:
    """Whether a watch event is the run's terminal status event."""
    return event.HasField("run") and event.run.status in pb.TERMINAL_STATUSES
