"""Mosquitto 2 as iotvault's broker: device accounts through the dynamic-security plugin.

When ``IOTVAULT_BROKER_URL`` names an external broker and ``broker_admin_username`` /
``broker_admin_password`` name a dynamic-security admin (``mosquitto_ctrl dynsec init``), the
broker follows the registry at once: registering a device creates its broker client
(username = client id = deviceId, the device's credential as password) with a role of its own
that allows exactly the contract's topics (:func:`device_role_acls`, the same rules as
:mod:`iotvault.broker.acl`); rotating a credential sets the new password; revoking disables the
client; deleting a device deletes its client and role. The commands are JSON published to
``$CONTROL/dynamic-security/v1`` over a short connection as the admin; answers are matched by
``correlationData`` on ``$CONTROL/dynamic-security/v1/response``.

At start, :meth:`DynsecAccounts.bootstrap` makes iotvault's own account (``iotvault:service``,
or the user of the broker URL) with the role ``iotvault-service``: subscribe to and receive
every device's events and status, publish commands, nothing else; it sets the plugin's default
ACL access to deny publishing, receiving and subscribing, so that only roles grant anything;
and it removes device clients whose device is no longer registered (a deletion made while the
broker was unreachable).

What Mosquitto 2.0 does differently from the embedded broker (measured on 2.0.11):

- One password per client. Setting a new one disconnects the client ("disconnected by
  administrative action") and the old password stops working at once: with Mosquitto a
  credential rotation takes effect immediately, whatever grace period was asked for.
- Under MQTT 3.1.1 a refused PUBLISH is still acknowledged, then dropped (MQTT 5 clients get
  reason code 0x87); a refused SUBSCRIBE gets 0x80. The plugin reports neither; Mosquitto logs
  "Denied PUBLISH from …" and "Client <unknown> disconnected, not authorised." (``log_type
  all``), which :mod:`iotvault.broker.mosquitto_log` turns into security events.
- The plugin stores password hashes (PBKDF2-SHA512) in its own JSON file; the plaintext only
  crosses the admin connection, which should therefore be TLS unless it is on localhost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from collections.abc import Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import gmqtt
from gmqtt.mqtt.constants import MQTTv311

from iotvault.broker.acl import SERVICE_USERNAME, device_prefix, is_device_id
from iotvault.broker.service_login import ServiceLogin
from iotvault.domain.topics import EVENT_FILTER, PREFIX, STATUS_FILTER
from iotvault.errors import BrokerAdminError, BrokerUnavailableError

log = logging.getLogger(__name__)

CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = f"{CONTROL_TOPIC}/response"
DEVICE_ROLE_PREFIX: Final = "iotvault-device-"
SERVICE_ROLE: Final = "iotvault-service"
COMMAND_FILTER: Final = f"{PREFIX}/type/+/id/+/cmd/+/fmt/json"
_NO_RECONNECT: Final = -2

T = TypeVar("T")


def device_role(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def device_role_acls(type_id: str, device_id: str) -> list[dict[str, Any]]:
    """Publish own events and status; subscribe to, and receive, own commands. Nothing else."""
    p = device_prefix(type_id, device_id)
    return [
        {"acltype": "publishClientSend", "topic": f"{p}evt/+/fmt/+", "allow": True},
        {"acltype": "publishClientSend", "topic": f"{p}mon", "allow": True},
        {"acltype": "subscribePattern", "topic": f"{p}cmd/+/fmt/json", "allow": True},
        {"acltype": "publishClientReceive", "topic": f"{p}cmd/+/fmt/json", "allow": True},
    ]


SERVICE_ACLS: Final = [
    {"acltype": "subscribePattern", "topic": EVENT_FILTER, "allow": True},
    {"acltype": "publishClientReceive", "topic": EVENT_FILTER, "allow": True},
    {"acltype": "subscribePattern", "topic": STATUS_FILTER, "allow": True},
    {"acltype": "publishClientReceive", "topic": STATUS_FILTER, "allow": True},
    {"acltype": "publishClientSend", "topic": COMMAND_FILTER, "allow": True},
    # ingest nodes in a share group (IOTVAULT_INGEST_SHARE_GROUP): Mosquitto checks the whole
    # $share/<group>/… filter against the ACL
    {"acltype": "subscribePattern", "topic": f"$share/+/{EVENT_FILTER}", "allow": True},
    {"acltype": "subscribePattern", "topic": f"$share/+/{STATUS_FILTER}", "allow": True},
]

DEFAULT_ACCESS: Final = [
    {"acltype": "publishClientSend", "allow": False},
    {"acltype": "publishClientReceive", "allow": False},
    {"acltype": "subscribe", "allow": False},
    {"acltype": "unsubscribe", "allow": True},
]


@dataclass(frozen=True, slots=True)
class Response:
    command: str
    error: str | None
    data: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.error is None


class DynsecClient(ServiceLogin):
    """Runs dynamic-security commands over one short admin connection per batch."""

    async def execute(self, commands: list[dict[str, Any]]) -> list[Response]:
        """Send ``commands`` in one message; return the plugin's answers, in order."""
        tag = secrets.token_hex(8)
        tagged = [{**c, "correlationData": f"{tag}:{i}"} for i, c in enumerate(commands)]
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        subscribed: asyncio.Future[None] = loop.create_future()

        def on_message(_c: Any, _topic: str, payload: bytes, _qos: int, _props: Any) -> int:
            try:
                responses = json.loads(payload).get("responses", [])
            except (ValueError, AttributeError):
                return 0
            mine = [r for r in responses if str(r.get("correlationData", "")).startswith(f"{tag}:")]
            if mine and not answer.done():
                answer.set_result(mine)
            return 0

        def on_subscribe(*_args: Any) -> None:
            if not subscribed.done():
                subscribed.set_result(None)

        client = gmqtt.Client(
            f"iotvault:dynsec:{tag}", clean_session=True, logger=logging.getLogger("iotvault.broker.mqtt")
        )
        client.set_config({"reconnect_retries": _NO_RECONNECT})
        client.set_auth_credentials(self._username, self._password)
        client.on_message = on_message
        client.on_subscribe = on_subscribe
        try:
            async with asyncio.timeout(self._timeout_s):
                await client.connect(self._host, self._port, ssl=self._ssl or False, version=MQTTv311)
                client.subscribe(RESPONSE_TOPIC, qos=1)
                await subscribed
                client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}), qos=1)
                raw = await answer
        except gmqtt.MQTTConnectError as exc:
            raise BrokerAdminError("the admin login", f"refused by {self.display} ({exc})") from None
        except (OSError, TimeoutError) as exc:
            raise BrokerUnavailableError(
                self.display, str(exc) or "no answer from dynamic security"
            ) from None
        finally:
            try:
                async with asyncio.timeout(2.0):
                    await client.disconnect()
            except (OSError, TimeoutError, AttributeError):
                log.debug("dynsec: admin connection already gone")
        by_index = {str(r.get("correlationData")): r for r in raw}
        out = []
        for i, c in enumerate(commands):
            r = by_index.get(f"{tag}:{i}", {"error": "no response"})
            data = r.get("data")
            out.append(Response(c["command"], r.get("error"), data if isinstance(data, dict) else {}))
        return out

    def run(self, commands: list[dict[str, Any]]) -> list[Response]:
        """:meth:`execute` for synchronous callers (the command line, API worker threads)."""
        return run_sync(self.execute(commands))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running loop's thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list[T] = []
    failure: list[BaseException] = []

    def worker() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            failure.append(exc)

    thread = threading.Thread(target=worker, name="iotvault-dynsec")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _expect(responses: list[Response], *, tolerate: Collection[str] = ()) -> None:
    for r in responses:
        if r.error is not None and not any(t in r.error for t in tolerate):
            raise BrokerAdminError(r.command, r.error)


