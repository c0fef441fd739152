"""The embedded broker's door: device credentials from the registry, topic rules, presence.

It supplies :class:`~iotvault.broker.embedded.EmbeddedBroker`'s hooks:

``authenticate``
    Devices connect with username = client id = deviceId and their credential. One database
    read per CONNECT (in a thread) fetches the device's type and credential hashes; the
    password is then checked against the current *and* the previous credential, always both,
    each against a dummy hash when there is none, with constant-time comparisons — so a wrong
    password, an unknown device and a device without a previous credential cost the same.
    The previous credential counts only until its grace period ends. iotvault's own account
    (``iotvault:service``, password kept wrapped in the database) connects with a client id
    that starts ``iotvault:``, which no device can have.
``authorize``
    Topic rules of :mod:`iotvault.broker.acl`, from what was learnt at CONNECT: no database
    read per packet. A session opened with a previous credential ends at its expiry.
``on_connection``
    Presence: a device's first connection makes it ``online``, its last one ending ``offline``
    (through ``on_status``, which feeds the ingest pipeline, so ``lastSeen`` follows).
``on_denied``
    Refused logins and topic denials become security events (:mod:`.security_log`).

Sessions are re-checked every ``revalidate_s`` seconds with one query for all connected
devices: a deleted device, or a credential that was revoked, rotated without grace or whose
grace has ended, is disconnected (``revalidate`` returns the client ids to drop). So a change
made by another process (``iotvault devices delete`` on the command line) reaches a connected
device within seconds.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from iotvault.broker.acl import (
    SERVICE_CLIENT_PREFIX,
    SERVICE_USERNAME,
    TopicAction,
    device_may,
    is_device_id,
    service_may,
)
from iotvault.clock import now_us
from iotvault.crypto.tokens import hash_secret, verify_secret
from iotvault.errors import IotVaultError
from iotvault.storage.sql import SqlStore

if TYPE_CHECKING:
    from iotvault.broker.embedded import Denial, EmbeddedBroker
    from iotvault.broker.security_log import SecurityEventLog

log = logging.getLogger(__name__)

StatusHook = Callable[[str, str, bool], Awaitable[None]]
"""``(device_id, type_id, online)``."""

_DUMMY_HASH: Final = hash_secret("iotvault: no such credential")


@dataclass(slots=True)
class _Session:
    device_id: str | None  # None: iotvault's own account
    type_id: str
    used_hash: str
    valid_until_us: int | None  # set when the previous credential (in its grace period) was used


class DeviceAuthority:
    def __init__(
        self,
        store: SqlStore,
        *,
        service_password: str | None = None,
        events: SecurityEventLog | None = None,
        on_status: StatusHook | None = None,
        clock_us: Callable[[], int] = now_us,
    ) -> None:
        self._store = store
        self._service_password = service_password
        self._events = events
        self._on_status = on_status
        self._clock_us = clock_us
        self._sessions: dict[str, _Session] = {}
        self._online: set[str] = set()

    # ---- EmbeddedBroker hooks ----------------------------------------------------------------
    async def authenticate(self, client_id: str, username: str | None, password: str | None) -> bool:
        if username == SERVICE_USERNAME:
            return self._service_login(client_id, password)
        found = None
        if is_device_id(username) and password is not None:
            rows = await asyncio.to_thread(self._store.device_credentials, [str(username)])
            found = rows.get(str(username))
        secret = password if password is not None else ""
        current = found.credential_hash if found is not None and found.credential_hash else None
        previous = found.previous_credential_hash if found is not None else None
        now = self._clock_us()
        # Both checks always run, the same way, whatever exists.
        current_ok = verify_secret(secret, current or _DUMMY_HASH) and current is not None
        previous_ok = verify_secret(secret, previous or _DUMMY_HASH) and previous is not None
        grace_until = found.previous_expires_us if found is not None else None
        previous_ok = previous_ok and grace_until is not None and grace_until > now
        if found is None or client_id != username or not (current_ok or previous_ok):
            return False
        used = current if current_ok else previous
        assert used is not None  # noqa: S101 - one of the two matched
        self._sessions[client_id] = _Session(
            found.device_id, found.type_id, used, None if current_ok else grace_until
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

    async def authorize(self, client_id: str, username: str | None, topic: str, action: TopicAction) -> bool:
        session = self._sessions.get(client_id)
        if session is None:
            return False
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
        if session is None or session.device_id is None or self._on_status is None:
            return
        await self._on_status(session.device_id, session.type_id, connected)

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
        devices = {
            cid: s
            for cid in self._online
            if (s := self._sessions.get(cid)) is not None and s.device_id is not None
        }
        if not devices:
            return []
        rows = await asyncio.to_thread(
            self._store.device_credentials, sorted({str(s.device_id) for s in devices.values()})
        )
        now = self._clock_us()
        stale: list[str] = []
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
