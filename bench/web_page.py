"""Server time of the web application's device page with 1,000 events stored (target ≤ 200 ms).

In-process (ASGI, no sockets) so that only the server's work is timed: a person signs in
through the built-in provider exactly as a browser would (code + PKCE, session cookie), then
the device page is fetched again and again. The baseline, measured in the same run, is the
API's last-50 JSON read of the same device.

    python -m bench.web_page [--repeat 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from iotvault.accounts import create_group, create_user
from iotvault.api.app import create_app
from iotvault.api.services import ApiServices
from iotvault.config import load_settings
from iotvault.context import open_context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.domain.ids import EventIdFactory
from iotvault.identity import Identity
from iotvault.metrics import Metrics
from iotvault.storage.repository import BatchWrite, StoredEvent

BASE = "http://127.0.0.1:8000"
PASSWORD = "ann-password-1234"  # noqa: S105 - a throw-away account in a temporary database
EVENTS = 1000


def build(root: Path) -> tuple[object, object]:
    settings = load_settings(environ={"IOTVAULT_DATA_DIR": str(root), "IOTVAULT_PUBLIC_URL": BASE})
    ctx = open_context(settings)
    register_device(ctx, "thermo", "t1")
    create_group(ctx, "readers", roles=Roles(reader=True), devices=("t1",))
    create_user(ctx, "ann", "Ann", password=PASSWORD, groups=("readers",))
    ids, batch = EventIdFactory(), BatchWrite()
    start_ms = time.time_ns() // 1_000_000 - EVENTS * 1000
    for i in range(EVENTS):
        eid = ids.new_at(start_ms + i * 1000)
        body = json.dumps({"d": {"temp": 20 + i % 7, "hum": 40 + i % 11, "state": "ok", "seq": i}}).encode()
        batch.events.append(
            StoredEvent(
                "t1",
                eid,
                "thermo",
                "reading",
                "json",
                (start_ms + i * 1000) * 1000,
                ctx.keyring.encrypt("t1", eid, body),
            )
        )
    ctx.store.write_batch(batch)
    identity = Identity(settings, ctx)
    svc = ApiServices(settings=settings, ctx=ctx, metrics=Metrics(), verifier=identity.api_verifier())
    return create_app(svc, identity=identity), ctx


async def sign_in(http: httpx.AsyncClient) -> None:
    r = await http.get("/auth/login", follow_redirects=True)
    form = dict(re.findall(r'name="(request|csrf_token)" value="([^"]*)"', r.text))
    r = await http.post(
        "/login",
        data={**form, "username": "ann", "password": PASSWORD, "action": "login"},
        follow_redirects=True,
    )
    if r.url.path != "/devices":
        raise RuntimeError(f"sign-in did not reach the devices page: {r.url}")


async def timed(
    http: httpx.AsyncClient, path: str, repeat: int, headers: dict[str, str] | None = None
) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = await http.get(path, headers=headers)
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code}")
    return out


async def main(repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        app, ctx = build(Path(tmp))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as http:  # type: ignore[arg-type]
            await sign_in(http)
            await timed(http, "/devices/t1", 3)  # warm caches (keys, templates)
            page = await timed(http, "/devices/t1", repeat)
            page_max = await timed(http, "/devices/t1?count=1000", max(5, repeat // 5))
            api = await timed(http, "/iotf/devices/t1?count=50", repeat)
        ctx.close()  # type: ignore[attr-defined]

    def line(name: str, xs: list[float]) -> str:
        return f"{name:34s} median {statistics.median(xs):7.1f} ms  max {max(xs):7.1f} ms  (n={len(xs)})"

    print(f"{EVENTS} events stored; in-process ASGI, no network")
    print(line("device page (100 events, chart)", page))
    print(line("device page (1000 events, chart)", page_max))
    print(line("baseline: API last-50 JSON", api))
    print(f"ratio device page / API last-50: {statistics.median(page) / statistics.median(api):.1f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--repeat", type=int, default=50)
    asyncio.run(main(p.parse_args().repeat))
