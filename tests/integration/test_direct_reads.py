"""The plain last-N read outside FastAPI (iotvault.api.direct) answers exactly as the route does.

Two apps over one database: one as the node builds it, one with ``direct_reads=False``. Every
answer (status, headers, body) and every audit record must be the same for each caller, device
and ``count``; the first app must have answered the plain form itself (there, FastAPI fails if it is
asked to solve the route's parameters) and left everything else to FastAPI.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import fastapi.routing
import httpx
import pytest
from apifixture import EXTERNAL_KEY, Built, api_key_for, build_api, mint
from fastapi import APIRouter, Header, Query, Request

import iotvault.api.direct
from iotvault.accounts import create_api_key, revoke_api_key
from iotvault.api.app import create_app
from iotvault.api.deps import Requires
from iotvault.api.direct import DirectReads, RouteMismatchError
from iotvault.api.routes.devices import DeviceIdPath, latest_events
from iotvault.auth.policy import Permission, Principal
from iotvault.devices import delete_device, register_device
from iotvault.domain.accounts import Roles
from iotvault.storage.audit import AuditStore


class ServedError(Exception):
    """FastAPI solved the route's dependency: the read did not go the direct way."""


@pytest.fixture
def built(tmp_path: Path, database_url: str) -> Iterator[Built]:
    b = build_api(tmp_path, database_url)
    try:
        yield b
    finally:
        b.close()


def both(b: Built, monkeypatch: pytest.MonkeyPatch) -> tuple[httpx.AsyncClient, httpx.AsyncClient]:
    """(direct, through FastAPI): the direct app fails any last-N read FastAPI would solve."""
    direct = b.app
    plain = create_app(b.svc, identity=direct.state.identity, direct_reads=False)
    solve = fastapi.routing.solve_dependencies

    async def spy(**kwargs: Any) -> Any:
        if kwargs["request"].app is direct and kwargs["dependant"].call is latest_events:
            raise ServedError
        return await solve(**kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", spy)
    return (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=direct), base_url="http://testserver"),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=plain), base_url="http://testserver"),
    )


