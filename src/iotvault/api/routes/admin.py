"""Administration: users, groups, devices, API keys, security events. ``roleAdmin`` only.

Request bodies refuse unknown fields, so a caller cannot slip ``roleAdmin`` or ``groups`` into
an update that does not offer them. Secrets (generated passwords, device credentials, API key
passwords) appear once, in the answer to the request that made them. The documents are those
of :mod:`iotvault.documents`, which ``iotvault … --json`` prints too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from iotvault import accounts
from iotvault.api.deps import Ctx, Requires
from iotvault.api.problems import Problem
from iotvault.api.schemas import ERRORS, DeviceOut, Strict
from iotvault.auth.policy import Permission, Principal, may_grant
from iotvault.clock import now_us
from iotvault.context import Context
from iotvault.devices import (
    delete_device,
    register_device,
    rotate_device_credential,
    set_command_delivery,
    set_type_command_delivery,
)
from iotvault.documents import api_key_doc, device_doc, group_doc, iso, user_doc
from iotvault.domain.accounts import Roles
from iotvault.domain.commands import Delivery
from iotvault.domain.types import AccountName, Identifier, Password
from iotvault.storage.accounts import ApiKeyNotFoundError, GroupNotFoundError, GroupRecord, UserRecord

router = APIRouter(prefix="/iotf", responses=ERRORS)

UserNamePath = Annotated[AccountName, Path()]
GroupNamePath = Annotated[AccountName, Path()]
# not devices.DeviceIdPath: that one would add a description to these routes' OpenAPI parameter
_DevicePath = Annotated[Identifier, Path()]

AccountsAdmin = Annotated[Principal, Requires(Permission.ACCOUNTS_MANAGE)]
DevicesAdmin = Annotated[Principal, Requires(Permission.DEVICES_MANAGE)]
ApiKeysAdmin = Annotated[Principal, Requires(Permission.API_KEYS_MANAGE)]


async def _no_content(change: Callable[[], object]) -> Response:
    """Run a change in a worker thread (it blocks on the database) and answer 204."""
    await run_in_threadpool(change)
    return Response(status_code=204)


# ---- users ---------------------------------------------------------------------------
class UserCreate(Strict):
    userName: AccountName
    displayName: str = Field("", max_length=128)
    attributes: dict[str, str] = Field(default_factory=dict)
    groups: list[str] = Field(default_factory=list, max_length=64)
    password: Password | None = Field(None, description="omit to have one generated")


class UserUpdate(Strict):
    displayName: str | None = Field(None, max_length=128)
    attributes: dict[str, str] | None = None
    disabled: bool | None = None


def _user_or_404(ctx: Context, name: str) -> UserRecord:
    user = ctx.accounts.get_user(name)
    if user is None:
        raise Problem(404, "user not found")
    return user


@router.get("/users", tags=["users"], summary="List users")
async def list_users(ctx: Ctx, _p: AccountsAdmin) -> Any:
    users = await run_in_threadpool(ctx.accounts.list_users)
    return {"users": [user_doc(u) for u in users]}


@router.post(
    "/users", tags=["users"], status_code=201, summary="Create a user; a generated password is shown once"
)
async def create_user(ctx: Ctx, body: UserCreate, _p: AccountsAdmin) -> Any:
    def run() -> dict[str, Any]:
        password = accounts.create_user(
            ctx,
            body.userName,
            body.displayName,
            password=body.password,
            attributes=body.attributes,
            groups=body.groups,
        )
        doc = user_doc(_user_or_404(ctx, body.userName))
        if body.password is None:
            doc["password"] = password
        return doc

    return await run_in_threadpool(run)


@router.get("/users/{userName}", tags=["users"], summary="One user")
async def get_user(ctx: Ctx, userName: UserNamePath, _p: AccountsAdmin) -> Any:
    return user_doc(await run_in_threadpool(_user_or_404, ctx, userName))


@router.patch("/users/{userName}", tags=["users"], summary="Change display name, attributes or disabled")
async def update_user(ctx: Ctx, userName: UserNamePath, body: UserUpdate, _p: AccountsAdmin) -> Any:
    def run() -> dict[str, Any]:
        _user_or_404(ctx, userName)
        return user_doc(
            accounts.update_user(
                ctx,
                userName,
                display_name=body.displayName,
                attributes=body.attributes,
                disabled=body.disabled,
            )
        )

    return await run_in_threadpool(run)


@router.delete("/users/{userName}", tags=["users"], status_code=204, summary="Delete a user")
async def delete_user(ctx: Ctx, userName: UserNamePath, _p: AccountsAdmin) -> Response:
    def run() -> None:
        _user_or_404(ctx, userName)
        accounts.delete_user(ctx, userName)

    return await _no_content(run)


@router.post(
    "/users/{userName}/password", tags=["users"], summary="Set a new generated password (shown once)"
)
async def reset_password(ctx: Ctx, userName: UserNamePath, _p: AccountsAdmin) -> Any:
    def run() -> str:
        _user_or_404(ctx, userName)
        return accounts.reset_password(ctx, userName)

    return {"userName": userName, "password": await run_in_threadpool(run)}


# ---- groups --------------------------------------------------------------------------
class GroupCreate(Strict):
    groupName: AccountName
    displayName: str = Field("", max_length=128)
    roleAdmin: bool = False
    roleReader: bool = False
    roleWriter: bool = False
    devices: list[str] = Field(default_factory=list, max_length=10_000)


class GroupUpdate(Strict):
    displayName: str | None = Field(None, max_length=128)
    roleAdmin: bool | None = None
    roleReader: bool | None = None
    roleWriter: bool | None = None
    devices: list[str] | None = Field(None, max_length=10_000)


def _group_or_404(ctx: Context, name: str) -> GroupRecord:
    group = ctx.accounts.get_group(name)
    if group is None:
        raise Problem(404, "group not found")
    return group


@router.get("/groups", tags=["groups"], summary="List groups")
async def list_groups(ctx: Ctx, _p: AccountsAdmin) -> Any:
    groups = await run_in_threadpool(ctx.accounts.list_groups)
    return {"groups": [group_doc(g) for g in groups]}


@router.post("/groups", tags=["groups"], status_code=201, summary="Create a group")
async def create_group(ctx: Ctx, body: GroupCreate, _p: AccountsAdmin) -> Any:
    def run() -> dict[str, Any]:
        roles = Roles(admin=body.roleAdmin, reader=body.roleReader, writer=body.roleWriter)
        return group_doc(
            accounts.create_group(ctx, body.groupName, body.displayName, roles=roles, devices=body.devices)
        )

    return await run_in_threadpool(run)


@router.get("/groups/{groupName}", tags=["groups"], summary="One group")
async def get_group(ctx: Ctx, groupName: GroupNamePath, _p: AccountsAdmin) -> Any:
    return group_doc(await run_in_threadpool(_group_or_404, ctx, groupName))


@router.patch("/groups/{groupName}", tags=["groups"], summary="Change roles, devices or display name")
async def update_group(ctx: Ctx, groupName: GroupNamePath, body: GroupUpdate, _p: AccountsAdmin) -> Any:
    def run() -> dict[str, Any]:
        current = _group_or_404(ctx, groupName)
        roles = None
        if body.roleAdmin is not None or body.roleReader is not None or body.roleWriter is not None:
            roles = current.roles.changed(
                admin=body.roleAdmin, reader=body.roleReader, writer=body.roleWriter
            )
        return group_doc(
            accounts.update_group(
                ctx, groupName, display_name=body.displayName, roles=roles, devices=body.devices
            )
        )

    return await run_in_threadpool(run)


@router.delete("/groups/{groupName}", tags=["groups"], status_code=204, summary="Delete a group")
async def delete_group(ctx: Ctx, groupName: GroupNamePath, _p: AccountsAdmin) -> Response:
    def run() -> None:
        _group_or_404(ctx, groupName)
        accounts.delete_group(ctx, groupName)

    return await _no_content(run)


@router.put(
    "/groups/{groupName}/members/{userName}", tags=["groups"], status_code=204, summary="Add a member"
)
async def add_member(
    ctx: Ctx, groupName: GroupNamePath, userName: UserNamePath, _p: AccountsAdmin
) -> Response:
    def run() -> None:
        _group_or_404(ctx, groupName)
        _user_or_404(ctx, userName)
        accounts.add_member(ctx, groupName, userName)

    return await _no_content(run)


@router.delete(
    "/groups/{groupName}/members/{userName}", tags=["groups"], status_code=204, summary="Remove a member"
)
async def remove_member(
    ctx: Ctx, groupName: GroupNamePath, userName: UserNamePath, _p: AccountsAdmin
) -> Response:
    def run() -> None:
        _group_or_404(ctx, groupName)
        accounts.remove_member(ctx, groupName, userName)

    return await _no_content(run)


# ---- device registry (administration, not data) --------------------------------------
class DeviceCreate(Strict):
    deviceId: Identifier
    typeId: Identifier
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict, max_length=64)


class CredentialRotation(Strict):
    graceSeconds: int = Field(0, ge=0, le=7 * 24 * 3600)


@router.post(
    "/devices",
    tags=["device registry"],
    status_code=201,
    summary="Register a device; its MQTT credential is shown once",
)
async def register(ctx: Ctx, body: DeviceCreate, _p: DevicesAdmin) -> Any:
    def run() -> dict[str, Any]:
        new = register_device(ctx, body.typeId, body.deviceId, body.metadata)
        device = ctx.store.get_device(new.device_id)
        assert device is not None  # noqa: S101 - just made
        return {**device_doc(device), "password": new.credential}

    return await run_in_threadpool(run)


@router.delete(
    "/devices/{deviceId}",
    tags=["device registry"],
    status_code=204,
    summary="Delete a device, its events and its data keys",
)
async def unregister(ctx: Ctx, deviceId: _DevicePath, _p: DevicesAdmin) -> Response:
    return await _no_content(lambda: delete_device(ctx, deviceId))


@router.post(
    "/devices/{deviceId}/credential",
    tags=["device registry"],
    summary="Give a device a new MQTT credential (shown once)",
)
async def rotate_credential(
    ctx: Ctx, deviceId: _DevicePath, body: CredentialRotation, _p: DevicesAdmin
) -> Any:
    cred = await run_in_threadpool(rotate_device_credential, ctx, deviceId, grace_s=body.graceSeconds)
    return {"deviceId": deviceId, "password": cred}


class DeviceChange(Strict):
    commandDelivery: Delivery = Field(
        description="`signed` (default, recommended): commands are signed JWS the device verifies; "
        "`unsigned`: the payload as sent, for devices that cannot verify (Watson IoT's behaviour), "
        "marked `delivered` once the broker took it"
    )


@router.patch(
    "/devices/{deviceId}",
    tags=["device registry"],
    summary="Change a device's settings: how commands reach it (audited)",
    response_model=DeviceOut,
)
async def change_device(ctx: Ctx, deviceId: _DevicePath, body: DeviceChange, _p: DevicesAdmin) -> Any:
    device = await run_in_threadpool(set_command_delivery, ctx, deviceId, body.commandDelivery)
    return device_doc(device)


class DeviceTypeOut(BaseModel):
    typeId: str
    commandDelivery: str
    devicesChanged: list[str] = Field(description="registered devices of the type whose setting changed")


@router.patch(
    "/device-types/{typeId}",
    tags=["device registry"],
    summary="How commands reach a type's devices: those registered from now on and those already (audited)",
    response_model=DeviceTypeOut,
)
async def change_device_type(
    ctx: Ctx, typeId: Annotated[Identifier, Path()], body: DeviceChange, _p: DevicesAdmin
) -> Any:
    changed_ids = await run_in_threadpool(set_type_command_delivery, ctx, typeId, body.commandDelivery)
    return {"typeId": typeId, "commandDelivery": body.commandDelivery.value, "devicesChanged": changed_ids}


# ---- API keys ------------------------------------------------------------------------
class ApiKeyCreate(Strict):
    description: str = Field("", max_length=256)
    roleAdmin: bool = False
    roleReader: bool = True
    roleWriter: bool = False
    devices: list[str] = Field(default_factory=list, max_length=10_000)
    groups: list[str] = Field(default_factory=list, max_length=64)
    expiresInSeconds: int | None = Field(None, ge=60, le=5 * 365 * 24 * 3600)
    watson: bool = Field(
        False, description="A key id of Watson's form (a-<org>-...), for Watson IoT application clients"
    )


@router.get("/apikeys", tags=["API keys"], summary="List API keys (never their passwords)")
async def list_keys(ctx: Ctx, _p: ApiKeysAdmin) -> Any:
    keys = await run_in_threadpool(ctx.accounts.list_api_keys)
    return {"apikeys": [api_key_doc(k) for k in keys]}


@router.post(
    "/apikeys", tags=["API keys"], status_code=201, summary="Create an API key; its password is shown once"
)
async def create_key(ctx: Ctx, body: ApiKeyCreate, principal: ApiKeysAdmin) -> Any:
    def run() -> dict[str, Any]:
        roles = Roles(admin=body.roleAdmin, reader=body.roleReader, writer=body.roleWriter)
        try:
            grant = accounts.api_key_grant(ctx, roles, body.devices, body.groups, strict=True)
        except GroupNotFoundError:
            raise Problem(404, "group not found") from None
        if not may_grant(principal, grant):
            raise Problem(403, "an API key cannot hold more than its creator may grant")
        expires = now_us() + body.expiresInSeconds * 1_000_000 if body.expiresInSeconds else None
        key, password = accounts.create_api_key(
            ctx,
            roles=roles,
            devices=tuple(body.devices),
            groups=tuple(body.groups),
            expires_us=expires,
            description=body.description,
            created_by=f"{principal.kind}:{principal.id}"[:64],
            watson_org=ctx.org_id if body.watson else None,
        )
        found = ctx.accounts.get_api_key(key)
        assert found is not None  # noqa: S101 - just made
        return {**api_key_doc(found[0]), "password": password}

    return await run_in_threadpool(run)


@router.delete("/apikeys/{key}", tags=["API keys"], status_code=204, summary="Revoke an API key")
async def revoke_key(
    ctx: Ctx, key: Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")], _p: ApiKeysAdmin
) -> Response:
    try:
        await run_in_threadpool(accounts.revoke_api_key, ctx, key, now_us())
    except ApiKeyNotFoundError:
        raise Problem(404, "API key not found") from None
    return Response(status_code=204)


# ---- security events -----------------------------------------------------------------
@router.get(
    "/security/events",
    tags=["security"],
    summary="Security events: rejected device messages, refused logins and topics, commands; newest first",
)
async def security_events(
    ctx: Ctx,
    _p: Annotated[Principal, Requires(Permission.SECURITY_EVENTS_READ)],
    count: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    store = ctx.store
    rows = await run_in_threadpool(store.list_rejected, count)
    others = await run_in_threadpool(store.list_security_events, count)
    events: list[tuple[int, dict[str, Any]]] = [
        (
            r.received_us,
            {
                "timestamp": iso(r.received_us),
                "kind": "ingest_rejected",
                "reason": r.reason,
                "deviceId": r.device_id,
                "topic": r.topic,
                "size": r.size,
                "source": r.source,
            },
        )
        for r in rows
    ]
    # broker and command events (security_events): kind, subject, and their small detail
    events += [
        (e.at_us, {**e.detail, "timestamp": iso(e.at_us), "kind": e.kind, "subject": e.subject})
        for e in others
    ]
    events.sort(key=lambda item: item[0], reverse=True)
    return {"events": [doc for _, doc in events[:count]]}


# ---- the caller ----------------------------------------------------------------------
@router.get("/me", tags=["users"], summary="Who the caller is and what it may do")
async def me(principal: Annotated[Principal, Requires(Permission.SELF_READ)]) -> Any:
    return {
        "kind": principal.kind,
        "id": principal.id,
        "roleAdmin": principal.admin,
        "groups": list(principal.groups),
        "readable": sorted(principal.readable),
        "writable": sorted(principal.writable),
    }
