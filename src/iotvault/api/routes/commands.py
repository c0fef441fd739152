"""Commands to devices: send one (writers of the device), follow its status, get the public key.

The permission check comes first (``Requires(Permission.DEVICE_COMMAND)``): a reader of the
device gets 403 and nothing is signed, recorded or published; anyone else 404. The command is
signed with the platform key and published QoS 1 on the device's command topic; the answer is
202 once the broker has taken it. A device set to ``unsigned`` delivery (admin's choice) gets the
payload as sent and its command is ``delivered`` at once (``delivery: unsigned``).
``GET …/commands/{commandId}`` shows ``sent``, then ``acknowledged``, ``rejected`` or
``expired`` (or ``failed`` when the broker did not take it).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from iotvault.api.deps import Requires
from iotvault.api.routes.devices import DeviceIdPath
from iotvault.api.schemas import ERRORS, Strict
from iotvault.api.security import services
from iotvault.auth.policy import Permission, Principal
from iotvault.clock import now_us
from iotvault.commands.service import MAX_EXPIRY_S, CommandService, effective_status
from iotvault.documents import iso
from iotvault.domain.types import Identifier, Uuid
from iotvault.storage.repository import CommandRecord

router = APIRouter(prefix="/iotf", tags=["commands"], responses=ERRORS)


class CommandIn(Strict):
    command: Identifier = Field(description="the command's name; also its topic level")
    payload: dict[str, Any] = Field(
        default_factory=dict, description="any JSON object, at most 16 KiB as JSON"
    )
    expiresInSeconds: int | None = Field(
        None, ge=1, le=MAX_EXPIRY_S, description="lifetime; the server's command_expiry_s if omitted"
    )


class CommandSent(BaseModel):
    commandId: str
    status: str = Field(description="sent; delivered for a device that takes unsigned commands")
    delivery: str = Field(description="signed, or unsigned (the payload as sent: no signature)")


class CommandStatus(BaseModel):
    commandId: str
    deviceId: str
    command: str
    status: str = Field(
        description="sent, acknowledged, rejected, expired or failed; delivered for an unsigned one"
    )
    delivery: str = Field(
        description="signed (a JWS the device verifies), or unsigned: the payload as sent, which "
        "the device cannot tell from a forgery (the device's commandDelivery setting)"
    )
    reason: str | None = Field(None, description="why the device refused it, in its own words")
    issued: str | None
    expires: str | None
    updated: str | None


class PublicKey(BaseModel):
    kid: str = Field(description="the key's RFC 7638 thumbprint, as in the JWS header")
    alg: str
    pem: str
    jwk: dict[str, str]


def command_service(request: Request) -> CommandService:
    """The node's service (set by :class:`iotvault.node.Node`), or one that cannot send."""
    svc = services(request)
    existing = getattr(request.app.state, "commands", None)
    if isinstance(existing, CommandService):
        return existing
    made = CommandService(svc.ctx, None, default_expiry_s=svc.settings.command_expiry_s)
    request.app.state.commands = made
    return made


def status_doc(record: CommandRecord) -> dict[str, Any]:
    return {
        "commandId": record.command_id,
        "deviceId": record.device_id,
        "command": record.command,
        "status": effective_status(record, now_us()),
        "reason": record.reason,
        "delivery": record.delivery,
        "issued": iso(record.issued_us),
        "expires": iso(record.expires_us),
        "updated": iso(record.updated_us),
    }


@router.post(
    "/devices/{deviceId}/commands",
    status_code=202,
    summary="Send a command to a device (signed unless an admin set the device to unsigned)",
    response_model=CommandSent,
)
async def send_command(
    request: Request,
    deviceId: DeviceIdPath,
    body: CommandIn,
    principal: Annotated[Principal, Requires(Permission.DEVICE_COMMAND)],
) -> Any:
    record = await command_service(request).send(
        deviceId,
        body.command,
        body.payload,
        sent_by=f"{principal.kind}:{principal.id}",
        expires_in_s=body.expiresInSeconds,
    )
    return {"commandId": record.command_id, "status": record.status, "delivery": record.delivery}


@router.get(
    "/devices/{deviceId}/commands/{commandId}",
    summary="The status of a command",
    response_model=CommandStatus,
)
async def command_status(
    request: Request,
    deviceId: DeviceIdPath,
    commandId: Annotated[Uuid, Path()],
    _p: Annotated[Principal, Requires(Permission.DEVICE_COMMAND)],
) -> Any:
    record = await run_in_threadpool(command_service(request).get, deviceId, commandId)
    return status_doc(record)


@router.get(
    "/commands/public-key",
    summary="The platform's public key that devices verify commands with",
    response_model=PublicKey,
)
async def public_key(request: Request, _p: Annotated[Principal, Requires(Permission.DEVICES_LIST)]) -> Any:
    key = await run_in_threadpool(command_service(request).public_key)
    return {"kid": key.kid, "alg": "EdDSA", "pem": key.pem(), "jwk": key.jwk()}
