"""The read caches never outlive what they were built on (iotvault.api.readcache).

A page of events is served once (filling the cache of encoded events and the cache of
authentication results), then what it rests on changes through the API: the device is
deleted, the reader's group loses the device, the reader's API key is revoked. The next
request must already see the change: the cached documents are gone from memory, the cached
principal is not used. The caches are on (their default TTLs) throughout, so a test fails if
invalidation waits for a TTL.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from apifixture import Built, build_api, stored_event

from iotvault.config import load_settings
from iotvault.context import context
from iotvault.devices import delete_device
from iotvault.domain.ids import EventIdFactory, event_id_millis
from iotvault.storage.repository import BatchWrite, StoredEvent

pytestmark = [pytest.mark.integration]


@asynccontextmanager
async def _client(tmp_path: Path, database_url: str | None) -> AsyncIterator[tuple[Built, httpx.AsyncClient]]:
    built = build_api(tmp_path, database_url, auth_cache_ttl_s="300")  # only invalidation empties it in time
    transport = httpx.ASGITransport(app=built.app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield built, client
    finally:
        built.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[Built, httpx.AsyncClient]]:
    async with _client(tmp_path, None) as both:
        yield both


@pytest.fixture
async def any_db(tmp_path: Path, database_url: str) -> AsyncIterator[tuple[Built, httpx.AsyncClient]]:
    async with _client(tmp_path, database_url) as both:
        yield both


def _bearer(built: Built, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {built.token(user)}"}


def _basic(pair: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


async def _api_key(client: httpx.AsyncClient, root: dict[str, str], **body: object) -> tuple[str, str]:
    r = await client.post("/iotf/apikeys", headers=root, json=body)
    assert r.status_code == 201, r.text
    doc = r.json()
    return doc["key"], doc["password"]


async def test_a_page_read_twice_is_the_same_and_comes_from_the_cache(
    api: tuple[Built, httpx.AsyncClient],
) -> None:
    built, client = api
    alice = _bearer(built, "alice")
    first = await client.get("/iotf/devices/d1?count=50", headers=alice)
    assert first.status_code == 200, first.text
    assert built.svc.event_docs.holds("d1")
    assert built.svc.event_docs.size_bytes > 0
    second = await client.get("/iotf/devices/d1?count=50", headers=alice)
    assert second.content == first.content  # byte for byte what the uncached read made
    events = json.loads(second.content)["events"]
    assert [e["eventId"] for e in events] == built.events["d1"][::-1][:50]
    assert events[0]["payload"] == {"d": {"seq": 59, "device": "d1"}}
    page = await client.get("/iotf/devices/d1/events?count=10", headers=alice)
    assert page.json()["next"] == built.events["d1"][::-1][9]


async def test_a_deleted_device_leaves_the_cache_at_once(api: tuple[Built, httpx.AsyncClient]) -> None:
    built, client = api
    alice, root = _bearer(built, "alice"), _bearer(built, "root")
    assert (await client.get("/iotf/devices/d1", headers=alice)).status_code == 200
    assert built.svc.event_docs.holds("d1")
    r = await client.delete("/iotf/devices/d1", headers=root)
    assert r.status_code == 204, r.text
    assert not built.svc.event_docs.holds("d1"), "decrypted events outlived the crypto-shredding"
    assert (await client.get("/iotf/devices/d1", headers=alice)).status_code == 404


async def test_a_group_that_loses_the_device_loses_the_cached_page(
    api: tuple[Built, httpx.AsyncClient],
) -> None:
    built, client = api
    alice, root = _bearer(built, "alice"), _bearer(built, "root")
    assert (await client.get("/iotf/devices/d1", headers=alice)).status_code == 200
    assert len(built.svc.principals) >= 1
    r = await client.patch("/iotf/groups/readers-1", headers=root, json={"devices": ["d2"]})
    assert r.status_code == 200, r.text
    assert (await client.get("/iotf/devices/d1", headers=alice)).status_code == 404
    assert (await client.get("/iotf/devices/d2", headers=alice)).status_code == 200  # what it gained


async def test_a_revoked_api_key_is_refused_at_the_next_request(api: tuple[Built, httpx.AsyncClient]) -> None:
    built, client = api
    root = _bearer(built, "olga")  # an admin who may read d1, so may grant it
    key, password = await _api_key(client, root, devices=["d1"])
    reader = _basic(f"{key}:{password}")
    for _ in range(2):  # the second one from the cache
        assert (await client.get("/iotf/devices/d1", headers=reader)).status_code == 200
    assert (await client.get("/iotf/devices/d1", headers=_basic(f"{key}:wrong"))).status_code == 401
    r = await client.delete(f"/iotf/apikeys/{key}", headers=root)
    assert r.status_code == 204, r.text
    assert (await client.get("/iotf/devices/d1", headers=reader)).status_code == 401


async def test_a_user_removed_from_the_group_is_refused_at_once(api: tuple[Built, httpx.AsyncClient]) -> None:
    built, client = api
    alice, root = _bearer(built, "alice"), _bearer(built, "root")
    assert (await client.get("/iotf/devices/d1", headers=alice)).status_code == 200
    r = await client.delete("/iotf/groups/readers-1/members/alice", headers=root)
    assert r.status_code == 204, r.text
    assert (await client.get("/iotf/devices/d1", headers=alice)).status_code == 404


def _counting_reads(built: Built) -> list[str]:
    """Counts the reads of a device's newest events (not the checks of a kept page)."""
    reads: list[str] = []
    real_read = built.ctx.store.newest_events

    async def counted(device_id: str, count: int) -> list[StoredEvent]:
        reads.append(device_id)  # the events themselves were read
        return await real_read(device_id, count)

    built.ctx.store.newest_events = counted  # type: ignore[method-assign]  # counts the real reads
    return reads


