"""Secrets belong to tenants: operator grants, tenants' own sealed secrets (SecretService, REST, CLI), one
refusal for "not granted" and "does not exist", and a server that will not start unable to open them.

Integration tests run a real server over a real channel on the test database (PostgreSQL with
EVALSVC_TEST_DB=postgres), with real HTTP servers standing in for model endpoints."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from evalsvc.http.outbound import OutboundError, endpoint_headers
from evalsvc.secrets.operator import OperatorSecrets, SecretsConfigError
from evalsvc.secrets.sealing import Sealer, SecretsKeyError, generate_key
from evalsvc.server import EvalServer
from evalsvc.v1 import eval_run_service_pb2 as pb
from evalsvc.v1 import (
    eval_run_service_pb2_grpc,
    grader_pb2,
    grader_service_pb2,
    grader_service_pb2_grpc,
    item_pb2,
    secret_service_pb2,
    secret_service_pb2_grpc,
    target_pb2,
    target_service_pb2,
    target_service_pb2_grpc,
)
from tests.conftest import make_settings
from tests.dbs import db_url, stored_bytes
from tests.fake_llm import FakeEndpoint, chat_reply, judge_reply
from tests.helpers import error_reason, exact, keyed_channel, serving_gateway, violations, watch_all

OPERATOR_VALUE = "sk-operator-0123456789"
ACME_VALUE = "sk-acme-abcdefghijklmnop"
Judge = grader_pb2.LlmJudge


# --- operator grants and sealing: no network ---


def test_an_env_secret_is_granted_to_default_only_unless_widened() -> None:
    secrets = OperatorSecrets(
        {
            "EVALSVC_SECRET_OPENAI": "a",
            "EVALSVC_SECRET_SHARED": "b",
            "EVALSVC_SECRET_SHARED_TENANTS": "acme, beta",
            "EVALSVC_SECRET_PUBLIC": "c",
            "EVALSVC_SECRET_PUBLIC_TENANTS": "*",
        }
    )
    assert secrets.names() == ["OPENAI", "PUBLIC", "SHARED"]
    assert secrets.granted("default", "openai") == "a" and secrets.granted("acme", "OPENAI") is None
    assert secrets.granted("acme", "shared") == "b" and secrets.granted("beta", "shared") == "b"
    assert secrets.granted("default", "shared") is None
    assert secrets.granted("anyone", "public") == "c"
    assert secrets.granted("default", "missing") is None


def test_the_secrets_file_grants_per_entry_and_reads_plain_strings_as_default_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    file = tmp_path / "secrets.json"
    file.write_text(
        '{"openai": {"value": "a", "tenants": ["acme"]}, "all": {"value": "b", "tenants": ["*"]}, "old": "sk-old"}'
    )
    with caplog.at_level(logging.WARNING):
        secrets = OperatorSecrets({}, str(file))
    assert secrets.granted("acme", "OPENAI") == "a" and secrets.granted("default", "openai") is None
    assert secrets.granted("zeta", "all") == "b"
    assert secrets.granted("default", "old") == "sk-old" and secrets.granted("acme", "old") is None
    assert "old" in caplog.text and "sk-old" not in caplog.text  # the warning names the entry, not its value


@pytest.mark.parametrize(
    ("environ", "content"),
    [
        ({"EVALSVC_SECRET_X_TENANTS": "acme"}, None),  # a grant of nothing
        ({"EVALSVC_SECRET_X": "sk-grant", "EVALSVC_SECRET_X_TENANTS": "Not A Tenant"}, None),
        ({"EVALSVC_SECRET_X": "sk-grant", "EVALSVC_SECRET_X_TENANTS": ""}, None),
        ({}, '{"x": {"value": "sk-grant", "tenants": "acme"}}'),
        ({}, '{"x": {"value": 1}}'),
        ({}, '{"x": {"value": "sk-grant", "tenant": ["acme"]}}'),
        ({}, '["x"]'),
        ({}, "{not json"),
    ],
)
def test_a_malformed_grant_is_a_configuration_error(
    tmp_path: Path, environ: dict[str, str], content: str | None
) -> None:
    file = ""
    if content is not None:
        (tmp_path / "s.json").write_text(content)
        file = str(tmp_path / "s.json")
    with pytest.raises(SecretsConfigError) as err:
        OperatorSecrets(environ, file)
    assert "sk-grant" not in str(err.value)


def test_sealed_values_open_only_with_their_key_tenant_and_name() -> None:
    sealer = Sealer(generate_key())
    sealed = sealer.seal("acme", "OPENAI", ACME_VALUE)
    assert ACME_VALUE.encode() not in sealed
    assert sealer.open("acme", "OPENAI", sealed) == ACME_VALUE
    assert sealer.seal("acme", "OPENAI", ACME_VALUE) != sealed  # a fresh nonce each time
    for tenant, name in [("other", "OPENAI"), ("acme", "ANTHROPIC")]:  # copied to another row
        with pytest.raises(SecretsKeyError):
            sealer.open(tenant, name, sealed)
    with pytest.raises(SecretsKeyError):
        Sealer(generate_key()).open("acme", "OPENAI", sealed)
    for malformed in ["", "short", "!" * 44, generate_key()[:-4]]:
        with pytest.raises(SecretsKeyError):
            Sealer(malformed)


def test_headers_carry_the_named_values_and_a_missing_one_fails_the_call() -> None:
    endpoint = target_pb2.Endpoint(
        base_url="https://api.example/v1", api_key_secret="openai", headers={"x-team": "a", "x-key": "secret:Extra"}
    )
    headers = endpoint_headers(endpoint, {"OPENAI": ACME_VALUE, "EXTRA": "sk-extra"})
    assert headers["authorization"] == f"Bearer {ACME_VALUE}" and headers["x-key"] == "sk-extra"
    assert headers["x-team"] == "a"
    # Deleted between CreateRun and the call: that call fails (an ERROR result), naming the secret only.
    with pytest.raises(OutboundError) as err:
        endpoint_headers(endpoint, {"OPENAI": ACME_VALUE})
    assert "'Extra'" in err.value.reason and ACME_VALUE not in err.value.reason


# --- a real server ---


class Tenant:
    """Stubs of every service, authenticated as one tenant."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.runs = eval_run_service_pb2_grpc.EvalRunServiceStub(channel)
        self.graders = grader_service_pb2_grpc.GraderServiceStub(channel)
        self.targets = target_service_pb2_grpc.TargetServiceStub(channel)
        self.secrets = secret_service_pb2_grpc.SecretServiceStub(channel)


