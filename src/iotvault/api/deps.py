"""Dependencies for routes: who is calling, is it allowed, and the node's services.

``Requires(Permission.X)`` is the only way a route gets a principal; it authenticates, asks
:func:`iotvault.auth.policy.authorize` (with the path's ``deviceId`` for device permissions)
and turns the decision into 404 or 403. A test walks every route and fails if one neither
declares a permission nor is listed as public. ``Ctx`` is the node's opened resources (stores,
key ring) for routes that call the services of :mod:`iotvault.accounts` and :mod:`iotvault.devices`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from iotvault.api.problems import Problem, not_found
from iotvault.api.security import Authenticator, services
from iotvault.auth.policy import DEVICE_PERMISSIONS, Decision, Permission, Principal, authorize
from iotvault.context import Context

_authenticate = Authenticator()

# How the OpenAPI document names the two credentials every route that declares a permission
# accepts (iotvault.api.app adds them to each such operation). Not FastAPI security
# dependencies: those would parse the header again on every request only to document it.
SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "HTTPBearer": {
        "type": "http",
        "description": "JWT access token, optionally followed by an ID token",
        "scheme": "bearer",
    },
    "HTTPBasic": {"type": "http", "description": "API key as key:password", "scheme": "basic"},
}


async def authenticated(request: Request) -> Principal:
    return await _authenticate(request)


def decide(permission: Permission, request: Request, principal: Principal) -> Principal:
    """The policy's answer for this request (with the path's ``deviceId`` for device
    permissions), as the principal or as the 404/403 problem a refusal is."""
    device_id = request.path_params.get("deviceId") if permission in DEVICE_PERMISSIONS else None
    verdict = authorize(principal, permission, device_id)
    if verdict is Decision.ALLOW:
        return principal
    if verdict is Decision.NOT_FOUND:
        raise not_found("device")
    raise Problem(403, f"this needs the permission {permission.value}")


async def admit(permission: Permission, request: Request) -> Principal:
    """Authenticate the caller and ask the policy: what :func:`Requires` does for a route, and
    what :mod:`iotvault.api.direct` does, with the permission that route declares."""
    return decide(permission, request, await _authenticate(request))


def Requires(permission: Permission) -> Any:  # noqa: N802 - reads as a declaration in signatures
    """One dependency: FastAPI solves it with nothing but the request (a tenth of a cached read
    went to solving the three it used to be; BENCHMARKS.md, issue 17)."""

    async def check(request: Request) -> Principal:
        return await admit(permission, request)

    check.permission = permission  # type: ignore[attr-defined]  # read by the route-walk test and the OpenAPI document
    return Depends(check)


def permission_of(dependencies: Any) -> Permission | None:
    """The permission a route declares through :func:`Requires`, if it does (from its dependant)."""
    for d in dependencies:
        found = getattr(d.call, "permission", None)
        if isinstance(found, Permission):
            return found
    return None


def _context(request: Request) -> Context:
    return services(request).ctx


Ctx = Annotated[Context, Depends(_context)]
