"""What a node starts on the broker side, from the settings: composed beside :mod:`iotvault.node`.

=========================  ==================================================================
node                       broker side
=========================  ==================================================================
embedded, runs ingest      the embedded broker with device authentication, topic rules,
                           login throttling, security events and presence
                           (:class:`~iotvault.broker.authority.DeviceAuthority`); commands go
                           out through the broker itself
embedded, API only         commands go to the embedded broker of the ingest node, over MQTT,
                           as iotvault's service account
external (Mosquitto)       ingest subscribes as iotvault's account; with a dynamic-security
                           admin configured, that account and its role are made at start and
                           stale device accounts removed; commands go out as the same account
=========================  ==================================================================

iotvault's account: the user and password of ``IOTVAULT_BROKER_URL`` if it names one, else
``iotvault:service`` with a password kept in the database (:mod:`iotvault.commands.keys`) —
which the embedded broker and a dynamic-security bootstrap both know, so nothing needs
configuring.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any, Final

from iotvault.broker.acl import SERVICE_USERNAME
from iotvault.broker.authority import DeviceAuthority
from iotvault.broker.embedded import EmbeddedBroker, InboundPublish, Listener, PublishHook
from iotvault.broker.hooks import NOT_FORWARDED, Refused
from iotvault.broker.limits import BrokerLimits
from iotvault.broker.mosquitto_log import MosquittoLogWatcher
from iotvault.broker.mqtt5 import IMPLEMENTATION_SPECIFIC, PAYLOAD_FORMAT_INVALID, TOPIC_NAME_INVALID
from iotvault.broker.publisher import CommandPublisher
from iotvault.broker.security_log import SecurityEventLog
from iotvault.broker.throttle import LoginThrottle
from iotvault.broker.tls import client_context, server_context
from iotvault.broker.watson import WatsonApp, parse_client_id
from iotvault.commands.keys import broker_service_password
from iotvault.commands.service import CommandService
from iotvault.config import Settings
from iotvault.context import Context
from iotvault.domain.topics import CommandTopic, StatusTopic, parse_topic
from iotvault.errors import DeviceNotFoundError, TopicError, ValidationError
from iotvault.ingest.nodeid import ingest_client_id
from iotvault.ingest.pipeline import Inbound, IngestPipeline
from iotvault.ingest.subscriber import BrokerSubscriber

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], Awaitable[None]]

REVALIDATE_S: Final = 5.0
"""How often connected devices' credentials are re-checked against the registry."""

_ONLINE: Final = b'{"status":"connected"}'
_OFFLINE: Final = b'{"status":"disconnected"}'


@dataclass
class BrokerSide:
    broker: EmbeddedBroker | None  # the embedded broker, when this node runs it
    publish: Publish  # how this node sends a command
    authority: DeviceAuthority | None = None
    events: SecurityEventLog | None = None


async def start_broker_side(
    stack: AsyncExitStack,
    s: Settings,
    ctx: Context,
    pipeline: IngestPipeline | None,
    on_publish: PublishHook | None,
) -> BrokerSide:
    service_password = await asyncio.to_thread(broker_service_password, ctx.store, ctx.master)
    if s.broker.embedded:
        if pipeline is not None:
            return await _embedded(
                stack, s, ctx, pipeline, on_publish=on_publish, service_password=service_password
            )
        client_ssl = client_context(s.broker_ca_file) if main_port_tls(s) else None
        publisher = CommandPublisher(
            s.mqtt_host,
            s.mqtt_port,
            username=SERVICE_USERNAME,
            password=service_password,
            ssl_context=client_ssl,
        )
        stack.push_async_callback(publisher.close)
        return BrokerSide(None, publisher.publish)
    return await _external(stack, s, ctx, pipeline, service_password)


