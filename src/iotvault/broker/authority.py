"""The embedded broker's door: device credentials from the registry, topic rules, presence.

It supplies :class:`~iotvault.broker.embedded.EmbeddedBroker`'s hooks:

``authenticate``
    Devices connect with username = client id = deviceId and their credential, or the Watson
    IoT way (:mod:`.watson`): client id ``d:<org>:<typeId>:<deviceId>``, username
    ``use-token-auth`` — the org must be the node's (``IOTVAULT_ORG_ID``) and the type the
    device's registered type. Watson applications connect with client id ``a:<org>:<appId>``
    and an API key (username = its id, password = its password), checked as the REST API
    checks one (:func:`iotvault.accounts.check_api_key`). One database
    read per CONNECT (in a thread, with the password check) fetches the device's type and
    credential hashes; :func:`iotvault.devices.check_device_credential` — the one rule, also
    HTTP device messaging's — checks the password against the current *and* the previous
    credential, always both, each against a dummy hash when there is none, in constant time —
    so a wrong password, an unknown device and a device without a previous credential cost the
    same. The previous credential counts only until its grace period ends. iotvault's own account
    (``iotvault:service``, password kept wrapped in the database) connects with a client id
    that starts ``iotvault:``, which no device can have.
``authorize``
    Topic rules of :mod:`iotvault.broker.acl`, from what was learnt at CONNECT: no database
    read per packet. A session opened with a previous credential ends at its expiry. An
    application's rights are its API key's :class:`~iotvault.auth.policy.Principal`, and the
    authorization policy decides each message it would receive and each command it sends.
``on_connection``
    Presence: a device's first connection (under any client id) makes it ``online``, its last
    one ending ``offline``
    (through ``on_status``, which feeds the ingest pipeline, so ``lastSeen`` follows).
``on_denied``
    Refused logins and topic denials become security events (:mod:`.security_log`).

Sessions are re-checked every ``revalidate_s`` seconds with one query for all connected
devices: a deleted device, or a credential that was revoked, rotated without grace or whose
grace has ended, is disconnected (``revalidate`` returns the client ids to drop); so is an
application whose API key was revoked, deleted or expired, and the rights of one that stays are
re-read (a group's devices may have changed). So a change
made by another process (``iotvault devices delete`` on the command line) reaches a connected
device within seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iotvault.accounts import AccountServices, api_key_grant, check_api_key
from iotvault.auth.policy import Decision, Permission, Principal, authorize
from iotvault.broker.acl import (
    SERVICE_CLIENT_PREFIX,
    SERVICE_USERNAME,
    TopicAction,
    device_may,
    is_device_id,
    service_may,
)
from iotvault.broker.watson import DEVICE_USERNAME, WatsonApp, WatsonDevice, parse_client_id
from iotvault.clock import now_us
from iotvault.devices import check_device_credential
from iotvault.domain.topics import PREFIX, CommandTopic, EventTopic, StatusTopic, parse_topic
from iotvault.errors import IotVaultError, TopicError
from iotvault.storage.sql import SqlStore

if TYPE_CHECKING:
    from iotvault.broker.embedded import Denial, EmbeddedBroker
    from iotvault.broker.security_log import SecurityEventLog

log = logging.getLogger(__name__)

StatusHook = Callable[[str, str, bool], Awaitable[None]]
"""``(device_id, type_id, online)``."""


@dataclass(slots=True)
class _Session:
    device_id: str | None  # None: iotvault's own account, or an application
    type_id: str
    used_hash: str
    valid_until_us: int | None  # set when the previous credential (in its grace period) was used
    app: Principal | None = None  # a Watson application: its API key's rights...
    api_key: str = ""  # ... and the key's id


class DeviceAuthority:
    def __init__(
        self,
        store: SqlStore,
        *,
        service_password: str | None = None,
        events: SecurityEventLog | None = None,
        on_status: StatusHook | None = None,
        clock_us: Callable[[], int] = now_us,
        org_id: str = "",
        accounts: AccountServices | None = None,
    ) -> None:
        self._store = store
        self._org_id = org_id  # "": Watson clients (d: and a: client ids) are not admitted
        self._accounts = accounts  # None: Watson applications are not admitted
        self._service_password = service_password
        self._events = events
        self._on_status = on_status
        self._clock_us = clock_us
        self._sessions: dict[str, _Session] = {}
        self._online: set[str] = set()
        self._device_connections: dict[str, int] = {}  # deviceId -> connected client ids

    # ---- EmbeddedBroker hooks ----------------------------------------------------------------
    async def authenticate(self, client_id: str, username: str | None, password: str | None) -> bool:
        if username == SERVICE_USERNAME:
            return self._service_login(client_id, password)
        watson = parse_client_id(client_id)
        if isinstance(watson, WatsonApp):
            return await self._app_login(client_id, watson, username, password)
        # A device: deviceId as client id and user name, or the Watson form (d:org:type:id).
        wanted = watson.device_id if isinstance(watson, WatsonDevice) else username
        login = await asyncio.to_thread(
            check_device_credential, self._store, wanted or "", password or "", at_us=self._clock_us()
        )
        if isinstance(watson, WatsonDevice):
            form_ok = (
                username == DEVICE_USERNAME
                and bool(self._org_id)
                and hmac.compare_digest(watson.org, self._org_id)
                and login is not None
                and watson.type_id == login.type_id
            )
        else:
            form_ok = client_id == username
        if login is None or not form_ok:
            return False
        self._sessions[client_id] = _Session(
            login.device_id, login.type_id, login.used_hash, login.valid_until_us
        )
        return True

    def _service_login(self, client_id: str, password: str | None) -> bool:
        expected = (self._service_password or "").encode()
        given = (password or "").encode()
        ok = hmac.compare_digest(given, expected) and bool(expected)
        ok = (
            ok and client_id.startswith(SERVICE_CLIENT_PREFIX) and len(client_id) > len(SERVICE_CLIENT_PREFIX)
        )
        if ok:
            self._sessions[client_id] = _Session(None, "", "", None)
        return ok

    async def _app_login(
        self, client_id: str, app: WatsonApp, username: str | None, password: str | None
    ) -> bool:
        """A Watson application: its API key, checked as the REST API checks one."""
        accounts = self._accounts
        if accounts is None or not username or not password or len(username) > 64 or len(password) > 256:
            return False
        record, _revoked = await asyncio.to_thread(
            check_api_key, accounts, username, password, self._clock_us()
        )
        if record is None or not self._org_id or not hmac.compare_digest(app.org, self._org_id):
            return False
        principal = await asyncio.to_thread(self._app_principal, record.key)
        if principal is None:
            return False
        self._sessions[client_id] = _Session(None, "", "", None, principal, record.key)
        return True

    def _app_principal(self, key: str) -> Principal | None:
        """The rights of API key ``key`` now; None if it is gone, revoked or expired (blocking)."""
        accounts = self._accounts
        found = accounts.accounts.get_api_key(key) if accounts is not None else None
        if accounts is None or found is None:
            return None
        record = found[0]
        if record.revoked_us is not None or (
            record.expires_us is not None and record.expires_us <= self._clock_us()
        ):
            return None
        grant = api_key_grant(accounts, record.roles, record.devices, record.groups)
        return Principal.from_grants("api_key", record.key, [grant], record.groups)

    async def authorize(self, client_id: str, username: str | None, topic: str, action: TopicAction) -> bool:
        session = self._sessions.get(client_id)
        if session is None:
            return False
        if session.app is not None:
            return app_may(session.app, topic, action)
        if session.device_id is None:
            return service_may(topic, action)
        if session.valid_until_us is not None and self._clock_us() > session.valid_until_us:
            return False
        return device_may(session.type_id, session.device_id, topic, action)

    async def on_connection(self, client_id: str, username: str | None, connected: bool) -> None:
        if connected:
            self._online.add(client_id)
        else:
            self._online.discard(client_id)
        session = self._sessions.get(client_id)
        if session is None or session.device_id is None:
            return
        # One device may be connected under two client ids (deviceId, and d:org:type:deviceId):
        # it is online from the first connection until the last one ends.
        device_id = session.device_id
        before = self._device_connections.get(device_id, 0)
        after = before + (1 if connected else -1)
        if after > 0:
            self._device_connections[device_id] = after
        else:
            self._device_connections.pop(device_id, None)
        if self._on_status is None or (before > 0) == (after > 0):
            return
        await self._on_status(device_id, session.type_id, connected)

    def on_denied(self, denial: Denial) -> None:
        if self._events is None:
            return
        if denial.action == "connect":
            kind = "login_throttled" if denial.reason == "throttled" else "login_failed"
        elif denial.action == "protocol":
            kind = "protocol_violation"  # malformed or oversized packet, unsupported protocol level
        elif denial.action == "limit":
            kind = "connection_refused"  # over a connection limit (per address, pending, total)
        else:
            kind = "acl_denied"
        detail: dict[str, str] = {"action": denial.action, "reason": denial.reason, "address": denial.peer}
        if denial.topic is not None:
            detail["topic"] = denial.topic[:256]
        if denial.username is not None and denial.username != denial.client_id:
            detail["username"] = denial.username[:64]
        self._events.record(kind, denial.client_id[:128], **detail)

    # ---- re-checking connected sessions ------------------------------------------------------
    async def revalidate(self) -> list[str]:
        """Client ids whose session no longer holds (device gone, credential changed or expired)."""
        stale = await self._revalidate_apps()
        devices = {
            cid: s
            for cid in self._online
            if (s := self._sessions.get(cid)) is not None and s.device_id is not None
        }
        if not devices:
            return stale
        rows = await asyncio.to_thread(
            self._store.device_credentials, sorted({str(s.device_id) for s in devices.values()})
        )
        now = self._clock_us()
        for cid, session in devices.items():
            row = rows.get(str(session.device_id))
            reason = None
            if row is None:
                reason = "device deleted"
                self._sessions.pop(cid, None)
            elif session.used_hash == row.credential_hash:
                session.valid_until_us = None
            elif (
                session.used_hash == row.previous_credential_hash
                and row.previous_expires_us is not None
                and row.previous_expires_us > now
            ):
                session.valid_until_us = row.previous_expires_us
            else:
                reason = "credential rotated or revoked"
            if reason is not None:
                stale.append(cid)
                if self._events is not None:
                    self._events.record("session_revoked", cid, reason=reason)
        return stale

    async def _revalidate_apps(self) -> list[str]:
        """Applications whose API key was revoked, deleted or expired; the others' rights re-read."""
        apps = {
            cid: s for cid in self._online if (s := self._sessions.get(cid)) is not None and s.app is not None
        }
        stale: list[str] = []
        for cid, session in apps.items():
            principal = await asyncio.to_thread(self._app_principal, session.api_key)
            if principal is not None:
                session.app = principal
                continue
            self._sessions.pop(cid, None)
            stale.append(cid)
            if self._events is not None:
                self._events.record("session_revoked", cid, reason="API key revoked, deleted or expired")
        return stale

    async def keep_checking(self, broker: EmbeddedBroker, interval_s: float = 5.0) -> None:
        """Run :meth:`revalidate` forever, dropping what it finds (a background task)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                stale = await self.revalidate()
            except IotVaultError as exc:
                log.warning("broker: could not re-check device sessions: %s", exc)
                continue
            for client_id in stale:
                log.info("broker: ending the session of %r: its credential no longer holds", client_id)
                broker.disconnect(client_id)


def app_may(principal: Principal, topic: str, action: TopicAction) -> bool:
    """May a Watson application with ``principal``'s rights do ``action`` on ``topic``?

    It subscribes to ``iot-2/type/<t|+>/id/<d|+>/evt/<e|+>/fmt/<f|+>`` and
    ``iot-2/type/<t|+>/id/<d|+>/mon`` (a named device only if it may read it); the policy then
    decides each message it would *receive* (a reader of that device); it *publishes* only
    commands, to devices it may command (they go out through iotvault's commands service,
    signed, never as it sent them).
    """
    if action == "subscribe":
        return _app_filter(principal, topic)
    try:
        parsed = parse_topic(topic)
    except TopicError:
        return False
    if action == "receive":
        return isinstance(parsed, EventTopic | StatusTopic) and (
            authorize(principal, Permission.DEVICE_EVENTS_READ, parsed.device_id) is Decision.ALLOW
        )
    return isinstance(parsed, CommandTopic) and (
        authorize(principal, Permission.DEVICE_COMMAND, parsed.device_id) is Decision.ALLOW
    )


def _app_filter(principal: Principal, topic_filter: str) -> bool:
    parts = topic_filter.split("/")
    if len(parts) < 6 or parts[0] != PREFIX or parts[1] != "type" or parts[3] != "id":
        return False
    rest = parts[5:]
    shape = rest == ["mon"] or (len(rest) == 4 and rest[0] == "evt" and rest[2] == "fmt")
    levels = [parts[2], parts[4], *(rest[1::2] if rest != ["mon"] else [])]
    if not shape or not all(level == "+" or is_device_id(level) for level in levels):
        return False
    device = parts[4]
    return device == "+" or authorize(principal, Permission.DEVICE_EVENTS_READ, device) is Decision.ALLOW
