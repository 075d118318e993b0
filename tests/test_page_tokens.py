"""Page tokens are opaque and authenticated (docs/errors.md, INVALID_PAGE_TOKEN): only a token this
service issued, to this tenant, for this list and these filters, is accepted; anything else is
INVALID_ARGUMENT with reason INVALID_PAGE_TOKEN on every paged list, never INTERNAL. Run with
EVALSVC_TEST_DB=postgres for PostgreSQL, where the key is also shared by replicas."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from evalsvc import ids
from evalsvc.errors import ServiceError
from evalsvc.ids import PageTokens
from evalsvc.secrets.sealing import generate_key
from evalsvc.server import EvalServer
from evalsvc.v1 import comparison_pb2 as cpb
from evalsvc.v1 import dataset_service_pb2 as ds
from evalsvc.v1 import (
    dataset_service_pb2_grpc,
    eval_run_service_pb2_grpc,
    grader_pb2,
    grader_service_pb2_grpc,
    item_pb2,
    secret_service_pb2_grpc,
    target_pb2,
    target_service_pb2_grpc,
    webhook_service_pb2_grpc,
)
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import grader_service_pb2 as gs
from evalsvc.v1 import secret_service_pb2 as ss
from evalsvc.v1 import target_service_pb2 as ts
from evalsvc.v1 import webhook_service_pb2 as ws
from tests.conftest import make_settings
from tests.helpers import create_request, error_reason, keyed_channel, violations, watch_all


def _unsigned(data: Any) -> str:
    """A token as the service made them before they were signed: base64url JSON."""
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


# Forged and broken tokens: the unsigned shape with each kind of position, and bytes that are not a token.
FORGED = [
    _unsigned({"p": {"a": 1}, "q": {}}),
    _unsigned({"p": [1, 2], "q": {}}),
    _unsigned({"p": 10**30, "q": {}}),
    _unsigned({"p": "run_0", "q": {}}),
    _unsigned({"p": None, "q": None}),
    _unsigned([1, 2, 3]),
    _unsigned(10**30),
    "x",
    "!!!!",
    "é",
    "A" * 5000,
    base64.urlsafe_b64encode(b"\0" * 16 + b"123").decode(),
]


def test_tokens_are_bound_to_tenant_list_and_filters() -> None:
    tokens = PageTokens(b"k" * 32)
    token = tokens.encode("acme", "runs", {"labels": {"a": "b"}}, "run_123")
    assert tokens.decode("acme", "runs", {"labels": {"a": "b"}}, token) == "run_123"
    assert "run_123" not in token and "acme" not in token
    for tenant, kind, query in [
        ("other", "runs", {"labels": {"a": "b"}}),
        ("acme", "datasets", {"labels": {"a": "b"}}),
        ("acme", "runs", {"labels": {"a": "c"}}),
    ]:
        with pytest.raises(ServiceError) as err:
            tokens.decode(tenant, kind, query, token)
        assert err.value.reason == "INVALID_PAGE_TOKEN"
    with pytest.raises(ServiceError):
        PageTokens(b"j" * 32).decode("acme", "runs", {"labels": {"a": "b"}}, token)  # another database's key
    altered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for bad in [altered, token[:-4], *FORGED]:
        with pytest.raises(ServiceError) as err:
            tokens.decode("acme", "runs", {"labels": {"a": "b"}}, bad)
        assert err.value.reason == "INVALID_PAGE_TOKEN" and err.value.violations[0].field == "page_token"


# Lists of one run, dataset or pair of runs, whose resource another tenant cannot see.
SCOPED = {"ListRunResults", "ListDatasetItems", "ListComparisonItems"}


class Lists:
    """Every paged list RPC, as `call(page_token, page_size)`, over one channel."""

    def __init__(self, channel: grpc.aio.Channel, run_ids: tuple[str, str], dataset_id: str) -> None:
        run_id, other_run_id = run_ids
        runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        graders = grader_service_pb2_grpc.GraderServiceStub(channel)
        targets = target_service_pb2_grpc.TargetServiceStub(channel)
        secrets = secret_service_pb2_grpc.SecretServiceStub(channel)
        webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
        self.calls: dict[str, Callable[[str, int], Awaitable[Any]]] = {
            "ListRuns": lambda t, n: runs.ListRuns(pb.ListRunsRequest(page_token=t, page_size=n)),
            "ListRunResults": lambda t, n: runs.ListRunResults(
                pb.ListRunResultsRequest(run_id=run_id, page_token=t, page_size=n)
            ),
            "ListDatasets": lambda t, n: datasets.ListDatasets(ds.ListDatasetsRequest(page_token=t, page_size=n)),
            "ListDatasetItems": lambda t, n: datasets.ListDatasetItems(
                ds.ListDatasetItemsRequest(dataset_id=dataset_id, page_token=t, page_size=n)
            ),
            "ListGraders": lambda t, n: graders.ListGraders(gs.ListGradersRequest(page_token=t, page_size=n)),
            "ListTargets": lambda t, n: targets.ListTargets(ts.ListTargetsRequest(page_token=t, page_size=n)),
            "ListSecrets": lambda t, n: secrets.ListSecrets(ss.ListSecretsRequest(page_token=t, page_size=n)),
            "ListWebhooks": lambda t, n: webhooks.ListWebhooks(ws.ListWebhooksRequest(page_token=t, page_size=n)),
            "ListComparisonItems": lambda t, n: runs.ListComparisonItems(
                cpb.ListComparisonItemsRequest(
                    baseline_run_id=run_id, candidate_run_id=other_run_id, page_token=t, page_size=n
                )
            ),
        }


async def _two_of_everything(channel: grpc.aio.Channel) -> tuple[tuple[str, str], str]:
    """Two runs (one with two results), datasets, dataset items, graders and targets; the runs' and a
    dataset's ids."""
    runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
    run = (await runs.CreateRun(create_request(2))).run
    other = (await runs.CreateRun(create_request(1))).run
    await watch_all(runs, run.id)
    await watch_all(runs, other.id)
    datasets = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    dataset = (await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="a")))).dataset
    await datasets.CreateDataset(ds.CreateDatasetRequest(dataset=ds.Dataset(display_name="b")))
    items = [item_pb2.Item(input="q1"), item_pb2.Item(input="q2")]
    await datasets.AddDatasetItems(ds.AddDatasetItemsRequest(dataset_id=dataset.id, items=items))
    graders = grader_service_pb2_grpc.GraderServiceStub(channel)
    targets = target_service_pb2_grpc.TargetServiceStub(channel)
    secrets = secret_service_pb2_grpc.SecretServiceStub(channel)
    webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
    for name in ("a", "b"):
        await secrets.CreateSecret(ss.CreateSecretRequest(name=f"key_{name}", value="s3cret"))
        # a closed local port (allow-listed): the runs above ended before it existed, so nothing is sent
        hook = ws.Webhook(url=f"http://127.0.0.1:9/{name}", event_types=["run.succeeded"])
        await webhooks.CreateWebhook(ws.CreateWebhookRequest(webhook=hook))
        grader = grader_pb2.Grader(name=name, exact_match=grader_pb2.ExactMatch())
        await graders.CreateGrader(gs.CreateGraderRequest(grader=gs.SavedGrader(grader=grader)))
        await targets.CreateTarget(ts.CreateTargetRequest(target=ts.SavedTarget(target=target_pb2.Target(echo={}))))
    return (run.id, other.id), dataset.id


