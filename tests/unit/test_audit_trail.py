"""The audit trail (iotvault.api.audit.AuditTrail) around a bare ASGI app: one record per audited
request with every field it has always had, and the origin of a change made only for a change."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from iotvault.api import audit as trail_module
from iotvault.api.audit import AuditTrail
from iotvault.audit.changes import Origin, changed, origin
from iotvault.auth.policy import Principal
from iotvault.clock import now_us
from iotvault.domain.audit import AuditEntry

READER = Principal("api_key", "k_reader", False, frozenset({"d1"}), frozenset())
ADMIN = Principal("user", "olga", True, frozenset(), frozenset())
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def origins(monkeypatch: pytest.MonkeyPatch) -> list[Origin]:
    """Every Origin the trail builds."""
    made: list[Origin] = []

    def counted(*args: Any, **kwargs: Any) -> Origin:
        made.append(Origin(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(trail_module, "Origin", counted)
    return made


def request(method: str, path: str, *headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": list(headers),
        "client": ("192.0.2.7", 50000),
    }


async def call(app: App, scope: dict[str, Any], records: list[AuditEntry]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    trail = AuditTrail(app, record=records.append, describe=lambda r: {"document": r})
    await trail(scope, receive, send)
    return sent


async def answer(send: Any, status: int) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
    )
    await send({"type": "http.response.body", "body": b""})


async def read_d1(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """What the last-N read leaves in the scope (the route, the path's id, the principal, the count)."""
    scope["route"] = SimpleNamespace(path="/iotf/devices/{deviceId}")
    scope["path_params"] = {"deviceId": "d1"}
    scope["state"]["principal"] = READER
    scope["state"]["audit"] = {"events": 50}
    await answer(send, 200)


async def test_a_read_is_one_record_with_every_field_and_builds_no_origin(origins: list[Origin]) -> None:
    records: list[AuditEntry] = []
    before = now_us()
    sent = await call(read_d1, request("GET", "/iotf/devices/d1", (b"x-request-id", b"req-1")), records)
    (entry,) = records
    assert before <= entry.at_us <= now_us()
    assert dataclasses.replace(entry, at_us=0) == AuditEntry(
        0, "api_key:k_reader", "http.request", "d1", "success", "192.0.2.7", "req-1",
        {"method": "GET", "route": "/iotf/devices/{deviceId}", "status": 200, "events": 50},
    )  # fmt: skip
    assert (b"x-request-id", b"req-1") in sent[0]["headers"]
    assert origins == []  # a read changes nothing, so nothing needs to know where changes come from


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        ([(b"x-request-id", b"bad id"), (b"x-request-id", b"req-2")], "req-2"),
        ([(b"x-request-id", b"req-2"), (b"x-request-id", b"bad id")], None),  # the last one counts
        ([(b"x-request-id", b"")], None),
        ([(b"x-request-id", b"r" * 65)], None),
        ([(b"accept", b"*/*")], None),
    ],
)
async def test_a_request_id_is_the_callers_last_well_formed_one_or_a_new_one(
    headers: list[tuple[bytes, bytes]], kept: str | None
) -> None:
    records: list[AuditEntry] = []
    sent = await call(read_d1, request("GET", "/iotf/devices/d1", *headers), records)
    given = records[0].request_id
    assert given == kept if kept else re.fullmatch(r"[0-9a-f]{32}", given)
    assert (b"x-request-id", given.encode()) in sent[0]["headers"]


async def test_changes_in_a_request_come_from_its_actor_address_and_id_even_in_a_thread(
    origins: list[Origin],
) -> None:
    async def create(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["state"]["principal"] = ADMIN  # authenticated after the trail set the origin up
        changed("user.create", "erin", after="erin's record")
        await asyncio.to_thread(changed, "user.update", "erin", before="old", after="new", generated=True)
        await answer(send, 201)

    records: list[AuditEntry] = []
    await call(create, request("POST", "/iotf/users", (b"x-request-id", b"req-3")), records)
    assert [(e.action, e.actor, e.target, e.client, e.request_id) for e in records] == [
        ("user.create", "user:olga", "erin", "192.0.2.7", "req-3"),
        ("user.update", "user:olga", "erin", "192.0.2.7", "req-3"),
        ("http.request", "user:olga", "/iotf/users", "192.0.2.7", "req-3"),
    ]
    assert records[0].detail == {"after": {"document": "erin's record"}}
    assert records[1].detail == {
        "before": {"document": "old"},
        "after": {"document": "new"},
        "generated": True,
    }
    assert records[2].detail == {"method": "POST", "route": "/iotf/users", "status": 201}
    assert len(origins) == 2
    changed("user.delete", "erin")  # after the request: no origin, no record
    assert len(records) == 3


async def test_a_failed_request_is_recorded_as_an_error_and_its_exception_kept() -> None:
    async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    records: list[AuditEntry] = []
    with pytest.raises(RuntimeError):
        await call(broken, request("DELETE", "/iotf/devices/d1"), records)
    assert [(e.outcome, e.actor, e.detail["status"]) for e in records] == [("error", "anonymous", 500)]


async def test_quiet_requests_are_not_recorded_but_their_changes_are() -> None:
    async def health(scope: dict[str, Any], receive: Any, send: Any) -> None:
        changed("node.noticed", "x")
        await answer(send, 200)

    records: list[AuditEntry] = []
    await call(health, request("GET", "/healthz"), records)
    assert [(e.action, e.actor, e.client) for e in records] == [("node.noticed", "anonymous", "192.0.2.7")]


def test_a_commands_origin_holds_inside_only() -> None:
    records: list[AuditEntry] = []
    with origin(Origin(records.append, lambda: "cli", lambda r: r)):
        changed("keys.rotate", "data keys", devices=2)
    changed("keys.rotate", "data keys", devices=3)
    assert [(e.actor, e.detail) for e in records] == [("cli", {"devices": 2})]
