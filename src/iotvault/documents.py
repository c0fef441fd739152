"""The JSON documents of devices, events, users, groups, API keys and OAuth clients: one shape,
two doors.

The API (``/iotf/devices``, ``/iotf/users``, ``/iotf/groups``, ``/iotf/apikeys``,
``/iotf/clients``) returns them and ``iotvault devices|events|users|groups|apikeys|clients …
--json`` prints them, so a script can move between the two without translating. An event's
document is :func:`event_doc`, written with :func:`to_json`. Field names are the seed's
(``userName``, ``roleReader``); times are UTC strings with milliseconds. Secrets are never part
of a document: the one call that makes a password, key password or client secret adds it to its
own answer.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from iotvault.domain.topics import JSON_FORMAT
from iotvault.errors import CryptoError

if TYPE_CHECKING:  # records only: printing a user must not load the OpenID Connect provider
    from iotvault.domain.accounts import Roles
    from iotvault.identity.records import ClientRecord
    from iotvault.storage.accounts import ApiKeyRecord, GroupRecord, UserRecord
    from iotvault.storage.repository import DeviceRecord, StoredEvent


def iso(us: int | None) -> str | None:
    """``2026-11-22T10:00:00.123Z`` for microseconds since the epoch; None stays None.

    Whole-number arithmetic: a float division could round a time up into the next second.
    """
    if us is None:
        return None
    seconds, micros = divmod(us, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros // 1000:03d}Z"


def _roles(r: Roles) -> dict[str, bool]:
    """A group's or an API key's roles, as the seed's userGroup documents name them."""
    return {"roleAdmin": r.admin, "roleReader": r.reader, "roleWriter": r.writer}


def user_doc(u: UserRecord) -> dict[str, Any]:
    return {
        "userName": u.user_name,
        "displayName": u.display_name,
        "attributes": dict(u.attributes),
        "groups": list(u.groups),
        "disabled": u.disabled,
        "created": iso(u.created_us),
    }


def group_doc(g: GroupRecord) -> dict[str, Any]:
    return {
        "groupName": g.group_name,
        "displayName": g.display_name,
        **_roles(g.roles),
        "devices": list(g.devices),
        "members": list(g.members),
    }


def api_key_doc(k: ApiKeyRecord) -> dict[str, Any]:
    return {
        "key": k.key,
        "description": k.description,
        **_roles(k.roles),
        "devices": list(k.devices),
        "groups": list(k.groups),
        "expires": iso(k.expires_us),
        "lastUsed": iso(k.last_used_us),
        "revoked": iso(k.revoked_us),
        "createdBy": k.created_by,
        "created": iso(k.created_us),
    }


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


# ---- devices and events ------------------------------------------------------------------
def device_doc(d: DeviceRecord) -> dict[str, Any]:
    return {
        "deviceId": d.device_id,
        "typeId": d.type_id,
        "status": d.status,
        "lastSeen": iso(d.last_seen_us),
        "metadata": dict(d.metadata),
        "commandDelivery": d.command_delivery,
    }


UNDECRYPTABLE = "the stored record does not decrypt"
NOT_JSON = "the stored payload is not JSON"

#: Formats whose payload is shown as text when it is valid UTF-8 (else as base64). Watson IoT
#: Platform took any format name in the topic; its SDKs and HTTP messaging API name these.
TEXT_FORMATS: frozenset[str] = frozenset({"text", "txt", "utf8", "utf-8", "xml", "csv", "plain"})
TEXT, BASE64 = "text", "base64"


def opaque_payload(fmt: str, plain: bytes) -> tuple[str, str]:
    """A non-JSON payload as ``(value, encoding)``: the text itself, or base64 of the bytes.

    Text only for a text format whose bytes are valid UTF-8; a ``bin`` payload that happens to
    decode is still base64, so a reader never has to guess which bytes a string stands for.
    """
    if fmt.lower() in TEXT_FORMATS:
        try:
            return plain.decode("utf-8"), TEXT
        except UnicodeDecodeError:
            pass
    return base64.b64encode(plain).decode("ascii"), BASE64


class RecordOpener(Protocol):
    """What opens a stored record: :class:`iotvault.crypto.keyring.KeyRing`."""

    def decrypt(self, device_id: str, event_id: str, record: bytes) -> bytes: ...


