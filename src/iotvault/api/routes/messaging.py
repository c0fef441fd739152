"""HTTP device messaging, as Watson IoT Platform offered it: a device posts one event per request.

``POST /api/v0002/device/types/{typeId}/devices/{deviceId}/events/{eventId}`` with HTTP Basic
``use-token-auth:<credential>`` (or the user name ``d:<orgId>:<typeId>:<deviceId>``), for devices
that cannot hold an MQTT connection. The event takes the MQTT path from there on: the same
ingest pipeline (validation, size limit, encryption, storage), so it is stored exactly as one
published on ``iot-2/type/{typeId}/id/{deviceId}/evt/{eventId}/fmt/{format}`` would be. The
answer is 200 with an empty body (Watson's) only once the batch that holds it has committed.

The format comes from ``Content-Type``, as on Watson: ``application/json`` → ``json`` (must be
valid JSON, else 400), ``text/plain`` → ``text``, ``application/xml`` or ``text/xml`` → ``xml``,
anything else → ``bin``.

The caller is a device, not a person or an API key: it proves its credential here
(:func:`iotvault.devices.check_device_credential`, the broker's rule) and may post only its own
events, under the type the registry has for it. Failures count against the address and the
device like API-key failures (429 past the limit) and are security events (``login_failed``).
Each request is a new event: HTTP has no redelivery to recognise (a client that retries after
a lost answer may store an event twice, as with Watson).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Annotated, Final

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from iotvault.api.problems import Problem
from iotvault.api.schemas import ERRORS
from iotvault.api.security import client_address, services
from iotvault.clock import now_us
from iotvault.devices import DeviceLogin, check_device_credential
from iotvault.domain.topics import JSON_FORMAT, EventTopic
from iotvault.domain.types import Identifier
from iotvault.ingest.pipeline import Inbound, IngestFailedError, Outcome

router = APIRouter(tags=["device messaging (Watson IoT)"])

EVENTS_PATH: Final = "/api/v0002/device/types/{typeId}/devices/{deviceId}/events/{eventId}"
DEVICE_ROUTES: Final = frozenset({("POST", EVENTS_PATH)})
"""Routes whose caller is a device proving its own credential, not a principal of the policy."""

TOKEN_USER: Final = "use-token-auth"  # noqa: S105 - Watson's fixed user name, not a secret
WWW_AUTHENTICATE: Final = 'Basic realm="iotvault devices", charset="UTF-8"'
MAX_CREDENTIAL: Final = 256

_FORMATS: Final = {
    "application/json": JSON_FORMAT,
    "text/plain": "text",
    "application/xml": "xml",
    "text/xml": "xml",
}


def content_format(content_type: str | None) -> str:
    """The event format a ``Content-Type`` names (Watson's mapping); ``bin`` for anything else."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return _FORMATS.get(media, "bin")


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": WWW_AUTHENTICATE})


def _basic(header: str) -> tuple[str, str]:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("expected Basic credentials: use-token-auth and the device credential")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError("malformed Basic credentials") from None
    if decoded.startswith("d:"):  # the user name d:<org>:<type>:<id> has colons of its own
        parts = decoded.split(":", 4)
        user, sep, secret = ":".join(parts[:4]), ":" if len(parts) == 5 else "", parts[-1]
    else:
        user, sep, secret = decoded.partition(":")
    if not sep or not user or not secret or len(user) > 200 or len(secret) > MAX_CREDENTIAL:
        raise ValueError("malformed Basic credentials")
    return user, secret


async def device_login(
    request: Request,
    typeId: Annotated[Identifier, Path()],
    deviceId: Annotated[Identifier, Path()],
) -> DeviceLogin:
    """The device named by the path, if the request carries its credential; else 401 or 429."""
    svc = services(request)
    address = client_address(request)
    limiter = svc.limiter
    blocked = await limiter.auth_blocked(address) if limiter is not None else None
    identity = f"device:{deviceId}"

    def too_many(wait: float | int) -> Problem:
        return Problem(429, "too many failed authentications", headers={"Retry-After": str(wait)})

    header = request.headers.get("authorization")
    if header is None:
        if blocked is not None:
            raise too_many(blocked)
        raise _unauthorized("authentication required: Basic use-token-auth:<device credential>")
    login: DeviceLogin | None = None
    try:
        user, secret = _basic(header)
    except ValueError as exc:
        reason = str(exc)
    else:
        if blocked is not None and limiter is not None:
            retry = await limiter.identity_blocked(identity)
            if retry is not None:  # the address and this device both throttled: no check at all
                raise too_many(retry)
        org = await run_in_threadpool(lambda: svc.ctx.org_id)
        reason = "invalid credentials"
        if user in (TOKEN_USER, f"d:{org}:{typeId}:{deviceId}"):
            login = await run_in_threadpool(
                lambda: check_device_credential(svc.ctx.store, deviceId, secret, at_us=now_us())
            )
    if login is None or login.type_id != typeId:
        if login is not None:
            reason = "the device type does not match the registry"
        if svc.security_event is not None:  # as the broker's: per device and address, aggregated
            svc.security_event(
                "login_failed", deviceId, via="http", deviceId=deviceId, reason=reason, address=address
            )
        if limiter is not None:
            retry = await limiter.auth_failed(address, identity)
            if retry is not None or blocked is not None:
                raise too_many(retry or blocked or 1)
        raise _unauthorized(reason)
    request.state.principal = login  # the audit record names the device as the actor
    return login


device_login.device_credential = True  # type: ignore[attr-defined]  # read by the route-walk test

Device = Annotated[DeviceLogin, Depends(device_login)]


@router.post(
    EVENTS_PATH,
    summary="A device posts an event (Watson IoT HTTP messaging; Basic use-token-auth:<credential>)",
    description=(
        "For devices, not people: HTTP Basic with user `use-token-auth` (or `d:<orgId>:<typeId>:"
        "<deviceId>`) and the device credential. The body is the payload; `Content-Type` names its "
        "format (`application/json` → json, `text/plain` → text, `application/xml` → xml, else "
        "bin). 200 with an empty body once stored."
    ),
    responses={200: {"description": "stored (empty body)", "content": {}}, **ERRORS},
    response_class=Response,
)
async def post_event(
    request: Request,
    typeId: Annotated[Identifier, Path()],
    deviceId: Annotated[Identifier, Path()],
    eventId: Annotated[Identifier, Path()],
    device: Device,
) -> Response:
    svc = services(request)
    limit = svc.settings.max_payload_bytes
    body = await request.body()  # the middleware caps it and times out a slow one (408)
    if len(body) > limit:
        raise Problem(413, f"the event is larger than {limit} bytes")
    fmt = content_format(request.headers.get("content-type"))
    if fmt == JSON_FORMAT:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            raise Problem(400, "the body is not valid JSON (Content-Type: application/json)") from None
    ingest = svc.ingest
    if ingest is None:
        raise Problem(503, "this node does not store events", headers={"Retry-After": "5"})
    topic = str(EventTopic(device.type_id, device.device_id, eventId, fmt))
    pending = ingest(Inbound(topic, body, 1, False, None, f"http:{client_address(request)}"))
    try:
        outcome = await asyncio.shield(pending)
    except asyncio.CancelledError:
        if not pending.cancelled():  # this request was cancelled, not the event
            raise
        raise Problem(503, "the node is shutting down; send again", headers={"Retry-After": "5"}) from None
    except IngestFailedError as exc:  # not stored, and the device must know
        raise Problem(503, "the event could not be stored; send again", headers={"Retry-After": "5"}) from exc
    if outcome not in (Outcome.STORED, Outcome.COMMAND_ACK):  # a cmdack updates its command
        raise Problem(400, f"the event was not stored ({outcome.value})")
    return Response(status_code=200)
