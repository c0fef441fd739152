"""The web and mobile application, served by ``iotvault serve`` at ``/``.

Server-rendered pages (Jinja2) with small scripts of our own, plus two pinned third-party
libraries fetched at build time (uPlot for charts, Swagger UI for ``/docs``; see
``web-assets.lock.json``). The folder reads:

``session``  server-side sessions and their cookie (the browser never holds a token)
``client``   the dashboard as an OAuth client of the built-in provider (registered at start)
``bff``      middleware: session cookie → CSRF check → ``Authorization: Bearer`` for the API
``render``   templates, the Content-Security-Policy, :func:`~.render.Page` permissions
``pages``    sign-in/out, devices, one device; ``admin`` the administration pages
``flatten``  nested payloads as field paths

:func:`mount` adds all of it to the API's app (:func:`iotvault.api.app.create_app`).
"""

from __future__ import annotations

from typing import Final

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from iotvault.api.services import ApiServices
from iotvault.identity import Identity
from iotvault.storage.web_sessions import WebSessionTable
from iotvault.web import admin, audit, pages
from iotvault.web.bff import COOKIE_KEY, SessionBridge
from iotvault.web.client import WebClient
from iotvault.web.render import LoginRequired, PageError, page, static_dir
from iotvault.web.session import SessionStore
from iotvault.web.state import WebState

__all__ = ["PUBLIC_ROUTES", "mount"]

# (method, path) of the web routes anyone may call; the others declare a permission
PUBLIC_ROUTES: Final = frozenset(
    {
        ("GET", "/"),
        ("GET", "/auth/login"),
        ("GET", "/auth/callback"),
        ("POST", "/auth/logout"),
        ("GET", "/docs"),
        ("GET", "/sw.js"),
        ("GET", "/manifest.webmanifest"),
    }
)
STATIC_MAX_AGE: Final = 3600


class _Static(StaticFiles):
    """Static files that browsers may cache for an hour (the API's default is ``no-store``)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if response.status_code == 200:
            response.headers["Cache-Control"] = f"public, max-age={STATIC_MAX_AGE}"
        return response


def mount(app: FastAPI, svc: ApiServices, identity: Identity) -> None:
    """Add the pages, the static files and the session bridge to ``app``."""
    https = svc.settings.public_url.startswith("https://")
    client = WebClient(identity)
    client.ensure_client()
    sessions = SessionStore(WebSessionTable(svc.ctx.engine, svc.settings.effective_database_url), https=https)
    app.state.web = WebState(sessions, client)
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.include_router(audit.router)
    app.mount("/static", _Static(directory=static_dir(), check_dir=False), name="static")

    @app.get("/sw.js", include_in_schema=False)
    async def service_worker() -> Response:
        # served from the root so that its scope is the whole application
        return FileResponse(
            static_dir() / "sw.js",
            media_type="text/javascript",
            headers={"Cache-Control": "no-cache", "Service-Worker-Allowed": "/"},
        )

    @app.get("/manifest.webmanifest", include_in_schema=False)
    async def manifest() -> Response:
        return FileResponse(static_dir() / "manifest.webmanifest", media_type="application/manifest+json")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        return page(request, "docs.html")

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, exc: LoginRequired) -> Response:
        # a session whose token the API refuses (user disabled, grant revoked) is over
        await run_in_threadpool(sessions.drop, request.scope.get(COOKIE_KEY))
        answer = RedirectResponse("/", status_code=303)
        answer.headers.append("set-cookie", sessions.set_cookie_header(sessions.cookie, "", max_age=0))
        return answer

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> HTMLResponse:
        return page(request, "message.html", status=exc.status, title=exc.title, message=exc.message)

    app.add_middleware(SessionBridge, sessions=sessions, client=client)
