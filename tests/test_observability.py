"""Access log (text and JSON) and Prometheus metrics, against real servers and channels."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from evalsvc.logs import TEXT_FORMAT, JsonFormatter, TextFormatter
from evalsvc.runs.service import RunService
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import eval_run_service_pb2_grpc, run_pb2
from tests.conftest import make_settings
from tests.helpers import create_request, error_reason, keyed_channel, serving_gateway, watch_all
from tests.procs import KEY_LINE, ServerProcess

SERVICE = "/evalsvc.v1.EvalRunService"
# Shaped like a real key so it reaches the key check; it must never show up in a log line.
FORGED_KEY = "evk_abcdef012345_notarealsecretnotarealsecret00"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value by name and exact labels; None when absent."""
    return samples.get((name, frozenset(labels.items())))


async def http_get(port: int, path: str) -> tuple[int, str]:
    """A plain HTTP/1.1 GET over asyncio streams (the endpoint shares the test's event loop)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode()


async def scrape(port: int) -> Samples:
    status, text = await http_get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
async def metrics_server(tmp_path: Path) -> AsyncIterator[EvalServer]:
    srv = EvalServer(make_settings(tmp_path, metrics_addr="127.0.0.1:0"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=1.0)


@pytest.fixture
async def metrics_stub(metrics_server: EvalServer) -> AsyncIterator[eval_run_service_pb2_grpc.EvalRunServiceStub]:
    assert metrics_server.bootstrap_key
    async with keyed_channel(metrics_server.port, metrics_server.bootstrap_key) as channel:
        yield eval_run_service_pb2_grpc.EvalRunServiceStub(channel)


# ----------------------------------------------------------------------------------------- access log


async def test_access_log_has_method_tenant_code_latency_and_run_id(
    server: EvalServer, runs: eval_run_service_pb2_grpc.EvalRunServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="evalsvc.access")
    run_id = (await runs.CreateRun(create_request(2))).run.id
    await runs.GetRun(pb.GetRunRequest(run_id=run_id))
    with pytest.raises(grpc.aio.AioRpcError):
        await runs.GetRun(pb.GetRunRequest(run_id="run_missing"))
    async with keyed_channel(server.port, FORGED_KEY) as forged:
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await eval_run_service_pb2_grpc.EvalRunServiceStub(forged).GetRun(pb.GetRunRequest(run_id=run_id))
        assert rejected.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await health_pb2_grpc.HealthStub(forged).Check(health_pb2.HealthCheckRequest())

    lines = [r for r in caplog.records if r.name == "evalsvc.access"]
    seen = [(r.method, r.code, r.tenant, r.run_id) for r in lines]  # type: ignore[attr-defined]
    assert seen == [
        (f"{SERVICE}/CreateRun", "OK", "default", run_id),
        (f"{SERVICE}/GetRun", "OK", "default", run_id),
        (f"{SERVICE}/GetRun", "NOT_FOUND", "default", "run_missing"),
        (f"{SERVICE}/GetRun", "UNAUTHENTICATED", "", ""),  # its request is never read: no run named
        ("/grpc.health.v1.Health/Check", "OK", "", ""),
    ]
    assert all(isinstance(r.latency_ms, float) and r.latency_ms >= 0 for r in lines)  # type: ignore[attr-defined]
    assert [r.levelno for r in lines] == [logging.INFO] * 4 + [logging.DEBUG]  # health is quiet
    formatter = JsonFormatter()
    for record in caplog.records:
        text = formatter.format(record)
        assert server.bootstrap_key not in text and FORGED_KEY not in text and "notarealsecret" not in text
        assert json.loads(text)["logger"] == record.name


async def test_a_callers_run_id_cannot_forge_or_flood_access_log_lines(
    runs: eval_run_service_pb2_grpc.EvalRunServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    """The access log wrote the request's `run_id` as it came: newlines in it forged whole lines (an ERROR
    line naming another key), and a 200 KB one made a 200 KB line. Now an id is shown as is only when
    it could be one; anything else is quoted, escaped and cut."""
    caplog.set_level(logging.INFO, logger="evalsvc.access")
    forged = "run_x\n2026-12-06 00:00:00,000 ERROR evalsvc.server: FORGED LINE tenant=default key=evk_stolen"
    for run_id in (forged, "run_" + "y" * 200_000, "run_é"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await runs.GetRun(pb.GetRunRequest(run_id=run_id))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    shown = [r.getMessage() for r in caplog.records if r.name == "evalsvc.access"]
    assert len(shown) == 3 and all("\n" not in line and len(line) < 200 for line in shown), shown
    assert shown[0].endswith(f"run_id={forged[:64]!a}...") and "\\n2026" in shown[0]
    assert shown[1].endswith(f"run_id='run_{'y' * 60}'...")
    assert shown[2].endswith("run_id='run_\\xe9'")


def test_json_formatter_makes_one_line_with_extra_fields() -> None:
    record = logging.LogRecord("evalsvc.x", logging.WARNING, __file__, 1, "two\nlines %s", ("here",), None)
    record.method = "/a/B"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "WARNING" and entry["logger"] == "evalsvc.x" and entry["method"] == "/a/B"
    assert entry["message"] == "two\nlines here" and entry["time"].endswith("+00:00")


def test_text_lines_carry_the_time_as_the_standard_formatter_writes_it() -> None:
    """TextFormatter formats the seconds once per second; every line still reads as logging's own."""
    formatter = TextFormatter()
    for created in (1_764_870_000.0, 1_764_870_000.9995, 1_764_870_001.0421, 1_764_870_000.5):  # back in time too
        record = logging.LogRecord("evalsvc.x", logging.INFO, __file__, 1, "run %s", ("r1",), None)
        record.created, record.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert formatter.format(record) == logging.Formatter(TEXT_FORMAT).format(record)