def basic(key: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()


def callers(b: Built) -> dict[str, dict[str, str]]:
    ctx = b.ctx
    revoked = create_api_key(ctx, roles=Roles(reader=True), devices=("d1",), created_by="test")
    revoke_api_key(ctx, revoked.key)
    wrong = create_api_key(ctx, roles=Roles(reader=True), devices=("d1",), created_by="test")
    found = {
        "key-d1": api_key_for(ctx, devices=("d1",), roles=Roles(reader=True)),
        "key-d2": api_key_for(ctx, devices=("d2",), roles=Roles(reader=True)),
        "key-admin": api_key_for(ctx, devices=(), roles=Roles(admin=True)),
        "key-writer-only": api_key_for(ctx, devices=("d1",), roles=Roles(writer=True)),
        "key-revoked": basic(revoked.key, revoked.password),
        "key-wrong-password": basic(wrong.key, wrong.password + "x"),
        "key-unknown": basic("a-no-such-key", "x" * 20),
        "alice": f"Bearer {b.token('alice')}",
        "carol": f"Bearer {b.token('carol')}",
        "dave": f"Bearer {b.token('dave')}",
        "root": f"Bearer {b.token('root')}",
        "olga": f"Bearer {b.token('olga')}",
        "expired": f"Bearer {b.token('alice', exp=1_000_000, iat=999_000)}",
        "external": f"Bearer {mint(EXTERNAL_KEY, 'ext-user', roles=['readers-1'])}",
        "garbage": "Bearer not.a.token",
        "digest": "Digest username=alice",
    }
    return {name: {"Authorization": value} for name, value in found.items()} | {"nobody": {}}


def same(a: httpx.Response, b: httpx.Response, what: str) -> None:
    assert a.status_code == b.status_code, what
    assert a.content == b.content, what
    drop = {"x-request-id"}
    assert [(k, v) for k, v in a.headers.items() if k not in drop] == [
        (k, v) for k, v in b.headers.items() if k not in drop
    ], what


class Audit:
    """The requests' audit records, read on from where the last look ended."""

    def __init__(self, b: Built) -> None:
        self.b = b
        self.store = AuditStore(b.ctx.engine, b.ctx.settings.effective_database_url)
        self.seen = 0

    def new(self) -> list[tuple[Any, ...]]:
        self.b.ctx.audit.flush()
        records = list(self.store.records(from_seq=self.seen + 1))
        if records:
            self.seen = records[-1].seq
        return [
            (r.entry.actor, r.entry.target, r.entry.outcome, r.entry.client, sorted(r.entry.detail.items()))
            for r in records
            if r.entry.action == "http.request"
        ]


async def test_every_plain_read_answers_as_the_route_does_for_every_caller(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    register_device(built.ctx, "thermo", "gone")
    delete_device(built.ctx, "gone")
    direct, plain = both(built, monkeypatch)
    who = callers(built)
    audit = Audit(built)
    statuses: set[int] = set()
    async with direct, plain:
        for name, headers in who.items():
            for device in ("d1", "d2", "d3", "gone", "no-such-device"):
                for query in ("", "?count=1", "?count=50", "?count=60", "?count=1000"):
                    url = f"/iotf/devices/{device}{query}"
                    for attempt in range(2):  # the second from the kept page, if one was kept
                        audit.new()
                        a = await direct.get(url, headers=headers)
                        b = await plain.get(url, headers=headers)
                        same(a, b, f"{name} {url} #{attempt}")
                        records = audit.new()
                        assert len(records) == 2, records
                        assert records[0] == records[1], f"{name} {url}"
                        statuses.add(a.status_code)
    assert statuses == {200, 401, 404}  # each kind of answer (a device one may not read is 404)


@pytest.mark.parametrize(
    "url",
    [
        "/iotf/devices/d1?count=0",
        "/iotf/devices/d1?count=1001",
        "/iotf/devices/d1?count=050",
        "/iotf/devices/d1?count=5&count=6",
        "/iotf/devices/d1?count=",
        "/iotf/devices/d1?count=-1",
        "/iotf/devices/d1?count=99999999999999999999",
        "/iotf/devices/d1?other=1",
        "/iotf/devices/d1?count=5&access_token=x",
        "/iotf/devices/a%20b",
        "/iotf/devices/a%00b",
        "/iotf/devices/" + "a" * 300,
        "/iotf/devices/d%C3%A9",
    ],
)
async def test_any_other_form_is_left_to_fastapi(
    built: Built, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct, plain = both(built, monkeypatch)
    headers = {"Authorization": api_key_for(built.ctx, devices=("d1",), roles=Roles(reader=True))}
    async with direct, plain:
        b = await plain.get(url, headers=headers)
        try:
            a = await direct.get(url, headers=headers)
        except ServedError:  # FastAPI answered it: what the route answers is the plain app's answer
            return
        same(a, b, url)  # refused before the route (hardening, validation): identical anyway
        assert a.status_code in (400, 422), a.text


async def test_a_head_request_and_other_methods_are_left_to_fastapi(
    built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    direct, plain = both(built, monkeypatch)
    async with direct, plain:
        for method in ("HEAD", "POST", "PUT", "OPTIONS"):
            a = await direct.request(method, "/iotf/devices/d1")
            b = await plain.request(method, "/iotf/devices/d1")
            same(a, b, method)


async def test_the_direct_read_is_rate_limited_timed_and_hardened_like_the_route(
    tmp_path: Path, database_url: str
) -> None:
    b = build_api(tmp_path, database_url, limits=("1000/minute", "3/minute", "1000/minute"))
    try:
        key = {"Authorization": api_key_for(b.ctx, devices=("d1",), roles=Roles(reader=True))}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=b.app), base_url="http://t") as c:
            answers = [await c.get("/iotf/devices/d1?count=2", headers=key) for _ in range(4)]
            assert [r.status_code for r in answers] == [200, 200, 200, 429]
            assert int(answers[-1].headers["retry-after"]) > 0
            assert answers[-1].headers["content-type"] == "application/problem+json"
            assert answers[0].headers["x-content-type-options"] == "nosniff"
            assert answers[0].headers["x-request-id"]
            assert len(answers[0].json()["events"]) == 2
        text = b.svc.metrics.render(None)
        route = 'iotvault_http_request_duration_seconds_count{method="GET",route="/iotf/devices/{deviceId}"}'
        assert f"{route} 4" in text
    finally:
        b.close()


async def test_an_unexpected_error_is_answered_as_the_apps_handler_answers_it(
    built: Built, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*_: object) -> None:
        raise RuntimeError("a bug in the read")

    monkeypatch.setattr(iotvault.api.direct, "newest_page", broken)
    headers = {"Authorization": api_key_for(built.ctx, devices=("d1",), roles=Roles(reader=True))}
    audit = Audit(built)
    audit.new()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=built.app), base_url="http://t") as c:
        r = await c.get("/iotf/devices/d1?count=2", headers=headers)
    assert r.status_code == 500
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["incident"] in caplog.text  # the error is in the log under the incident's id
    assert "a bug in the read" not in r.text
    assert r.headers["x-content-type-options"] == "nosniff"  # through the middlewares, like any answer
    assert r.headers["x-request-id"]
    (record,) = audit.new()
    assert ("status", 500) in record[4]


async def test_a_page_with_an_event_that_does_not_decrypt_is_not_kept(built: Built) -> None:
    headers = {"Authorization": api_key_for(built.ctx, devices=("d1",), roles=Roles(reader=True))}
    newest = built.events["d1"][-1]
    built.ctx.store.replace_payloads([("d1", newest, b"\x00tampered")])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=built.app), base_url="http://t") as c:
        first = (await c.get("/iotf/devices/d1?count=3", headers=headers)).json()
        assert first["events"][0]["payload"] is None
        assert first["events"][0]["error"]
        assert built.svc.event_docs.page("d1", 3) is None
        ok = (await c.get("/iotf/devices/d1?count=3&", headers=headers)).json()  # FastAPI's way
        assert ok == first


def test_a_route_that_declares_more_than_the_direct_way_answers_is_refused() -> None:
    router = APIRouter()

    @router.get("/iotf/devices/{deviceId}")
    async def with_header(
        request: Request,
        deviceId: DeviceIdPath,  # noqa: N803 - the route's own parameter name
        _p: Annotated[Principal, Requires(Permission.DEVICE_EVENTS_READ)],
        count: Annotated[int, Query(ge=1, le=1000)] = 50,
        x_tenant: Annotated[str | None, Header()] = None,
    ) -> None: ...

    @router.get("/iotf/devices/{deviceId}")
    async def unprotected(
        request: Request,
        deviceId: DeviceIdPath,  # noqa: N803 - the route's own parameter name
        count: int = 50,
    ) -> None: ...

    @router.get("/iotf/devices/{deviceId}")
    async def other_default(
        request: Request,
        deviceId: DeviceIdPath,  # noqa: N803 - the route's own parameter name
        _p: Annotated[Principal, Requires(Permission.DEVICE_EVENTS_READ)],
        count: Annotated[int, Query(ge=1, le=1000)] = 10,
    ) -> None: ...

    for route in router.routes:
        with pytest.raises(RouteMismatchError):
            DirectReads(lambda *_: None, route=route)  # type: ignore[arg-type, return-value]
