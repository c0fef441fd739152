"""The stored form of an event payload: one self-describing AES-256-GCM record.

Layout (all integers big-endian)::

    offset  0      1 byte   format version, 0x01
    offset  1      4 bytes  key version (unsigned)
    offset  5     12 bytes  random nonce
    offset 17      n bytes  ciphertext || 16-byte GCM tag

The nonce and key version travel inside the value, so rotating keys or changing the format never
needs a schema change: a reader learns from the record itself which data key and which format
it needs.

The associated data is ``b"iotvault/event/v1\\x00" + device_id + b"\\x00" + event_id + b"\\x00"
+ key_version (4 bytes)``. It pins everything an attacker with write access to the database
could swap without knowing a key: copying a ciphertext into another row (other event or
device) or relabelling it with another key version makes the tag check fail. The format
version is pinned by the ``v1`` in the purpose label. Ids must not contain NUL, the separator,
so that no two (device, event) pairs yield the same associated data; :func:`encrypt_event`
refuses them. Which columns stay in plaintext for queries is decided by the storage layer,
not here.

Nonces are 96 random bits, which is safe for up to 2**32 records per key version (NIST
SP 800-38D); per-device keys and ``keys rotate`` keep every key far below that. A buffered or
counter nonce would be faster, but a process forked with a copied buffer or counter would
repeat nonces, which breaks GCM outright, so every record asks the OS for a fresh one.

This is the ingest hot path, so the format lives in two layers here, both in this module
(nothing else knows the offsets or the associated data):

* the per-event functions :func:`seal_record` and :func:`open_record` take positional
  arguments and no keyword binding, integer conversion or closure per call. Sealing takes a
  :class:`SealingKey`: a data key bound once (:func:`bind_key`) to a device and key version,
  with the range check, the device id's NUL check, the header and the parts of the associated
  data that are the same for every event of that device and version done in advance.
  Ingest seals every event of a device with the same one for ``key_cache_ttl_s``, instead of
  preparing those parts per event (BENCHMARKS.md, "Measurements behind choices in the code").
  Opening reads the version from the record, so it builds its associated data in one piece;
* :func:`encrypt_event`, :func:`decrypt_event` and :func:`record_key_version` are the
  documented keyword forms on top of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from iotvault.errors import RecordDecryptionError

FORMAT_V1: Final = 1
HEADER_LEN: Final = 17
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
#: The shortest valid record: a header and the tag of an empty payload.
MIN_RECORD_LEN: Final = HEADER_LEN + TAG_LEN
MAX_KEY_VERSION: Final = 0xFFFF_FFFF

_urandom = os.urandom
#: :func:`decrypt_event` has no cache: each of its lookups goes to the caller's function.
_NOTHING_CACHED: Final[dict[tuple[str, bytes], AESGCM]] = {}


class SealingKey(NamedTuple):
    """A data key bound to one device and key version, ready to seal that device's events.

    Make one with :func:`bind_key`, which checks what it is given. The fields are what every
    record of the device and version shares: the associated data of an event is
    ``aad_prefix + event_id + aad_suffix``.
    """

    header: bytes  # format and key version: the record's first 5 bytes
    aad_prefix: bytes  # purpose label, device id, separator
    aad_suffix: bytes  # separator, key version
    aead: AESGCM
    version: int


def key_version_bytes(key_version: int) -> bytes:
    """The 4-byte header form of ``key_version``; :class:`ValueError` outside its range."""
    try:
        return key_version.to_bytes(4, "big")
    except OverflowError:
        raise ValueError(f"key_version must be in 0..{MAX_KEY_VERSION}, got {key_version}") from None


def bind_key(aead: AESGCM, device_id: str, key_version: int) -> SealingKey:
    """Bind the data key of ``key_version`` to ``device_id`` for :func:`seal_record`.

    ``key_version`` must be the version of the data key behind ``aead``: it is written in each
    header so that a reader can find the key again after rotation.
    """
    version = key_version_bytes(key_version)
    if "\x00" in device_id:
        raise _nul_in_ids()
    return SealingKey(
        b"\x01" + version,
        f"iotvault/event/v1\x00{device_id}\x00".encode(),
        b"\x00" + version,
        aead,
        key_version,
    )


def seal_record(key: SealingKey, event_id: str, plaintext: bytes) -> bytes:
    """:func:`encrypt_event` with positional arguments and a key bound in advance."""
    header, aad_prefix, aad_suffix, aead, _ = key
    if "\x00" in event_id:
        raise _nul_in_ids()
    nonce = _urandom(NONCE_LEN)
    # Two concatenations: measured faster than b"".join here (BENCHMARKS.md).
    return header + nonce + aead.encrypt(nonce, plaintext, aad_prefix + event_id.encode() + aad_suffix)


def open_record(
    cached: Callable[[tuple[str, bytes]], AESGCM | None],
    load: Callable[[str, int], AESGCM],
    device_id: str,
    event_id: str,
    record: bytes,
) -> bytes:
    """:func:`decrypt_event` with positional arguments and a two-step key lookup.

    ``cached((device_id, version))`` gets the record's version in its 4-byte header form and
    is meant to be a cache's ``dict.get``: a call into C, no Python frame, on every hit. Only
    when it returns None does ``load(device_id, version)`` run, with the version as a number;
    it returns the key or raises, like the lookup of :func:`decrypt_event`.
    """
    if len(record) < MIN_RECORD_LEN or record[0] != FORMAT_V1:
        raise _bad_header(record, device_id, event_id)
    version = record[1:5]
    aead = cached((device_id, version))
    if aead is None:
        aead = load(device_id, int.from_bytes(version, "big"))
    try:
        # The same bytes as SealingKey's aad_prefix + event_id + aad_suffix, in one piece.
        aad = f"iotvault/event/v1\x00{device_id}\x00{event_id}\x00".encode() + version
        return aead.decrypt(record[5:HEADER_LEN], record[HEADER_LEN:], aad)
    except InvalidTag as exc:
        raise RecordDecryptionError(
            device_id,
            event_id,
            "authentication failed: the record was altered, moved from another row, or the key is wrong",
        ) from exc
    except UnicodeEncodeError as exc:
        # No record can have been sealed for an id that has no UTF-8 form.
        raise RecordDecryptionError(device_id, event_id, "the id is not valid UTF-8") from exc


def encrypt_event(
    aead: AESGCM, *, device_id: str, event_id: str, key_version: int, plaintext: bytes
) -> bytes:
    """Seal one event payload for the row ``(device_id, event_id)``.

    ``key_version`` must be the version of the data key behind ``aead``: it is written in the
    header so that a reader can find the key again after rotation.
    """
    return seal_record(bind_key(aead, device_id, key_version), event_id, plaintext)


def record_key_version(record: bytes, *, device_id: str = "?", event_id: str = "?") -> int:
    """Read which key version a record needs, without decrypting it.

    Rotation and re-encryption jobs use this to find records still under an old key; the ids
    only label the error.
    """
    if len(record) < MIN_RECORD_LEN or record[0] != FORMAT_V1:
        raise _bad_header(record, device_id, event_id)
    return int.from_bytes(record[1:5], "big")


def decrypt_event(
    aead_for_version: Callable[[int], AESGCM], *, device_id: str, event_id: str, record: bytes
) -> bytes:
    """Open a record stored in the row ``(device_id, event_id)``.

    ``aead_for_version`` maps the record's key version to its AES-GCM object (usually through
    :class:`~iotvault.crypto.keycache.DataKeyCache`); a :class:`DataKeyNotFoundError` it
    raises, for instance after crypto-shredding, propagates unchanged because "the key is
    gone" and "the record was tampered with" call for different responses.
    """
    return open_record(
        _NOTHING_CACHED.get,
        lambda _device_id, version: aead_for_version(version),
        device_id,
        event_id,
        record,
    )


def _nul_in_ids() -> ValueError:
    return ValueError("device and event ids must not contain NUL: it separates them in the associated data")


def _bad_header(record: bytes, device_id: str, event_id: str) -> RecordDecryptionError:
    if len(record) < MIN_RECORD_LEN:
        reason = f"truncated: {len(record)} bytes, a format {FORMAT_V1} record has at least {MIN_RECORD_LEN}"
    else:
        reason = f"unknown record format 0x{record[0]:02x}"
    return RecordDecryptionError(device_id, event_id, reason)
