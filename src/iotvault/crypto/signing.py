"""Ed25519 signatures for commands, in the JWS compact serialization (RFC 7515; EdDSA, RFC 8037).

Why JWS rather than a format of our own: a device in any language can verify a command with
the JOSE library it already has, or with 20 lines around its Ed25519 primitive; the signing
input is ``BASE64URL(header) || "." || BASE64URL(document)``. Why sign *bytes*: the signature
covers exactly the document that was transmitted, so a device never re-serialises JSON before
checking (re-serialising is where signature schemes over JSON go wrong: key order, number
formats, escapes). The platform still produces those bytes deterministically with
:func:`canonical_json`, so a test or an auditor can rebuild them from the stored fields.

Strictness, because a verifier is only as good as what it refuses: the header must say
``"alg": "EdDSA"`` and the expected ``typ`` (explicit typing, RFC 8725 section 3.11, so that no
other signed object of ours can pass for a command), must name the verifying key's ``kid`` (its
RFC 7638 thumbprint) and carry no ``crit``; every part must be canonical unpadded base64url;
the signature is checked before the document is parsed. ``alg: none``, HMAC "signatures" made
with the public key, and any other algorithm are refused because only one algorithm exists here.

This module imports nothing of iotvault but its error tree and the pure encodings of
:mod:`iotvault.domain.encoding`, so the device SDK can use it alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from iotvault.domain.encoding import b64url, b64url_decode, canonical_json
from iotvault.errors import SignatureError

__all__ = [
    "ALG",
    "COMMAND_TYP",
    "CommandPublicKey",
    "CommandSigningKey",
    "b64url",
    "b64url_decode",
    "canonical_json",
]

ALG: Final = "EdDSA"
COMMAND_TYP: Final = "iotvault-command+jws"
MAX_TOKEN_CHARS: Final = 96 * 1024  # a command is small; refuse to parse megabytes
_SEED_LEN: Final = 32
_SIG_LEN: Final = 64


class CommandPublicKey:
    """The platform's public key for commands, as a device holds it."""

    __slots__ = ("_key", "_raw", "kid")

    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self._raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        thumbprint_input = json.dumps(
            {"crv": "Ed25519", "kty": "OKP", "x": b64url(self._raw)}, separators=(",", ":"), sort_keys=True
        )
        self.kid: str = b64url(hashlib.sha256(thumbprint_input.encode()).digest())  # RFC 7638

    @classmethod
    def from_raw(cls, raw: bytes) -> CommandPublicKey:
        if len(raw) != 32:
            raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(raw)}")
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    @classmethod
    def from_text(cls, text: str) -> CommandPublicKey:
        """Read a key as printed by ``iotvault devices command-key``: PEM, or raw base64url."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode("ascii"))
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("the PEM key is not an Ed25519 public key")
            return cls(key)
        return cls.from_raw(b64url_decode(text))

    @property
    def raw(self) -> bytes:
        return self._raw

    def pem(self) -> str:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(self._raw), "kid": self.kid, "alg": ALG}

    def verify(self, token: str, *, typ: str = COMMAND_TYP) -> dict[str, Any]:
        """Check a compact JWS made by :meth:`CommandSigningKey.sign`; return its document.

        Raises :class:`~iotvault.errors.SignatureError` with a short reason: ``malformed``,
        ``bad_header``, ``unknown_key`` or ``bad_signature``.
        """
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise SignatureError("malformed")
        parts = token.split(".")
        if len(parts) != 3:
            raise SignatureError("malformed")
        header_b64, payload_b64, sig_b64 = parts
        try:
            header = json.loads(b64url_decode(header_b64))
            signature = b64url_decode(sig_b64)
            payload = b64url_decode(payload_b64)
        except (ValueError, RecursionError):
            raise SignatureError("malformed") from None
        if (
            not isinstance(header, dict)
            or header.get("alg") != ALG
            or header.get("typ") != typ
            or "crit" in header
            or not isinstance(header.get("kid"), str)
        ):
            raise SignatureError("bad_header")
        if header["kid"] != self.kid:
            raise SignatureError("unknown_key")
        if len(signature) != _SIG_LEN:
            raise SignatureError("bad_signature")
        try:
            self._key.verify(signature, f"{header_b64}.{payload_b64}".encode("ascii"))
        except InvalidSignature:
            raise SignatureError("bad_signature") from None
        try:
            document = json.loads(payload)
        except (ValueError, RecursionError):
            raise SignatureError("malformed") from None
        if not isinstance(document, dict):
            raise SignatureError("malformed")
        return document

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CommandPublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"<CommandPublicKey kid={self.kid}>"


class CommandSigningKey:
    """The platform's private key for commands. Never in ``repr``; stored only wrapped."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = CommandPublicKey(key.public_key())

    @classmethod
    def generate(cls) -> CommandSigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> CommandSigningKey:
        if len(seed) != _SEED_LEN:
            raise ValueError(f"an Ed25519 seed has {_SEED_LEN} bytes, not {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        """The 32 secret bytes, to be wrapped for storage and nothing else."""
        return self._key.private_bytes_raw()

    def sign(self, document: Mapping[str, Any], *, typ: str = COMMAND_TYP) -> str:
        """A compact JWS of ``canonical_json(document)``."""
        header = canonical_json({"alg": ALG, "kid": self.public.kid, "typ": typ})
        signing_input = f"{b64url(header)}.{b64url(canonical_json(dict(document)))}"
        return f"{signing_input}.{b64url(self._key.sign(signing_input.encode('ascii')))}"

    def __repr__(self) -> str:
        return f"<CommandSigningKey kid={self.public.kid}>"
