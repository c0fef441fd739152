"""A kept page answered without a query is never behind what its process has heard of.

Two real ``iotvault serve`` processes on one database: ``--role all`` (ingest and HTTP) and
``--role api``. ``page_trust_ms`` is 60 s here, so a page known current would be answered as it
is for a minute unless the process heard of the device's new events: at once on the process
that stored them (before it answers the device), through the fan-out on the other one
(PostgreSQL ``LISTEN/NOTIFY``; on SQLite the data dir's socket). Each event is read on both
right after its 200; the ``known`` answers in ``/metrics`` show the query was really skipped.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import ServerProcess, free_port, server_env

from iotvault.accounts import create_api_key
from iotvault.config import load_settings
from iotvault.context import context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BOUND_S = 1.0  # a page believed for 60 s: only the fan-out explains an answer within this
EVENTS = "/api/v0002/device/types/thermo/devices/kp-1/events/reading"
NEWEST = "/iotf/devices/kp-1?count=3"


def _basic(user: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


@dataclass
class Two:
    node: ServerProcess  # --role all: stores the events
    api: ServerProcess  # --role api: hears of them through the fan-out
    device: dict[str, str]
    reader: dict[str, str]
    admin: dict[str, str]


def _url(p: ServerProcess) -> str:
    return f"http://127.0.0.1:{p.env['IOTVAULT_HTTP_PORT']}"


@pytest.fixture(params=["sqlite", "postgres"])
def two(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Two]:
    settings = {"page_trust_ms": "60000", "ingest_batch_ms": "2", "key_cache_ttl_s": "300"}
    if request.param == "postgres":
        settings["database_url"] = str(request.getfixturevalue("pg_url"))
        settings["master_key_file"] = str(tmp_path / "master.key")
    env = server_env(tmp_path, **settings)
    env["IOTVAULT_DATA_DIR"] = str(tmp_path / "d")  # a Unix socket's path has ~100 bytes
    with context(load_settings(environ=env)) as ctx:
        credential = register_device(ctx, "thermo", "kp-1").credential
        reader = create_api_key(ctx, roles=Roles(reader=True), devices=["kp-1"], created_by="test")
        admin = create_api_key(ctx, roles=Roles(admin=True), created_by="test")
    procs: list[ServerProcess] = []
    try:
        for role in ("all", "api"):
            own = dict(env, IOTVAULT_HTTP_PORT=str(free_port()))
            p = ServerProcess(own, tmp_path / f"{role}.log", args=("--role", role))
            procs.append(p)
            p.start()
        yield Two(
            procs[0],
            procs[1],
            _basic("use-token-auth", credential),
            _basic(reader.key, reader.password),
            _basic(admin.key, admin.password),
        )
    finally:
        for p in procs:
            p.stop()


async def _newest(http: httpx.AsyncClient, p: ServerProcess, two: Two) -> int:
    r = await http.get(_url(p) + NEWEST, headers=two.reader)
    assert r.status_code == 200, r.text
    return int(r.json()["events"][0]["payload"]["seq"])


async def _answered(http: httpx.AsyncClient, p: ServerProcess, two: Two) -> dict[str, float]:
    r = await http.get(_url(p) + "/metrics", headers=two.admin)
    assert r.status_code == 200, r.text
    found = re.findall(r'^iotvault_http_newest_pages_total\{how="(\w+)"\} (\S+)$', r.text, re.MULTILINE)
    return {how: float(n) for how, n in found}


async def test_a_known_page_answers_every_event_its_process_heard_of(two: Two) -> None:
    delays: list[float] = []
    async with httpx.AsyncClient(timeout=10) as http:
        for seq in range(12):
            r = await http.post(_url(two.node) + EVENTS, json={"seq": seq}, headers=two.device)
            assert r.status_code == 200, r.text  # only once committed
            # the process that stored it answers with it at once, however long its page was believed
            assert await _newest(http, two.node, two) == seq
            start = time.monotonic()
            while await _newest(http, two.api, two) != seq:
                assert time.monotonic() - start < 10, "the other process never heard of the event"
                await asyncio.sleep(0.002)
            delays.append(time.monotonic() - start)
            for _ in range(3):  # found current, then known: answered without a query
                assert await _newest(http, two.node, two) == seq
                assert await _newest(http, two.api, two) == seq
        node, api = await _answered(http, two.node, two), await _answered(http, two.api, two)
    print(f"other process answered a new event after {max(delays) * 1000:.1f} ms at most; {node=} {api=}")
    assert max(delays) < BOUND_S, delays
    # every event was read on both with each kind of answer: no query for the last ones
    for answered in (node, api):
        assert answered.get("known", 0) >= 12, answered
        assert answered.get("unchanged", 0) >= 12, answered
