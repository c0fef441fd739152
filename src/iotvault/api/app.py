"""The FastAPI application factory.

``create_app(services)`` builds the whole HTTP surface from already-opened resources; nothing
is created at import time. Every route either declares the permission it needs
(``Requires(Permission.X)``) or is listed in :data:`PUBLIC_ROUTES`; a test enforces that. The
OpenID Connect provider's endpoints (:mod:`iotvault.api.routes.oidc`) are public by nature.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute, iter_route_contexts

from iotvault import __version__, web
from iotvault.api import problems
from iotvault.api.audit import AuditTrail
from iotvault.api.deps import SECURITY_SCHEMES, Requires, permission_of
from iotvault.api.direct import DirectReadsApp, latest_route
from iotvault.api.middleware import Hardening
from iotvault.api.routes import access, admin, audit, commands, devices, messaging, oidc, oidc_admin, stream
from iotvault.api.services import ApiServices
from iotvault.api.timing import RequestTimer
from iotvault.auth.policy import Permission, Principal
from iotvault.documents import describe
from iotvault.health import RETRY_AFTER_S, ReadyCheck
from iotvault.identity import Identity

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (method, path) of the routes anyone may call
PUBLIC_ROUTES = frozenset(
    {
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
    }
    | oidc.OIDC_ROUTES
    | web.PUBLIC_ROUTES
)


def _produces(path: str) -> str | None:
    if path.startswith("/iotf/"):
        return "text/event-stream" if path.endswith("/stream") else "application/json"
    return None


def _json_body(path: str) -> bool:
    return path.startswith("/iotf/")


def _document_security(app: FastAPI) -> None:
    """Every operation that declares a permission accepts a bearer token or an API key: say so
    in the OpenAPI document (what FastAPI's security dependencies did, at a cost per request)."""
    make = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = make()
            doc.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            for context in iter_route_contexts(app.routes):
                route = context.original_route
                if not isinstance(route, APIRoute) or not route.include_in_schema:
                    continue
                if permission_of(route.dependant.dependencies) is None:
                    continue
                for method in route.methods or ():
                    operation = doc["paths"][context.path][method.lower()]
                    operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
        return app.openapi_schema  # type: ignore[return-value]  # set by make()

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to amend it


def create_app(
    svc: ApiServices,
    *,
    ready: ReadyCheck = list,
    identity: Identity | None = None,
    direct_reads: bool = True,
) -> FastAPI:
    """``identity`` is the OpenID Connect provider, which the node builds with ``svc.verifier``
    (:func:`iotvault.node.build_verifier`); without it, one is made here on ``svc.ctx``.
    ``ready`` lists what keeps the node from being ready (:class:`iotvault.health.Readiness`).
    ``direct_reads=False`` leaves every last-N read to FastAPI (:mod:`iotvault.api.direct`),
    for the tests that compare both ways."""
    settings = svc.settings
    app = DirectReadsApp(
        title="iotvault",
        version=__version__,
        description=(
            "Secure back end for IoT applications. Authenticate with `Authorization: Bearer <access_token>` "
            "(optionally followed by ` <id_token>`) or `Authorization: Basic <key:password>` for API keys. "
            "Errors are `application/problem+json` (RFC 9457)."
        ),
        docs_url=None,
        redoc_url=None,
        # iotvault's own metrics (/metrics) and audit log; FastAPI's OpenTelemetry hooks would
        # only ask, on every request, whether a provider was configured (BENCHMARKS.md, issue 17)
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.services = svc
    app.state.identity = identity if identity is not None else Identity(settings, svc.ctx)
    problems.install(app)

    @app.get("/healthz", tags=["operations"], summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: the node can serve and store now",
        responses={
            503: {
                "description": "starting, stopping, or a dependency fails (named in `failing`); "
                "`Retry-After` says when to ask again"
            }
        },
    )
    async def readyz() -> JSONResponse:
        failing = ready()
        if not failing:
            return JSONResponse({"status": "ready"})
        return JSONResponse(
            {
                "status": "not ready",
                "failing": [{"dependency": f.dependency, "reason": f.reason} for f in failing],
            },
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics (operators: an administrator's API key as Basic credentials)",
        response_class=PlainTextResponse,
    )
    async def metrics_endpoint(
        _p: Annotated[Principal, Requires(Permission.METRICS_READ)],
    ) -> PlainTextResponse:
        plus = svc.metrics_plus() if svc.metrics_plus is not None else None
        return PlainTextResponse(svc.metrics.render(plus), media_type=PROMETHEUS_CONTENT_TYPE)

    app.include_router(access.router)  # before devices: its path is more specific
    app.include_router(devices.router)
    app.include_router(stream.router)  # live events: the last of the device routes
    app.include_router(commands.router)
    app.include_router(admin.router)
    app.include_router(audit.router)
    app.include_router(oidc_admin.router)
    app.include_router(oidc.router)
    app.include_router(messaging.router)

    _document_security(app)
    if direct_reads:  # within every middleware added here: the session bridge, hardening, audit, timer
        app.read_directly(latest_route(app.routes))
    web.mount(app, svc, app.state.identity)  # the web application; its session bridge sits inside Hardening

    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "PATCH", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(
        Hardening,
        max_body=settings.max_request_bytes,
        https=settings.public_url.startswith("https://"),
        limiter=svc.limiter,
        produces=_produces,
        json_body_paths=_json_body,
        body_timeout_s=settings.http_body_timeout_s,
        on_abuse=svc.on_abuse,
    )
    # outermost: it records what the hardening refuses too (429, 413), with the request id
    app.add_middleware(
        AuditTrail,
        record=svc.ctx.audit.record,
        describe=describe,
        skip=oidc.OIDC_ROUTES,
        requests=settings.audit_requests,
    )
    app.add_middleware(RequestTimer, histogram=svc.metrics.http_latency)  # outermost: all of it
    return app
