"""The person-facing pages: sign-in and sign-out, the devices, one device.

Device data is read with the same store calls as the API and decided by the same policy
(:func:`iotvault.web.render.Page`); a page lists only the devices the person may read, so the
names of the others never reach the browser. Live updates, commands and their status are the
page's script calling the ``/iotf`` API through the session (:mod:`iotvault.web.bff`).
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Annotated, Any, Final
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from iotvault.api.routes.devices import EVENT_ID
from iotvault.api.security import client_address, services
from iotvault.auth.policy import Decision, Permission, Principal, authorize
from iotvault.context import Context
from iotvault.documents import iso, opaque_payload
from iotvault.domain.topics import JSON_FORMAT
from iotvault.domain.types import Identifier
from iotvault.errors import CryptoError
from iotvault.storage.repository import DeviceRecord, StoredEvent
from iotvault.web.bff import COOKIE_KEY, apply_tokens
from iotvault.web.flatten import flatten, is_number, opaque_fields
from iotvault.web.render import Page, PageError, Viewer, page, session_of
from iotvault.web.session import WebSession
from iotvault.web.state import web_state

router = APIRouter(include_in_schema=False)

PAGE_EVENTS: Final = 100
MAX_FORM: Final = 64 * 1024


async def form_of(request: Request) -> dict[str, str]:
    """An urlencoded form, checked against the session's CSRF token (403 page otherwise)."""
    body = await request.body()
    if len(body) > MAX_FORM:
        raise PageError(413, "Too large", "The form is too large.")
    fields = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    session = session_of(request)
    token = fields.get("csrf_token", "")
    if session is None or not hmac.compare_digest(session.csrf.encode(), token.encode()):
        raise PageError(403, "Form expired", "The form has expired. Reload the page and try again.")
    return fields


# ---- sign-in and sign-out ------------------------------------------------------------------
@router.get("/")
async def home(request: Request) -> Response:
    """The landing page; signed-in people go on to their devices."""
    if session_of(request) is not None:
        return RedirectResponse("/devices", status_code=303)
    web = web_state(request)
    return page(request, "home.html", error=web.client.error, anonymous=web.anonymous_allowed())


@router.get("/auth/login")
async def login(request: Request, anonymous: Annotated[bool, Query()] = False) -> Response:
    web = web_state(request)
    if web.client.error is not None:
        raise PageError(503, "Sign-in unavailable", web.client.error)
    value, pending = await run_in_threadpool(web.sessions.start_login)
    url = web.client.authorization_url(pending.state, pending.nonce, pending.verifier, anonymous=anonymous)
    answer = RedirectResponse(url, status_code=303)
    # Lax: the provider's answer arrives as a top-level navigation (a redirect after its form)
    answer.headers.append(
        "set-cookie",
        web.sessions.set_cookie_header(web.sessions.pending_cookie, value, max_age=600, lax=True),
    )
    return answer


@router.get("/auth/callback")
async def callback(request: Request) -> Response:
    web = web_state(request)
    params = request.query_params
    pending = await run_in_threadpool(
        web.sessions.finish_login, request.cookies.get(web.sessions.pending_cookie)
    )
    state, code = params.get("state", ""), params.get("code")
    if pending is None or not hmac.compare_digest(pending.state.encode(), state.encode()):
        raise PageError(
            400, "Sign-in expired", "This sign-in is not the one this browser started. Try again."
        )
    if code is None:
        message = params.get("error_description") or params.get("error") or "sign-in refused"
        raise PageError(400, "Sign-in refused", message[:200])
    address = client_address(request)
    doc = await run_in_threadpool(web.client.exchange, code, pending.verifier, address)
    id_token = doc.get("id_token") if doc else None
    claims = web.client.identity.provider.decode_own(id_token) if isinstance(id_token, str) else None
    if doc is None or claims is None or claims.get("nonce") != pending.nonce:
        raise PageError(400, "Sign-in failed", "The sign-in could not be completed. Try again.")
    anonymous = "anon" in (claims.get("amr") or [])
    user = "anonymous" if anonymous else str(claims.get("preferred_username") or claims.get("sub"))
    session = WebSession("", None, None, 0.0, user=user, anonymous=anonymous)
    apply_tokens(session, doc)
    value = await run_in_threadpool(web.sessions.create, session)
    answer = RedirectResponse("/devices", status_code=303)
    answer.headers.append("set-cookie", web.sessions.set_cookie_header(web.sessions.cookie, value))
    answer.headers.append(
        "set-cookie", web.sessions.set_cookie_header(web.sessions.pending_cookie, "", max_age=0)
    )
    return answer


