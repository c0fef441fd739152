"""Administration of the OpenID Connect provider's OAuth clients.

``/iotf/clients`` needs ``clients:manage`` (``roleAdmin``), like ``iotvault clients …`` on the
command line. A confidential client's secret appears once, in the answer that made it. (The
provider's security events — failed logins, lockouts, replayed codes and refresh tokens — are
listed with the others at ``/iotf/security/events``, kinds ``oidc_…``.)
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from iotvault.api.deps import Requires
from iotvault.api.routes.devices import iso
from iotvault.api.schemas import ERRORS, Strict
from iotvault.auth.policy import Permission, Principal
from iotvault.identity import Identity
from iotvault.identity.clients import (
    AUTHORIZATION_CODE,
    GRANT_TYPES,
    REFRESH_TOKEN,
    add_client,
    get_client,
    remove_client,
)
from iotvault.identity.store import ClientRecord

router = APIRouter(prefix="/iotf", responses=ERRORS)

CLIENT_ID = r"^[A-Za-z0-9._-]{1,64}$"
ClientIdPath = Annotated[str, Path(pattern=CLIENT_ID, description="clientId")]


def _identity(request: Request) -> Identity:
    found: Identity = request.app.state.identity
    return found


def client_doc(c: ClientRecord) -> dict[str, Any]:
    return {
        "clientId": c.client_id,
        "displayName": c.display_name,
        "confidential": not c.public,
        "redirectUris": list(c.redirect_uris),
        "postLogoutRedirectUris": list(c.post_logout_redirect_uris),
        "grantTypes": list(c.grant_types),
        "allowAnonymous": c.allow_anonymous,
        "createdBy": c.created_by,
        "created": iso(c.created_us),
    }


class ClientCreate(Strict):
    clientId: str = Field(pattern=CLIENT_ID)
    displayName: str = Field("", max_length=128)
    confidential: bool = Field(False, description="true: it gets a secret (client_secret_basic), shown once")
    redirectUris: list[str] = Field(default_factory=list, max_length=10)
    postLogoutRedirectUris: list[str] = Field(default_factory=list, max_length=10)
    grantTypes: list[str] = Field(
        default_factory=lambda: [AUTHORIZATION_CODE, REFRESH_TOKEN],
        max_length=len(GRANT_TYPES),
        description=f"some of {', '.join(GRANT_TYPES)}",
    )
    allowAnonymous: bool = Field(False, description="offer anonymous login (tokens with amr ['anon'])")


@router.get("/clients", tags=["OAuth clients"], summary="List OAuth clients (never their secrets)")
async def list_clients(
    request: Request, _p: Annotated[Principal, Requires(Permission.CLIENTS_MANAGE)]
) -> Any:
    clients = await run_in_threadpool(_identity(request).provider.store.list_clients)
    return {"clients": [client_doc(c) for c in clients]}


@router.post(
    "/clients",
    tags=["OAuth clients"],
    status_code=201,
    summary="Register an OAuth client; a confidential client's secret is shown once",
)
async def create_client(
    request: Request,
    body: ClientCreate,
    principal: Annotated[Principal, Requires(Permission.CLIENTS_MANAGE)],
) -> Any:
    store = _identity(request).provider.store

    def run() -> dict[str, Any]:
        new = add_client(
            store,
            body.clientId,
            display_name=body.displayName,
            confidential=body.confidential,
            redirect_uris=body.redirectUris,
            post_logout_redirect_uris=body.postLogoutRedirectUris,
            grant_types=body.grantTypes,
            allow_anonymous=body.allowAnonymous,
            created_by=f"{principal.kind}:{principal.id}"[:64],
        )
        doc = client_doc(new.client)
        if new.secret is not None:
            doc["clientSecret"] = new.secret
        return doc

    return await run_in_threadpool(run)


@router.get("/clients/{clientId}", tags=["OAuth clients"], summary="One OAuth client")
async def get_one(
    request: Request,
    clientId: ClientIdPath,
    _p: Annotated[Principal, Requires(Permission.CLIENTS_MANAGE)],
) -> Any:
    return client_doc(await run_in_threadpool(get_client, _identity(request).provider.store, clientId))


@router.delete(
    "/clients/{clientId}",
    tags=["OAuth clients"],
    status_code=204,
    summary="Remove an OAuth client; every grant it holds is revoked",
)
async def delete_client(
    request: Request,
    clientId: ClientIdPath,
    _p: Annotated[Principal, Requires(Permission.CLIENTS_MANAGE)],
) -> Response:
    await run_in_threadpool(remove_client, _identity(request).provider.store, clientId)
    return Response(status_code=204)