async def test_serve_with_json_logs_writes_only_json_lines(tmp_path: Path) -> None:
    server = ServerProcess(f"sqlite+aiosqlite:///{tmp_path / 'svc.db'}", tmp_path / "svc.log", "--log-format", "json")
    key = server.bootstrap_key()
    assert key
    try:
        async with keyed_channel(server.port, key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await stub.CreateRun(create_request(2))).run.id
            await watch_all(stub, run_id)
        async with keyed_channel(server.port, FORGED_KEY) as forged:
            with pytest.raises(grpc.aio.AioRpcError):
                await eval_run_service_pb2_grpc.EvalRunServiceStub(forged).GetRun(pb.GetRunRequest(run_id=run_id))
    finally:
        assert server.terminate() == 0
    entries = []
    for line in server.log_path.read_text().splitlines():
        if KEY_LINE.fullmatch(line):  # the bootstrap key, printed once on stdout (merged into this file)
            continue
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= entry.keys()
        assert key not in line and "notarealsecret" not in line
        entries.append(entry)
    access = {(e["method"], e["code"]): e for e in entries if e["logger"] == "evalsvc.access"}
    assert access[(f"{SERVICE}/CreateRun", "OK")]["run_id"] == run_id
    assert access[(f"{SERVICE}/CreateRun", "OK")]["tenant"] == "default"
    assert access[(f"{SERVICE}/WatchRun", "OK")]["run_id"] == run_id
    assert access[(f"{SERVICE}/GetRun", "UNAUTHENTICATED")]["tenant"] == ""
    assert all(isinstance(e["latency_ms"], float) for e in access.values())
    assert any("evalsvc listening on" in e["message"] for e in entries)


# -------------------------------------------------------------------------------------------- metrics


