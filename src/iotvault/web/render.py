"""Rendering pages: the Jinja2 environment, the Content-Security-Policy, and who is asking.

Every page is rendered by :func:`page` with autoescaping on, and answered with a CSP that
allows scripts, styles, images and connections from this origin only — no inline script or
style, no ``eval``, nothing from elsewhere, no framing. Data a script needs travels in a
``<script type="application/json">`` block (never executed; ``tojson`` escapes ``<``) or in
``data-`` attributes.

:func:`Page` is :func:`iotvault.api.deps.Requires` for pages: the same authenticator (the
session's token, added by :mod:`iotvault.web.bff`) and the same policy decide, and a refusal
becomes a page — the sign-in page when nobody is signed in, a "not found" page for a device
the person may not read (the same as for one that does not exist), a "not allowed" page else.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, select_autoescape

from iotvault import __version__
from iotvault.api.deps import authenticated, decide
from iotvault.api.problems import Problem
from iotvault.auth.policy import Permission, Principal
from iotvault.web.bff import SESSION_KEY
from iotvault.web.session import WebSession

CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; worker-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# same-origin, not the API's no-referrer: under no-referrer a browser sends ``Origin: null`` with
# the page's own form posts, and the session bridge checks that Origin is this server's
PAGE_HEADERS: Final = {"Content-Security-Policy": CSP, "Referrer-Policy": "same-origin"}
VENDOR: Final = ("vendor/uplot/uPlot.iife.min.js", "vendor/swagger-ui/swagger-ui-bundle.js")


class PageError(Exception):
    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


class LoginRequired(Exception):  # noqa: N818 - a redirect, raised
    pass


@cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("iotvault.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["version"] = __version__
    return env


def static_dir() -> Path:
    return Path(str(resources.files("iotvault.web") / "static"))


@cache
def missing_assets() -> tuple[str, ...]:
    """Vendored assets that are not installed (``make assets`` was not run): pages say so."""
    root = static_dir()
    return tuple(p for p in VENDOR if not (root / p).is_file())


def session_of(request: Request) -> WebSession | None:
    found = request.scope.get(SESSION_KEY)
    return found if isinstance(found, WebSession) else None


def page(
    request: Request, template: str, *, status: int = 200, principal: Principal | None = None, **values: Any
) -> HTMLResponse:
    session = session_of(request)
    body = (
        environment()
        .get_template(template)
        .render(
            session=session,
            csrf=session.csrf if session is not None else "",
            principal=principal,
            missing_assets=missing_assets(),
            path=request.url.path,
            **values,
        )
    )
    return HTMLResponse(body, status_code=status, headers=PAGE_HEADERS)


def Page(permission: Permission) -> Any:  # noqa: N802 - reads as a declaration in signatures
    """Requires(permission) for a page; refusals become pages (see the module docstring)."""

    async def check(request: Request) -> Principal:
        if session_of(request) is None:
            raise LoginRequired
        try:
            principal = await authenticated(request)
            result = decide(permission, request, principal)
        except Problem as exc:
            if exc.status == 401:
                raise LoginRequired from None
            if exc.status == 404:
                raise PageError(404, "Not found", "There is no such device, or you may not see it.") from None
            if exc.status == 403:
                raise PageError(403, "Not allowed", "Your account may not open this page.") from None
            raise
        return result

    check.permission = permission  # type: ignore[attr-defined]  # read by the route-walk test
    return Depends(check)


Viewer = Annotated[Principal, Page(Permission.DEVICES_LIST)]