async def test_a_newest_page_is_reused_only_while_the_database_would_return_it(
    any_db: tuple[Built, httpx.AsyncClient], tmp_path: Path, database_url: str
) -> None:
    """Writes and a deletion by another process, which tells this one nothing, are seen at once."""
    built, client = any_db
    alice = _bearer(built, "alice")
    reads = _counting_reads(built)
    real_read = built.ctx.store.last_events
    first = await client.get("/iotf/devices/d1?count=50", headers=alice)
    assert first.status_code == 200, first.text
    assert (await client.get("/iotf/devices/d1?count=50", headers=alice)).content == first.content
    assert len(reads) == 1, "the second read of an unchanged page read the events again"
    assert (await client.get("/iotf/devices/d1?count=5", headers=alice)).json()["events"] == (
        first.json()["events"][:5]
    )
    assert len(reads) == 2  # another count is a page of its own

    # another process on the same database (a second node, the command line): no fan-out here
    env = {"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_DATABASE_URL": database_url}
    with context(load_settings(environ=env)) as other:
        newest = EventIdFactory().new()
        other.store.write_batch(BatchWrite(events=[stored_event(other, "d1", newest, b'{"d": {"late": 1}}')]))
        after = (await client.get("/iotf/devices/d1?count=50", headers=alice)).json()["events"]
        assert [e["eventId"] for e in after] == [newest] + [e["eventId"] for e in first.json()["events"][:49]]
        assert after[0]["payload"] == {"d": {"late": 1}}
        assert len(reads) == 2, "one newer event: the page is it and the kept page, no read of the rest"
        assert (await client.get("/iotf/devices/d1?count=50", headers=alice)).json()["events"] == after
        assert len(reads) == 2
        assert [e["eventId"] for e in after] == [e.event_id for e in real_read("d1", 50)]

        delete_device(other, "d1")  # crypto-shredded by the other process
        gone = await client.get("/iotf/devices/d1?count=50", headers=alice)
        assert gone.status_code == 404, gone.text
        assert (await client.get("/iotf/devices/d1?count=5", headers=alice)).status_code == 404


async def test_a_short_page_sees_an_older_event_stored_late(any_db: tuple[Built, httpx.AsyncClient]) -> None:
    """A page holding all of a device's events is checked from the first one: an event stored
    late with an older id (another node's clock) still changes it."""
    built, client = any_db
    alice = _bearer(built, "alice")
    page = (await client.get("/iotf/devices/d1?count=100", headers=alice)).json()["events"]
    assert len(page) == len(built.events["d1"]) < 100
    late = EventIdFactory().new_at(event_id_millis(built.events["d1"][0]) - 5_000)
    built.ctx.store.write_batch(BatchWrite(events=[stored_event(built.ctx, "d1", late, b'{"d": 0}')]))
    again = (await client.get("/iotf/devices/d1?count=100", headers=alice)).json()["events"]
    assert len(again) == len(page) + 1
    assert again[-1]["eventId"] == late


