"""Administration of the OpenID Connect provider's OAuth clients.

``/iotf/clients`` needs ``clients:manage`` (``roleAdmin``), like ``iotvault clients …`` on the
command line. A confidential client's secret appears once, in the answer that made it. (The
provider's security events — failed logins, lockouts, replayed codes and refresh tokens — are
listed with the others at ``/iotf/security/events``, kinds ``oidc_…``.)
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from iotvault.api.deps import Requires
from iotvault.api.routes.oidc import identity
from iotvault.api.schemas import ERRORS, Strict
from iotvault.auth.policy import Permission, Principal
from iotvault.documents import client_doc
from iotvault.domain.types import Identifier
from iotvault.identity.clients import (
    AUTHORIZATION_CODE,
    GRANT_TYPES,
    REFRESH_TOKEN,
    add_client,
    get_client,
    remove_client,
)
from iotvault.identity.store import IdentityStore

router = APIRouter(prefix="/iotf", responses=ERRORS)

ClientIdPath = Annotated[Identifier, Path(description="clientId")]
ClientsAdmin = Annotated[Principal, Requires(Permission.CLIENTS_MANAGE)]


def _client_store(request: Request) -> IdentityStore:
    return identity(request).provider.store


ClientStore = Annotated[IdentityStore, Depends(_client_store)]


class ClientCreate(Strict):
    clientId: Identifier
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
async def list_clients(store: ClientStore, _p: ClientsAdmin) -> Any:
    clients = await run_in_threadpool(store.list_clients)
    return {"clients": [client_doc(c) for c in clients]}


@router.post(
    "/clients",
    tags=["OAuth clients"],
    status_code=201,
    summary="Register an OAuth client; a confidential client's secret is shown once",
)
async def create_client(store: ClientStore, body: ClientCreate, principal: ClientsAdmin) -> Any:
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
async def get_one(store: ClientStore, clientId: ClientIdPath, _p: ClientsAdmin) -> Any:
    return client_doc(await run_in_threadpool(get_client, store, clientId))


@router.delete(
    "/clients/{clientId}",
    tags=["OAuth clients"],
    status_code=204,
    summary="Remove an OAuth client; every grant it holds is revoked",
)
async def delete_client(store: ClientStore, clientId: ClientIdPath, _p: ClientsAdmin) -> Response:
    await run_in_threadpool(remove_client, store, clientId)
    return Response(status_code=204)
