"""examples/ run as they are, with the commands the README and the specs' comments give, against a live server
(a subprocess, as a user runs it) and real HTTP stand-ins for the model and the agent; and what evalctl says
around them: validate, the verdict and exit code, errors that say what to do, the HTML report, and output that
keeps whole lines without a terminal."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fake_llm import FakeEndpoint, chat_reply, judge_reply
from tests.procs import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CLIENT_DIR = ROOT / "clients" / "python"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    tmp = tmp_path_factory.mktemp("examples")
    server = ServerProcess(
        f"sqlite+aiosqlite:///{tmp / 'examples.db'}", tmp / "server.log", "--outbound-allow", "127.0.0.1"
    )
    try:
        key = server.bootstrap_key()
        assert key
        yield server, key
    finally:
        assert server.terminate() == 0


def evalctl(
    live: tuple[ServerProcess, str] | None, *args: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """evalctl as the README runs it (cwd the repository root), output captured: no terminal, no COLUMNS."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "EVALSVC_API_KEY", "EVALCTL_TARGET")}
    env["PYTHONPATH"] = os.pathsep.join([str(CLIENT_DIR), os.environ.get("PYTHONPATH", "")])
    if live is not None:
        env["EVALCTL_TARGET"] = live[0].target
        env["EVALSVC_API_KEY"] = live[1] if key is None else key
    return subprocess.run(
        [sys.executable, "-m", "evalsvc_client.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def readme_evalctl_line() -> list[str]:
    """The evalctl command the README shows for a first run, as arguments."""
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"^\.venv/bin/evalctl run (examples/\S+.*?)(?:\s+#.*)?$", readme, re.MULTILINE)
    assert line, "the README shows no `.venv/bin/evalctl run examples/...` line"
    return ["run", *line[1].split()]


def test_readme_first_run_with_examples_spec(live: tuple[ServerProcess, str], tmp_path: Path) -> None:
    """examples/spec.yaml (qa.jsonl, recorded): exact 6/8 (case-insensitive), fast 7/8 -> 13/16 = 81.25%."""
    validated = evalctl(None, "validate", "examples/spec.yaml")
    assert validated.returncode == 0, validated.stderr
    assert validated.stderr.strip() == (
        "examples/spec.yaml: valid: 8 items from qa.jsonl, target provided, 2 graders (exact, fast), 1 repetition"
    )

    args = readme_evalctl_line()
    assert args[:2] == ["run", "examples/spec.yaml"]
    first = evalctl(live, *args)
    assert first.returncode == 0, first.stderr
    summary = [line for line in first.stderr.splitlines() if line.startswith("run run_")]
    assert len(summary) == 1 and len(summary[0]) > 80, first.stderr  # one whole line: no wrapping at 80 columns
    assert "SUCCEEDED: 16/16 evaluations, pass rate 81.3%, 0 errors" in summary[0]
    assert "PASSED: pass rate 81.3% reaches --fail-under 60%" in first.stderr

    # Without --fail-under the spec's pass_threshold (75) decides; with one, it replaces the threshold.
    own = evalctl(live, "run", "examples/spec.yaml")
    assert own.returncode == 0 and "PASSED: pass rate 81.3% reaches the run's pass_threshold 75%" in own.stderr
    below = evalctl(live, "run", "examples/spec.yaml", "--fail-under", "90")
    assert below.returncode == 1 and "FAILED: pass rate 81.3% is below --fail-under 90%" in below.stderr

    run_id = summary[0].split()[1]
    report = tmp_path / "report.html"
    made = evalctl(live, "report", run_id, "--html", str(report))
    assert made.returncode == 0, made.stderr
    page = report.read_text()
    assert not re.search(r"""(?:src|href)\s*=|https?:|url\(""", page), (
        "the report must not refer to anything outside it"
    )
    assert run_id in page and "<svg" in page and "capitals and arithmetic (recorded)" in page
    failing = page[page.index("Failing results") :]
    assert "Failing results (3)" in failing
    for item, grader in (("capital-es", "exact"), ("math-sub", "exact"), ("capital-pe", "fast")):
        assert re.search(rf"<td>{item}</td><td class='num'>\d+</td><td>{grader}</td>", failing)
    assert "Barcelona" in failing and "81.3%" in page


def test_webhook_agent_example_with_the_example_agent(live: tuple[ServerProcess, str], tmp_path: Path) -> None:
    """examples/agent.py beside examples/webhook-agent.yaml (on a free port instead of 8765): the weather question
    is refused and calls no tool, so answer 4/5 and tools 4/5 -> 80%, above the spec's 75."""
    agent = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "agent.py"), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert agent.stdout is not None
        url = re.search(r"listening on (http://\S+)", agent.stdout.readline())
        assert url, "the example agent did not say where it listens"
        spec = yaml.safe_load((EXAMPLES / "webhook-agent.yaml").read_text())
        assert spec["target"]["http"]["endpoint"]["base_url"] == "http://127.0.0.1:8765/"
        spec["target"]["http"]["endpoint"]["base_url"] = url[1]
        (tmp_path / "webhook-agent.yaml").write_text(yaml.safe_dump(spec))
        ran = evalctl(live, "run", str(tmp_path / "webhook-agent.yaml"), "--json")
    finally:
        agent.terminate()
        agent.wait(10)
    assert ran.returncode == 0, ran.stderr
    run = json.loads(ran.stdout)
    assert run["status"] == "RUN_STATUS_SUCCEEDED" and run["counts"]["passed"] == 8 and run["counts"]["failed"] == 2
    assert run["overall_passed"] is True