async def test_every_paged_list_refuses_forged_and_foreign_tokens_and_honours_its_own(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = EvalServer(make_settings(tmp_path, secrets_key=generate_key(), outbound_allow="127.0.0.1"))
    await srv.start()
    try:
        other_key, _ = await srv.keys.create("other")
        async with (
            keyed_channel(srv.port, srv.bootstrap_key or "") as mine,
            keyed_channel(srv.port, other_key) as theirs,
        ):
            run_ids, dataset_id = await _two_of_everything(mine)
            lists, foreign = Lists(mine, run_ids, dataset_id), Lists(theirs, run_ids, dataset_id)
            caplog.set_level(logging.WARNING)
            for name, call in lists.calls.items():
                first = await call("", 1)
                assert first.next_page_token, name
                second = await call(first.next_page_token, 1)  # its own token: the next page
                assert second != first, name
                refused = []
                for token in [*FORGED, first.next_page_token[:-3]]:
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(token, 1)
                    refused.append(err.value)
                # Another tenant's token is refused: as a page token, or (on lists of one run or
                # dataset, which that tenant cannot see) as NOT_FOUND, whichever is checked first.
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await foreign.calls[name](first.next_page_token, 1)
                if name in SCOPED and err.value.code() == grpc.StatusCode.NOT_FOUND:
                    assert error_reason(err.value).endswith("_NOT_FOUND")
                else:
                    refused.append(err.value)
                # So is a token of another list.
                other_list = "ListGraders" if name != "ListGraders" else "ListTargets"
                other_token = (await lists.calls[other_list]("", 1)).next_page_token
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(other_token, 1)
                refused.append(err.value)
                for error in refused:
                    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error)
                    assert error_reason(error) == "INVALID_PAGE_TOKEN", (name, error)
                    assert "page_token" in violations(error)
    finally:
        await srv.stop(grace=0.5)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_token_outlives_a_restart_and_works_on_every_replica(tmp_path: Path) -> None:
    first = EvalServer(make_settings(tmp_path))
    await first.start()
    first_running = True
    try:
        key = first.bootstrap_key or ""
        async with keyed_channel(first.port, key) as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            for _ in range(3):
                await runs.CreateRun(create_request(1))
            page = await runs.ListRuns(pb.ListRunsRequest(page_size=1))
        # A second server on the same database: the next process (SQLite has one) or a replica.
        if first.db.is_sqlite:
            await first.stop(grace=0.5)
            first_running = False
        second = EvalServer(make_settings(tmp_path, db=first.settings.db))
        await second.start()
        try:
            async with keyed_channel(second.port, key) as channel:
                runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                rest = await runs.ListRuns(pb.ListRunsRequest(page_size=5, page_token=page.next_page_token))
        finally:
            await second.stop(grace=0.5)
    finally:
        if first_running:
            await first.stop(grace=0.5)
    assert len(rest.runs) == 2 and page.runs[0].id not in {r.id for r in rest.runs}


async def test_a_page_size_over_the_maximum_is_coerced_and_a_negative_one_refused(runs) -> None:
    """AIP-158: a page_size over the maximum is taken as the maximum (`page_size=100000` was a 400); a
    negative one is INVALID_ARGUMENT naming the field."""
    created = (await runs.CreateRun(create_request(1005))).run
    await watch_all(runs, created.id)
    page = await runs.ListRunResults(pb.ListRunResultsRequest(run_id=created.id, page_size=100_000))
    assert len(page.results) == 1000 and page.next_page_token  # a page of the maximum, and the rest after it
    assert ids.page_size(100_000, 50) == 1000 and ids.page_size(0, 50) == 50
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.ListRuns(pb.ListRunsRequest(page_size=-1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and set(violations(caught.value)) == {"page_size"}
