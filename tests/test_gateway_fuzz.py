"""Schemathesis over the gateway's live /openapi.json: no generated request, to any route mounted (native or
dialect), gets a 5xx.

The server runs in this process with its gateway on port 0; Schemathesis runs as its own process (its CLI,
as a user would run it) against the real HTTP port, with an API key on every request. Generation is
deterministic and bounded: a few examples per operation, positive and negative, no shrinking, one worker.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from evalsvc.server import EvalServer
from tests.conftest import make_settings

EXAMPLES_PER_OPERATION = 20
REQUEST_TIMEOUT_S = 10  # bounds a streaming route too: a watch of an unknown run ends at once
RUN_TIMEOUT_S = 300
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Where a fuzzed target or judge URL would go: nowhere (a closed port). Only the executor calls out, through
# httpx, which reads these; gRPC does not, and the loopback calls of this test and of Schemathesis bypass them.
NO_OUTBOUND = {"ALL_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "no_proxy")


@pytest.fixture
async def fuzzed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[EvalServer]:
    """A server whose limits leave room for the fuzzer's creates, whose runs execute (a dialect that waits
    for its run to end must not wait in vain) and whose executor cannot reach the internet."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in NO_OUTBOUND.items():
        monkeypatch.setenv(name, value)
    srv = EvalServer(
        make_settings(
            tmp_path,
            http_addr="127.0.0.1:0",
            create_run_rate=1000.0,
            create_run_burst=1000,
            max_active_runs=10_000,
            http_retries=0,
            # A default judge (also the generator) so that judge runs and generated evals are accepted;
            # it is a closed port, so what calls it ends as an ERROR result or a failed generation.
            judge_base_url="http://127.0.0.1:9/v1",
            judge_model="fuzz-judge",
        )
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0.5)


def operations(spec: dict[str, Any]) -> set[str]:
    """`METHOD /path` of every operation in an OpenAPI document, as Schemathesis names them."""
    return {
        f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item if method in HTTP_METHODS
    }


async def schemathesis(base_url: str, api_key: str, workdir: Path) -> tuple[int, str, dict[str, Any]]:
    """Run `schemathesis run` against the live document; its exit code, output and JSON report."""
    report = workdir / "schemathesis.json"
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{base_url}/openapi.json"),
        *("--header", f"Authorization: Bearer {api_key}", "--header", f"x-api-key: {api_key}"),
        *("--checks", "not_a_server_error", "--phases", "examples,fuzzing", "--mode", "all"),
        *("--max-examples", str(EXAMPLES_PER_OPERATION), "--generation-deterministic", "--no-shrink"),
        *("--workers", "1", "--request-timeout", str(REQUEST_TIMEOUT_S), "--no-color"),
        *("--report", "json", "--report-json-path", str(report)),
    ]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=workdir, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = output.decode(errors="replace")
    assert report.exists(), text
    return process.returncode or 0, text, json.loads(report.read_text())


def failures_section(output: str) -> str:
    """The part of Schemathesis's output that names each failing operation and its curl reproduction."""
    start = output.find("FAILURES")
    end = output.find("WARNINGS", start) if start >= 0 else -1
    return output[start:end] if start >= 0 else output[-4000:]


async def test_no_generated_request_to_any_mounted_operation_gets_a_5xx(fuzzed: EvalServer, tmp_path: Path) -> None:
    assert fuzzed.gateway is not None and fuzzed.bootstrap_key
    base_url = f"http://127.0.0.1:{fuzzed.gateway.port}"
    async with httpx.AsyncClient(base_url=base_url) as client:
        documented = operations((await client.get("/openapi.json")).json())
    assert any(op.startswith("POST /v1/runs") for op in documented)

    code, output, report = await schemathesis(base_url, fuzzed.bootstrap_key, tmp_path)

    assert report["failures"] == [] and report["errors"] == [], failures_section(output)
    tested = report["operations"]
    assert (tested["total"], tested["tested"], tested["errored"]) == (len(documented), len(documented), 0), tested
    assert report["test_cases"]["generated"] >= len(documented), report["test_cases"]
    assert code == 0, failures_section(output)


async def test_a_key_that_cannot_be_grpc_metadata_is_a_4xx_on_every_mounted_operation(fuzzed: EvalServer) -> None:
    """HTTP headers may carry bytes gRPC metadata may not (non-ASCII, control characters): the fuzzer above
    sends a valid key, so this sends such keys, once per operation and header, path parameters filled in."""
    assert fuzzed.gateway is not None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{fuzzed.gateway.port}", timeout=30) as client:
        documented = sorted(operations((await client.get("/openapi.json")).json()))
        server_errors = []
        for operation in documented:
            method, _, path = operation.partition(" ")
            url = re.sub(r"{[^}]+}", "x", path)
            for header in ({"authorization": b"Bearer \xe9v\xeek"}, {"x-api-key": b"evk\x01"}):
                response = await client.request(method, url, headers=header, json={} if method != "GET" else None)
                if response.status_code >= 500:
                    server_errors.append(f"{operation} with {header}: {response.status_code} {response.text[:80]}")
    assert not server_errors, "\n".join(server_errors)
