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
from fastapi.security import HTTPBasic, HTTPBearer

from iotvault.api.problems import Problem, not_found
from iotvault.api.security import Authenticator, services
from iotvault.auth.policy import DEVICE_PERMISSIONS, Decision, Permission, Principal, authorize
from iotvault.context import Context

_authenticate = Authenticator()
# declared only so that the OpenAPI document shows both schemes; the header is parsed above
_bearer_doc = HTTPBearer(auto_error=False, description="JWT access token, optionally followed by an ID token")
_basic_doc = HTTPBasic(auto_error=False, description="API key as key:password")


async def authenticated(
    request: Request,
    _b: Annotated[Any, Depends(_bearer_doc)] = None,
    _k: Annotated[Any, Depends(_basic_doc)] = None,
) -> Principal:
    return await _authenticate(request)


def Requires(permission: Permission) -> Any:  # noqa: N802 - reads as a declaration in signatures
    async def check(request: Request, principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        device_id = request.path_params.get("deviceId") if permission in DEVICE_PERMISSIONS else None
        decision = authorize(principal, permission, device_id)
        if decision is Decision.ALLOW:
            return principal
        if decision is Decision.NOT_FOUND:
            raise not_found("device")
        raise Problem(403, f"this needs the permission {permission.value}")

    check.permission = permission  # type: ignore[attr-defined]  # read by the route-walk test
    return Depends(check)


def _context(request: Request) -> Context:
    return services(request).ctx


Ctx = Annotated[Context, Depends(_context)]