async def test_rpcs_are_counted_by_method_and_code(
    metrics_server: EvalServer, metrics_stub: eval_run_service_pb2_grpc.EvalRunServiceStub
) -> None:
    run_id = (await metrics_stub.CreateRun(create_request(1))).run.id
    for _ in range(2):
        await metrics_stub.GetRun(pb.GetRunRequest(run_id=run_id))
    with pytest.raises(grpc.aio.AioRpcError):
        await metrics_stub.GetRun(pb.GetRunRequest(run_id="run_missing"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{metrics_server.port}") as keyless:
        with pytest.raises(grpc.aio.AioRpcError):
            await eval_run_service_pb2_grpc.EvalRunServiceStub(keyless).GetRun(pb.GetRunRequest(run_id=run_id))

    samples = await scrape(metrics_server.metrics_port)
    get = f"{SERVICE}/GetRun"
    assert sample(samples, "evalsvc_rpcs_total", method=f"{SERVICE}/CreateRun", code="OK") == 1
    assert sample(samples, "evalsvc_rpcs_total", method=get, code="OK") == 2
    assert sample(samples, "evalsvc_rpcs_total", method=get, code="NOT_FOUND") == 1
    assert sample(samples, "evalsvc_rpcs_total", method=get, code="UNAUTHENTICATED") == 1
    assert sample(samples, "evalsvc_rpc_latency_seconds_count", method=get) == 4
    assert sample(samples, "evalsvc_rpc_latency_seconds_bucket", method=get, le="+Inf") == 4


async def test_a_finished_run_shows_in_evaluation_run_and_latency_metrics(
    metrics_server: EvalServer, metrics_stub: eval_run_service_pb2_grpc.EvalRunServiceStub
) -> None:
    run_id = (await metrics_stub.CreateRun(create_request(5))).run.id
    await watch_all(metrics_stub, run_id)

    samples = await scrape(metrics_server.metrics_port)
    assert sample(samples, "evalsvc_evaluations_completed_total", state="passed") == 5
    assert sample(samples, "evalsvc_evaluations_completed_total", state="failed") == 0
    assert sample(samples, "evalsvc_runs", status="succeeded") == 1
    assert sample(samples, "evalsvc_runs", status="running") == 0
    assert sample(samples, "evalsvc_jobs_queued") == 0
    assert sample(samples, "evalsvc_jobs_running") is not None
    assert sample(samples, "evalsvc_target_latency_seconds_count", target="provided") == 5
    assert sample(samples, "evalsvc_grader_latency_seconds_count", grader="exact_match") == 5
    # Buckets are cumulative: an exact match takes well under a second, so all 5 are in le="1.0".
    assert sample(samples, "evalsvc_grader_latency_seconds_bucket", grader="exact_match", le="1.0") == 5
    assert sample(samples, "evalsvc_grader_latency_seconds_bucket", grader="exact_match", le="+Inf") == 5
    assert 0 < (sample(samples, "evalsvc_grader_latency_seconds_sum", grader="exact_match") or 0) < 5
    assert sample(samples, "evalsvc_stream_duration_seconds_count", method=f"{SERVICE}/WatchRun") == 1


async def test_open_streams_gauge_follows_an_open_watch(tmp_path: Path) -> None:
    # No workers: the run stays pending, so its watch stays open until the client leaves.
    srv = EvalServer(make_settings(tmp_path, metrics_addr="127.0.0.1:0", workers=0))
    await srv.start()
    watch = f"{SERVICE}/WatchRun"
    try:
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            stub = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await stub.CreateRun(create_request(2))).run.id
            call = stub.WatchRun(pb.WatchRunRequest(run_id=run_id))
            assert (await call.read()).seq == 1
            samples = await scrape(srv.metrics_port)
            assert sample(samples, "evalsvc_open_streams", method=watch) == 1
            assert sample(samples, "evalsvc_jobs_queued") == 2
            assert sample(samples, "evalsvc_runs", status="pending") == 1
            call.cancel()
            # The server learns of the cancellation asynchronously, and nothing signals it: poll, bounded.
            for _ in range(500):
                if srv.metrics.registry.get_sample_value("evalsvc_open_streams", {"method": watch}) == 0:
                    break
                await asyncio.sleep(0.01)
        samples = await scrape(srv.metrics_port)
        assert sample(samples, "evalsvc_open_streams", method=watch) == 0
        assert sample(samples, "evalsvc_rpcs_total", method=watch, code="CANCELLED") == 1
    finally:
        await srv.stop(grace=1.0)


async def test_metrics_endpoint_serves_only_metrics(metrics_server: EvalServer) -> None:
    status, _ = await http_get(metrics_server.metrics_port, "/")
    assert status == 404
    status, text = await http_get(metrics_server.metrics_port, "/metrics")
    assert status == 200 and "# TYPE evalsvc_rpcs_total counter" in text


async def test_metrics_are_off_without_an_address(server: EvalServer) -> None:
    assert server.settings.metrics_addr == "" and server.metrics_port == 0


@pytest.mark.parametrize(
    ("level", "httpx_info", "httpx_warning"), [("info", False, True), ("debug", True, True), ("error", False, False)]
)
def test_httpx_does_not_log_each_outbound_request_at_info(level: str, httpx_info: bool, httpx_warning: bool) -> None:
    """httpx logged every target, judge and webhook request at INFO with its whole URL: a line per model
    call, and any `user:password@` in a URL, in clear. At evalsvc's default level it speaks at WARNING
    (`--log-level debug` keeps its lines for whoever asks)."""
    import io

    from evalsvc import logs

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("httpx").level, logging.getLogger("httpcore").level)
    try:
        logs.configure(level, "text", io.StringIO())
        for name in ("httpx", "httpcore"):
            assert logging.getLogger(name).isEnabledFor(logging.INFO) is httpx_info
            assert logging.getLogger(name).isEnabledFor(logging.WARNING) is httpx_warning  # --log-level error
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        logging.getLogger("httpx").setLevel(saved[2])
        logging.getLogger("httpcore").setLevel(saved[3])


