"""Machine secrets: device credentials and API keys, generated here and stored only as hashes.

These secrets are 256 random bits made by :func:`new_secret`, never chosen by a person. A slow
password hash (Argon2, scrypt) exists to make guessing low-entropy passwords expensive; no
amount of guessing finds a 256-bit random value, so one SHA-256 is as strong here and keeps
the check cheap enough to run on every MQTT connect and API request. Passwords that people
choose are a different matter and must not use this module.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

_SCHEME: Final = "sha256$"
_HEX_DIGITS: Final = frozenset("0123456789abcdef")
# Fewer random bytes would no longer justify a fast hash.
_MIN_NBYTES: Final = 16


def new_secret(nbytes: int = 32) -> str:
    """A URL-safe random secret, shown to its owner once and then kept only as a hash."""
    if nbytes < _MIN_NBYTES:
        raise ValueError(f"a secret needs at least {_MIN_NBYTES} random bytes, got {nbytes}")
    return secrets.token_urlsafe(nbytes)


def hash_secret(secret: str) -> str:
    """The stored form of a secret; the ``sha256$`` prefix leaves room for another scheme."""
    return _SCHEME + hashlib.sha256(secret.encode()).hexdigest()


def verify_secret(secret: str, stored: str) -> bool:
    """Whether ``secret`` matches ``stored``; a malformed stored value matches nothing.

    It never raises, so that a corrupt row cannot turn an authentication check into a server
    error, and compares in constant time.
    """
    digest = stored.removeprefix(_SCHEME)
    if len(stored) - len(digest) != len(_SCHEME) or len(digest) != 64 or not _HEX_DIGITS.issuperset(digest):
        return False
    try:
        candidate = hashlib.sha256(secret.encode()).hexdigest()
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(candidate, digest)
