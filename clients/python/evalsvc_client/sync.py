"""`EvalClient`: the blocking client (grpc's sync channel); the same methods as `AsyncEvalClient`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Self, TypeVar

import grpc

from evalsvc_client import pb
from evalsvc_client._common import (
    ClientOptions,
    GraderLike,
    ItemLike,
    Retrying,
    RetryPolicy,
    TargetLike,
    TLSOptions,
    WatchPolicy,
    client_options,
    create_run_request,
    create_webhook_request,
    is_terminal,
    list_results_request,
    list_runs_request,
    new_request_id,
    rerun_run_request,
    rpc_name,
    to_grader,
    to_item,
    to_target,
    update_run_request,
    update_webhook_request,
)
from evalsvc_client._gen.evalsvc.v1 import (
    dataset_service_pb2_grpc,
    eval_run_service_pb2_grpc,
    grader_service_pb2_grpc,
    secret_service_pb2_grpc,
    target_service_pb2_grpc,
    webhook_service_pb2_grpc,
)
from evalsvc_client.errors import from_rpc_error

log = logging.getLogger("evalsvc_client")
T = TypeVar("T")


class EvalClient:
    """A blocking evalsvc client over one grpc channel.

    Unary calls get a per-attempt deadline (`timeout_s`) and are retried with backoff, for up to
    `RetryPolicy.max_elapsed_s` (30 s: a server restart is ridden out), on UNAVAILABLE,
    DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (honouring RetryInfo) when they are safe to repeat: reads, CancelRun,
    CreateSecret and DeleteSecret, and CreateRun/RerunRun/CreateDataset/CreateGrader/CreateTarget, whose retries
    reuse one request_id.
    AddDatasetItems and UpdateGrader are not retried, nor is RotateWebhookSecret.
    Errors are raised as `evalsvc_client.errors.EvalError` subclasses.

        with EvalClient("127.0.0.1:50051", api_key=key) as client:
            run = client.create_run(items=[...], target="provided", graders=[{"exact_match": {}}])
            for event in client.watch(run.id):
                ...
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: TLSOptions | None = None,
        timeout_s: float = 10.0,
        retry: RetryPolicy | None = None,
        watch: WatchPolicy | None = None,
        options: ClientOptions | None = None,
        on_retry: Callable[[Retrying], object] | None = None,
    ) -> None:
        self.options = client_options(
            options,
            on_retry,
            target=target,
            api_key=api_key,  # None: EVALSVC_API_KEY (ClientOptions)
            tls=tls,
            timeout_s=timeout_s,
            retry=retry or RetryPolicy(),
            watch=watch or WatchPolicy(),
        )
        opts = self.options
        if opts.tls is not None:
            self._channel = grpc.secure_channel(opts.target, opts.tls.credentials(), options=opts.grpc_options())
        else:
            self._channel = grpc.insecure_channel(opts.target, options=opts.grpc_options())
        self._runs = eval_run_service_pb2_grpc.EvalRunServiceStub(self._channel)
        self._datasets = dataset_service_pb2_grpc.DatasetServiceStub(self._channel)
        self._graders = grader_service_pb2_grpc.GraderServiceStub(self._channel)
        self._targets = target_service_pb2_grpc.TargetServiceStub(self._channel)
        self._webhooks = webhook_service_pb2_grpc.WebhookServiceStub(self._channel)
        self._secrets = secret_service_pb2_grpc.SecretServiceStub(self._channel)
        self._metadata = opts.metadata()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, *, retry: bool = True) -> T:
        retries = self.options.retry.start(rpc_name(request))
        while True:
            try:
                return method(request, timeout=self.options.timeout_s, metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error, self.options.target, tls=self.options.tls is not None)
                delay = retries.wait_after(error) if retry else None
                if delay is None:
                    raise retries.final(error) from None
                log.debug("retrying after %s in %.2fs (attempt %d)", error.code.name, delay, retries.attempts)
                self.options.retrying(Retrying(retries.call, error, retries.attempts, delay))
                time.sleep(delay)

    # Runs.

    def create_run(
        self,
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
    ) -> pb.Run:
        """Create a run (items inline, or a dataset). Retries reuse one request_id (a uuid4 when none is given).
        `max_cost_usd` stops the run at that spend; `cache_mode` is a CacheMode or `off`, `read_write`, `refresh`,
        `replay` (docs/targets.md)."""
        request = create_run_request(
            target=target,
            graders=graders,
            items=items,
            dataset_id=dataset_id,
            item_ids=item_ids,
            display_name=display_name,
            description=description,
            labels=labels,
            pass_threshold=pass_threshold,
            max_error_rate=max_error_rate,
            repetitions=repetitions,
            warmup_runs=warmup_runs,
            trigger=trigger,
            request_id=request_id,
            max_cost_usd=max_cost_usd,
            annotations=annotations,
            cache_mode=cache_mode,
        )
        return (self.create_run_from(request)).run

    def create_run_from(self, request: pb.runs.CreateRunRequest) -> pb.runs.CreateRunResponse:
        """CreateRun with a request built by the caller; a missing request_id is filled in before the first try."""
        if not request.request_id:
            request.request_id = new_request_id()
        return self._call(self._runs.CreateRun, request)

    def rerun_run(
        self,
        run_id: str,
        *,
        scope: pb.runs.RerunScope | str = pb.runs.RERUN_SCOPE_ITEMS_ERRORED,
        request_id: str | None = None,
        trigger: pb.run.Trigger = pb.run.TRIGGER_UNSPECIFIED,
        cache_mode: pb.cache.CacheMode | str = pb.cache.CACHE_MODE_UNSPECIFIED,
    ) -> pb.Run:
        """A new run of an ended run's items in `scope` (a RerunScope, or "errored" (the default),
        "failed_or_errored", "all") with its stored definition; its `rerun_of` is `run_id`. Retries reuse one
        request_id (a uuid4 when none is given). `cache_mode` (a CacheMode or `off`, `read_write`, `refresh`,
        `replay`) overrides the server's choice: the source's mode, REFRESH for a failed-or-errored or whole
        rerun of a READ_WRITE run. FailedPreconditionError when the run has not ended (RUN_NOT_FINISHED) or the
        scope selects no item (NOTHING_TO_RERUN)."""
        request = rerun_run_request(run_id, scope=scope, request_id=request_id, trigger=trigger, cache_mode=cache_mode)
        return (self._call(self._runs.RerunRun, request)).run

    def get_run(self, run_id: str) -> pb.Run:
        return (self._call(self._runs.GetRun, pb.runs.GetRunRequest(run_id=run_id))).run

    def update_run(
        self,
        run_id: str,
        *,
        display_name: str | None = None,
        description: str | None = None,
        labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
        etag: str = "",
        set_labels: Mapping[str, str] | None = None,
        remove_labels: Iterable[str] = (),
        set_annotations: Mapping[str, str] | None = None,
        remove_annotations: Iterable[str] = (),
    ) -> pb.Run:
        """Change a run's display name, description, labels or annotations (only those given; `labels` and
        `annotations` replace the map whole, `set_labels`/`remove_labels` and `set_annotations`/
        `remove_annotations` change those keys alone). With `etag` (a `Run.etag` as read), only if the run has
        not changed since: an `EvalError` ABORTED, reason ETAG_MISMATCH, otherwise (AIP-154)."""
        request = update_run_request(
            run_id,
            display_name=display_name,
            description=description,
            labels=labels,
            annotations=annotations,
            etag=etag,
            set_labels=set_labels,
            remove_labels=remove_labels,
            set_annotations=set_annotations,
            remove_annotations=remove_annotations,
        )
        # Not retried with an etag: a first attempt that committed but whose answer was lost would make the
        # retry's etag stale (ABORTED, though the change was made).
        return (self._call(self._runs.UpdateRun, request, retry=not etag)).run

    def delete_run(self, run_id: str, *, etag: str = "") -> pb.Run:
        """Soft-delete a run (cancelling it if it has not finished); list_runs leaves it out. Idempotent. With
        `etag`, only if the run has not changed since it was read (ABORTED, ETAG_MISMATCH, otherwise)."""
        request = pb.runs.DeleteRunRequest(run_id=run_id, etag=etag)
        return (self._call(self._runs.DeleteRun, request, retry=not etag)).run  # as update_run's

    def undelete_run(self, run_id: str) -> pb.Run:
        """Restore a soft-deleted run. Idempotent."""
        return (self._call(self._runs.UndeleteRun, pb.runs.UndeleteRunRequest(run_id=run_id))).run

    def cancel_run(self, run_id: str) -> pb.Run:
        """Cancel a run (idempotent); FailedPreconditionError when it already finished."""
        return (self._call(self._runs.CancelRun, pb.runs.CancelRunRequest(run_id=run_id))).run

    def list_runs(
        self,
        *,
        statuses: Iterable[pb.run.RunStatus] = (),
        labels: Mapping[str, str] | None = None,
        dataset_id: str = "",
        page_size: int = 0,
        limit: int | None = None,
        show_deleted: bool = False,
        filter: str = "",
        order_by: str = "",
        view: pb.runs.RunView = pb.runs.RUN_VIEW_UNSPECIFIED,
    ) -> Iterator[pb.Run]:
        """Runs, newest first, across every page (at most `limit`); soft-deleted ones too with `show_deleted`.

        `filter` selects runs by a subset of AIP-160 (README "Listing runs"), e.g.
        `'create_time >= "2026-01-02T00:00:00Z" AND display_name:"nightly"'`; `order_by="create_time"` lists
        the oldest first; `view=pb.runs.RUN_VIEW_BASIC` leaves each run's definition (target, graders) and
        annotations out, which a listing of names, statuses and counts does not need."""
        request = list_runs_request(
            statuses=statuses,
            labels=labels,
            dataset_id=dataset_id,
            page_size=page_size,
            show_deleted=show_deleted,
            filter=filter,
            order_by=order_by,
            view=view,
        )
        count = 0
        while True:
            page = self._call(self._runs.ListRuns, request)
            for run in page.runs:
                if limit is not None and count >= limit:
                    return
                count += 1
                yield run
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def list_results(
        self,
        run_id: str,
        *,
        state: pb.run.ResultState = pb.run.RESULT_STATE_UNSPECIFIED,
        states: Iterable[pb.run.ResultState] = (),
        page_size: int = 0,
    ) -> Iterator[pb.Result]:
        """A run's results in recording order, across every page: those in `state`, or in any of `states`
        (`states=[RESULT_STATE_FAILED, RESULT_STATE_ERROR]` lists what needs triage), or all; not both."""
        request = list_results_request(run_id, state=state, states=states, page_size=page_size)
        while True:
            page = self._call(self._runs.ListRunResults, request)
            yield from page.results
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def compare_runs(self, baseline_run_id: str, candidate_run_id: str, *, alpha: float = 0.0) -> pb.RunComparison:
        """Paired comparison of two runs per grader and overall (alpha 0 means 0.05; docs/compare.md)."""
        request = pb.comparison.CompareRunsRequest(
            baseline_run_id=baseline_run_id, candidate_run_id=candidate_run_id, alpha=alpha
        )
        return (self._call(self._runs.CompareRuns, request)).comparison

    def list_comparison_items(
        self,
        baseline_run_id: str,
        candidate_run_id: str,
        *,
        grader: str = "",
        change: pb.comparison.ComparisonChange = pb.comparison.COMPARISON_CHANGE_UNSPECIFIED,
        page_size: int = 0,
    ) -> Iterator[pb.ComparisonItem]:
        """Both runs' evaluations side by side (results with outputs), filtered by grader and change, every page."""
        request = pb.comparison.ListComparisonItemsRequest(
            baseline_run_id=baseline_run_id,
            candidate_run_id=candidate_run_id,
            grader=grader,
            change=change,
            page_size=page_size,
        )
        while True:
            page = self._call(self._runs.ListComparisonItems, request)
            yield from page.items
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def watch(self, run_id: str, after_seq: int = 0, *, heartbeats: bool = False) -> Iterator[pb.WatchRunResponse]:
        """A run's events with seq > after_seq, in order, each once, ending after the terminal status event.

        A dropped stream (connection lost, server restarted or shutting down) is resumed from the last seq this
        iterator delivered, with backoff (`WatchPolicy`). The run is read first (`get_run`, with its retries): a
        server that cannot be reached, or a run that does not exist, fails the watch at once, as a call does (a
        watch retried its first connection 30 times, 35 s of silence; and counting a watch that had delivered
        nothing yet as never connected gave up on a quiet run's watch when its server restarted). Heartbeats
        (seq 0) are skipped unless `heartbeats=True`. OUT_OF_RANGE (after_seq beyond the run's last_seq) raises
        `OutOfRangeError`; NOT_FOUND `NotFoundError`.
        """
        policy = self.options.watch
        last = after_seq
        failures = 0
        finished = False
        self.get_run(run_id)
        while True:
            call = self._runs.WatchRun(pb.runs.WatchRunRequest(run_id=run_id, after_seq=last), metadata=self._metadata)
            try:
                for event in call:
                    failures = 0
                    if event.HasField("heartbeat"):
                        if heartbeats and not finished:
                            yield event
                        continue
                    if event.seq <= last:
                        continue  # already delivered (cannot happen with a correct server; never deliver twice)
                    last = event.seq
                    yield event
                    # After the terminal event the server ends the stream with OK: read to that end rather than
                    # cancel it (the tidy end of a stream; cancelling once crashed the server: see clients/README.md).
                    finished = finished or is_terminal(event)
                return  # the server ends a watch with OK only after the terminal event
            except grpc.RpcError as rpc_error:
                if finished:
                    return
                error = from_rpc_error(rpc_error, self.options.target, tls=self.options.tls is not None)
                failures += 1
                if not policy.should_resume(error, failures):
                    raise error from None
                delay = policy.backoff(failures, error)
                log.info(
                    "watch of %s dropped (%s); resuming after seq %d in %.2fs", run_id, error.code.name, last, delay
                )
                self.options.retrying(Retrying("WatchRun", error, failures, delay, run_id, last))
                time.sleep(delay)
            finally:
                call.cancel()

    def wait(self, run_id: str) -> pb.Run:
        """Watch a run to its end and return it as of its terminal event."""
        final: pb.Run | None = None
        for event in self.watch(run_id):
            if event.HasField("run"):
                final = event.run
        return final if final is not None and final.status in pb.TERMINAL_STATUSES else self.get_run(run_id)

    # Datasets.

    def create_dataset(
        self,
        display_name: str,
        *,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> pb.Dataset:
        """Create an empty dataset. Retries reuse one request_id."""
        request = pb.datasets.CreateDatasetRequest(
            dataset=pb.Dataset(display_name=display_name, description=description, labels=dict(labels or {})),
            request_id=request_id or new_request_id(),
        )
        return (self._call(self._datasets.CreateDataset, request)).dataset

    def get_dataset(self, dataset_id: str) -> pb.Dataset:
        return (self._call(self._datasets.GetDataset, pb.datasets.GetDatasetRequest(dataset_id=dataset_id))).dataset

    def list_datasets(self, *, page_size: int = 0) -> Iterator[pb.Dataset]:
        """Datasets, newest first, across every page."""
        request = pb.datasets.ListDatasetsRequest(page_size=page_size)
        while True:
            page = self._call(self._datasets.ListDatasets, request)
            yield from page.datasets
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def add_dataset_items(
        self, dataset_id: str, items: Iterable[ItemLike], *, request_id: str | None = None
    ) -> pb.datasets.AddDatasetItemsResponse:
        """Append items. Retries reuse one request_id, so a retry after a lost reply adds nothing and gets the
        first call's item ids."""
        request = pb.datasets.AddDatasetItemsRequest(
            dataset_id=dataset_id, items=[to_item(i) for i in items], request_id=request_id or new_request_id()
        )
        return self._call(self._datasets.AddDatasetItems, request)

    def list_dataset_items(self, dataset_id: str, *, page_size: int = 0) -> Iterator[pb.Item]:
        """A dataset's items in the order they were added, across every page."""
        request = pb.datasets.ListDatasetItemsRequest(dataset_id=dataset_id, page_size=page_size)
        while True:
            page = self._call(self._datasets.ListDatasetItems, request)
            yield from page.items
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def delete_dataset(self, dataset_id: str) -> None:
        """Delete a dataset with its items (runs made from it keep their copies). Retried: a repeat after a
        lost reply raises NotFoundError."""
        self._call(self._datasets.DeleteDataset, pb.datasets.DeleteDatasetRequest(dataset_id=dataset_id))

    # Secrets: the caller's own provider keys, named by targets and judges (`api_key_secret`, `secret:NAME`).

    def create_secret(self, name: str, value: str) -> pb.Secret:
        """Set a secret: create it, or replace the value of the caller's secret of that name. The answer names it
        (upper-case) with when it was set, never its value. Retried: a repeat sets the same value again."""
        request = pb.secrets.CreateSecretRequest(name=name, value=value)
        return (self._call(self._secrets.CreateSecret, request)).secret

    def list_secrets(self, *, page_size: int = 0) -> Iterator[pb.Secret]:
        """The caller's secrets by name, across every page: names and when each was set, never values."""
        request = pb.secrets.ListSecretsRequest(page_size=page_size)
        while True:
            page = self._call(self._secrets.ListSecrets, request)
            yield from page.secrets
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def delete_secret(self, name: str) -> None:
        """Delete one of the caller's secrets; runs created afterwards cannot name it. Retried: a repeat after a
        lost reply raises NotFoundError."""
        self._call(self._secrets.DeleteSecret, pb.secrets.DeleteSecretRequest(name=name))

    # Saved graders.

    def create_grader(
        self,
        display_name: str,
        grader: GraderLike,
        *,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> pb.SavedGrader:
        """Save a grader definition as version 1. Retries reuse one request_id."""
        request = pb.graders.CreateGraderRequest(
            grader=pb.SavedGrader(
                display_name=display_name,
                description=description,
                labels=dict(labels or {}),
                grader=to_grader(grader),
            ),
            request_id=request_id or new_request_id(),
        )
        return (self._call(self._graders.CreateGrader, request)).grader

    def get_grader(self, grader_id: str, version: int = 0) -> pb.SavedGrader:
        """A saved grader at `version` (0 = the latest)."""
        request = pb.graders.GetGraderRequest(grader_id=grader_id, version=version)
        return (self._call(self._graders.GetGrader, request)).grader

    def list_graders(self, *, page_size: int = 0) -> Iterator[pb.SavedGrader]:
        """Saved graders at their latest versions, newest first, across every page."""
        request = pb.graders.ListGradersRequest(page_size=page_size)
        while True:
            page = self._call(self._graders.ListGraders, request)
            yield from page.graders
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def update_grader(self, grader_id: str, grader: GraderLike) -> pb.SavedGrader:
        """Save a new, immutable version. Not retried: a repeat after a lost reply would save another version."""
        request = pb.graders.UpdateGraderRequest(grader_id=grader_id, grader=to_grader(grader))
        return (self._call(self._graders.UpdateGrader, request, retry=False)).grader

    def delete_grader(self, grader_id: str) -> None:
        """Delete a saved grader with all its versions (runs that used it keep their copies). Retried: a
        repeat after a lost reply raises NotFoundError."""
        self._call(self._graders.DeleteGrader, pb.graders.DeleteGraderRequest(grader_id=grader_id))

    # Saved targets.

    def create_target(
        self,
        display_name: str,
        target: TargetLike,
        *,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> pb.SavedTarget:
        """Save a target definition. Retries reuse one request_id."""
        request = pb.targets.CreateTargetRequest(
            target=pb.SavedTarget(
                display_name=display_name,
                description=description,
                labels=dict(labels or {}),
                target=to_target(target),
            ),
            request_id=request_id or new_request_id(),
        )
        return (self._call(self._targets.CreateTarget, request)).target

    def get_target(self, target_id: str) -> pb.SavedTarget:
        return (self._call(self._targets.GetTarget, pb.targets.GetTargetRequest(target_id=target_id))).target

    def list_targets(self, *, page_size: int = 0) -> Iterator[pb.SavedTarget]:
        """Saved targets, newest first, across every page."""
        request = pb.targets.ListTargetsRequest(page_size=page_size)
        while True:
            page = self._call(self._targets.ListTargets, request)
            yield from page.targets
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def delete_target(self, target_id: str) -> None:
        """Delete a saved target (runs that used it keep their copies). Retried: a repeat after a lost reply
        raises NotFoundError."""
        self._call(self._targets.DeleteTarget, pb.targets.DeleteTargetRequest(target_id=target_id))

    # Webhooks (docs/webhooks.md).

    def create_webhook(
        self,
        url: str,
        *,
        event_types: Iterable[str] = (),
        description: str = "",
        enabled: bool = True,
        request_id: str | None = None,
    ) -> pb.Webhook:
        """Register a webhook; its `signing_secret` is in this answer only. Retries reuse one request_id: a retry
        whose first attempt's answer was lost gets the webhook without the secret (rotate it to get a new one)."""
        request = create_webhook_request(
            url, event_types=event_types, description=description, enabled=enabled, request_id=request_id
        )
        return (self._call(self._webhooks.CreateWebhook, request)).webhook

    def get_webhook(self, webhook_id: str) -> pb.Webhook:
        request = pb.webhooks.GetWebhookRequest(webhook_id=webhook_id)
        return (self._call(self._webhooks.GetWebhook, request)).webhook

    def list_webhooks(self, *, page_size: int = 0) -> Iterator[pb.Webhook]:
        """Webhooks, newest first, across every page."""
        request = pb.webhooks.ListWebhooksRequest(page_size=page_size)
        while True:
            page = self._call(self._webhooks.ListWebhooks, request)
            yield from page.webhooks
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def update_webhook(
        self,
        webhook_id: str,
        *,
        url: str | None = None,
        event_types: Iterable[str] | None = None,
        description: str | None = None,
        enabled: bool | None = None,
    ) -> pb.Webhook:
        """Change the fields given (event_types is replaced whole); enabled=True resumes a webhook the server
        disabled after a 410."""
        request = update_webhook_request(
            webhook_id, url=url, event_types=event_types, description=description, enabled=enabled
        )
        return (self._call(self._webhooks.UpdateWebhook, request)).webhook

    def delete_webhook(self, webhook_id: str) -> None:
        """Delete a webhook and its deliveries. Retried: a repeat after a lost reply raises NotFoundError."""
        self._call(self._webhooks.DeleteWebhook, pb.webhooks.DeleteWebhookRequest(webhook_id=webhook_id))

    def rotate_webhook_secret(self, webhook_id: str, *, revoke_previous: bool = False) -> pb.Webhook:
        """A new signing secret (in this answer only). The old one also signs for 24 h unless revoke_previous.
        Not retried: a repeat after a lost reply would replace the secret again."""
        request = pb.webhooks.RotateWebhookSecretRequest(webhook_id=webhook_id, revoke_previous=revoke_previous)
        return (self._call(self._webhooks.RotateWebhookSecret, request, retry=False)).webhook

    def list_webhook_deliveries(
        self,
        webhook_id: str,
        *,
        status: pb.webhooks.WebhookDeliveryStatus = pb.webhooks.WEBHOOK_DELIVERY_STATUS_UNSPECIFIED,
        page_size: int = 0,
    ) -> Iterator[pb.WebhookDelivery]:
        """A webhook's deliveries, newest first, across every page (status: only those)."""
        request = pb.webhooks.ListWebhookDeliveriesRequest(webhook_id=webhook_id, status=status, page_size=page_size)
        while True:
            page = self._call(self._webhooks.ListWebhookDeliveries, request)
            yield from page.deliveries
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token
