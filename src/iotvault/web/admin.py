"""Administration pages: users, groups, the device registry, API keys, OAuth clients, who can
see a device, and the security events.

Each page declares the permission the matching ``/iotf`` endpoint needs (the one policy
decides); each change is a form post checked against the session's CSRF token
(:func:`iotvault.web.pages.form_of`) and calls the same services as the API and the command
line. Secrets (generated passwords, device credentials, API key passwords) are on the page
that answers the change that made them, and nowhere else: that answer is never cached
(``Cache-Control: no-store``) and reloading it does not show them again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from iotvault import accounts
from iotvault.api.problems import Problem
from iotvault.api.routes.access import device_access, holders
from iotvault.api.security import services
from iotvault.auth.policy import Decision, Grant, Permission, Principal, authorize, may_grant, reach
from iotvault.clock import now_us
from iotvault.context import Context
from iotvault.devices import (
    delete_device,
    register_device,
    revoke_device_credential,
    rotate_device_credential,
)
from iotvault.documents import iso
from iotvault.domain.accounts import Roles
from iotvault.domain.types import AccountName, Identifier
from iotvault.errors import IotVaultError
from iotvault.identity.clients import remove_client
from iotvault.web.audit import recent_alerts
from iotvault.web.pages import form_of
from iotvault.web.render import Page, PageError, page
from iotvault.web.state import web_state

router = APIRouter(include_in_schema=False)
T = TypeVar("T")

Accounts = Annotated[Principal, Page(Permission.ACCOUNTS_MANAGE)]
Devices = Annotated[Principal, Page(Permission.DEVICES_MANAGE)]
Keys = Annotated[Principal, Page(Permission.API_KEYS_MANAGE)]
Clients = Annotated[Principal, Page(Permission.CLIENTS_MANAGE)]
Security = Annotated[Principal, Page(Permission.SECURITY_EVENTS_READ)]
UserName = Annotated[AccountName, Path()]
GroupName = Annotated[AccountName, Path()]
DeviceId = Annotated[Identifier, Path(description="deviceId")]


async def _do(change: Callable[[], T]) -> T:
    """Run a change in a worker thread; a refusal of the domain becomes a page that says why."""
    try:
        return await run_in_threadpool(change)
    except IotVaultError as exc:
        raise PageError(400, "Not done", str(exc)) from None


def _names(text: str) -> list[str]:
    return [n for n in (p.strip() for p in text.replace("\n", ",").split(",")) if n]


def _roles(fields: dict[str, str]) -> Roles:
    return Roles(admin="roleAdmin" in fields, reader="roleReader" in fields, writer="roleWriter" in fields)


def shown_once(request: Request, principal: Principal, **values: Any) -> Response:
    """The page that shows a new secret (``secrets``, with ``title``, ``note``, ``back``): the
    only time it is shown; the answer is never cached (``Cache-Control: no-store``)."""
    return page(request, "secret.html", principal=principal, **values)


def _back(to: str) -> Response:
    return RedirectResponse(to, status_code=303)


# ---- users ---------------------------------------------------------------------------------
def _users(ctx: Context) -> list[dict[str, Any]]:
    rows = []
    for h in holders(ctx):
        if h.kind != "user":
            continue
        readable, writable, admin = reach(h)
        rows.append(
            {
                "name": h.id,
                "disabled": h.disabled,
                "groups": [s for s, _ in h.grants],
                "readable": sorted(readable),
                "writable": sorted(writable),
                "admin": admin,
            }
        )
    return rows


@router.get("/admin/users")
async def users(request: Request, principal: Accounts) -> Response:
    ctx = services(request).ctx
    rows, groups = await run_in_threadpool(lambda: (_users(ctx), ctx.accounts.list_groups()))
    return page(request, "admin_users.html", principal=principal, users=rows, groups=groups)


@router.post("/admin/users")
async def add_user(request: Request, principal: Accounts) -> Response:
    f = await form_of(request)
    ctx = services(request).ctx
    name = f.get("userName", "")
    password = await _do(
        lambda: accounts.create_user(
            ctx, name, f.get("displayName") or None, groups=_names(f.get("groups", ""))
        )
    )
    return shown_once(
        request,
        principal,
        title=f"User {name} created",
        secrets=[("Password", password)],
        back="/admin/users",
        note="Give this password to the person; it is not shown again.",
    )


@router.post("/admin/users/{userName}/{action}")
async def change_user(request: Request, userName: UserName, action: str, principal: Accounts) -> Response:
    await form_of(request)
    ctx = services(request).ctx
    if action in ("disable", "enable"):
        await _do(lambda: accounts.update_user(ctx, userName, disabled=action == "disable"))
        return _back("/admin/users")
    if action == "password":
        password = await _do(lambda: accounts.reset_password(ctx, userName))
        return shown_once(
            request,
            principal,
            title=f"New password for {userName}",
            secrets=[("Password", password)],
            back="/admin/users",
            note="The old password no longer works; this one is not shown again.",
        )
    raise PageError(404, "Not found", "No such action.")


# ---- groups --------------------------------------------------------------------------------
@router.get("/admin/groups")
async def groups(request: Request, principal: Accounts) -> Response:
    ctx = services(request).ctx
    rows = await run_in_threadpool(ctx.accounts.list_groups)
    return page(request, "admin_groups.html", principal=principal, groups=rows)


@router.post("/admin/groups")
async def add_group(request: Request, principal: Accounts) -> Response:
    f = await form_of(request)
    ctx = services(request).ctx
    await _do(
        lambda: accounts.create_group(
            ctx,
            f.get("groupName", ""),
            f.get("displayName") or None,
            roles=_roles(f),
            devices=_names(f.get("devices", "")),
        )
    )
    return _back("/admin/groups")


@router.post("/admin/groups/{groupName}")
async def change_group(request: Request, groupName: GroupName, principal: Accounts) -> Response:
    f = await form_of(request)
    ctx = services(request).ctx

    def change() -> None:
        before = accounts.update_group(ctx, groupName, roles=_roles(f), devices=_names(f.get("devices", "")))
        wanted = set(_names(f.get("members", "")))
        for user in sorted(wanted - set(before.members)):
            accounts.add_member(ctx, groupName, user)
        for user in sorted(set(before.members) - wanted):
            accounts.remove_member(ctx, groupName, user)

    await _do(change)
    return _back("/admin/groups")


# ---- device registry -----------------------------------------------------------------------
def connection(request: Request, device_id: str, type_id: str) -> list[tuple[str, str]]:
    """What a device needs besides its credential to connect and publish."""
    settings = services(request).settings
    broker = settings.broker
    if broker.embedded:
        host, port = urlsplit(settings.public_url).hostname or settings.mqtt_host, settings.mqtt_port
    else:
        host, port = broker.host, broker.port
    return [
        ("MQTT host", str(host)),
        ("MQTT port", str(port)),
        ("Client id", device_id),
        ("User name", device_id),
        ("Event topic", f"iot-2/type/{type_id}/id/{device_id}/evt/<event>/fmt/json"),
        ("Command topic", f"iot-2/type/{type_id}/id/{device_id}/cmd/+/fmt/json"),
    ]


@router.get("/admin/devices")
async def registry(request: Request, principal: Devices) -> Response:
    ctx = services(request).ctx
    rows = await run_in_threadpool(ctx.store.list_devices)
    return page(request, "admin_devices.html", principal=principal, devices=rows, iso=iso)


@router.post("/admin/devices")
async def register(request: Request, principal: Devices) -> Response:
    f = await form_of(request)
    ctx = services(request).ctx
    new = await _do(lambda: register_device(ctx, f.get("typeId", ""), f.get("deviceId", "")))
    return shown_once(
        request,
        principal,
        title=f"Device {new.device_id} registered",
        secrets=[("Credential (MQTT password)", new.credential)],
        details=connection(request, new.device_id, new.type_id),
        back="/admin/devices",
        note="Store the credential on the device now: it is shown only once.",
    )


@router.post("/admin/devices/{deviceId}/{action}")
async def change_device(request: Request, deviceId: DeviceId, action: str, principal: Devices) -> Response:
    f = await form_of(request)
    ctx = services(request).ctx
    if action == "rotate":
        credential = await _do(lambda: rotate_device_credential(ctx, deviceId))
        found = await run_in_threadpool(ctx.store.get_device, deviceId)
        return shown_once(
            request,
            principal,
            title=f"New credential for {deviceId}",
            secrets=[("Credential (MQTT password)", credential)],
            details=connection(request, deviceId, found.type_id if found else "?"),
            back="/admin/devices",
            note="The old credential no longer works.",
        )
    if action == "revoke":
        await _do(lambda: revoke_device_credential(ctx, deviceId))
        return _back("/admin/devices")
    if action == "delete":
        if f.get("confirm") != deviceId:
            raise PageError(
                400, "Not deleted", "Type the device id to confirm that its data will be destroyed."
            )
        await _do(lambda: delete_device(ctx, deviceId))
        return _back("/admin/devices")
    raise PageError(404, "Not found", "No such action.")


@router.get("/admin/devices/{deviceId}/access")
async def access(request: Request, deviceId: DeviceId, principal: Devices) -> Response:
    ctx = services(request).ctx
    try:
        rows = await run_in_threadpool(device_access, ctx, deviceId)
    except Problem as exc:  # device_access's not_found
        raise PageError(exc.status, "Not found", "There is no such device.") from None
    return page(request, "admin_access.html", principal=principal, device_id=deviceId, rows=rows)


# ---- API keys and OAuth clients ------------------------------------------------------------
@router.get("/admin/apikeys")
async def keys(request: Request, principal: Keys) -> Response:
    ctx = services(request).ctx

    def load() -> tuple[list[tuple[Any, list[str]]], str]:
        reached = {h.id: sorted(reach(h)[0] | reach(h)[1]) for h in holders(ctx) if h.kind == "api_key"}
        return [(k, reached.get(k.key, [])) for k in ctx.accounts.list_api_keys()], ctx.org_id

    rows, org = await run_in_threadpool(load)
    return page(request, "admin_keys.html", principal=principal, keys=rows, iso=iso, org=org)


@router.post("/admin/apikeys")
async def add_key(request: Request, principal: Keys) -> Response:
    f = await form_of(request)
    ctx = services(request).ctx
    roles = _roles(f)
    devices, groups_ = _names(f.get("devices", "")), _names(f.get("groups", ""))
    grant = await _do(lambda: accounts.api_key_grant(ctx, roles, devices, groups_, strict=True))
    if not may_grant(principal, Grant(grant.admin, grant.reader, grant.writer, grant.devices)):
        raise PageError(403, "Not allowed", "An API key may not hold more than its maker.")
    watson = "watson" in f  # a key id a-<org>-..., which Watson's application SDK reads the org from
    new = await _do(
        lambda: accounts.create_api_key(
            ctx,
            roles=roles,
            devices=devices,
            groups=groups_,
            description=f.get("description", ""),
            created_by=f"{principal.kind}:{principal.id}",
            watson_org=ctx.org_id if watson else None,
        )
    )
    note = "Use them as HTTP Basic credentials (key:password); the password is not shown again."
    if watson:
        note += (
            " A Watson IoT application connects over MQTT with client id a:<org>:<appId>,"
            " the key as user name and the password."
        )
    return shown_once(
        request,
        principal,
        title="API key created",
        secrets=[("Key", new.key), ("Password", new.password)],
        back="/admin/apikeys",
        note=note,
    )


@router.post("/admin/apikeys/{key}/revoke")
async def revoke_key(request: Request, key: Annotated[AccountName, Path()], principal: Keys) -> Response:
    await form_of(request)
    ctx = services(request).ctx
    await _do(lambda: accounts.revoke_api_key(ctx, key, now_us()))
    return _back("/admin/apikeys")


@router.get("/admin/clients")
async def clients(request: Request, principal: Clients) -> Response:
    store = web_state(request).client.identity.provider.store
    rows = await run_in_threadpool(store.list_clients)
    return page(request, "admin_clients.html", principal=principal, clients=rows)


@router.post("/admin/clients/{clientId}/delete")
async def delete_client(
    request: Request, clientId: Annotated[AccountName, Path()], principal: Clients
) -> Response:
    await form_of(request)
    store = web_state(request).client.identity.provider.store
    await _do(lambda: remove_client(store, clientId))
    return _back("/admin/clients")


# ---- security events -----------------------------------------------------------------------
@router.get("/security")
async def security(request: Request, principal: Security) -> Response:
    alerts = None
    if authorize(principal, Permission.AUDIT_READ) is Decision.ALLOW:
        alerts = await run_in_threadpool(recent_alerts, services(request).ctx)
    return page(request, "security.html", principal=principal, alerts=alerts, iso=iso)
