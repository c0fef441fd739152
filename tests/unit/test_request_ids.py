"""Request ids made for requests that bring none (iotvault.api.audit.RequestIds)."""

from __future__ import annotations

import re

from iotvault.api.audit import _REQUEST_ID, RequestIds


def test_ids_are_32_hex_digits_unique_and_differ_between_processes() -> None:
    one, other = RequestIds(), RequestIds()  # two processes' middlewares
    ids = [one() for _ in range(10_000)] + [other() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert all(_REQUEST_ID.fullmatch(i.encode()) for i in ids[:10])  # what a caller may send back
    assert ids[0][:16] != ids[-1][:16]