async def test_a_response_too_large_to_send_is_internal_and_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every response is bounded by design (pages by bytes, definitions, endpoint replies); one that is
    not was refused in grpc's core: the client saw RESOURCE_EXHAUSTED, grpc logged an ERROR traceback
    ("ExecuteBatchError raised in core") and the access log said OK. The interceptor now serializes
    and measures each response: the caller gets INTERNAL, the operator one ERROR line naming the
    method and the sizes, and the access log the code the caller got, over gRPC and in process alike.
    (No path is known to make such a response; here GetRun's service is made to.)"""
    limit = 256 * 1024
    real_get = RunService.get

    async def unbounded(self: RunService, tenant: str, run_id: str) -> run_pb2.Run:
        run = await real_get(self, tenant, run_id)
        run.annotations["padding"] = "x" * limit
        return run

    monkeypatch.setattr(RunService, "get", unbounded)
    caplog.set_level(logging.INFO)
    async with serving_gateway(make_settings(tmp_path, http_addr="127.0.0.1:0", max_message_bytes=limit)) as (
        srv,
        http,
    ):
        assert srv.bootstrap_key
        async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
            runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
            run_id = (await runs.CreateRun(create_request(1))).run.id
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await runs.GetRun(pb.GetRunRequest(run_id=run_id))
            assert err.value.code() == grpc.StatusCode.INTERNAL and error_reason(err.value) == "INTERNAL"
            assert (await runs.ListRuns(pb.ListRunsRequest())).runs[0].id == run_id  # other calls unaffected
        answer = await http.get(f"/v1/runs/{run_id}")  # the embedded gateway: in process
        assert answer.status_code == 500 and answer.json()["details"][0]["reason"] == "INTERNAL"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    line = rf"{SERVICE}/GetRun: a response of 26\d{{4}} bytes is over --max-message-bytes \({limit}\); "
    line += "some bound is missing"
    assert len(errors) == 2 and all(re.fullmatch(line, r.getMessage()) and r.exc_info is None for r in errors)
    access = [(r.method, r.code) for r in caplog.records if r.name == "evalsvc.access"]  # type: ignore[attr-defined]
    assert access.count((f"{SERVICE}/GetRun", "INTERNAL")) == 2 and (f"{SERVICE}/GetRun", "OK") not in access
