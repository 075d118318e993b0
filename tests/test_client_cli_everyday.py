"""evalctl's everyday edges, as a new user meets them: TLS flags given by halves (grpc aborted the process),
progress without a terminal, --fail-under given as a fraction, a server lost mid-watch, --version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from evalsvc_client import cli
from evalsvc_client._common import TLSOptions

from tests.test_client_cli import CLIENT_DIR
from tests.test_tls import Pki, pki

__all__ = ["pki"]  # the fixture, imported for the tests below


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
