"""The live run pages: `GET /ui/runs` (a tenant's runs, newest first), `GET /ui/runs/{run_id}` (one run,
updated live from the SSE watch with resume) and `GET /ui/compare?baseline=RUN_ID&candidate=RUN_ID` (the paired
comparison of two runs, CompareRuns; the run page links it).

The pages are static files shipped in this package (`assets/`): they load nothing from any other origin
and the server puts no data in them. Their script asks the gateway's own JSON API for everything, with
the API key the user gave once (as the URL fragment `#key=evk_...`, which browsers never send to the
server, or typed into the page), kept in the tab's `sessionStorage` and sent as the `authorization`
header, never in a URL. So the pages need no session of their own, and a page without a valid key shows
nothing but the key form. The Content-Security-Policy allows only this origin's scripts, styles and calls.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

ASSETS = resources.files(__package__) / "assets"
PAGE_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}
_MEDIA_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}


def _asset(name: str) -> bytes:
    return (ASSETS / name).read_bytes()


def router() -> APIRouter:
    """The /ui routes. The files are read once, here: they are small and never change while serving."""
    pages = {name: _asset(f"{name}.html") for name in ("runs", "run", "compare")}
    files = {name: _asset(name) for name in ("ui.css", "ui.js")}
    ui = APIRouter(include_in_schema=False, redirect_slashes=False)  # as the app's: /ui/runs/ is a 404

    def page(name: str) -> Response:
        return Response(pages[name], media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @ui.get("/ui")
    async def ui_root() -> Response:
        return RedirectResponse("/ui/runs")

    @ui.get("/ui/runs")
    async def runs_page() -> Response:
        return page("runs")

    @ui.get("/ui/runs/{run_id}")
    async def run_page(run_id: str) -> Response:
        return page("run")  # the script reads the id from the path; nothing of the request is echoed

    @ui.get("/ui/compare")
    async def compare_page() -> Response:
        return page("compare")  # the script reads ?baseline= and ?candidate=; nothing is echoed

    @ui.get("/ui/assets/{name}")
    async def asset(name: str) -> Response:
        body = files.get(name)
        if body is None:
            return Response(status_code=404)
        return Response(body, media_type=_MEDIA_TYPES[name[name.rfind(".") :]], headers=PAGE_HEADERS)

    return ui