class DynsecAccounts:
    """Device accounts on Mosquitto, kept in step with the registry (the devices service's hook)."""

    def __init__(self, client: DynsecClient) -> None:
        self.client = client

    # ---- the registry's hook (synchronous) ---------------------------------------------------
    def device_registered(self, device_id: str, type_id: str, credential: str) -> None:
        answers = self.client.run(self._create_commands(device_id, type_id, credential))
        _expect(answers[:2], tolerate=["not found"])  # nothing left over to remove: fine
        _expect(answers[2:])

    def credential_rotated(self, device_id: str, type_id: str, credential: str) -> None:
        answers = self.client.run(
            [
                {"command": "setClientPassword", "username": device_id, "password": credential},
                {"command": "enableClient", "username": device_id},
            ]
        )
        if answers[0].error and "not found" in answers[0].error.lower():
            log.warning("dynsec: device %s had no broker account; creating it", device_id)
            self.device_registered(device_id, type_id, credential)
            return
        _expect(answers)

    def credential_revoked(self, device_id: str) -> None:
        _expect(
            self.client.run([{"command": "disableClient", "username": device_id}]), tolerate=["not found"]
        )

    def device_deleted(self, device_id: str) -> None:
        _expect(self.client.run(self._delete_commands(device_id)), tolerate=["not found"])

    @staticmethod
    def _create_commands(device_id: str, type_id: str, credential: str) -> list[dict[str, Any]]:
        # A leftover client or role of the same name (a deletion that did not reach the
        # broker) is removed first, so the new device inherits nothing from it.
        role = device_role(device_id)
        return [
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": role},
            {"command": "createRole", "rolename": role, "acls": device_role_acls(type_id, device_id)},
            {
                "command": "createClient",
                "username": device_id,
                "password": credential,
                "clientid": device_id,
                "textname": f"iotvault device {type_id}/{device_id}",
                "roles": [{"rolename": role}],
            },
        ]

    @staticmethod
    def _delete_commands(device_id: str) -> list[dict[str, Any]]:
        return [
            {"command": "deleteClient", "username": device_id},
            {"command": "deleteRole", "rolename": device_role(device_id)},
        ]

    # ---- at start ----------------------------------------------------------------------------
    async def bootstrap(self, service_username: str, service_password: str) -> None:
        """iotvault's own account and role, deny-by-default access."""
        commands: list[dict[str, Any]] = [
            {"command": "setDefaultACLAccess", "acls": DEFAULT_ACCESS},
            {"command": "createRole", "rolename": SERVICE_ROLE, "textname": "iotvault's own clients"},
        ]
        commands += [{"command": "addRoleACL", "rolename": SERVICE_ROLE, **acl} for acl in SERVICE_ACLS]
        answers = await self.client.execute(commands)
        _expect(answers, tolerate=["already exists"])
        created = await self.client.execute(
            [
                {
                    "command": "createClient",
                    "username": service_username,
                    "password": service_password,
                    "textname": "iotvault ingest and commands",
                    "roles": [{"rolename": SERVICE_ROLE}],
                }
            ]
        )
        if created[0].error and "already exists" in created[0].error:
            # Another start (a restart, a second node) made the account: update its password and
            # give it the role only if it lacks it — Mosquitto 2.0 answers "Internal error", not
            # "already has", to adding a role a client holds.
            (found,) = await self.client.execute([{"command": "getClient", "username": service_username}])
            _expect([found])
            roles = found.data.get("client", {}).get("roles", [])
            has_role = any(isinstance(r, dict) and r.get("rolename") == SERVICE_ROLE for r in roles)
            commands = [
                {"command": "setClientPassword", "username": service_username, "password": service_password},
                {"command": "enableClient", "username": service_username},
            ]
            if not has_role:
                commands.insert(
                    1, {"command": "addClientRole", "username": service_username, "rolename": SERVICE_ROLE}
                )
            answers = await self.client.execute(commands)
            _expect(answers, tolerate=["already has"])
        else:
            _expect(created)

    async def reconcile(self, registered: Collection[str]) -> tuple[list[str], list[str]]:
        """Remove device clients whose device is gone; list devices that have no client.

        Only clients holding an ``iotvault-device-…`` role are considered, so other clients of
        a shared broker are left alone. A registered device without a client can only get one
        with a new credential (``iotvault devices rotate-credential``): the broker needs the
        password itself, which iotvault never keeps.
        """
        answers = await self.client.execute([{"command": "listClients", "verbose": True}])
        _expect(answers)
        ours: set[str] = set()
        for c in answers[0].data.get("clients", []):
            username = c.get("username")
            roles = {r.get("rolename") for r in c.get("roles", [])}
            if is_device_id(username) and device_role(str(username)) in roles:
                ours.add(str(username))
        known = set(registered)
        gone = sorted(ours - known)
        missing = sorted(known - ours)
        if gone:
            commands = [cmd for d in gone for cmd in self._delete_commands(d)]
            _expect(await self.client.execute(commands), tolerate=["not found"])
            log.warning("dynsec: removed broker accounts of %d deleted devices", len(gone))
        if missing:
            log.warning(
                "dynsec: %d registered devices have no broker account (e.g. %s); "
                "give them a new credential with 'iotvault devices rotate-credential'",
                len(missing),
                ", ".join(missing[:5]),
            )
        return gone, missing


__all__ = [
    "CONTROL_TOPIC",
    "SERVICE_ROLE",
    "SERVICE_USERNAME",
    "DynsecAccounts",
    "DynsecClient",
    "Response",
    "device_role_acls",
    "run_sync",
]
