"""The byte encodings signed documents are made of: canonical JSON and unpadded base64url. Pure.

Shared by the command formats (:mod:`iotvault.domain.commands`) and their signatures
(:mod:`iotvault.crypto.signing`), which is why they live below both.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """iotvault's canonical JSON: the one byte string for a JSON value.

    Object keys sorted (by code point), no insignificant whitespace, ASCII only (everything else
    as ``\\uXXXX`` escapes, surrogate pairs beyond the BMP), ``NaN`` and infinities refused,
    integers as digits, other numbers in Python's shortest round-trip form. Sign the result;
    verify the bytes as received.
    """
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        ).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not representable as canonical JSON: {exc}") from None


def b64url(data: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; refuse padding, foreign characters and non-canonical text."""
    if not isinstance(text, str) or "=" in text or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if b64url(raw) != text:  # urlsafe_b64decode skips junk and ignores trailing bits
        raise ValueError("not canonical base64url")
    return raw
