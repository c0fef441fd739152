"""Platform secrets kept in the database, wrapped by the master key.

Two secrets every node of one installation must share: the Ed25519 key that signs commands,
and the password of iotvault's own broker account. Kept in ``iotvault_meta`` wrapped by the
master key (AES-256-GCM, like the devices' data keys) rather than in files, so that several
API and ingest nodes use the same ones without copying files around, a backup of the database
holds them, and a stolen database without the master key reveals neither. The first node to
need one makes it; nodes starting together agree on one (:meth:`SqlStore.add_meta_if_absent`).

Each is wrapped under a reserved name, ``iotvault:<what>``, that no device can have (``:`` is
not allowed in a deviceId), so its associated data never matches a device's data key.

The command-signing key is distinct from the OpenID Connect signing keys (``iotvault keys
rotate --signing``): devices pin it, and it never signs anything else.
"""

from __future__ import annotations

from typing import Final

from iotvault.crypto.master_key import MasterKey, generate_data_key
from iotvault.crypto.signing import CommandSigningKey
from iotvault.domain.encoding import b64url, b64url_decode
from iotvault.errors import KeyUnwrapError
from iotvault.storage.sql import SqlStore

COMMAND_SIGNING_KEY: Final = "command_signing_key"
BROKER_SERVICE_SECRET: Final = "broker_service_secret"  # noqa: S105 - the name of a meta row
_PREFIX: Final = "v1:"


def stored_secret(store: SqlStore, master: MasterKey, name: str) -> bytes:
    """The 32-byte secret called ``name``, made on first use."""
    wrap_id = f"iotvault:{name}"
    stored = store.get_meta(name)
    if stored is None:
        wrapped = master.wrap_data_key(wrap_id, 1, generate_data_key())
        stored = store.add_meta_if_absent(name, _PREFIX + b64url(wrapped))
    if not stored.startswith(_PREFIX):
        raise KeyUnwrapError(wrap_id, 1)
    try:
        wrapped = b64url_decode(stored.removeprefix(_PREFIX))
    except ValueError:
        raise KeyUnwrapError(wrap_id, 1) from None
    return master.unwrap_data_key(wrap_id, 1, wrapped)


def command_signing_key(store: SqlStore, master: MasterKey) -> CommandSigningKey:
    """The platform's command-signing key; its public half is what devices trust."""
    return CommandSigningKey.from_seed(stored_secret(store, master, COMMAND_SIGNING_KEY))


def broker_service_password(store: SqlStore, master: MasterKey) -> str:
    """The password of iotvault's own broker account (``iotvault:service``)."""
    return b64url(stored_secret(store, master, BROKER_SERVICE_SECRET))
