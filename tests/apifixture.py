"""A real iotvault API over a real database, with users, groups, devices and signed tokens.

Tokens are minted with a test signing key that the app's verifier trusts as its local issuer,
until the built-in OpenID Connect provider issues them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI
from helpers import free_port
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from iotvault.accounts import create_api_key, create_group, create_user
from iotvault.api.app import create_app
from iotvault.api.ratelimit import RateLimiter
from iotvault.api.services import ApiServices, watch_changes
from iotvault.auth.keys import StaticKeys, public_keyset
from iotvault.auth.tokens import IssuerConfig, TokenVerifier
from iotvault.config import load_settings
from iotvault.context import Context, open_context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.domain.ids import EventIdFactory, event_id_millis
from iotvault.metrics import Metrics
from iotvault.storage.repository import BatchWrite, StoredEvent

ISSUER = "https://issuer.test"
AUDIENCE = "iotvault"
EXTERNAL_ISSUER = "https://external.test"
EXTERNAL_AUDIENCE = "iotvault-api"
EXTERNAL_KEY = ECKey.generate_key("P-256", parameters={"kid": "ext-1"}, private=True)

# group -> (roles, devices); user -> groups
GROUPS: dict[str, tuple[Roles, tuple[str, ...]]] = {
    "readers-1": (Roles(reader=True), ("d1",)),
    "writers-1": (Roles(reader=True, writer=True), ("d1",)),
    "readers-2": (Roles(reader=True), ("d2",)),
    "admins": (Roles(admin=True), ()),
    "ops": (Roles(admin=True, reader=True), ("d1",)),
}
USERS: dict[str, tuple[str, ...]] = {
    "alice": ("readers-1",),
    "bob": ("writers-1",),
    "carol": ("readers-2",),
    "root": ("admins",),
    "olga": ("ops",),
    "dave": (),
}


@dataclass
class Api:
    ctx: Context
    client: httpx.AsyncClient
    key: ECKey
    events: dict[str, list[str]] = field(default_factory=dict)  # device -> event ids, oldest first

    def token(self, sub: str, **overrides: Any) -> str:
        return mint(self.key, sub, **overrides)

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(user)}"}


def seed(ctx: Context, events_per_device: int = 60) -> dict[str, list[str]]:
    for device_id in ("d1", "d2", "d3"):
        register_device(ctx, "thermo", device_id)
    for name, (roles, devices) in GROUPS.items():
        create_group(ctx, name, roles=roles, devices=devices)
    for user, groups in USERS.items():
        create_user(ctx, user, user.title(), password=f"{user}-password-123", groups=groups)
    ids = EventIdFactory()
    out: dict[str, list[str]] = {}
    base_ms = time.time_ns() // 1_000_000 - events_per_device * 1000
    for device_id in ("d1", "d2", "d3"):
        batch = BatchWrite()
        for i in range(events_per_device):
            eid = ids.new_at(base_ms + i * 1000)  # one event a second, as ingest would stamp them
            body = json.dumps({"d": {"seq": i, "device": device_id}}).encode()
            batch.events.append(stored_event(ctx, device_id, eid, body))
            out.setdefault(device_id, []).append(eid)
        ctx.store.write_batch(batch)
    return out


def stored_event(ctx: Context, device_id: str, event_id: str, body: bytes) -> StoredEvent:
    """A ``thermo`` reading sealed as ingest would seal it, its time read from its id."""
    return StoredEvent(
        device_id,
        event_id,
        "thermo",
        "reading",
        "json",
        event_id_millis(event_id) * 1000,
        ctx.keyring.encrypt(device_id, event_id, body),
    )


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """The app behind a real uvicorn on a free port (live streams need one); yields its URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn has no started event
            await asyncio.sleep(0.02)
        if task.done():
            task.result()
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@dataclass
class Built:
    app: FastAPI
    ctx: Context
    key: ECKey
    svc: ApiServices
    events: dict[str, list[str]]

    def token(self, sub: str, **overrides: Any) -> str:
        return mint(self.key, sub, **overrides)

    def close(self) -> None:
        self.svc.stopping.set()
        self.ctx.close()


def mint(key: ECKey, sub: str, **overrides: Any) -> str:
    now = int(time.time())
    external = key is EXTERNAL_KEY
    claims: dict[str, Any] = {
        "iss": EXTERNAL_ISSUER if external else ISSUER,
        "aud": EXTERNAL_AUDIENCE if external else AUDIENCE,
        "sub": sub,
        "preferred_username": sub,
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    header = {"alg": "ES256", "kid": key.kid}
    return jwt.encode(header, {k: v for k, v in claims.items() if v is not None}, key)


def build_api(
    tmp_path: Path,
    database_url: str | None = None,
    *,
    limits: tuple[str, str, str] | None = None,
    **settings: str,
) -> Built:
    env = {"IOTVAULT_DATA_DIR": str(tmp_path / "data")}
    if database_url:
        env["IOTVAULT_DATABASE_URL"] = database_url
    env.update({f"IOTVAULT_{k.upper()}": v for k, v in settings.items()})
    s = load_settings(environ=env)
    ctx = open_context(s)
    key = ECKey.generate_key("P-256", parameters={"kid": f"test-{uuid.uuid4().hex[:8]}"}, private=True)
    keys = StaticKeys(public_keyset(KeySet([key])))
    external = IssuerConfig(
        issuer=EXTERNAL_ISSUER,
        audience=EXTERNAL_AUDIENCE,
        keys=StaticKeys(public_keyset(KeySet([EXTERNAL_KEY]))),
        groups_claim="roles",
    )
    verifier = TokenVerifier(
        [IssuerConfig(issuer=ISSUER, audience=AUDIENCE, keys=keys, local=True), external]
    )
    per_ip, per_principal, failures = limits or ("100000/minute", "100000/minute", "100000/minute")
    svc = ApiServices(
        settings=s,
        ctx=ctx,
        metrics=Metrics(),
        verifier=verifier,
        limiter=RateLimiter(per_address=per_ip, per_principal=per_principal, auth_failures=failures),
        stream_poll_s=0.2,
    )
    watch_changes(ctx, svc.principals, svc.event_docs)
    events = seed(ctx)
    return Built(create_app(svc), ctx, key, svc, events)


@asynccontextmanager
async def running_api(
    tmp_path: Path,
    database_url: str | None = None,
    *,
    limits: tuple[str, str, str] | None = None,
    **settings: str,
) -> AsyncIterator[Api]:
    built = build_api(tmp_path, database_url, limits=limits, **settings)
    transport = httpx.ASGITransport(app=built.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield Api(built.ctx, client, built.key, built.events)
    finally:
        built.close()


def api_key_for(
    ctx: Context, *, devices: tuple[str, ...], roles: Roles, expires_us: int | None = None
) -> str:
    new = create_api_key(ctx, roles=roles, devices=devices, expires_us=expires_us, created_by="test")
    return "Basic " + base64.b64encode(f"{new.key}:{new.password}".encode()).decode()
