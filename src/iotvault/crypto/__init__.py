"""Field encryption for iotvault: pure functions and objects, no SQL, asyncio or HTTP.

Key hierarchy: a master key in a file of its own (:mod:`.master_key`) wraps one data key per
device and version; the wrapped keys live in the database, bound by their associated data to
the device and version they belong to. Deleting a device's keys makes its events unreadable
everywhere, backups included. :mod:`.keycache` keeps unwrapped keys in memory so that sealing
or opening an event costs one AES-GCM call.

An event payload is stored as one self-describing value (:mod:`.cipher`)::

    0x01 | key version (4 bytes, big-endian) | nonce (12 bytes) | ciphertext || tag (16 bytes)

Its associated data is the purpose and format label, the device id, the event id and the key
version. Those are exactly what a person with write access to the database could swap
without knowing a key: moving a ciphertext to another row or relabelling its key version then
fails authentication instead of serving another event's data. Which fields stay in plaintext
beside the record, for queries, is the storage layer's decision and its threat model's.

:mod:`.tokens` hashes the random secrets of devices and API keys.
"""

from __future__ import annotations

from iotvault.crypto.cipher import (
    FORMAT_V1,
    HEADER_LEN,
    decrypt_event,
    encrypt_event,
    record_key_version,
)
from iotvault.crypto.keycache import DataKeyCache
from iotvault.crypto.master_key import MasterKey, generate_data_key
from iotvault.crypto.tokens import hash_secret, new_secret, verify_secret

__all__ = [
    "FORMAT_V1",
    "HEADER_LEN",
    "DataKeyCache",
    "MasterKey",
    "decrypt_event",
    "encrypt_event",
    "generate_data_key",
    "hash_secret",
    "new_secret",
    "record_key_version",
    "verify_secret",
]
