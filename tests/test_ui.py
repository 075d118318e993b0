"""The run pages as HTTP resources: served by the gateway from the package, with nothing loaded from another
origin, no key or data in the HTML, and the elements scripts read (`data-field`). The browser behaviour is in
tests/test_ui_browser.py."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from evalsvc.gateway import ui
from tests.conftest import make_settings
from tests.helpers import serving_gateway

EXTERNAL_URL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]""", re.IGNORECASE)


@pytest.fixture
async def gateway(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with serving_gateway(make_settings(tmp_path, http_addr="127.0.0.1:0")) as (_server, client):
        yield client


def test_shipped_assets_reference_no_other_origin() -> None:
    for asset in ui.ASSETS.iterdir():
        text = asset.read_text(encoding="utf-8")
        assert not EXTERNAL_URL.search(text), f"{asset.name} refers to another origin: {EXTERNAL_URL.search(text)}"


async def test_pages_are_served_without_a_key_and_carry_the_readable_fields(gateway: httpx.AsyncClient) -> None:
    anonymous = httpx.AsyncClient(base_url=gateway.base_url)
    async with anonymous:
        page = await anonymous.get("/ui/runs/run_0123")
        listing = await anonymous.get("/ui/runs")
        root = await anonymous.get("/ui")
        script = await anonymous.get("/ui/assets/ui.js")
        missing = await anonymous.get("/ui/assets/secret.py")
    assert page.status_code == listing.status_code == script.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert script.headers["content-type"].startswith("text/javascript")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "run_0123" not in page.text  # nothing of the request is echoed into the page
    for field in ("status", "completed", "total", "passed", "pass_rate"):
        assert f'data-field="{field}"' in page.text
    assert root.status_code == 307 and root.headers["location"] == "/ui/runs"
    assert missing.status_code == 404


async def test_comparison_page_is_served_like_the_run_pages_and_the_run_page_links_it(
    gateway: httpx.AsyncClient,
) -> None:
    anonymous = httpx.AsyncClient(base_url=gateway.base_url)
    async with anonymous:
        compare = await anonymous.get("/ui/compare", params={"baseline": "run_base", "candidate": "run_cand"})
        run = await anonymous.get("/ui/runs/run_cand")
    assert compare.status_code == 200 and compare.headers["content-type"].startswith("text/html")
    assert compare.headers["content-security-policy"] == run.headers["content-security-policy"]
    assert compare.headers["referrer-policy"] == "no-referrer"
    assert "run_base" not in compare.text and "run_cand" not in compare.text  # the script reads the query
    assert 'data-page="compare"' in compare.text and 'id="comparison-body"' in compare.text
    assert '<script src="/ui/assets/ui.js" defer></script>' in compare.text  # the one shared script, no inline code
    actions = run.text[
        run.text.index('id="run-actions"') : run.text.index("</nav>", run.text.index('id="run-actions"'))
    ]
    assert 'id="compare-form"' in actions and 'id="compare-baseline"' in actions and "Compare with" in actions


async def test_swagger_ui_is_off_and_the_openapi_document_stays(gateway: httpx.AsyncClient) -> None:
    assert (await gateway.get("/docs")).status_code == 404
    assert (await gateway.get("/redoc")).status_code == 404
    document = (await gateway.get("/openapi.json")).json()
    assert "/v1/runs" in document["paths"] and not any(path.startswith("/ui") for path in document["paths"])