@router.post("/auth/logout")
async def logout(request: Request) -> Response:
    """End the session here, revoke its tokens, then end the provider's session too."""
    await form_of(request)
    web = web_state(request)
    session = await run_in_threadpool(web.sessions.drop, request.scope.get(COOKIE_KEY))
    id_token = None
    if session is not None:
        id_token = session.id_token
        address = client_address(request)
        for token in (session.refresh_token, session.access_token):
            if token:
                await run_in_threadpool(web.client.revoke, token, address)
    answer = RedirectResponse(web.client.logout_url(id_token), status_code=303)
    answer.headers.append("set-cookie", web.sessions.set_cookie_header(web.sessions.cookie, "", max_age=0))
    return answer


# ---- devices -------------------------------------------------------------------------------
def decrypt(ctx: Context, e: StoredEvent) -> dict[str, Any]:
    """An event for a page: its time, type and flattened payload (or why there is none)."""
    row: dict[str, Any] = {
        "id": e.event_id,
        "time": iso(e.received_us),
        "us": e.received_us,
        "type": e.event_type,
    }
    try:
        plain = ctx.keyring.decrypt(e.device_id, e.event_id, e.payload)
        if e.fmt == JSON_FORMAT:
            row["fields"] = flatten(orjson.loads(plain))
        else:
            row["fields"] = opaque_fields(e.fmt, *opaque_payload(e.fmt, plain))
        row["error"] = None
    except CryptoError:
        row["fields"], row["error"] = {}, "the stored record does not decrypt"
    except orjson.JSONDecodeError:
        row["fields"], row["error"] = {}, "the stored payload is not JSON"
    return row


def _device_row(ctx: Context, d: DeviceRecord) -> dict[str, Any]:
    latest = ctx.store.last_events(d.device_id, 1)
    return {
        "id": d.device_id,
        "type": d.type_id,
        "status": d.status,
        "last_seen": iso(d.last_seen_us),
        "latest": decrypt(ctx, latest[0]) if latest else None,
    }


@router.get("/devices")
async def devices(request: Request, principal: Viewer) -> Response:
    ctx = services(request).ctx

    def load() -> list[dict[str, Any]]:
        return [_device_row(ctx, d) for d in ctx.store.list_devices() if principal.can_read(d.device_id)]

    rows = await run_in_threadpool(load) if principal.readable else []
    return page(request, "devices.html", principal=principal, devices=rows)


def _us(value: datetime | None) -> int | None:
    if value is None:
        return None
    if value.tzinfo is None:  # the page's time inputs are in UTC
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1_000_000)


def chart_data(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Oldest first: times in seconds and one list per numeric field (None where absent)."""
    ordered = list(reversed(rows))
    names = sorted({k for r in ordered for k, v in r["fields"].items() if is_number(v)})
    return {
        "t": [r["us"] / 1_000_000 for r in ordered],
        "series": {n: [v if is_number(v := r["fields"].get(n)) else None for r in ordered] for n in names},
    }


@router.get("/devices/{deviceId}")
async def device(
    request: Request,
    deviceId: Annotated[Identifier, Path(description="deviceId")],
    principal: Annotated[Principal, Page(Permission.DEVICE_EVENTS_READ)],
    before: Annotated[str | None, Query(pattern=EVENT_ID)] = None,
    since: Annotated[datetime | None, Query()] = None,
    until: Annotated[datetime | None, Query()] = None,
    count: Annotated[int, Query(ge=1, le=1000)] = PAGE_EVENTS,
) -> Response:
    ctx = services(request).ctx
    since_us, until_us = _us(since), _us(until)

    def load() -> tuple[DeviceRecord | None, list[dict[str, Any]], list[str]]:
        found = ctx.store.get_device(deviceId)
        events = ctx.store.events_page(
            deviceId, count=count, before=before, since_us=since_us, until_us=until_us
        )
        tabs = [d.device_id for d in ctx.store.list_devices() if principal.can_read(d.device_id)]
        return found, [decrypt(ctx, e) for e in events], tabs

    found, rows, tabs = await run_in_threadpool(load)
    if found is None:
        raise PageError(404, "Not found", "There is no such device, or you may not see it.")
    columns = list(dict.fromkeys(k for r in rows for k in r["fields"]))
    live = before is None and until is None
    return page(
        request,
        "device.html",
        principal=principal,
        device=found,
        last_seen=iso(found.last_seen_us),
        rows=rows,
        columns=columns,
        chart=chart_data(rows),
        live=live,
        older=rows[-1]["id"] if len(rows) == count else None,
        since=since.strftime("%Y-%m-%dT%H:%M") if since else "",
        until=until.strftime("%Y-%m-%dT%H:%M") if until else "",
        count=count,
        writer=authorize(principal, Permission.DEVICE_COMMAND, deviceId) is Decision.ALLOW,
        tabs=tabs,
    )
