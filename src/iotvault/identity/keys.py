"""The provider's token-signing keys: ES256 (P-256), stored wrapped by the master key, rotated.

A key's private half is the 32-byte P-256 scalar, which the master key wraps exactly as it wraps
a device's data key (AES-256-GCM; :meth:`~iotvault.crypto.master_key.MasterKey.wrap_data_key`).
The associated data names ``oidc-signing-key/<kid>``: a device id can never contain ``/``, so a
signing key and a data key can never be taken for one another, and a wrapped key copied to
another key's row does not unwrap. The public half is stored beside it as a JWK.

Rotation (``iotvault keys rotate --signing``) adds a new key, which signs from then on (every
node sees it within ``key_cache_ttl_s``). The keys it replaces stop signing but stay in the
JWKS until every token they may have signed has expired: the rotation time, plus how long a
node may still be using its cached signer, plus the lifetime of a token, plus the verifiers'
clock leeway. Then the housekeeping deletes them, private half and all.

:class:`SigningKeys` is also the local issuer's :class:`~iotvault.auth.keys.KeySource`, so the
API verifies the provider's tokens with exactly the keys the JWKS publishes.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Final

from joserfc.jwk import ECKey, JWKRegistry, KeySet

from iotvault.auth.keys import public_keyset
from iotvault.clock import now_us
from iotvault.crypto.master_key import MasterKey
from iotvault.errors import KeyUnwrapError
from iotvault.identity.records import SigningKeyRecord
from iotvault.identity.store import IdentityStore

log = logging.getLogger(__name__)

ALG: Final = "ES256"
_SCALAR_LEN: Final = 32  # a P-256 private key
_WRAP_LABEL: Final = "oidc-signing-key/"
_WRAP_VERSION: Final = 1
VERIFIER_LEEWAY_S: Final = 60  # auth.tokens accepts 30 s of clock skew; twice that, to be safe
_MIN_RELOAD_S: Final = 1.0  # an unknown kid reloads the keys at most this often


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True, slots=True)
class Signer:
    kid: str
    key: ECKey  # private


def new_key_record(master: MasterKey, at_us: int) -> SigningKeyRecord:
    """A fresh P-256 key, its kid the RFC 7638 thumbprint, the private scalar wrapped."""
    key = ECKey.generate_key("P-256", private=True)
    kid = key.thumbprint()
    private = key.as_dict(private=True)
    scalar = _unb64(str(private["d"]))
    if len(scalar) != _SCALAR_LEN:  # joserfc pads the scalar to the curve size; be sure
        scalar = scalar.rjust(_SCALAR_LEN, b"\0")
    public = {**key.as_dict(private=False), "kid": kid, "alg": ALG, "use": "sig"}
    return SigningKeyRecord(
        kid=kid,
        alg=ALG,
        public_jwk=json.dumps(public, sort_keys=True),
        wrapped=master.wrap_data_key(_WRAP_LABEL + kid, _WRAP_VERSION, scalar),
        created_us=at_us,
        retired_us=None,
        publish_until_us=None,
    )


def _private_key(master: MasterKey, record: SigningKeyRecord) -> ECKey:
    scalar = master.unwrap_data_key(_WRAP_LABEL + record.kid, _WRAP_VERSION, record.wrapped)
    key = JWKRegistry.import_key({**json.loads(record.public_jwk), "d": _b64(scalar)})
    if not isinstance(key, ECKey) or key.thumbprint() != record.kid:
        raise KeyUnwrapError(_WRAP_LABEL + record.kid, _WRAP_VERSION)
    return key


def _published(record: SigningKeyRecord, at_us: int) -> bool:
    return record.publish_until_us is None or record.publish_until_us > at_us


class SigningKeys:
    """The signing key in use and the public keys to publish, cached for ``cache_ttl_s``.

    Thread-safe: the protocol code signs from worker threads, the API verifies on the loop.
    """

    def __init__(
        self, store: IdentityStore, master: MasterKey, *, token_ttl_s: int, cache_ttl_s: float
    ) -> None:
        self._store = store
        self._master = master
        self._token_ttl_s = token_ttl_s
        self._cache_ttl_s = cache_ttl_s
        self._lock = threading.Lock()
        self._signer: Signer | None = None
        self._public: KeySet | None = None
        self._loaded_at = -float("inf")

    # ---- management ------------------------------------------------------------------
    def rotate(self) -> tuple[str, list[str], int]:
        """Make a new key the signing key; returns its kid, the kids it retired, and until
        when (Unix µs) those stay published."""
        at = now_us()
        retiring = [r.kid for r in self._store.signing_keys() if r.retired_us is None]
        grace_s = self._cache_ttl_s + self._token_ttl_s + VERIFIER_LEEWAY_S
        until = at + int(grace_s * 1_000_000)
        record = new_key_record(self._master, at)
        self._store.add_signing_key(record, retire_others_until_us=until)
        self.invalidate()
        log.info("signing key %s now signs; %s published until %d", record.kid, retiring, until)
        return record.kid, retiring, until

    def invalidate(self) -> None:
        with self._lock:
            self._loaded_at = -float("inf")

    # ---- use -------------------------------------------------------------------------
    def _load(self, *, force: bool = False) -> tuple[Signer | None, KeySet]:
        """Blocking: read the keys (at most once per cache TTL unless forced)."""
        with self._lock:
            fresh = time.monotonic() - self._loaded_at < (_MIN_RELOAD_S if force else self._cache_ttl_s)
            if fresh and self._public is not None:
                return self._signer, self._public
            at = now_us()
            records = [r for r in self._store.signing_keys() if _published(r, at)]
            signing = next((r for r in records if r.retired_us is None), None)
            signer = self._signer
            if signing is None:
                signer = None
            elif signer is None or signer.kid != signing.kid:
                signer = Signer(signing.kid, _private_key(self._master, signing))
            public = public_keyset(
                KeySet([JWKRegistry.import_key(json.loads(r.public_jwk)) for r in records])
            )
            self._signer, self._public, self._loaded_at = signer, public, time.monotonic()
            return signer, public

    def signer(self) -> Signer:
        """Blocking: the key that signs now; the first call on a new installation makes one."""
        signer, _ = self._load()
        if signer is None:
            signer, _ = self._load(force=True)
        if signer is None:
            self._store.add_signing_key(new_key_record(self._master, now_us()), retire_others_until_us=None)
            self.invalidate()
            signer, _ = self._load(force=True)
        if signer is None:  # pragma: no cover - just stored
            raise RuntimeError("no signing key after creating one")
        return signer

    def public_keys(self) -> KeySet:
        """Blocking: the public keys the JWKS publishes (never none: the first call makes one)."""
        signer, public = self._load()
        if signer is None:
            self.signer()
            _, public = self._load()
        return public

    def public_jwks(self) -> dict[str, list[dict[str, object]]]:
        """Blocking: the JWKS document (public members only)."""
        return {"keys": [dict(key.as_dict(private=False)) for key in self.public_keys()]}

    async def keys(self, *, refresh: bool = False) -> KeySet:
        """The :class:`~iotvault.auth.keys.KeySource` protocol: public keys, from a thread."""
        if (
            not refresh
            and self._public is not None
            and time.monotonic() - self._loaded_at < self._cache_ttl_s
        ):
            return self._public
        _, public = await asyncio.to_thread(self._load, force=refresh)
        return public