async def _embedded(
    stack: AsyncExitStack,
    s: Settings,
    ctx: Context,
    pipeline: IngestPipeline,
    *,
    on_publish: PublishHook | None,
    service_password: str,
) -> BrokerSide:
    events = await stack.enter_async_context(
        SecurityEventLog(
            ctx.store, window_s=s.security_events_window_s, retention_days=s.security_events_retention_days
        )
    )
    await asyncio.to_thread(ctx.store.mark_all_offline)  # nobody is connected to a new broker
    pending: set[asyncio.Future[object]] = set()

    running: list[EmbeddedBroker] = []  # set once the broker runs

    async def on_status(device_id: str, type_id: str, online: bool) -> None:
        # Not awaited: presence must not hold up connections behind a batch commit.
        topic = str(StatusTopic(type_id, device_id))
        message = Inbound(topic, _ONLINE if online else _OFFLINE, 0, False, None, "broker")
        tasks: list[asyncio.Future[object]] = [asyncio.ensure_future(pipeline.submit(message))]
        if running:  # and told to the applications that may read the device (Watson's .../mon)
            tasks.append(asyncio.ensure_future(_announce(running[0], topic, online)))
        for task in tasks:
            pending.add(task)
            task.add_done_callback(pending.discard)

    org_id = await asyncio.to_thread(lambda: ctx.org_id)  # made once and kept, when not set
    authority = DeviceAuthority(
        ctx.store,
        service_password=service_password,
        events=events,
        on_status=on_status,
        org_id=org_id,
        accounts=ctx,
    )
    commands: list[CommandService] = []  # the broker's own, made once the broker runs

    def send_command(message: InboundPublish, topic: CommandTopic) -> Awaitable[object]:
        return _app_command(ctx, commands[0], events, message, topic)

    hook = _presence_is_the_brokers(on_publish) if on_publish is not None else None
    tls = server_context(s.mqtt_tls_cert_file, s.mqtt_tls_key_file) if s.mqtt_tls_cert_file else None
    broker = await stack.enter_async_context(
        EmbeddedBroker(
            s.mqtt_host,
            s.mqtt_port,
            on_publish=_app_commands_to_service(hook, send_command) if hook is not None else None,
            authenticate=authority.authenticate,
            authorize=authority.authorize,
            on_connection=authority.on_connection,
            on_denied=authority.on_denied,
            throttle=LoginThrottle(),
            max_packet_size=s.mqtt_max_packet_bytes,
            limits=broker_limits(s),
            ssl=tls if main_port_tls(s) else None,
            listeners=further_listeners(s, tls),
        )
    )

    async def settle_presence() -> None:
        if pending:
            await asyncio.wait(set(pending), timeout=5.0)

    stack.push_async_callback(settle_presence)
    running.append(broker)
    commands.append(CommandService(ctx, broker.publish, default_expiry_s=s.command_expiry_s))
    await _background(stack, authority.keep_checking(broker, REVALIDATE_S), "iotvault-sessions")
    return BrokerSide(broker, broker.publish, authority, events)


def _presence_is_the_brokers(on_publish: PublishHook) -> PublishHook:
    """A connected device's own "disconnected" status message is acknowledged, not applied.

    On the embedded broker presence comes from the connection itself (``on_connection``), and
    a device that publishes is, by definition, connected: its claim to be offline would only
    make it look offline while it is connected (a device's will reaches presence through the
    broker, not through this hook).
    """

    def hook(p: InboundPublish) -> Awaitable[object]:
        if p.topic.endswith("/mon") and b"disconnected" in p.payload and _is_status_topic(p.topic):
            log.debug("MQTT client %r: its own 'disconnected' status ignored while connected", p.client_id)
            done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        return on_publish(p)

    return hook


