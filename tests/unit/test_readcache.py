"""The read caches' bounds and their refusal to keep what a change or deletion made stale."""

from __future__ import annotations

from iotvault.api.readcache import (
    MAX_PRINCIPALS,
    PAGE_BYTES,
    PAGE_EVENT_BYTES,
    PAGES_PER_DEVICE,
    PER_DEVICE,
    EventDocCache,
    Page,
    PrincipalCache,
)
from iotvault.storage.repository import PageCheck


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_principal_is_kept_for_the_ttl_and_never_past_its_credential() -> None:
    clock = Clock()
    cache: PrincipalCache[str] = PrincipalCache(5.0, clock)
    cache.put(b"a", "alice", generation=cache.generation)
    cache.put(b"b", "bob", generation=cache.generation, expires_in_s=1.0)
    cache.put(b"c", "carol", generation=cache.generation, expires_in_s=-3.0)  # already expired
    assert (cache.get(b"a"), cache.get(b"b"), cache.get(b"c")) == ("alice", "bob", None)
    clock.now += 1.0
    assert (cache.get(b"a"), cache.get(b"b")) == ("alice", None)
    clock.now += 4.0
    assert cache.get(b"a") is None


def test_a_principal_resolved_before_a_change_is_not_stored_after_it() -> None:
    cache: PrincipalCache[str] = PrincipalCache(5.0)
    seen = cache.generation  # a lookup begins
    cache.clear()  # meanwhile, a revocation
    cache.put(b"a", "alice", generation=seen)
    assert cache.get(b"a") is None
    assert len(cache) == 0


def test_a_ttl_of_zero_keeps_nothing_and_the_number_of_principals_is_bounded() -> None:
    off: PrincipalCache[int] = PrincipalCache(0.0)
    off.put(b"a", 1, generation=off.generation)
    assert off.get(b"a") is None
    cache: PrincipalCache[int] = PrincipalCache(60.0)
    for i in range(MAX_PRINCIPALS + 10):
        cache.put(i.to_bytes(4, "big"), i, generation=cache.generation)
    assert len(cache) <= MAX_PRINCIPALS


def test_documents_are_bounded_in_bytes_least_recently_read_device_first() -> None:
    cache = EventDocCache(max_bytes=3000, ttl_s=60.0)
    cache.put("d1", [(f"e{i}", b"x" * 100) for i in range(10)], generation=cache.generation)
    cache.put("d2", [(f"e{i}", b"y" * 100) for i in range(10)], generation=cache.generation)
    assert cache.get("d1", ["e0"]) == [b"x" * 100]  # d1 read last: d2 goes first
    cache.put("d3", [(f"e{i}", b"z" * 100) for i in range(15)], generation=cache.generation)
    assert cache.size_bytes <= 3000
    assert not cache.holds("d2")
    assert cache.holds("d1")
    assert cache.holds("d3")


def test_a_device_keeps_at_most_per_device_documents() -> None:
    cache = EventDocCache(max_bytes=10**9, ttl_s=60.0)
    cache.put("d1", [(f"e{i:05}", b"{}") for i in range(PER_DEVICE + 5)], generation=cache.generation)
    assert cache.get("d1", ["e00000", f"e{PER_DEVICE + 4:05}"]) == [None, b"{}"]
    assert cache.size_bytes == 2 * PER_DEVICE


def test_forgetting_a_device_drops_its_documents_and_a_read_in_flight_cannot_put_them_back() -> None:
    cache = EventDocCache(max_bytes=10**6, ttl_s=60.0)
    cache.put("d1", [("e1", b"{1}")], generation=cache.generation)
    seen = cache.generation  # a read of d1 began: it decrypts e2
    cache.forget(["d1"])  # the device is deleted meanwhile
    cache.put("d1", [("e2", b"{2}")], generation=seen)
    assert not cache.holds("d1")
    assert cache.get("d1", ["e1", "e2"]) == [None, None]
    assert cache.size_bytes == 0


def test_documents_age_out_with_the_keys_and_a_zero_size_keeps_nothing() -> None:
    clock = Clock()
    cache = EventDocCache(max_bytes=10**6, ttl_s=5.0, clock=clock)
    cache.put("d1", [("e1", b"{}")], generation=cache.generation)
    clock.now += 5.1
    assert cache.get("d1", ["e1"]) == [None]
    assert not cache.holds("d1")
    off = EventDocCache(max_bytes=0, ttl_s=60.0)
    off.put("d1", [("e1", b"{}")], generation=off.generation)
    assert not off.holds("d1")


def test_forgetting_a_device_tells_the_listeners_the_live_feeds() -> None:
    cache = EventDocCache(max_bytes=10**6, ttl_s=60.0)
    told: list[list[str]] = []
    cache.listeners.append(lambda ids: told.append(list(ids)))
    cache.forget(iter(["d1", "d2"]))  # a one-pass iterable: the cache and the listeners both see it
    assert told == [["d1", "d2"]]


def test_a_page_is_checked_from_its_oldest_event_or_from_the_first_when_it_holds_them_all() -> None:
    assert Page.of(["e3", "e2", "e1"], 3, [b"3", b"2", b"1"], b"{}").check == PageCheck("e1", 3, "e3")
    # all of the device's events: an older event stored late (another node's clock) changes it
    assert Page.of(["e2", "e1"], 50, [b"2", b"1"], b"{}").check == PageCheck("", 2, "e2")