class Served:
    """A started server and its tenants' stubs: `default` (bootstrap key), `acme` and `other`."""

    def __init__(self, server: EvalServer, tenants: dict[str, Tenant]) -> None:
        self.server = server
        self.tenants = tenants


async def _serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> AsyncIterator[Served]:
    monkeypatch.setenv("EVALSVC_SECRET_OPS", OPERATOR_VALUE)  # granted to default only
    tmp_path.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {"outbound_allow": "127.0.0.1", "secrets_key": generate_key()}
    values.update(overrides)
    server = EvalServer(make_settings(tmp_path, **values))
    await server.start()
    try:
        assert server.bootstrap_key
        keys = {"default": server.bootstrap_key}
        for tenant in ("acme", "other"):
            keys[tenant], _ = await server.keys.create(tenant)
        channels = [keyed_channel(server.port, key) for key in keys.values()]
        try:
            yield Served(server, {tenant: Tenant(ch) for tenant, ch in zip(keys, channels, strict=True)})
        finally:
            for channel in channels:
                await channel.close()
    finally:
        await server.stop(grace=0.5)


@pytest.fixture
async def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Served]:
    async for value in _serve(tmp_path / "a", monkeypatch):
        yield value


def _chat(url: str, secret: str) -> target_pb2.Target:
    return target_pb2.Target(
        chat=target_pb2.ChatTarget(
            endpoint=target_pb2.Endpoint(base_url=url + "/v1", api_key_secret=secret, timeout_s=5), model="m"
        )
    )


def _judge(url: str, secret: str) -> grader_pb2.Grader:
    return grader_pb2.Grader(
        name="judge",
        llm_judge=Judge(
            mode=Judge.MODE_ACCURACY,
            model="j",
            endpoint=target_pb2.Endpoint(base_url=url + "/v1", headers={"x-key": f"secret:{secret}"}, timeout_s=5),
        ),
    )


URL = "http://127.0.0.1:9"


async def _update_grader(tenant: Tenant, name: str) -> Any:
    """UpdateGrader of a fresh saved grader to a judge naming `name`."""
    saved = await tenant.graders.CreateGrader(
        grader_service_pb2.CreateGraderRequest(grader=grader_service_pb2.SavedGrader(grader=exact()))
    )
    return await tenant.graders.UpdateGrader(
        grader_service_pb2.UpdateGraderRequest(grader_id=saved.grader.id, grader=_judge(URL, name))
    )


