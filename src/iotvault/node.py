"""One iotvault node: HTTP server, ingest, and (when configured) the embedded broker.

Every part is an async context manager entered in order on an :class:`~contextlib.AsyncExitStack`
and left in reverse order, so a failure at start (port taken, broker unreachable) unwinds what
was already started and reaches the command line as one :class:`~iotvault.errors.IotVaultError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import math
import random
import signal
import socket
import sys
from collections.abc import Callable, Generator
from contextlib import AsyncExitStack
from enum import StrEnum
from functools import partial
from typing import Any

import uvicorn

from iotvault.api.app import create_app
from iotvault.api.ratelimit import RateLimiter
from iotvault.api.readcache import EventDocCache, PrincipalCache, deaf
from iotvault.api.services import ApiServices, EventNotifier, watch_changes
from iotvault.api.slowclients import MAX_HEADER_BYTES, guarded_protocol
from iotvault.apiprocs import ApiProcesses
from iotvault.audit.node import AuditService
from iotvault.auth.keys import RemoteJwks
from iotvault.auth.policy import Principal
from iotvault.auth.tokens import IssuerConfig, TokenVerifier
from iotvault.broker.embedded import EmbeddedBroker, InboundPublish
from iotvault.broker.security_log import SecurityEventLog
from iotvault.commands.service import CommandService
from iotvault.config import Settings
from iotvault.context import Context, open_context
from iotvault.errors import DatabaseUnavailableError, PortInUseError
from iotvault.fanout import Fanout
from iotvault.health import Failing, Phase, Readiness
from iotvault.identity import Identity
from iotvault.ingest.pipeline import Inbound, IngestPipeline, Outcome
from iotvault.metrics import SNAPSHOT_EVERY_S, Metrics, SnapshotFile
from iotvault.storage.audit import AuditStore
from iotvault.wiring import start_broker_side

log = logging.getLogger(__name__)


GC_THRESHOLD = (20_000, 20, 20)
"""Collector thresholds of a serving process (Python's default: 700, 10, 10).

Ingest keeps tens of thousands of small objects alive for the tens of milliseconds a batch
takes to commit: they survive the young generations and, with the default thresholds, trigger
a full collection of the whole heap every few thousand events. With these thresholds, and the
start-up objects frozen out of the collector's sight, ingest uses clearly less CPU per event
(BENCHMARKS.md, "Measurements behind choices in the code"). Reference cycles are still
collected, only less often; memory over a 10-minute run stays flat.
"""


def tune_gc_for_serving() -> None:
    """Set :data:`GC_THRESHOLD` and freeze what start-up made: for ``iotvault serve`` only.

    A process-wide decision, so the command that owns the process makes it, once the node is
    up (the objects made by imports and start-up live as long as the process).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def set_switch_interval(ms: float) -> None:
    """How long a thread may keep the interpreter lock another asks for (``switch_interval_ms``):
    for ``iotvault serve`` only, once the node is up.

    The event loop and the ingest and audit writers' threads share one lock. A writer that let
    go of it (for its database) waits for the loop to be made to hand it back, after Python's
    5 ms by default: while the API was busy, one process's ingest fell to 1,804 to 2,045 of 5,000
    events/s with ``/healthz`` hammered. At 1 ms it kept 4,918 to 5,058, and the last-50 read's
    p99 under ingest went from 19 to 38 ms to 16 to 18 ms (BENCHMARKS.md, issue 17, round 5).
    """
    sys.setswitchinterval(ms / 1000.0)


def loop_factory(s: Settings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop for ``iotvault serve`` (``IOTVAULT_EVENT_LOOP``), else asyncio's.

    uvloop (libuv) runs the same asyncio programs with less work per callback and per socket
    read, which every HTTP request, MQTT packet and worker-thread hand-over pays (BENCHMARKS.md,
    issue 17). Where it is not installed (Windows) asyncio's own loop is used.
    """
    if s.event_loop != "uvloop":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional on some platforms
    except ImportError:
        log.warning("uvloop is not installed: using asyncio's event loop")
        return None
    return uvloop.new_event_loop


class Role(StrEnum):
    ALL = "all"
    API = "api"
    INGEST = "ingest"


POOL_SIZES: dict[Role, int] = {Role.API: 10, Role.INGEST: 4, Role.ALL: 12}
"""Database connections a node keeps open, by role (``IOTVAULT_DATABASE_POOL_SIZE`` overrides).

API: the device-data reads (``READ_THREADS``, 4), authentication lookups and administration
in worker threads (a few at once), the audit writer and the readiness check. Ingest: the batch
writer and its housekeeping (one thread), the audit writer, the readiness check, the broker's
device lookups. All: both. Busy moments open up to ``IOTVAULT_DATABASE_POOL_OVERFLOW`` (5) more
for a while; a PostgreSQL server must allow the sum over the nodes (``max_connections``).
"""


def pool_size(role: Role) -> int:
    return POOL_SIZES[role]


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the node owns shutdown."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_socket(host: str, port: int, setting: str, *, reuse_port: bool = False) -> socket.socket:
    """A listening socket, inheritable; a taken port raises :class:`PortInUseError` (one line).

    ``reuse_port``: one of several sockets on the port (``SO_REUSEPORT``, only processes of
    the same user can join), among which the kernel spreads new connections
    (:mod:`iotvault.apiprocs`); bound but not yet listening: it joins them when the process it
    is for starts serving on it, so that no connection waits for a process still starting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto is TCP, and
    # a connection accepted here carries this socket's proto. Without it each keep-alive
    # response waited for the client's delayed ACK (Nagle), a few dozen requests/s a
    # connection at most (BENCHMARKS.md).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            raise PortInUseError(host, port, setting) from None
        raise
    if not reuse_port:
        sock.listen(2048)
    # a socket for one child is passed to it alone (pass_fds): an inheritable one would go to
    # every process started after it (uvloop's spawn closes nothing), and a dead child's
    # socket would then go on taking connections in another child that never accepts them
    sock.set_inheritable(not reuse_port)
    return sock


def build_verifier(s: Settings, identity: Identity | None = None) -> TokenVerifier | None:
    """The issuers whose access tokens the API accepts.

    The built-in OpenID Connect provider (``identity``): issuer ``IOTVAULT_PUBLIC_URL``, audience
    ``<public URL>/iotf`` (:func:`iotvault.identity.api_audience`), its own signing keys, and its
    revocations honoured (:class:`~iotvault.identity.ProviderVerifier`). And an external issuer
    when ``IOTVAULT_OIDC_EXTERNAL_ISSUER`` is set.
    """
    issuers = []
    if s.oidc_external_issuer:
        issuers.append(
            IssuerConfig(
                issuer=s.oidc_external_issuer,
                audience=s.oidc_external_audience,
                keys=RemoteJwks(s.oidc_external_issuer),
                groups_claim=s.oidc_external_groups_claim,
            )
        )
    if identity is not None:
        return identity.api_verifier(issuers)
    return TokenVerifier(issuers) if issuers else None


def http_limits(s: Settings) -> dict[str, Any]:
    """uvicorn's bounds on slow and idle clients (README, "Health and readiness"), and whom it
    believes about the client's address.

    ``timeout_keep_alive`` closes a connection idle between requests; ``limit_concurrency``
    answers 503 beyond that many connections and running requests, so idle sockets cannot
    take every slot. The deadline for a request's headers is :class:`~iotvault.api.slowclients`'s.
    ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are read only from ``IOTVAULT_TRUSTED_PROXIES``
    (none by default), never from uvicorn's default (loopback) or its ``FORWARDED_ALLOW_IPS``: any
    process on the machine could otherwise choose the address the rate limits, lockouts and the
    audit log see.
    """
    proxies = s.trusted_proxy_list
    return {
        "timeout_keep_alive": max(1, math.ceil(s.http_idle_timeout_s)),
        "limit_concurrency": s.http_max_connections,
        "h11_max_incomplete_event_size": MAX_HEADER_BYTES,
        "proxy_headers": bool(proxies),
        "forwarded_allow_ips": proxies,
    }


class Node:
    def __init__(
        self,
        settings: Settings,
        role: Role = Role.ALL,
        *,
        http_sock: socket.socket | None = None,
        api_processes: ApiProcesses | None = None,
    ) -> None:
        self.settings = settings
        self.role = role
        # an HTTP socket bound by the parent (``serve --api-processes``): served, never re-bound
        self._http_sock = http_sock
        # this node's HTTP children, started once it is up, stopped before anything else
        self.api_processes = api_processes
        self.metrics = Metrics()
        self.ctx: Context | None = None
        self.pipeline: IngestPipeline | None = None
        self.broker: EmbeddedBroker | None = None
        self._ready = False
        self._stop = asyncio.Event()
        self._main: asyncio.Task[Any] | None = None
        self.notifier = EventNotifier()
        self._fanout: Fanout | None = None
        self.readiness: Readiness | None = None
        # iotvault.api.readcache: emptied on every change of access and deletion, on every node
        self.principals: PrincipalCache[Principal] = PrincipalCache(settings.auth_cache_ttl_s)
        self.event_docs = EventDocCache(
            settings.read_cache_mib * 2**20, settings.key_cache_ttl_s, trust_s=settings.page_trust_ms / 1000
        )
        self._access_changed: Callable[[], None] = self.principals.clear

    def _share_metrics(self, stack: AsyncExitStack) -> None:
        """The ``--api-processes`` parent's figures (ingest), for its children's ``/metrics``."""
        snapshots = SnapshotFile(self.settings.data_dir)

        async def write_forever() -> None:
            while True:
                try:  # a few kB, unsynced: on the loop, so that no write outlives the node
                    snapshots.write(self.metrics)
                except OSError as exc:  # a full disk: the scrape shows the last one a while
                    log.warning("could not share the ingest metrics with the API processes: %s", exc)
                await asyncio.sleep(SNAPSHOT_EVERY_S)

        task = asyncio.create_task(write_forever(), name="iotvault-metrics-snapshot")
        stack.callback(snapshots.remove)
        stack.callback(task.cancel)

    def _committed(self, device_ids: set[str]) -> None:
        """The pipeline committed events of these devices: wake the streams here and elsewhere."""
        self.notifier.notify(device_ids)
        if self._fanout is not None:
            self._fanout.publish(device_ids)

    def stop(self) -> None:
        """Ask the node to stop; during start-up this cancels the start-up itself."""
        if self.api_processes is not None:
            self.api_processes.stopping()  # its children got the signal too: no restarts
        self._stop.set()
        if not self._ready and self._main is not None:
            self._main.cancel()

    def is_ready(self) -> bool:
        return self._ready

    def failing(self) -> list[Failing]:
        """What keeps this node from being ready now (``/readyz``); empty when ready."""
        if self.readiness is None:
            return [Failing("node", Phase.READY.value if self._ready else Phase.STARTING.value)]
        return self.readiness.failing()

    async def _open_context(self) -> Context:
        """Open the database, waiting for it with backoff unless ``startup_fail_fast`` is set.

        An orchestrator often starts iotvault before its database answers (or restarts both at
        once): waiting is then the useful thing to do. Each attempt logs one line; a stop
        request (SIGTERM) ends the wait, as it ends any start-up.
        """
        s = self.settings
        delay, attempt = 1.0, 1
        while True:
            try:
                return await asyncio.to_thread(partial(open_context, s, pool_size=pool_size(self.role)))
            except DatabaseUnavailableError as exc:
                if s.startup_fail_fast:
                    raise
                log.warning(
                    "start-up: database not available (attempt %d: %s); retrying in %.0fs "
                    "(set IOTVAULT_STARTUP_FAIL_FAST=true to exit instead)",
                    attempt,
                    exc.reason,
                    delay,
                )
            await asyncio.sleep(delay * (0.75 + random.random() / 2))  # noqa: S311 - jitter, not a secret
            delay, attempt = min(delay * 2, 30.0), attempt + 1

    async def _shut_down(
        self, svc: ApiServices | None, server: _Server | None, server_task: asyncio.Task[None] | None
    ) -> None:
        """Stop in the order that loses nothing and waits for nobody (issue 18, finding 3).

        1. not ready: load balancers stop sending work here;
        2. ingest stops acknowledging: a message arriving now stays with its sender (or the
           broker's session) for the next node, rather than being acknowledged by a node that
           is going away; batches already cut still commit and are answered;
        3. live streams (SSE) end, woken at once;
        4. the HTTP server stops with a bounded grace (``http_shutdown_grace_s``), after which
           what still runs is cancelled.

        The rest (broker side, pipeline, database) is left by the exit stack, in reverse order.
        """
        self._ready = False
        if self.readiness is not None:
            self.readiness.phase = Phase.STOPPING
        if self.pipeline is not None:
            self.pipeline.stop_intake()
        if svc is not None:
            svc.stopping.set()
            self.notifier.wake_all()
        if server is not None and server_task is not None:
            server.should_exit = True
            grace = self.settings.http_shutdown_grace_s + 2.0  # uvicorn's own bound, then ours
            try:
                await asyncio.wait_for(asyncio.shield(server_task), grace)
            except TimeoutError:
                log.warning("HTTP server still stopping after %.0fs; forcing it", grace)
                server.force_exit = True
                server_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server_task
            except asyncio.CancelledError:
                pass

    def _embedded_hook(self, p: InboundPublish) -> asyncio.Future[Outcome]:
        # The pipeline's own future (what ``submit`` awaits), not a coroutine: the broker then
        # needs no task per message to run the hook (iotvault.broker.embedded, PublishHook).
        assert self.pipeline is not None  # noqa: S101 - the broker starts after the pipeline
        return self.pipeline.enqueue(
            Inbound(p.topic, p.payload, p.qos, p.dup, p.packet_id if p.qos else None, p.client_id)
        )

    async def _audit_service(self, ctx: Context) -> AuditService:
        """The audit log's writer, alerts and webhook, and the record of this start."""
        audit = await asyncio.to_thread(lambda: ctx.audit)  # its signing key may be made now
        store = AuditStore(ctx.engine, self.settings.effective_database_url)
        return AuditService(audit, store, self.settings, self.role.value, self.metrics)

    async def _start_shared(self, stack: AsyncExitStack, ctx: Context) -> None:
        """The audit service, and wake-ups for the live streams of every node (iotvault.fanout)."""
        s = self.settings
        await stack.enter_async_context(await self._audit_service(ctx))
        fanout = Fanout.for_settings(
            s.redis_url,
            s.database_url,
            self.notifier.notify,
            self.notifier.wake_all,
            self._forget_here,
            access_changed=self.principals.clear,
            data_dir=s.data_dir,
        )
        if fanout is not None:
            self._fanout = await stack.enter_async_context(fanout)
            fanout.start()
            self.event_docs.hearing = fanout.hearing  # pages are believed only while it listens
            stack.callback(setattr, self.event_docs, "hearing", deaf)
        self._access_changed = watch_changes(ctx, self.principals, self.event_docs, self._fanout)
        stack.callback(setattr, ctx.keyring, "on_forget", None)
        stack.callback(setattr, ctx.accounts, "on_change", None)

    def _forget_here(self, device_ids: set[str]) -> None:
        """Another node deleted these devices: their keys and cached type go from this one now."""
        self.event_docs.forget(device_ids)
        if self.ctx is not None:
            for d in device_ids:
                self.ctx.keyring.forget_here(d)
        if self.pipeline is not None:
            self.pipeline.forget_devices(device_ids)

    async def _start_pipelines(self, stack: AsyncExitStack, ctx: Context) -> IngestPipeline | None:
        """The ingest pipeline of an ingest node (``self.pipeline``); what HTTP device messaging uses.

        An API-only node gets a pipeline of its own for HTTP device messaging, which no broker
        feeds; an ingest-only node serves no HTTP.
        """
        s = self.settings

        def made() -> IngestPipeline:
            return IngestPipeline(
                ctx.store,
                ctx.keyring,
                self.metrics,
                batch_size=s.ingest_batch_size,
                batch_ms=s.ingest_batch_ms,
                max_payload_bytes=s.max_payload_bytes,
                dedupe_window_s=s.ingest_dedupe_window_s,
                on_commit=self._committed,
            )

        if self.role in (Role.ALL, Role.INGEST):
            self.pipeline = await stack.enter_async_context(made())
            return self.pipeline
        return await stack.enter_async_context(made())

    def _api_services(
        self, ctx: Context, identity: Identity, *, ingest: Callable[[Inbound], asyncio.Future[Outcome]] | None
    ) -> ApiServices:
        s = self.settings
        identity.provider.store.on_change = self._access_changed  # a revoked grant
        return ApiServices(
            settings=s,
            ctx=ctx,
            metrics=self.metrics,
            verifier=build_verifier(s, identity),
            limiter=RateLimiter(
                per_address=s.rate_limit_per_ip,
                per_principal=s.rate_limit_per_principal,
                auth_failures=s.rate_limit_auth_failures,
                redis_url=s.redis_url,
            ),
            notifier=self.notifier,
            # with wake-ups from every node the poll is only a safety net
            stream_poll_s=s.stream_safety_poll_s if self._fanout is not None else 2.0,
            principals=self.principals,
            event_docs=self.event_docs,
            ingest=ingest,
            # an --api-processes child: /metrics adds the ingesting parent's figures
            metrics_plus=SnapshotFile(s.data_dir).read if self._http_sock is not None else None,
        )

    def _http_socket(self, stack: AsyncExitStack) -> socket.socket | None:
        """The socket this node serves HTTP on: bound here, or inherited (never re-bound)."""
        sock = self._http_sock
        if sock is None and self.role in (Role.ALL, Role.API):
            sock = bind_socket(self.settings.http_host, self.settings.http_port, "IOTVAULT_HTTP_PORT")
        if sock is not None:
            stack.callback(sock.close)
        return sock

    async def run(self, on_ready: Callable[[Node], None] | None = None) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        async with AsyncExitStack() as stack:
            http_sock = self._http_socket(stack)
            self.ctx = await self._open_context()
            stack.callback(self.ctx.close)
            await self._start_shared(stack, self.ctx)
            http_ingest = await self._start_pipelines(stack, self.ctx)
            # the embedded broker (device accounts, topic rules) or the external one's subscriber,
            # and how commands are sent: iotvault.wiring
            broker_side = await start_broker_side(stack, s, self.ctx, self.pipeline, self._embedded_hook)
            self.broker = broker_side.broker
            self.readiness = await stack.enter_async_context(
                Readiness(self.ctx.engine, s.effective_database_url, pipeline=self.pipeline)
            )
            svc: ApiServices | None = None
            server_task: asyncio.Task[None] | None = None
            server: _Server | None = None
            if http_sock is not None:
                identity = Identity(s, self.ctx)
                svc = self._api_services(
                    self.ctx, identity, ingest=http_ingest.enqueue if http_ingest is not None else None
                )
                http_events = await stack.enter_async_context(SecurityEventLog(self.ctx.store))
                svc.on_abuse = lambda kind, address, detail: http_events.record(kind, address, **detail)
                svc.security_event = http_events.record
                stack.callback(svc.stopping.set)
                if svc.limiter is not None:
                    stack.push_async_callback(svc.limiter.close)
                app = create_app(svc, ready=self.failing, identity=identity)
                app.state.commands = CommandService(
                    self.ctx, broker_side.publish, default_expiry_s=s.command_expiry_s
                )
                config = uvicorn.Config(
                    app,
                    log_level="warning",
                    access_log=False,
                    server_header=False,
                    lifespan="off",
                    timeout_graceful_shutdown=max(1, math.ceil(s.http_shutdown_grace_s)),
                    http=guarded_protocol(s.http_header_timeout_s, svc.on_abuse, s.http_parser),
                    **http_limits(s),
                )
                server = _Server(config)
                server_task = asyncio.create_task(server.serve(sockets=[http_sock]), name="iotvault-http")
                # uvicorn offers no "started" event to wait on
                while not server.started and not server_task.done():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                if server_task.done():
                    server_task.result()
            if self.api_processes is not None:  # left first: the children stop before ingest
                self._share_metrics(stack)
                await stack.enter_async_context(self.api_processes)
            self._ready = True
            self.readiness.phase = Phase.READY
            if on_ready is not None:
                on_ready(self)
            stop_wait = asyncio.create_task(self._stop.wait(), name="iotvault-stop")
            waiters: set[asyncio.Task[Any]] = {stop_wait}
            if server_task is not None:
                waiters.add(server_task)
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            await self._shut_down(svc, server, server_task)
            stop_wait.cancel()
        log.info("iotvault stopped")