def test_pages_go_with_their_device_are_bounded_and_not_put_back_after_a_forget() -> None:
    cache = EventDocCache(max_bytes=10**6, ttl_s=60.0)
    cache.put("d1", [("e1", b"{}")], generation=cache.generation)
    before = cache.size_bytes
    body = b'{"deviceId":"d1","events":[{}]}'
    cache.put_page("d1", 50, Page.of(["e1"], 50, [b"{}"], body), generation=cache.generation)
    page = cache.page("d1", 50)
    assert page is not None
    assert (page.ids, page.docs, page.body) == (("e1",), (b"{}",), body)
    assert not page.full
    assert cache.size_bytes == before + len(body) + PAGE_BYTES + PAGE_EVENT_BYTES
    for count in range(1, PAGES_PER_DEVICE + 5):
        cache.put_page("d1", count, Page.of(["e1"], count, [b"{}"], body), generation=cache.generation)
    assert sum(cache.page("d1", c) is not None for c in range(1, PAGES_PER_DEVICE + 60)) == PAGES_PER_DEVICE
    assert cache.size_bytes == before + PAGES_PER_DEVICE * (len(body) + PAGE_BYTES + PAGE_EVENT_BYTES)
    seen = cache.generation  # a read of d1 began
    cache.forget(["d1"])
    cache.put("d1", [("e1", b"{}")], generation=cache.generation)  # a later read
    # the first read ends: too late
    cache.put_page("d1", 50, Page.of(["e1"], 50, [b"{}"], body), generation=seen)
    assert cache.page("d1", 50) is None
    # no documents of d2
    cache.put_page("d2", 50, Page.of(["x"], 50, [b"{}"], body), generation=cache.generation)
    assert cache.page("d2", 50) is None


def test_a_page_ages_out_with_its_device_documents() -> None:
    clock = Clock()
    cache = EventDocCache(max_bytes=10**6, ttl_s=60.0, clock=clock)
    cache.put("d1", [("e1", b"{}")], generation=cache.generation)
    cache.put_page("d1", 50, Page.of(["e1"], 50, [b"{}"], b"{}"), generation=cache.generation)
    clock.now += 59.0
    assert cache.page("d1", 50) is not None
    clock.now += 2.0
    assert cache.page("d1", 50) is None
    assert cache.size_bytes == 0


class Hearing:
    """The fan-out's listening session as the cache sees it (None: not listening)."""

    def __init__(self) -> None:
        self.session: int | None = 1

    def __call__(self) -> int | None:
        return self.session


def _trusting(trust_s: float = 1.0) -> tuple[EventDocCache, Clock, Hearing]:
    clock, hearing = Clock(), Hearing()
    cache = EventDocCache(max_bytes=10**6, ttl_s=60.0, clock=clock, trust_s=trust_s)
    cache.hearing = hearing
    cache.put("d1", [("e1", b"{}")], generation=cache.generation)
    cache.put_page("d1", 50, Page.of(["e1"], 50, [b"{}"], b"{}"), generation=cache.generation)
    return cache, clock, hearing


def _found_current(cache: EventDocCache, count: int = 50) -> None:
    """What the read does when its check says the page is current."""
    kept = cache.kept("d1", count)
    assert kept is not None
    cache.trust("d1", count, kept)


def _current(cache: EventDocCache, count: int = 50) -> bool:
    kept = cache.kept("d1", count)
    assert kept is not None
    return kept.current


def test_a_page_found_current_is_believed_until_a_new_event_is_heard_of_or_the_time_is_up() -> None:
    cache, clock, _ = _trusting()
    assert not _current(cache)  # kept, but never checked: asked about
    _found_current(cache)
    assert _current(cache)
    cache.heard(["d2"])  # another device's events change nothing here
    assert _current(cache)
    cache.heard(["d1"])
    assert not _current(cache)
    _found_current(cache)
    clock.now += 0.999
    assert _current(cache)
    clock.now += 0.002
    assert not _current(cache)
    assert cache.kept("d2", 50) is None


def test_a_check_begun_before_a_new_event_was_heard_of_does_not_make_the_page_believed() -> None:
    cache, _, _ = _trusting()
    kept = cache.kept("d1", 50)  # the check begins
    assert kept is not None
    cache.heard(["d1"])  # an event is committed while the statement runs
    cache.trust("d1", 50, kept)  # the statement did not see it
    assert not _current(cache)


def test_a_page_is_believed_only_while_the_fan_out_listens_in_the_session_it_was_found_current() -> None:
    cache, _, hearing = _trusting()
    hearing.session = None  # not listening: another process's commit could go unheard
    _found_current(cache)
    assert not _current(cache)
    hearing.session = 1
    _found_current(cache)
    assert _current(cache)
    hearing.session = None
    assert not _current(cache)
    hearing.session = 2  # listening again: what was missed in between is unknown
    assert not _current(cache)
    kept = cache.kept("d1", 50)
    assert kept is not None
    hearing.session = 3  # the session ended and began again during the check
    cache.trust("d1", 50, kept)
    assert not _current(cache)


def test_a_replaced_or_forgotten_page_and_a_trust_of_zero_are_never_believed() -> None:
    cache, _, _ = _trusting()
    kept = cache.kept("d1", 50)
    assert kept is not None
    # meanwhile another read put a page of its own: the check was of the old one
    cache.put_page("d1", 50, Page.of(["e1"], 50, [b"{}"], b"{}"), generation=cache.generation)
    cache.trust("d1", 50, kept)
    assert not _current(cache)
    _found_current(cache)
    cache.put_page("d1", 50, Page.of(["e1"], 50, [b"{}"], b"{}"), generation=cache.generation)
    assert not _current(cache)  # a new page is believed after a check of its own
    _found_current(cache)
    cache.forget(["d1"])
    assert cache.kept("d1", 50) is None
    off, _, _ = _trusting(trust_s=0.0)
    _found_current(off)
    assert not _current(off)
