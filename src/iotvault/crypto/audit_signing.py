"""Signed checkpoints of the audit chain's head (Ed25519).

A checkpoint says "record ``seq`` of this installation's audit log has hash ``hash``, as of
``at_us``", signed with the audit key: a 32-byte seed stored in the database wrapped by the master
key (like the command-signing key), so someone with the database alone can neither read nor
use it. Verification needs only the public key, which ``iotvault audit verify`` prints so an
operator can keep it elsewhere.

The signed bytes are a fixed, versioned text form, not JSON, so there is nothing to canonicalise.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from iotvault.domain.audit import Anchor, Checkpoint

__all__ = ["CheckpointSigner", "checkpoint_valid", "signed_bytes"]

_DOMAIN: Final = b"iotvault-audit-checkpoint/v1"


def signed_bytes(seq: int, hash_hex: str, at_us: int) -> bytes:
    return b"\n".join((_DOMAIN, str(seq).encode(), hash_hex.encode(), str(at_us).encode()))


class CheckpointSigner:
    """Signs heads with the audit key; holds only what it was given, never writes it anywhere."""

    def __init__(self, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed)

    def public_key_b64(self) -> str:
        raw = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def sign(self, head: Anchor, at_us: int) -> Checkpoint:
        signature = self._key.sign(signed_bytes(head.seq, head.hash, at_us))
        return Checkpoint(
            head.seq, head.hash, at_us, base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
        )


def checkpoint_valid(public_key_b64: str, checkpoint: Checkpoint) -> bool:
    """Whether ``checkpoint`` carries a valid signature by the key ``public_key_b64``."""
    try:
        raw = base64.urlsafe_b64decode(public_key_b64 + "=" * (-len(public_key_b64) % 4))
        signature = base64.urlsafe_b64decode(checkpoint.signature + "=" * (-len(checkpoint.signature) % 4))
        Ed25519PublicKey.from_public_bytes(raw).verify(
            signature, signed_bytes(checkpoint.seq, checkpoint.hash, checkpoint.at_us)
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True
