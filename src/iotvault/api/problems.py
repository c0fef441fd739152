"""The one place where errors become HTTP answers: RFC 9457 ``application/problem+json``.

Domain errors (the :mod:`iotvault.errors` tree) are mapped by class; framework errors
(routing, validation) are re-shaped into problems; anything else is a 500 that says nothing
about the inside (the exception is logged with a request id that the answer carries).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from iotvault import errors
from iotvault.health import RETRY_AFTER_S

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"

TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

WWW_AUTHENTICATE = 'Bearer realm="iotvault", Basic realm="iotvault", charset="UTF-8"'


class Problem(Exception):  # noqa: N818 - it is the problem document, raised
    """Raise to answer with a problem document."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra or {}
        super().__init__(detail or TITLES.get(status, str(status)))


def problem_response(
    status: int,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": TITLES.get(status, "Error"), "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def unauthorized(detail: str = "authentication required") -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": WWW_AUTHENTICATE})


def not_found(what: str = "resource") -> Problem:
    return Problem(404, f"{what} not found")


_DOMAIN_STATUS: tuple[tuple[type[errors.IotVaultError], int], ...] = (
    (errors.DeviceNotFoundError, 404),
    (errors.DeviceExistsError, 409),
    (errors.ValidationError, 422),
    (errors.DatabaseUnavailableError, 503),
    (errors.BrokerUnavailableError, 503),
)


def status_for(exc: errors.IotVaultError) -> int:
    for cls, status in _DOMAIN_STATUS:
        if isinstance(exc, cls):
            return status
    name = type(exc).__name__
    if name.endswith("NotFoundError"):
        return 404
    if name.endswith("ExistsError"):
        return 409
    return 500


def answer(request: Request, exc: Problem | errors.IotVaultError) -> JSONResponse:
    """The answer to a refusal (:class:`Problem`) or a domain error: what the handlers that
    :func:`install` adds answer, and what :mod:`iotvault.api.direct` answers outside FastAPI."""
    if isinstance(exc, Problem):
        return problem_response(exc.status, exc.detail, headers=exc.headers, extra=exc.extra)
    status = status_for(exc)
    if status == 500:
        return answer_unexpected(request, exc)
    if status == 503:  # a dependency is down: say when to come back (RFC 9110, 10.2.3)
        return problem_response(
            503, "a backing service is unavailable", headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    return problem_response(status, str(exc))


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) and exc.status_code != 500 else None
        if detail == TITLES.get(exc.status_code):
            detail = None
        return problem_response(exc.status_code, detail, headers=dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # never echo the input back: it may be large, or a secret sent to the wrong field
        problems = [
            {"location": [str(p) for p in e.get("loc", ())], "message": str(e.get("msg", "invalid"))}
            for e in exc.errors()
        ][:20]
        return problem_response(422, "the request is not valid", extra={"errors": problems})

    @app.exception_handler(errors.IotVaultError)
    async def _domain(request: Request, exc: errors.IotVaultError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return answer_unexpected(request, exc)


def answer_unexpected(request: Request, exc: BaseException) -> JSONResponse:
    """The answer to an unexpected error: 500 with an incident id, and the error in the log."""
    incident = uuid.uuid4().hex[:12]
    log.error("incident %s: %s %s failed", incident, request.method, request.url.path, exc_info=exc)
    return problem_response(500, "an internal error occurred", extra={"incident": incident})
