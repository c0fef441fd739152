"""Who can see this device? — ``GET /iotf/devices/{deviceId}/access`` (admins).

The records are read here and turned into :class:`~iotvault.auth.policy.Holder` values; the
answer itself is :func:`iotvault.auth.policy.access_to`, the one policy every request is
decided by, so this page can never disagree with what the API would do. Holders are every
user (through its groups), every API key that is neither revoked nor expired (through its own
devices and its groups), the anonymous caller (the group named ``anonymous``) and every group
as a whole, which is how users of an external issuer get their rights.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from iotvault.accounts import api_key_grant
from iotvault.api.deps import Ctx, Requires
from iotvault.api.problems import not_found
from iotvault.api.schemas import ERRORS
from iotvault.auth.policy import ANONYMOUS_GROUP, Access, Grant, Holder, Permission, Principal, access_to
from iotvault.clock import now_us
from iotvault.context import Context
from iotvault.domain.types import Identifier
from iotvault.storage.accounts import GroupRecord

router = APIRouter(prefix="/iotf", tags=["device registry"], responses=ERRORS)


class AccessOut(BaseModel):
    kind: str
    id: str
    read: bool
    command: bool
    readVia: list[str]
    commandVia: list[str]
    disabled: bool


class DeviceAccess(BaseModel):
    deviceId: str
    access: list[AccessOut]


def _grant(g: GroupRecord) -> Grant:
    return Grant(g.roles.admin, g.roles.reader, g.roles.writer, frozenset(g.devices))


def holders(ctx: Context) -> list[Holder]:
    """Everyone who may hold rights, with where each of their grants comes from."""
    groups = {g.group_name: g for g in ctx.accounts.list_groups()}
    found: list[Holder] = []
    for user in ctx.accounts.list_users():
        grants = tuple((name, _grant(groups[name])) for name in user.groups if name in groups)
        found.append(Holder("user", user.user_name, grants, disabled=user.disabled))
    now = now_us()
    for key in ctx.accounts.list_api_keys():
        if key.revoked_us is not None or (key.expires_us is not None and key.expires_us <= now):
            continue
        own = api_key_grant(ctx, key.roles, key.devices, ())
        grants = (
            ("key", own),
            *((f"key via {n}", api_key_grant(ctx, key.roles, (), (n,))) for n in key.groups),
        )
        found.append(Holder("api_key", key.key, grants))
    if ANONYMOUS_GROUP in groups:
        found.append(Holder("anonymous", "anonymous", ((ANONYMOUS_GROUP, _grant(groups[ANONYMOUS_GROUP])),)))
    found.extend(Holder("group", name, ((name, _grant(g)),)) for name, g in sorted(groups.items()))
    return found


def access_doc(a: Access) -> dict[str, Any]:
    return {
        "kind": a.kind,
        "id": a.id,
        "read": a.read,
        "command": a.command,
        "readVia": list(a.read_via),
        "commandVia": list(a.command_via),
        "disabled": a.disabled,
    }


def device_access(ctx: Context, device_id: str) -> list[Access]:
    """The access list of a registered device; ``not_found`` for an unknown one."""
    if ctx.store.get_device(device_id) is None:
        raise not_found("device")
    return access_to(device_id, holders(ctx))


@router.get(
    "/devices/{deviceId}/access",
    summary="Who may read and command a device, and through which group or key",
    response_model=DeviceAccess,
)
async def who_can_access(
    ctx: Ctx,
    deviceId: Annotated[Identifier, Path(description="deviceId")],
    _p: Annotated[Principal, Requires(Permission.DEVICES_MANAGE)],
) -> Any:
    found = await run_in_threadpool(device_access, ctx, deviceId)
    return {"deviceId": deviceId, "access": [access_doc(a) for a in found]}
