"""Device data whatever the devices sent: the API always answers valid JSON in its documented shape.

The device-data routes build their JSON themselves instead of going through the response model
(a quarter of a last-50 request, BENCHMARKS.md), so these tests hold them to that model and to a
strict JSON parser, with the payloads that Python's own parser lets in but JSON has not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from apifixture import Api, running_api, serving, stored_event

from iotvault.accounts import create_group, create_user
from iotvault.api.routes.devices import DeviceEvents, EventPage
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from iotvault.domain.ids import EventIdFactory
from iotvault.storage.repository import BatchWrite

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# raw payload as a device sent it -> what the API must return for it
ODD_PAYLOADS: list[tuple[bytes, Any]] = [
    (b'{"t": NaN}', {"t": None}),
    (b'{"t": [Infinity, -Infinity, 1.5]}', {"t": [None, None, 1.5]}),
    (b'{"t": 1e400}', {"t": None}),
    (b'{"s": "\\ud800"}', {"s": "\ud800"}),
    ('{"s": "é ✓ 𝄞"}'.encode(), {"s": "é ✓ 𝄞"}),
    (b'{"n": 123456789012345678901234567890}', {"n": 123456789012345678901234567890}),
    (b'{"k": 1, "k": 2}', {"k": 2}),
    (b'{\n  "a": [1,\r\n 2.25]\n}\n', {"a": [1, 2.25]}),
    ('{"utf16": true}'.encode("utf-16"), {"utf16": True}),  # Python's parser reads UTF-16 too
]
# a lone surrogate as an object key: no JSON writer can spell it, so the event says so
UNWRITABLE = b'{"\\ud800": 1}'


def strict_json(body: bytes) -> Any:
    """JSON as RFC 8259 has it: no NaN or infinities, UTF-8 text."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"the API sent {constant}, which is not JSON")

    return json.loads(body.decode("utf-8"), parse_constant=refuse)


@pytest.fixture
async def api(tmp_path: Path, database_url: str) -> AsyncIterator[Api]:
    async with running_api(tmp_path, database_url) as a:
        yield a


def store_payloads(api: Api, device_id: str, payloads: list[bytes]) -> list[str]:
    ids = EventIdFactory()
    batch = BatchWrite()
    made = []
    for body in payloads:
        eid = ids.new()
        batch.events.append(stored_event(api.ctx, device_id, eid, body))
        made.append(eid)
    api.ctx.store.write_batch(batch)
    return made


async def test_odd_payloads_come_back_as_valid_json_in_the_documented_shape(api: Api) -> None:
    made = store_payloads(api, "d1", [raw for raw, _ in ODD_PAYLOADS])
    expected = {eid: want for eid, (_, want) in zip(made, ODD_PAYLOADS, strict=True)}

    r = await api.client.get("/iotf/devices/d1", params={"count": 100}, headers=api.auth("alice"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    doc = strict_json(r.content)
    DeviceEvents.model_validate(doc)
    got = {e["eventId"]: e for e in doc["events"]}
    for eid, want in expected.items():
        assert got[eid]["payload"] == want, eid
        assert got[eid]["error"] is None
    big = r.content.decode().count("123456789012345678901234567890")
    assert big == 1  # the exact digits, not a float
    assert [e["eventId"] for e in doc["events"][: len(made)]] == made[::-1]  # newest first

    r = await api.client.get(
        "/iotf/devices/d1/events", params={"after": made[0], "count": 3}, headers=api.auth("alice")
    )
    assert r.status_code == 200, r.text
    page = strict_json(r.content)
    EventPage.model_validate(page)
    assert [e["eventId"] for e in page["events"]] == made[1:4]  # oldest first after the cursor
    assert page["next"] == made[3]
    assert [e["payload"] for e in page["events"]] == [want for _, want in ODD_PAYLOADS[1:4]]


async def test_a_page_is_the_same_json_as_the_response_model_would_give(api: Api) -> None:
    r = await api.client.get("/iotf/devices/d1", params={"count": 5}, headers=api.auth("alice"))
    assert r.status_code == 200
    doc = strict_json(r.content)
    # exclude_unset: payloadEncoding, which only events in another format than json carry
    assert doc == json.loads(DeviceEvents.model_validate(doc).model_dump_json(exclude_unset=True))
    assert set(doc["events"][0]) == {
        "eventId",
        "deviceId",
        "typeId",
        "eventType",
        "format",
        "timestamp",
        "payload",
        "error",
    }


async def test_empty_device_is_an_empty_page_and_a_missing_one_is_404(api: Api) -> None:
    register_device(api.ctx, "thermo", "quiet-1")
    create_group(api.ctx, "watchers", roles=Roles(reader=True), devices=["quiet-1", "ghost-1"])
    create_user(api.ctx, "wanda", "Wanda", password="wanda-password-123", groups=["watchers"])
    auth = {"Authorization": f"Bearer {api.token('wanda')}"}

    for path in ("/iotf/devices/quiet-1", "/iotf/devices/quiet-1/events"):
        r = await api.client.get(path, headers=auth)
        assert r.status_code == 200, (path, r.text)
        assert strict_json(r.content)["events"] == []
    for path in ("/iotf/devices/ghost-1", "/iotf/devices/ghost-1/events"):
        r = await api.client.get(path, headers=auth)  # granted, but never registered
        assert r.status_code == 404, (path, r.text)
        assert r.headers["content-type"] == "application/problem+json"


async def test_a_payload_no_json_writer_can_spell_is_reported_on_its_event(api: Api) -> None:
    [bad] = store_payloads(api, "d1", [UNWRITABLE])
    r = await api.client.get("/iotf/devices/d1", params={"count": 3}, headers=api.auth("alice"))
    assert r.status_code == 200, r.text
    events = strict_json(r.content)["events"]
    assert events[0]["eventId"] == bad
    assert events[0]["payload"] is None
    assert events[0]["error"] == "the stored payload is not JSON"
    assert all(e["error"] is None for e in events[1:])  # the rest of the page is unaffected


async def test_live_events_are_one_sse_line_each_whatever_the_payload_spacing(api: Api) -> None:
    app = api.client._transport.app  # type: ignore[attr-defined]
    async with (
        serving(app) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as http,
        http.stream("GET", "/iotf/devices/d1/stream", headers=api.auth("alice")) as resp,
    ):
        assert resp.status_code == 200
        sent = [b'{\n "a": 1,\r\n "b": "x\\ny"\n}', b'{"t": NaN}']
        made = store_payloads(api, "d1", sent)
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            async for line in resp.aiter_lines():
                if line.startswith("data: "):
                    got.append(strict_json(line[6:].encode()))
                    if len(got) == len(sent):
                        break
                else:  # nothing but the SSE fields: no stray line of a payload
                    assert line == "" or line.startswith(("id: ", "event: ", ":", "retry: ")), line
        assert [e["eventId"] for e in got] == made
        assert got[0]["payload"] == {"a": 1, "b": "x\ny"}
        assert got[1]["payload"] == {"t": None}
