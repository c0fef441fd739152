"""A real ``iotvault serve`` (embedded broker, SQLite) with people, groups and devices, and a
real Chromium driven by Playwright, for the web application's browser tests.

Chromium is Debian's ``/usr/bin/chromium`` (Playwright's own download does not work offline);
without it the tests skip loudly, and under CI they fail (:func:`helpers.unavailable`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from helpers import ServerProcess, free_port, server_env, unavailable

from iotvault.accounts import create_group, create_user
from iotvault.config import load_settings
from iotvault.context import Context, context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.domain.ids import EventIdFactory
from iotvault.storage.repository import BatchWrite, StoredEvent

CHROMIUM = os.environ.get("IOTVAULT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
HISTORY = 40
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

GROUPS: dict[str, tuple[Roles, tuple[str, ...]]] = {
    "readers-1": (Roles(reader=True), ("thermo-1",)),
    "writers-1": (Roles(reader=True, writer=True), ("thermo-1",)),
    "readers-all": (Roles(reader=True), ("thermo-1", "thermo-2", "pump-1")),
    "admins": (Roles(admin=True), ()),
    "anonymous": (Roles(reader=True), ("pump-1",)),
}
USERS: dict[str, tuple[str, ...]] = {
    "alice": ("readers-1",),
    "bob": ("writers-1",),
    "maria": ("readers-all",),
    "root": ("admins",),
}


def password(user: str) -> str:
    return f"{user}-password-123"


@dataclass
class Site:
    url: str
    env: dict[str, str]
    credentials: dict[str, str] = field(default_factory=dict)  # deviceId -> credential
    server: ServerProcess | None = None


def history(ctx: Context, device_id: str, n: int) -> None:
    """``n`` stored readings of the last minutes, as ingest would have sealed them."""
    ids, batch = EventIdFactory(), BatchWrite()
    start_ms = time.time_ns() // 1_000_000 - n * 10_000
    for i in range(n):
        at_ms = start_ms + i * 10_000
        eid = ids.new_at(at_ms)
        reading = {"d": {"temp": round(20 + 2 * math.sin(i / 5), 2), "hum": 45 + i % 7, "label": "ok"}}
        sealed = ctx.keyring.encrypt(device_id, eid, json.dumps(reading).encode())
        batch.events.append(StoredEvent(device_id, eid, "thermo", "reading", "json", at_ms * 1000, sealed))
    ctx.store.write_batch(batch)


def require_chromium() -> str:
    if not Path(CHROMIUM).is_file():
        unavailable(f"{CHROMIUM} is not installed (apt-get install chromium)")
    return CHROMIUM


def start_site(tmp: Path) -> Site:
    env = server_env(tmp)
    env["IOTVAULT_PUBLIC_URL"] = f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"
    env["IOTVAULT_MQTT_HOST"] = "127.0.0.1"
    settings = load_settings(environ=env)
    site = Site(env["IOTVAULT_PUBLIC_URL"], env)
    with context(settings) as ctx:
        for type_id, device_id in (("thermo", "thermo-1"), ("thermo", "thermo-2"), ("pump", "pump-1")):
            site.credentials[device_id] = register_device(ctx, type_id, device_id).credential
        history(ctx, "thermo-1", HISTORY)
        for name, (roles, devices) in GROUPS.items():
            create_group(ctx, name, roles=roles, devices=devices)
        for user, groups in USERS.items():
            create_user(ctx, user, user.title(), password=password(user), groups=groups)
    site.server = ServerProcess(env, tmp / "serve.log")
    try:
        site.server.start(timeout=60)
    except RuntimeError as exc:  # a free port taken between choosing it and binding it: new ports
        if "already in use" not in str(exc):
            raise
        env.update({"IOTVAULT_HTTP_PORT": str(free_port()), "IOTVAULT_MQTT_PORT": str(free_port())})
        env["IOTVAULT_PUBLIC_URL"] = site.url = f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"
        site.server.start(timeout=60)
    return site


@asynccontextmanager
async def browser_page(site: Site, viewport: dict[str, int] = DESKTOP) -> AsyncIterator[object]:
    from playwright.async_api import async_playwright  # noqa: PLC0415 - only where a browser runs

    executable = require_chromium()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            context_ = await browser.new_context(viewport=viewport, base_url=site.url)
            page = await context_.new_page()
            yield page
        finally:
            await browser.close()