def event_doc(keyring: RecordOpener, e: StoredEvent) -> dict[str, Any]:
    """An event as the API and ``iotvault events tail`` show it, its payload decrypted.

    A record that does not decrypt, or whose payload is not JSON, still yields its document:
    ``payload`` is null and ``error`` says why (never the key or the record).

    An event in another format than ``json`` (``text``, ``xml``, ``bin``, …) has a string
    ``payload`` and one more field, ``payloadEncoding``: ``text`` (the payload as sent) or
    ``base64`` (its bytes). A ``json`` event's document has no such field: it is as it was.
    """
    doc: dict[str, Any] = {
        "eventId": e.event_id,
        "deviceId": e.device_id,
        "typeId": e.type_id,
        "eventType": e.event_type,
        "format": e.fmt,
        "timestamp": iso(e.received_us),
        "payload": None,
        "error": None,
    }
    try:
        plain = keyring.decrypt(e.device_id, e.event_id, e.payload)
    except CryptoError:
        doc["error"] = UNDECRYPTABLE
        if e.fmt != JSON_FORMAT:
            doc["payloadEncoding"] = None
        return doc
    if e.fmt != JSON_FORMAT:
        doc["payload"], doc["payloadEncoding"] = opaque_payload(e.fmt, plain)
        return doc
    try:
        doc["payload"] = payload_json(plain)
    except (ValueError, TypeError, RecursionError):
        doc["error"] = NOT_JSON
    return doc


def payload_json(plain: bytes) -> Any:
    """A stored payload, ready for :func:`to_json`.

    Ingest stores only payloads that parse as JSON, so nearly every one is strict RFC 8259
    text: then it is checked with orjson (UTF-8, one complete value, no ``NaN``) and goes into
    the page as it is, without being turned into Python objects and back; a complete JSON
    value cannot break out of its place in the page. Records stored before ingest used orjson
    may hold what only Python's parser accepts: non-finite numbers become null (as the
    response model had them), integers beyond 64 bits and lone surrogates (``"\\ud800"``)
    keep their exact JSON spelling. What cannot be written even so raises ``TypeError``.
    """
    try:
        orjson.loads(plain)
    except orjson.JSONDecodeError:
        value = _jsonable(json.loads(plain))
        orjson.dumps(value)  # TypeError if some part still cannot be written (a surrogate in a key)
        return value
    return orjson.Fragment(plain)


def _jsonable(value: Any) -> Any:
    """What Python's JSON parser made, in a form orjson writes as valid JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if type(value) is int and not -(2**63) <= value < 2**64:
        return orjson.Fragment(str(value).encode())
    if isinstance(value, str) and not _is_utf8(value):  # a lone surrogate: its escaped spelling
        return orjson.Fragment(json.dumps(value).encode())
    return value


def _is_utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def to_json(body: Any) -> bytes:
    """Device data as UTF-8 JSON; payloads made by :func:`payload_json` go in as they are.

    Payloads from :func:`payload_json` are ``orjson.Fragment`` values, which only orjson
    writes: print an :func:`event_doc` with this, not with ``json.dumps``.

    The device-data routes build their bodies with this instead of returning them through
    the response model: FastAPI would validate the documents and serialise them again (a
    quarter of a last-50 request); they are built here in exactly the model's shape, which
    the schema tests check against the OpenAPI document. Its only line breaks are whitespace
    between tokens (JSON escapes them inside strings), so a Server-Sent Events line may
    replace them with spaces.
    """
    return orjson.dumps(body)


def describe(record: Any) -> dict[str, Any]:
    """The document of a user, group, API key, OAuth client or device record (audit before/after).

    By the record's class name, so that this module still imports no record class at run time.
    """
    doc = _DOCUMENTS.get(type(record).__name__)
    if doc is None:
        raise TypeError(f"no document for {type(record).__name__}")
    return doc(record)


_DOCUMENTS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "UserRecord": user_doc,
    "GroupRecord": group_doc,
    "ApiKeyRecord": api_key_doc,
    "ClientRecord": client_doc,
    "DeviceRecord": device_doc,
}