# Every place a request names a secret: (what is called, the field path the refusal names).
NAMING_CALLS: dict[str, Callable[[Tenant, str], Any]] = {
    "CreateRun target api_key_secret": lambda t, name: t.runs.CreateRun(
        pb.CreateRunRequest(items=[item_pb2.Item(input="q")], target=_chat(URL, name), graders=[exact()])
    ),
    "CreateRun target secret: header": lambda t, name: t.runs.CreateRun(
        pb.CreateRunRequest(
            items=[item_pb2.Item(input="q")],
            target=target_pb2.Target(
                http=target_pb2.HttpTarget(endpoint=target_pb2.Endpoint(base_url=URL, headers={"k": f"secret:{name}"}))
            ),
            graders=[exact()],
        )
    ),
    "CreateRun judge endpoint": lambda t, name: t.runs.CreateRun(
        pb.CreateRunRequest(
            items=[item_pb2.Item(input="q")],
            target=target_pb2.Target(echo=target_pb2.EchoTarget()),
            graders=[_judge(URL, name)],
        )
    ),
    "CreateTarget": lambda t, name: t.targets.CreateTarget(
        target_service_pb2.CreateTargetRequest(target=target_service_pb2.SavedTarget(target=_chat(URL, name)))
    ),
    "CreateGrader": lambda t, name: t.graders.CreateGrader(
        grader_service_pb2.CreateGraderRequest(grader=grader_service_pb2.SavedGrader(grader=_judge(URL, name)))
    ),
    "UpdateGrader": _update_grader,
}


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str, bytes]:
    """Code, message and the serialized google.rpc.Status (every detail) of a failed call."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    status = rpc_status.from_call(err.value)
    assert status is not None
    return err.value.code(), err.value.details() or "", status.SerializeToString()


@pytest.mark.parametrize("where", list(NAMING_CALLS))
async def test_a_secret_not_granted_is_refused_exactly_like_one_that_does_not_exist(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    call = NAMING_CALLS[where]
    acme, other = served.tenants["acme"], served.tenants["other"]
    await other.secrets.CreateSecret(secret_service_pb2.CreateSecretRequest(name="THEIRS", value=ACME_VALUE))
    # The operator's OPS is granted to default only; THEIRS is tenant other's own.
    not_granted = await _refusal(call(acme, "ops"))
    anothers = await _refusal(call(acme, "theirs"))
    await other.secrets.DeleteSecret(secret_service_pb2.DeleteSecretRequest(name="theirs"))
    gone = await _refusal(call(acme, "theirs"))
    assert anothers == gone
    assert not_granted[0] == grpc.StatusCode.INVALID_ARGUMENT
    # The same name on a server where no such secret was ever configured.
    monkeypatch.delenv("EVALSVC_SECRET_OPS")
    async for fresh in _serve(tmp_path / "b", monkeypatch):
        monkeypatch.delenv("EVALSVC_SECRET_OPS")
        never = await _refusal(call(fresh.tenants["acme"], "ops"))
    assert not_granted == never
    # Where it is granted, the same call gets past the secret check.
    try:
        await call(served.tenants["default"], "ops")
    except grpc.aio.AioRpcError as error:
        assert not any("secret" in d for d in violations(error).values()), violations(error)


async def test_tenants_use_their_own_secrets_which_shadow_the_operators_and_never_come_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("EVALSVC_SECRET_LLM_KEY", OPERATOR_VALUE)
    monkeypatch.setenv("EVALSVC_SECRET_LLM_KEY_TENANTS", "*")
    async for served in _serve(tmp_path, monkeypatch):
        acme, default, other = (served.tenants[t] for t in ("acme", "default", "other"))
        created = await acme.secrets.CreateSecret(
            secret_service_pb2.CreateSecretRequest(name="llm_key", value=ACME_VALUE)
        )
        assert created.secret.name == "LLM_KEY" and created.secret.create_time.seconds > 0
        await acme.secrets.CreateSecret(secret_service_pb2.CreateSecretRequest(name="JUDGE_KEY", value="sk-judge-1"))
        with FakeEndpoint(chat_reply("a"), judge_reply({"score": 9, "reason": "ok"})) as llm:

            async def run_as(tenant: Tenant, graders: list[grader_pb2.Grader]) -> list[dict[str, str]]:
                before = len(llm.seen)
                created = await tenant.runs.CreateRun(
                    pb.CreateRunRequest(
                        items=[item_pb2.Item(input="q", expected_output="a")],
                        target=_chat(llm.url, "llm_key"),
                        graders=graders,
                    )
                )
                await watch_all(tenant.runs, created.run.id)
                return [seen.headers for seen in llm.seen[before:]]

            # acme's own LLM_KEY shadows the operator's (granted to everyone); its judge uses its JUDGE_KEY.
            llm.script = [chat_reply("a"), judge_reply({"score": 9, "reason": "ok"})]
            target_call, judge_call = await run_as(acme, [_judge(llm.url, "judge_key")])
            assert target_call["authorization"] == f"Bearer {ACME_VALUE}" and judge_call["x-key"] == "sk-judge-1"
            llm.script = [chat_reply("a")]
            (seen,) = await run_as(default, [exact()])
            assert seen["authorization"] == f"Bearer {OPERATOR_VALUE}"
            # Another tenant cannot name acme's JUDGE_KEY: it does not exist for them.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await run_as(other, [_judge(llm.url, "judge_key")])
            assert "graders[0].llm_judge.endpoint.headers[x-key]" in violations(err.value)
            # Deleted, acme falls back to the operator's grant.
            await acme.secrets.DeleteSecret(secret_service_pb2.DeleteSecretRequest(name="Llm_Key"))
            (seen,) = await run_as(acme, [exact()])
            assert seen["authorization"] == f"Bearer {OPERATOR_VALUE}"
        listed = await acme.secrets.ListSecrets(secret_service_pb2.ListSecretsRequest())
        assert [s.name for s in listed.secrets] == ["JUDGE_KEY"]
        assert not (await other.secrets.ListSecrets(secret_service_pb2.ListSecretsRequest())).secrets
        stored = stored_bytes(served.server.settings.db)
        assert ACME_VALUE.encode() not in stored and b"sk-judge-1" not in stored
        assert OPERATOR_VALUE.encode() not in stored
    assert all(v not in record.getMessage() for record in caplog.records for v in (ACME_VALUE, "sk-judge-1"))


async def test_secret_service_validates_pages_and_scopes_to_the_tenant(served: Served) -> None:
    acme, other = served.tenants["acme"], served.tenants["other"]
    for name in ("C_KEY", "a_key", "B_KEY"):
        await acme.secrets.CreateSecret(secret_service_pb2.CreateSecretRequest(name=name, value="v-" + name))
    replaced = await acme.secrets.CreateSecret(secret_service_pb2.CreateSecretRequest(name="b_key", value="new"))
    assert replaced.secret.name == "B_KEY"
    names, token = [], ""
    while True:
        page = await acme.secrets.ListSecrets(secret_service_pb2.ListSecretsRequest(page_size=1, page_token=token))
        names += [s.name for s in page.secrets]
        assert all(
            not s.ListFields() or {f.name for f, _ in s.ListFields()} <= {"name", "create_time"} for s in page.secrets
        )
        if not (token := page.next_page_token):
            break
    assert names == ["A_KEY", "B_KEY", "C_KEY"]
    # Concurrent sets of one new name: each succeeds, one secret remains.
    await asyncio.gather(
        *(
            acme.secrets.CreateSecret(secret_service_pb2.CreateSecretRequest(name="RACED", value=f"v{i}"))
            for i in range(8)
        )
    )
    listed = await acme.secrets.ListSecrets(secret_service_pb2.ListSecretsRequest())
    assert [s.name for s in listed.secrets].count("RACED") == 1
    bad = [
        ("", "sk-never-echoed", "name"),
        ("1abc", "sk-never-echoed", "name"),
        ("has-dash", "sk-never-echoed", "name"),
        ("X" * 65, "sk-never-echoed", "name"),
        ("OK\n", "sk-never-echoed", "name"),
        ("OK", "", "value"),
        ("OK", "sk-never\necho", "value"),
        ("OK", "sk-never-échoed", "value"),
        ("OK", "sk-never-echoed\n", "value"),
        ("OK", "sk-never-echoed" * 600, "value"),
    ]
    for name, value, field in bad:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await acme.secrets.CreateSecret(secret_service_pb2.CreateSecretRequest(name=name, value=value))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in violations(err.value), (name, field)
        status = rpc_status.from_call(err.value)
        assert status is not None and b"sk-never" not in status.SerializeToString()
    # another tenant's secret, and one that never existed: the same NOT_FOUND
    theirs = await _refusal(other.secrets.DeleteSecret(secret_service_pb2.DeleteSecretRequest(name="A_KEY")))
    await acme.secrets.DeleteSecret(secret_service_pb2.DeleteSecretRequest(name="A_KEY"))
    missing = await _refusal(acme.secrets.DeleteSecret(secret_service_pb2.DeleteSecretRequest(name="A_KEY")))
    assert theirs == missing and theirs[0] == grpc.StatusCode.NOT_FOUND
    # A name no secret can have is the caller's mistake, not a missing secret: it was NOT_FOUND "secret '' not found".
    for name, description in [("", "is required"), ("../x", "must be 1-64 characters"), ("X" * 65, "must be 1-64")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await acme.secrets.DeleteSecret(secret_service_pb2.DeleteSecretRequest(name=name))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert description in violations(err.value)["name"], violations(err.value)


async def test_without_a_secrets_key_tenants_cannot_store_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for served in _serve(tmp_path, monkeypatch, secrets_key=""):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.tenants["acme"].secrets.CreateSecret(
                secret_service_pb2.CreateSecretRequest(name="K", value="v")
            )
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(err.value) == "SECRETS_KEY_NOT_CONFIGURED"


async def test_rest_routes_serve_the_secret_service(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, http_addr="127.0.0.1:0", secrets_key=generate_key())
    async with serving_gateway(settings) as (_, client):
        created = await client.post("/v1/secrets", json={"name": "openai", "value": ACME_VALUE})
        assert created.status_code == 200, created.text
        assert created.json()["secret"]["name"] == "OPENAI" and ACME_VALUE not in created.text
        listed = await client.get("/v1/secrets", params={"page_size": 10})
        assert [s["name"] for s in listed.json()["secrets"]] == ["OPENAI"] and ACME_VALUE not in listed.text
        assert (await client.delete("/v1/secrets/OPENAI")).status_code == 200
        gone = await client.delete("/v1/secrets/OPENAI")
        assert gone.status_code == 404


def _evalsvc(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "evalsvc", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


async def test_cli_sets_lists_deletes_and_the_server_refuses_to_start_without_the_right_key(tmp_path: Path) -> None:
    db = db_url(tmp_path)
    key = _evalsvc("secrets", "generate-key").stdout.strip()
    keyed = {"EVALSVC_SECRETS_KEY": key}
    done = await asyncio.to_thread(
        _evalsvc, "secrets", "set", "--tenant", "acme", "--db", db, "openai", stdin=ACME_VALUE + "\n", env=keyed
    )
    assert done.returncode == 0, done.stderr
    listed = await asyncio.to_thread(_evalsvc, "secrets", "list", "--db", db)
    assert "acme" in listed.stdout and "OPENAI" in listed.stdout and ACME_VALUE not in listed.stdout
    assert ACME_VALUE.encode() not in stored_bytes(db)
    # The key is required to set more, and must be the one the stored secrets were sealed with.
    for env, cause in [
        ({"EVALSVC_SECRETS_KEY": ""}, "not set"),
        ({"EVALSVC_SECRETS_KEY": generate_key()}, "not the key"),
    ]:
        refused = await asyncio.to_thread(_evalsvc, "serve", "--grpc-addr", "127.0.0.1:0", "--db", db, env=env)
        assert refused.returncode == 2, refused.stderr
        output = refused.stdout + refused.stderr
        lines = [line for line in output.splitlines() if line.strip() and " INFO " not in line]
        assert len(lines) == 1 and "EVALSVC_SECRETS_KEY" in lines[0] and cause in lines[0], lines
        assert "Traceback" not in refused.stderr
    malformed = await asyncio.to_thread(_evalsvc, "serve", "--db", db, env={"EVALSVC_SECRETS_KEY": "short"})
    assert malformed.returncode == 2 and "EVALSVC_SECRETS_KEY" in malformed.stderr
    deleted = await asyncio.to_thread(
        _evalsvc, "secrets", "delete", "--tenant", "acme", "--db", db, "OPENAI", env=keyed
    )
    assert deleted.returncode == 0, deleted.stderr
    again = await asyncio.to_thread(_evalsvc, "secrets", "delete", "--tenant", "acme", "--db", db, "OPENAI", env=keyed)
    assert again.returncode == 1
