"""Routes of the dashboard (``/ui``), its sign-in, its static files, and ``/docs`` offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, FastAPI, Form, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.session import COOKIE, make_cookie, read_cookie
from store import auth as keys
from store.db import session_scope

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(include_in_schema=False)

#: (path, template, title) of each page; ``{id}`` parts are passed to the template
PAGES = {
    "jobs": "Jobs", "job": "Job", "compare": "Compare", "sweeps": "Sweeps", "sweep": "Sweep", "new": "New job",
}


def _package_file(package: str, *parts: str) -> Path:
    """A file shipped inside an installed package (found without importing the package)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {package!r} package is not installed (pip install {package})")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def plotly_js() -> Path:
    """plotly.js as the ``plotly`` Python package ships it."""
    return _package_file("plotly", "package_data", "plotly.min.js")


def docs_assets() -> Path:
    """Swagger UI and ReDoc as the ``fastapi-offline`` package ships them."""
    return _package_file("fastapi_offline", "static")


def _auth_on(request: Request) -> bool:
    return request.app.state.settings.auth != "off"


def _signed_in(request: Request) -> Any:
    return read_cookie(request.app, request.cookies)


def _page(request: Request, template: str, title: str, **context: Any) -> Response:
    browser = None
    if _auth_on(request):
        browser = _signed_in(request)
        if browser is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/ui/signin?next={quote(target, safe='')}", status_code=303)
    return templates.TemplateResponse(request, template, {
        "title": title, "csrf": browser.csrf if browser else "", "auth_on": _auth_on(request), **context,
    })


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", status_code=307)


@router.get("/ui")
def jobs_page(request: Request) -> Response:
    return _page(request, "jobs.html", "Jobs", page="jobs")


@router.get("/ui/jobs/{job_id}")
def job_page(request: Request, job_id: str) -> Response:
    return _page(request, "job.html", "Job", page="job", job_id=job_id)


@router.get("/ui/compare")
def compare_page(request: Request) -> Response:
    return _page(request, "compare.html", "Compare", page="compare")


@router.get("/ui/sweeps")
def sweeps_page(request: Request) -> Response:
    return _page(request, "sweeps.html", "Sweeps", page="sweeps")


@router.get("/ui/sweeps/{sweep_id}")
def sweep_page(request: Request, sweep_id: str) -> Response:
    return _page(request, "sweep.html", "Sweep", page="sweep", sweep_id=sweep_id)


@router.get("/ui/new")
def new_page(request: Request) -> Response:
    return _page(request, "new.html", "New job", page="new")


def _safe_next(target: str | None) -> str:
    """Only a path of this dashboard (never another host: an open redirect)."""
    if not target:
        return "/ui"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/ui") or target.startswith("//"):
        return "/ui"
    return target


@router.get("/ui/signin")
def signin_page(request: Request, next: str | None = None, error: str | None = None) -> Response:  # noqa: A002
    if not _auth_on(request):
        return RedirectResponse(_safe_next(next), status_code=303)
    return templates.TemplateResponse(request, "signin.html", {
        "title": "Sign in", "next": _safe_next(next), "error": error, "csrf": "", "auth_on": True, "page": "signin",
    })


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host")


@router.post("/ui/signin")
def signin(request: Request, key: Annotated[str, Form(max_length=200)], next: Annotated[str, Form()] = "/ui") -> Response:  # noqa: A002
    """Trade an API key for a session cookie (the key itself is never stored in the browser)."""
    if not _same_origin(request):
        raise HTTPException(status_code=403, detail="sign-in from another site is refused")
    with session_scope(write=False) as s:
        owner = keys.resolve_key(s, key.strip())
    if owner is None:
        page = templates.TemplateResponse(request, "signin.html", {
            "title": "Sign in", "next": _safe_next(next), "error": "That key is not valid (unknown or revoked).",
            "csrf": "", "auth_on": True, "page": "signin"}, status_code=401)
        return page
    value, _ = make_cookie(request.app, keys.hash_key(key.strip()))
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(COOKIE, value, max_age=request.app.state.settings.session_max_age_s, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return response


@router.post("/ui/signout")
def signout(request: Request) -> Response:
    if not _same_origin(request):
        raise HTTPException(status_code=403, detail="sign-out from another site is refused")
    response = RedirectResponse("/ui/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/ui/vendor/plotly.min.js")
def plotly_bundle() -> FileResponse:
    return FileResponse(plotly_js(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})


def install(app: FastAPI) -> None:
    """Add the dashboard, its static files and the offline API docs to ``app`` (built with
    ``docs_url=None, redoc_url=None``)."""
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    app.mount("/docs-assets", StaticFiles(directory=docs_assets()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} – API docs",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js", swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
            swagger_ui_parameters={"validatorUrl": None, "persistAuthorization": False},
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} – API reference",
                              redoc_js_url="/docs-assets/redoc.standalone.js",
                              redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)