async def _page_ids(client: httpx.AsyncClient, headers: dict[str, str], count: int) -> list[str]:
    r = await client.get(f"/iotf/devices/d1?count={count}", headers=headers)
    assert r.status_code == 200, r.text
    return [e["eventId"] for e in r.json()["events"]]


async def test_a_full_page_sees_an_event_stored_late_inside_it(
    any_db: tuple[Built, httpx.AsyncClient],
) -> None:
    """An event stored late with an id between a kept page's oldest and newest (another node's
    clock) is not a newer event: the page is read again, and holds it in its place."""
    built, client = any_db
    alice = _bearer(built, "alice")
    reads = _counting_reads(built)
    page = await _page_ids(client, alice, 5)
    assert page == built.events["d1"][::-1][:5]
    inside = EventIdFactory().new_at(event_id_millis(page[2]) - 500)  # between the 3rd and 4th newest
    built.ctx.store.write_batch(BatchWrite(events=[stored_event(built.ctx, "d1", inside, b'{"d": 0}')]))
    again = await _page_ids(client, alice, 5)
    assert again == [*page[:3], inside, page[3]]
    assert len(reads) == 2, "a late event inside the page must make it be read again"


@pytest.mark.parametrize("added", [1, 3, 40, 50, 70])
async def test_a_page_grown_by_newer_events_is_what_a_read_returns(
    any_db: tuple[Built, httpx.AsyncClient], added: int
) -> None:
    """Newer events only: the page is made from them and the kept page's newest, whichever
    way (on the loop, or in a read thread for many on PostgreSQL, or the new events alone when
    there are as many as asked for), and is exactly what reading it would return."""
    built, client = any_db
    alice = _bearer(built, "alice")
    reads = _counting_reads(built)
    first = await _page_ids(client, alice, 50)
    ids = EventIdFactory()
    newer = [ids.new() for _ in range(added)]
    built.ctx.store.write_batch(
        BatchWrite(
            events=[stored_event(built.ctx, "d1", e, b'{"d": {"n": %d}}' % i) for i, e in enumerate(newer)]
        )
    )
    grown = await client.get("/iotf/devices/d1?count=50", headers=alice)
    truth = built.ctx.store.last_events("d1", 50)
    assert [e["eventId"] for e in grown.json()["events"]] == [e.event_id for e in truth]
    assert [e["eventId"] for e in grown.json()["events"]] == (newer[::-1] + first)[:50]
    assert grown.json()["events"][0]["payload"] == {"d": {"n": added - 1}}
    assert len(reads) == 1, "newer events alone: the page must grow without a read"
    again = await client.get("/iotf/devices/d1?count=50", headers=alice)
    assert again.content == grown.content
    assert len(reads) == 1


async def test_a_newer_event_that_does_not_decrypt_says_so_on_every_read(
    any_db: tuple[Built, httpx.AsyncClient],
) -> None:
    built, client = any_db
    alice = _bearer(built, "alice")
    first = await _page_ids(client, alice, 50)
    bad = EventIdFactory().new()
    good = stored_event(built.ctx, "d1", bad, b'{"d": 1}')
    built.ctx.store.write_batch(BatchWrite(events=[good._replace(payload=b"\x00" * len(good.payload))]))
    for _ in range(2):
        events = (await client.get("/iotf/devices/d1?count=50", headers=alice)).json()["events"]
        assert [e["eventId"] for e in events] == [bad, *first[:49]]
        assert events[0]["payload"] is None
        assert events[0]["error"]
        assert all(e["error"] is None for e in events[1:])


async def test_metrics_show_latency_per_route_template_never_per_raw_path(
    api: tuple[Built, httpx.AsyncClient],
) -> None:
    built, client = api
    alice = _bearer(built, "alice")
    for _ in range(3):
        assert (await client.get("/iotf/devices/d1?count=5", headers=alice)).status_code == 200
    assert (await client.get("/iotf/devices/d2", headers=alice)).status_code == 404  # not hers
    assert (await client.get("/no/such/path/x7", headers=alice)).status_code == 404
    page = (await client.get("/metrics", headers=_bearer(built, "root"))).text
    route = 'iotvault_http_request_duration_seconds_count{method="GET",route="/iotf/devices/{deviceId}"}'
    assert f"{route} 4" in page
    assert 'route="unmatched"' in page
    assert "/iotf/devices/d1" not in page
    assert "/no/such/path" not in page
