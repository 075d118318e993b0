"""The signature verifiers docs/webhooks.md shows for TypeScript and Go, compiled as written, accept a
real delivery of a real server and refuse the same delivery with one byte of its body changed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2_grpc, webhook_service_pb2_grpc
from evalsvc.v1 import webhook_service_pb2 as wpb
from tests.conftest import make_settings
from tests.fake_llm import FakeEndpoint, Reply
from tests.helpers import create_request, keyed_channel, watch_all

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "webhooks.md").read_text()
TSC = ROOT / "clients" / "typescript" / "node_modules" / ".bin" / "tsc"

TS_HARNESS = """
import { readFileSync } from "node:fs";
const delivery = JSON.parse(readFileSync(process.argv[2], "utf8"));
const forged = delivery.body.replace("succeeded", "succeedee");
console.log(JSON.stringify([verify(delivery.secret, delivery.headers, delivery.body),
                            verify(delivery.secret, delivery.headers, forged)]));
"""

GO_HARNESS_HEAD = """package main

import (
\t"crypto/hmac"
\t"crypto/sha256"
\t"encoding/base64"
\t"encoding/json"
\t"fmt"
\t"math"
\t"net/http"
\t"os"
\t"strconv"
\t"strings"
\t"time"
)
"""

GO_HARNESS_MAIN = """
func main() {
\traw, _ := os.ReadFile(os.Args[1])
\tvar delivery struct {
\t\tSecret  string            `json:"secret"`
\t\tHeaders map[string]string `json:"headers"`
\t\tBody    string            `json:"body"`
\t}
\tif err := json.Unmarshal(raw, &delivery); err != nil {
\t\tpanic(err)
\t}
\th := http.Header{}
\tfor name, value := range delivery.Headers {
\t\th.Set(name, value)
\t}
\tforged := strings.Replace(delivery.Body, "succeeded", "succeedee", 1)
\tgenuine := Verify(delivery.Secret, h, []byte(delivery.Body))
\tfmt.Printf("[%t,%t]\\n", genuine, Verify(delivery.Secret, h, []byte(forged)))
}
"""


def snippet(language: str) -> str:
    found = re.search(rf"```{language}\n(.*?)```", DOC, re.S)
    assert found, f"docs/webhooks.md has no {language} block"
    return found.group(1)


@pytest.fixture(scope="module")
def delivery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run.succeeded delivery as a receiver got it: {secret, headers, body}, in a JSON file."""

    async def capture(tmp: Path) -> dict[str, object]:
        srv = EvalServer(make_settings(tmp, outbound_allow="127.0.0.1"))
        await srv.start()
        try:
            assert srv.bootstrap_key
            with FakeEndpoint(Reply({})) as receiver:
                async with keyed_channel(srv.port, srv.bootstrap_key) as channel:
                    webhooks = webhook_service_pb2_grpc.WebhookServiceStub(channel)
                    runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
                    request = wpb.CreateWebhookRequest(webhook=wpb.Webhook(url=receiver.url))
                    secret = (await webhooks.CreateWebhook(request)).webhook.signing_secret
                    await watch_all(runs, (await runs.CreateRun(create_request(2))).run.id)
                    assert await asyncio.to_thread(receiver.wait_seen, 1, 60.0)
        finally:
            await srv.stop(grace=0.5)
        [seen] = receiver.seen
        return {"secret": secret, "headers": seen.headers, "body": seen.raw.decode()}

    tmp = tmp_path_factory.mktemp("webhook-docs")
    path = tmp / "delivery.json"
    path.write_text(json.dumps(asyncio.run(capture(tmp))))
    return path


@pytest.mark.skipif(not TSC.exists(), reason="needs clients/typescript/node_modules (make test installs it)")
def test_the_documented_typescript_verifier(delivery: Path, tmp_path: Path) -> None:
    (tmp_path / "verify.ts").write_text(snippet("typescript") + TS_HARNESS)
    types = ROOT / "clients" / "typescript" / "node_modules" / "@types"
    subprocess.run(
        [
            *(str(TSC), "--strict", "--target", "es2022", "--module", "nodenext", "--moduleResolution", "nodenext"),
            *("--types", "node", "--typeRoots", str(types), "--outDir", str(tmp_path), str(tmp_path / "verify.ts")),
        ],
        check=True,
        timeout=120,
    )
    done = subprocess.run(
        ["node", str(tmp_path / "verify.js"), str(delivery)], capture_output=True, text=True, timeout=60
    )
    assert json.loads(done.stdout) == [True, False], done.stderr


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain")
def test_the_documented_go_verifier(delivery: Path, tmp_path: Path) -> None:
    (tmp_path / "main.go").write_text(GO_HARNESS_HEAD + "\n" + snippet("go") + GO_HARNESS_MAIN)
    env = {**os.environ, "GO111MODULE": "off", "GOCACHE": str(tmp_path / "cache"), "GOFLAGS": ""}
    done = subprocess.run(
        ["go", "run", str(tmp_path / "main.go"), str(delivery)], capture_output=True, text=True, env=env, timeout=300
    )
    assert json.loads(done.stdout) == [True, False], done.stderr
