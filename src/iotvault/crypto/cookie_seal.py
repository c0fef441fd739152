"""Sealing a server-side record under a key only its bearer's cookie can give.

A web session is stored in the shared database (so that every API node finds it) but holds
OAuth tokens; a database reader must not be able to use them. The cookie value is 256 random
bits that only the browser keeps, so two things are derived from it with separate labels:

* the row's name, :func:`cookie_id` — SHA-256 of a label and the value: finding the row needs
  the cookie, and the row does not give the cookie back;
* the key, :func:`cookie_key` — HKDF-SHA256 of the value with another label: AES-256-GCM over
  the record, with the row's name as associated data (a sealed record copied to another row
  does not open).

So neither the database nor a backup nor the server alone, without a request from the browser,
can open a session; ending one is deleting its row.

Layout: ``0x01 | nonce (12 bytes) | ciphertext || tag (16 bytes)``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT: Final = b"\x01"
_ID_LABEL: Final = b"iotvault/web-session/id/v1\x00"
_KEY_LABEL: Final = b"iotvault/web-session/key/v1"


def cookie_id(value: str) -> str:
    """The name a record is kept under: hex SHA-256 of a label and the cookie value."""
    return hashlib.sha256(_ID_LABEL + value.encode()).hexdigest()


def cookie_key(value: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_LABEL).derive(value.encode())


def seal(value: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(12)
    aad = cookie_id(value).encode()
    return FORMAT + nonce + AESGCM(cookie_key(value)).encrypt(nonce, plaintext, aad)


def open_sealed(value: str, record: bytes) -> bytes | None:
    """The plaintext, or None when the record is not one this cookie sealed (or was altered)."""
    if len(record) < 1 + 12 + 16 or record[:1] != FORMAT:
        return None
    try:
        return AESGCM(cookie_key(value)).decrypt(record[1:13], record[13:], cookie_id(value).encode())
    except InvalidTag:
        return None
