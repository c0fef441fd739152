"""The Accept check of the hardening (iotvault.api.middleware): its answers, and its memory of them."""

from __future__ import annotations

import pytest

from iotvault.api import middleware
from iotvault.api.middleware import _ACCEPT_KEPT_LENGTH, _ACCEPTS_KEPT, _accepts


@pytest.mark.parametrize(
    ("accept", "offered", "admitted"),
    [
        ("", "application/json", True),
        ("application/json", "application/json", True),
        ("*/*", "text/event-stream", True),
        ("application/*", "application/json", True),
        ("application/problem+json", "application/json", True),
        ("text/html", "application/json", False),
        ("application/json;q=0", "application/json", False),
        ("application/json; q=0.000, */*;q=0", "application/json", False),
        ("text/html, application/json;q=0.5", "application/json", True),
    ],
)
def test_accept_answers_the_same_the_first_time_and_remembered(
    accept: str, offered: str, admitted: bool
) -> None:
    middleware._accepted.clear()
    assert _accepts(accept, offered) is admitted
    assert _accepts(accept, offered) is admitted  # now from memory
    assert middleware._accepted[(accept, offered)] is admitted


def test_a_client_sending_ever_new_accept_headers_cannot_grow_the_memory() -> None:
    middleware._accepted.clear()
    for i in range(10 * _ACCEPTS_KEPT):
        assert _accepts(f"application/x-{i}, application/json", "application/json")
        assert len(middleware._accepted) <= _ACCEPTS_KEPT
    assert not _accepts("application/x-1", "application/json")  # a forgotten one is worked out again


def test_long_accept_headers_are_answered_and_never_kept() -> None:
    middleware._accepted.clear()
    long_one = "application/x-" + "a" * 60_000 + ", application/json"  # what a 64 KiB header block allows
    assert len(long_one) > _ACCEPT_KEPT_LENGTH
    assert _accepts(long_one, "application/json")
    assert not _accepts(long_one.replace(", application/json", ""), "application/json")
    assert not middleware._accepted  # 256 of them would otherwise hold 15 MiB