def test_chat_judge_example_on_openai_compatible_stand_ins(live: tuple[ServerProcess, str], tmp_path: Path) -> None:
    """examples/chat-judge.yaml with its two endpoints pointed at stand-ins: the model answers "Paris" to every
    question and the judge scores everything 9/10, so similarity passes 1/8, the judge 8/8: 56% < 70."""
    spec = yaml.safe_load((EXAMPLES / "chat-judge.yaml").read_text())
    with FakeEndpoint(chat_reply("Paris")) as model, FakeEndpoint(judge_reply({"score": 9, "reason": "ok"})) as judge:
        spec["target"]["chat"]["endpoint"]["base_url"] = f"{model.url}/v1"
        spec["graders"][1]["llm_judge"]["endpoint"]["base_url"] = f"{judge.url}/v1"
        spec["dataset"] = str(EXAMPLES / spec["dataset"])
        (tmp_path / "chat-judge.yaml").write_text(yaml.safe_dump(spec))
        ran = evalctl(live, "run", str(tmp_path / "chat-judge.yaml"))
    assert ran.returncode == 1, ran.stderr
    assert "SUCCEEDED: 16/16 evaluations, pass rate 56.3%" in ran.stderr
    assert "FAILED: pass rate 56.3% is below the run's pass_threshold 70%" in ran.stderr
    asked: dict[str, Any] = model.seen[0].body
    assert asked["model"] == "llama3.1" and asked["messages"][0]["role"] == "system" and asked["temperature"] == 0
    assert len(model.seen) == 8 and len(judge.seen) == 8 and judge.seen[0].body["model"] == "llama3.1"


def test_validate_lists_every_problem_with_path_suggestion_and_values(tmp_path: Path) -> None:
    (tmp_path / "typos.yaml").write_text(
        "dataset: qa.jsonl\ntarget: provded\ngraders:\n  - {name: e, exact_mach: {}}\n"
        "  - {name: j, llm_judge: {mode: acuracy}}\n"
    )
    (tmp_path / "qa.jsonl").write_text('{"input": "a", "expected_outptu": "a"}\n')
    checked = evalctl(None, "validate", str(tmp_path / "typos.yaml"))
    assert checked.returncode == 3 and "Traceback" not in checked.stderr
    lines = checked.stderr.splitlines()
    assert lines[0] == f"evalctl: {tmp_path / 'typos.yaml'}: 5 problems"
    assert any(line.startswith("  graders[0].exact_mach: unknown key; did you mean 'exact_match'?") for line in lines)
    assert "  graders[1].llm_judge.mode: 'acuracy' is not a valid value; did you mean 'accuracy'?; use one of" in (
        checked.stderr
    )
    assert "  qa.jsonl:1: expected_outptu: unknown key; did you mean 'expected_output'?" in checked.stderr
    assert "did you mean 'provided'?" in checked.stderr and "docs/spec.md" in lines[-1]
    as_json = json.loads(evalctl(None, "validate", str(tmp_path / "typos.yaml"), "--json").stdout)
    assert as_json["valid"] is False and len(as_json["problems"]) == 5

    run = evalctl(None, "run", str(tmp_path / "typos.yaml"), "--target", "127.0.0.1:1")
    assert run.returncode == 3 and "graders[0].exact_mach" in run.stderr  # checked before any call
    missing = evalctl(None, "validate", "spec.yaml")
    assert missing.returncode == 3 and "no such spec file (examples/spec.yaml is one that runs)" in missing.stderr


def test_errors_say_what_to_do(live: tuple[ServerProcess, str]) -> None:
    for key in ("", "evk_nope_nope"):
        refused = evalctl(live, "list", key=key)
        assert refused.returncode == 3 and "Traceback" not in refused.stderr
        assert "UNAUTHENTICATED" in refused.stderr and "--api-key or EVALSVC_API_KEY" in refused.stderr
        assert "evalsvc keys create --tenant NAME" in refused.stderr

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"  # bound, never listening: connections are refused
        down = evalctl(live, "get", "run_x", "--target", address)
    assert down.returncode == 3 and "Traceback" not in down.stderr
    assert f"Nothing answers at {address}: is the server running? `make run` starts one" in down.stderr


def test_quickstart_without_a_key_says_how_to_get_one() -> None:
    env = {k: v for k, v in os.environ.items() if k != "EVALSVC_API_KEY"}
    ran = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert ran.returncode != 0 and "Traceback" not in ran.stderr
    assert "set EVALSVC_API_KEY" in ran.stderr and "evalsvc keys create --tenant default" in ran.stderr

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
        down = subprocess.run(
            [sys.executable, str(EXAMPLES / "quickstart.py"), address],
            env={**env, "EVALSVC_API_KEY": "evk_x"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert down.returncode != 0 and "Traceback" not in down.stderr
    assert f"is the server running at {address}? `make run` starts one" in down.stderr


def test_quickstart_stops_quietly_when_its_reader_does(live: tuple[ServerProcess, str]) -> None:
    """`examples/quickstart.py | head -1` ended in a BrokenPipeError traceback; it stops as `cat` would."""
    quickstart = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "quickstart.py"), live[0].target],
        env={**os.environ, "EVALSVC_API_KEY": live[1]},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert quickstart.stdout is not None and quickstart.stderr is not None
    quickstart.stdout.close()  # before its first line, which waits for CreateRun
    assert (quickstart.stderr.read(), quickstart.wait(60)) == ("", 128 + 13)
