"""The live run page in a real browser: Playwright driving Debian's chromium (`.ci/run` installs it; Playwright's
own browser download is never used) against a real server, its gateway and a real HTTP target.

The target stand-in holds every call until the test lets some through, so the page is seen at each step of the
run rather than at moments chosen by sleeping."""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from evalsvc.server import EvalServer
from tests.conftest import make_settings

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None or not CHROMIUM.exists(),
    reason="needs playwright (dev dependency) and Debian's chromium (apt-get install chromium; .ci/run does)",
)
STEP_TIMEOUT_MS = 30_000


class GatedTarget:
    """An agent webhook (an `http` target) that answers `expected` only when the test releases a call.
    The WRONG_CALL-th call to pass the gate answers "wrong" instead (its item is `wrong_item`): which item
    that is depends on the order the executor sends them in, so the test reads it from here."""

    WRONG_CALL = 10  # in the third batch of four the test releases

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.closing = threading.Event()
        self.answered = 0
        self.wrong_item = ""
        self._lock = threading.Lock()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                item = json.loads(self.rfile.read(int(self.headers["content-length"])))["item"]
                while not gate.permits.acquire(timeout=0.5):
                    if gate.closing.is_set():
                        break
                with gate._lock:
                    gate.answered += 1
                    wrong = gate.answered == gate.WRONG_CALL
                    if wrong:
                        gate.wrong_item = item["id"]
                answer = "wrong" if wrong else f"answer to {item['input']}"
                body = json.dumps({"content": answer}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/agent"

    def release(self, calls: int) -> None:
        for _ in range(calls):
            self.permits.release()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def target() -> Iterator[GatedTarget]:
    gated = GatedTarget()
    try:
        yield gated
    finally:
        gated.close()


@pytest.fixture
async def gateway_server(tmp_path: Path) -> AsyncIterator[EvalServer]:
    srv = EvalServer(make_settings(tmp_path, http_addr="127.0.0.1:0", outbound_allow="127.0.0.1"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(grace=0.5)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield launched
        finally:
            await launched.close()


async def _rest(server: EvalServer, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gateway's answer to one call with the bootstrap key; it must succeed."""
    import httpx

    assert server.gateway is not None
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.gateway.port}", timeout=30) as client:
        answered = await client.request(
            method, path, json=body, headers={"authorization": f"Bearer {server.bootstrap_key}"}
        )
        assert answered.status_code == 200, answered.text
        return dict(answered.json())


async def _create_run(server: EvalServer, body: dict[str, Any]) -> dict[str, Any]:
    return dict((await _rest(server, "POST", "/v1/runs", body))["run"])


async def _get_run(server: EvalServer, run_id: str) -> dict[str, Any]:
    return dict((await _rest(server, "GET", f"/v1/runs/{run_id}"))["run"])


async def _field(page: Any, name: str) -> str:
    return str(await page.locator(f'[data-field="{name}"]').first.text_content()).strip()


async def _wait_field(page: Any, name: str, value: str) -> None:
    await page.wait_for_function(
        '([name, value]) => document.querySelector(`[data-field="${name}"]`)?.textContent.trim() === value',
        arg=[name, value],
        timeout=STEP_TIMEOUT_MS,
    )


async def test_run_page_shows_a_run_live_from_start_to_final_status(
    gateway_server: EvalServer, target: GatedTarget, browser: Any, tmp_path: Path
) -> None:
    items = [{"id": f"q{i}", "input": f"question {i}", "expectedOutput": f"answer to question {i}"} for i in range(12)]
    run = await _create_run(
        gateway_server,
        {
            "displayName": "browser: live counts",
            "items": items,
            "target": {"http": {"endpoint": {"baseUrl": target.url}}},
            "graders": [{"name": "exact", "exactMatch": {}}],
        },
    )
    page = await browser.new_page()
    requests: list[Any] = []
    page.on("request", lambda request: requests.append(request))
    await page.goto(
        f"http://127.0.0.1:{gateway_server.gateway.port}/ui/runs/{run['id']}#key={gateway_server.bootstrap_key}"
    )

    # Nothing answered yet: the run executes and shows 0 of 12.
    await _wait_field(page, "status", "RUNNING")
    assert (await _field(page, "completed"), await _field(page, "total")) == ("0", "12")
    assert await _field(page, "pass_rate") == "\N{EN DASH}"  # no verdict yet

    target.release(4)  # the first four calls pass
    await _wait_field(page, "completed", "4")
    assert (await _field(page, "passed"), await _field(page, "pass_rate"), await _field(page, "status")) == (
        "4",
        "100%",
        "RUNNING",
    )
    target.release(4)
    await _wait_field(page, "completed", "8")
    assert await _field(page, "status") == "RUNNING"

    target.release(4)  # the last four; the tenth call answered "wrong"
    await _wait_field(page, "status", "SUCCEEDED")
    assert (await _field(page, "completed"), await _field(page, "total"), await _field(page, "passed")) == (
        "12",
        "12",
        "11",
    )
    assert await _field(page, "pass_rate") == "91.7%"
    assert await page.locator("#results-body tr").count() == 12
    await page.locator('#filters button[data-state="RESULT_STATE_FAILED"]').click()
    failed_rows = page.locator("#results-body tr")
    assert target.wrong_item.startswith("q")
    assert await failed_rows.count() == 1 and await failed_rows.locator("td").first.text_content() == target.wrong_item

    # The key left the address bar, went only as a header, and never into a URL.
    key = str(gateway_server.bootstrap_key)
    assert "key=" not in page.url
    assert all(key not in request.url for request in requests)
    api_calls = [request for request in requests if "/v1/" in request.url]
    assert api_calls and all(request.headers.get("authorization") == f"Bearer {key}" for request in api_calls)
    assert all(request.url.startswith(f"http://127.0.0.1:{gateway_server.gateway.port}/") for request in requests)

    await page.locator('#filters button[data-state=""]').click()
    await page.set_viewport_size({"width": 1280, "height": 1000})
    await page.screenshot(path=str(tmp_path / "run-page.png"), full_page=True)  # for people: pytest keeps tmp_path


async def test_run_page_resumes_after_the_stream_drops_and_keys_are_typed_once(
    gateway_server: EvalServer, target: GatedTarget, browser: Any
) -> None:
    """The first watch connection ends after three events; the page reconnects with Last-Event-ID and shows every
    result once. A refused key brings the form back; the key typed into it is kept for the tab, so the runs list
    opens without asking again."""
    target.release(6)
    items = [{"id": f"q{i}", "input": f"question {i}", "expectedOutput": f"answer to question {i}"} for i in range(6)]
    run = await _create_run(
        gateway_server,
        {
            "displayName": "browser: resume",
            "items": items,
            "target": {"http": {"endpoint": {"baseUrl": target.url}}},
            "graders": [{"name": "exact", "exactMatch": {}}, {"name": "short", "latency": {"maxMs": 60000}}],
        },
    )
    page = await browser.new_page()
    watch_requests: list[dict[str, str]] = []

    async def cut_first_stream(route: Any) -> None:
        watch_requests.append(dict(route.request.headers))
        if len(watch_requests) > 1:
            await route.continue_()
            return
        response = await route.fetch()  # the whole stream (the run may finish meanwhile), then only its start
        events = (await response.text()).split("\n\n")
        await route.fulfill(response=response, body="\n\n".join(events[:3]) + "\n\n")

    await page.route("**/*:watch", cut_first_stream)
    await page.goto(f"http://127.0.0.1:{gateway_server.gateway.port}/ui/runs/{run['id']}")
    await page.locator("#key-input").fill("evk_wrong_key")
    await page.locator("#key-form button").click()
    refused = page.locator("#key-error")
    await refused.wait_for(timeout=STEP_TIMEOUT_MS)
    assert (await refused.text_content() or "").startswith("The key was refused")
    assert watch_requests == []  # nothing is watched without a valid key
    await page.locator("#key-input").fill(str(gateway_server.bootstrap_key))
    await page.locator("#key-form button").click()

    await _wait_field(page, "status", "SUCCEEDED")
    assert (await _field(page, "completed"), await _field(page, "total"), await _field(page, "pass_rate")) == (
        "12",
        "12",
        "100%",
    )
    assert await page.locator("#results-body tr").count() == 12  # each result once
    assert len(watch_requests) >= 2 and "last-event-id" not in watch_requests[0]
    assert watch_requests[1]["last-event-id"] == "3"
    assert await page.locator("#graders-body tr").count() == 2

    await page.goto(f"http://127.0.0.1:{gateway_server.gateway.port}/ui/runs")
    link = page.locator(f'tr[data-run-id="{run["id"]}"] a')
    await link.wait_for(timeout=STEP_TIMEOUT_MS)
    assert await link.text_content() == "browser: resume"
    assert await page.locator("#key-panel").is_hidden()


async def test_run_page_shows_the_latency_figures_the_api_gives(gateway_server: EvalServer, browser: Any) -> None:
    """Recorded latencies 100..600 ms and three items without a response (their target failed: no latency).
    The page computed its figures with another rank than the server (p50 of 100..600: 400 ms against 300 ms)
    and counted each failed item as 0 ms (with them: 200 ms)."""
    items = [
        {
            "id": f"q{i}",
            "input": "q",
            "expectedOutput": "a",
            "response": {"content": "a", "latencyMs": 100 * i},
            "humanVerdicts": {"exact": i != 6},
        }
        for i in range(1, 7)
    ]
    run = await _create_run(
        gateway_server,
        {
            "displayName": "browser: latency",
            "items": [*items, *({"id": f"none{i}", "input": "q", "expectedOutput": "a"} for i in range(3))],
            "target": {"provided": {}},
            "graders": [{"name": "exact", "exactMatch": {}}],
            "maxErrorRate": 50,
        },
    )
    page = await browser.new_page()
    await page.goto(f"http://127.0.0.1:{gateway_server.gateway.port}/ui/runs/{run['id']}")
    await page.locator("#key-input").fill(str(gateway_server.bootstrap_key))
    await page.locator("#key-form button").click()
    await _wait_field(page, "status", "SUCCEEDED")
    latency = (await _get_run(gateway_server, run["id"]))["aggregate"]["latency"]
    assert (latency["p50Ms"], latency["p95Ms"]) == (300, 600)
    assert await _field(page, "latency") == "300 ms / 600 ms"
    # People's verdicts on q1..q6 (they failed q6, which exact passed): the grader's agreement with them.
    agreement = (await _get_run(gateway_server, run["id"]))["aggregate"]["graders"][0]["agreement"]
    assert agreement["graderPassedPersonFailed"] == 1 and agreement["bothPassed"] == 5
    await _wait_field(page, "grader_agreement", "83.3% of 6, κ 0.00")

    # Its errored items rerun: the new run's page names the run it reruns.
    rerun = (await _rest(gateway_server, "POST", f"/v1/runs/{run['id']}:rerun", {}))["run"]
    await page.goto(f"http://127.0.0.1:{gateway_server.gateway.port}/ui/runs/{rerun['id']}")
    await page.wait_for_function(
        "(source) => document.getElementById('run-meta').textContent.includes(`rerun of ${source}`)", arg=run["id"]
    )


async def test_run_page_opens_the_comparison_view_of_two_finished_runs(
    gateway_server: EvalServer, browser: Any, tmp_path: Path
) -> None:
    """Recorded (`provided`) outputs: the baseline answers all 12 items right, the candidate gets q0..q7 wrong, so
    8 pairs regressed and none improved: McNemar p = 2 / 2**8 = 0.0078 < 0.05, REGRESSED. A run graded under
    another grader name has no pairs with it: NO_PAIRS, with a dash for its rates, delta and p (not 0% and +0.0)."""

    def run_body(name: str, wrong: int, grader: str = "exact") -> dict[str, Any]:
        items = [
            {
                "id": f"q{i}",
                "input": f"question {i}",
                "expectedOutput": f"answer {i}",
                "response": {"content": "wrong" if i < wrong else f"answer {i}"},
            }
            for i in range(12)
        ]
        return {
            "displayName": name,
            "items": items,
            "target": {"provided": {}},
            "graders": [{"name": grader, "exactMatch": {}}],
        }

    baseline = await _create_run(gateway_server, run_body("browser: baseline", 0))
    candidate = await _create_run(gateway_server, run_body("browser: candidate", 8))
    origin = f"http://127.0.0.1:{gateway_server.gateway.port}"
    page = await browser.new_page()
    await page.goto(f"{origin}/ui/runs/{baseline['id']}#key={gateway_server.bootstrap_key}")
    await _wait_field(page, "status", "SUCCEEDED")
    await page.goto(f"{origin}/ui/runs/{candidate['id']}")  # the key stays in the tab
    await _wait_field(page, "status", "SUCCEEDED")

    await page.locator("#run-actions #compare-baseline").fill(baseline["id"])
    await page.locator("#run-actions button[type=submit]").click()
    await page.wait_for_url(f"{origin}/ui/compare?baseline={baseline['id']}&candidate={candidate['id']}")
    exact = page.locator('tr[data-grader="exact"]')
    await exact.wait_for(timeout=STEP_TIMEOUT_MS)

    async def cell(row: Any, field: str) -> str:
        return str(await row.locator(f'[data-field="{field}"]').text_content())

    assert [await cell(exact, f) for f in ("pairs", "baseline_pass_rate", "candidate_pass_rate", "changed")] == [
        "12",
        "100%",
        "33.3%",
        "+0 -8",
    ]
    assert (await cell(exact, "pass_rate_delta"), await cell(exact, "mcnemar_p")) == ("-66.7", "0.00781")
    assert await cell(exact, "verdict") == "REGRESSED"
    assert await cell(page.locator("tr[data-overall]"), "verdict") == "REGRESSED"
    assert await page.locator("#partial").is_hidden()
    # The links are named once the runs are read (nameRuns, after the comparison drew): awaited, not read at once.
    await page.wait_for_function(
        "(name) => document.getElementById('candidate-link').textContent === name",
        arg="browser: candidate",
        timeout=STEP_TIMEOUT_MS,
    )
    await page.set_viewport_size({"width": 1280, "height": 700})
    await page.screenshot(path=str(tmp_path / "compare-page.png"), full_page=True)  # for people: pytest keeps tmp_path

    renamed = await _create_run(gateway_server, run_body("browser: renamed grader", 0, grader="same"))
    await page.goto(f"{origin}/ui/compare?baseline={baseline['id']}&candidate={renamed['id']}")
    unpaired = page.locator('tr[data-grader="same"]')
    await unpaired.wait_for(timeout=STEP_TIMEOUT_MS)
    fields = ("pairs", "baseline_pass_rate", "candidate_pass_rate", "pass_rate_delta", "delta_ci", "mcnemar_p")
    assert [await cell(unpaired, f) for f in fields] == ["0"] + ["\N{EN DASH}"] * 5
    assert await cell(unpaired, "verdict") == "NO_PAIRS"
    assert await cell(page.locator("tr[data-overall]"), "verdict") == "NO_PAIRS"
    assert await page.locator('[data-field="definition_changed"]').count() == 0
    assert await page.locator("#changed-items").is_hidden()

    # The same grader name made case-insensitive, and 4 items of other questions under the same ids: the grader
    # is marked and pairs nothing, the items are counted and not paired.
    redefined = run_body("browser: redefined", 0)
    redefined["graders"][0]["exactMatch"] = {"caseInsensitive": True}
    for item in redefined["items"][:4]:
        item["input"] = "another question"
    changed = await _create_run(gateway_server, redefined)
    await page.goto(f"{origin}/ui/compare?baseline={baseline['id']}&candidate={changed['id']}")
    marked = page.locator('tr[data-grader="exact"] [data-field="definition_changed"]')
    await marked.wait_for(timeout=STEP_TIMEOUT_MS)
    assert await marked.text_content() == "definition changed"
    assert await cell(page.locator('tr[data-grader="exact"]'), "verdict") == "NO_PAIRS"
    # The candidate may still be executing (a partial comparison, read again every 5 s) until its results are in.
    await page.wait_for_function(
        "(text) => document.getElementById('changed-items').textContent === text",
        arg="4 evaluations of different items: not paired",
        timeout=STEP_TIMEOUT_MS,
    )
    assert await page.locator("#changed-items").is_visible()