async def _announce(broker: EmbeddedBroker, topic: str, online: bool) -> object:
    """A device's connection or disconnection on its status topic, for applications (QoS 0).

    Watson's keys (``Action``, ``Time``) beside iotvault's ``status``; the broker's RECEIVE check
    lets only readers of the device have it (devices never receive status topics).
    """
    notice = {
        "status": "connected" if online else "disconnected",
        "Action": "Connect" if online else "Disconnect",
        "Time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    try:
        await broker.publish(topic, json.dumps(notice, separators=(",", ":")).encode(), qos=0)
    except (RuntimeError, ValueError, OSError) as exc:  # stopping: presence is informational
        log.debug("status of %s not announced: %s", topic, exc)
    return None


def _app_commands_to_service(
    on_publish: PublishHook, send: Callable[[InboundPublish, CommandTopic], Awaitable[object]]
) -> PublishHook:
    """A Watson application's command goes through iotvault's commands service, never past it.

    The broker authorized it already (the policy: a writer of that device); the service signs,
    records and audits it like a command sent through the REST API, or hands its bytes on as
    they are to a device with unsigned delivery, and publishes it on the device's topic. The
    application's own message is acknowledged and forwarded to nobody.
    """

    def hook(p: InboundPublish) -> Awaitable[object]:
        if not isinstance(parse_client_id(p.client_id), WatsonApp):
            return on_publish(p)
        topic = parse_topic(p.topic)  # authorized: a command topic
        if not isinstance(topic, CommandTopic):
            raise TopicError(p.topic, "an application publishes only commands")
        return send(p, topic)

    return hook


async def _app_command(
    ctx: Context,
    commands: CommandService,
    events: SecurityEventLog,
    p: InboundPublish,
    topic: CommandTopic,
) -> object:
    """Send an application's command, or refuse it for good (:class:`Refused`).

    A command that can never be sent — QoS 2 or retained, for no device of that type, not what
    the device accepts (anything but a JSON object on ``fmt/json`` for a device that takes only
    signed commands: iotvault signs JSON documents, never an application's bytes) — is answered
    all the same (MQTT 5: with a reason code) and recorded as a ``command_refused`` security
    event: dropping the connection unanswered would make a QoS 1 sender resend it forever. A
    failure that may pass (the database, the broker) still withholds the acknowledgement.
    """
    api_key = p.username or ""

    def refuse(code: int, reason: str, **detail: str) -> Refused:
        events.record(
            "command_refused",
            f"api_key:{api_key}",
            action="publish",
            reason=reason,
            topic=p.topic[:256],
            clientId=p.client_id[:128],
            deviceId=topic.device_id,
            command=topic.command,
            format=topic.fmt,
            **detail,
        )
        log.info("command from application key %r on %r refused: %s", api_key, p.topic, reason)
        return Refused(code, reason)

    if p.qos == 2 or p.retain:
        return refuse(IMPLEMENTATION_SPECIFIC, "a command is sent with QoS 0 or 1, not retained")
    device = await asyncio.to_thread(ctx.store.get_device, topic.device_id)
    if device is None or device.type_id != topic.type_id:
        return refuse(TOPIC_NAME_INVALID, "no such device of that type")
    try:
        record = await commands.send_message(
            topic.device_id, topic.command, topic.fmt, p.payload, sent_by=f"api_key:{api_key}"
        )
    except DeviceNotFoundError:  # deleted meanwhile
        return refuse(TOPIC_NAME_INVALID, "no such device of that type")
    except ValidationError as exc:
        return refuse(PAYLOAD_FORMAT_INVALID, exc.reason[:200], delivery=device.command_delivery)
    log.info("command %s to %r sent for application key %r", record.command_id, topic.device_id, api_key)
    return NOT_FORWARDED


def _is_status_topic(topic: str) -> bool:
    try:
        return isinstance(parse_topic(topic), StatusTopic)
    except TopicError:
        return False


def main_port_tls(s: Settings) -> bool:
    """Whether the embedded broker's ``mqtt_port`` serves TLS: a certificate, and no TLS port."""
    return bool(s.mqtt_tls_cert_file) and not s.mqtt_tls_port


def further_listeners(s: Settings, tls: ssl.SSLContext | None) -> list[Listener]:
    """MQTT over TLS on ``mqtt_tls_port``, over WebSocket on ``mqtt_ws_port`` (TLS with a certificate)."""
    listeners = []
    if s.mqtt_tls_port and tls is not None:
        listeners.append(Listener(s.mqtt_tls_port, tls, setting="IOTVAULT_MQTT_TLS_PORT"))
    if s.mqtt_ws_port:
        listeners.append(Listener(s.mqtt_ws_port, tls, websocket=True, setting="IOTVAULT_MQTT_WS_PORT"))
    return listeners


def broker_limits(s: Settings) -> BrokerLimits:
    """The embedded broker's limits from the settings."""
    return BrokerLimits(
        max_connections=s.mqtt_max_connections,
        max_connections_per_address=s.mqtt_max_connections_per_address,
        max_pending_connects=s.mqtt_max_pending_connects,
        connect_timeout_s=s.mqtt_connect_timeout_s,
        max_inflight=s.mqtt_max_inflight,
        max_retained=s.mqtt_max_retained,
        max_retained_bytes=s.mqtt_max_retained_bytes,
        log_lines_per_connection=s.mqtt_log_lines_per_connection,
    )


async def _background(stack: AsyncExitStack, coro: Coroutine[Any, Any, None], name: str) -> None:
    """Run ``coro`` until the stack unwinds."""
    task = asyncio.create_task(coro, name=name)

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(stop)


async def _external(
    stack: AsyncExitStack, s: Settings, ctx: Context, pipeline: IngestPipeline | None, service_password: str
) -> BrokerSide:
    b = s.broker
    client_ssl: ssl.SSLContext | None = client_context(s.broker_ca_file) if b.tls else None
    accounts = ctx.device_accounts
    if b.username:
        username, password = b.username, b.password or ""
    elif accounts is not None:
        username, password = SERVICE_USERNAME, service_password
    else:
        username, password = "", ""  # an open broker: connect without credentials, as before
    bootstrap = getattr(accounts, "bootstrap", None)
    if pipeline is not None and bootstrap is not None:
        await bootstrap(username, password)
        reconcile = getattr(accounts, "reconcile", None)
        if reconcile is not None:
            await reconcile(await asyncio.to_thread(ctx.store.device_ids))
    if pipeline is not None and s.broker_log_file:
        events = await stack.enter_async_context(SecurityEventLog(ctx.store))
        watcher = MosquittoLogWatcher(s.broker_log_file, events)
        await _background(stack, watcher.run(), "iotvault-mosquitto-log")
    if pipeline is not None:
        address = replace(b, username=username or None, password=password or None)
        await stack.enter_async_context(
            BrokerSubscriber(
                address,
                pipeline,
                client_id=ingest_client_id(s),
                share_group=s.ingest_share_group,
                ssl_context=client_ssl,
            )
        )
    if not username:
        log.warning("commands: the broker %s is used without credentials", b.display)
    publisher = CommandPublisher(b.host, b.port, username=username, password=password, ssl_context=client_ssl)
    stack.push_async_callback(publisher.close)
    return BrokerSide(None, publisher.publish)
