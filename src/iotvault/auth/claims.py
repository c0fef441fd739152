"""What a verified bearer token says (:class:`TokenClaims`), and why one was refused
(:class:`InvalidTokenError`): the words :mod:`.keys`, :mod:`.tokens` and the API share."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from iotvault.errors import IotVaultError


class InvalidTokenError(IotVaultError):
    """A bearer token is refused. ``reason`` is short and safe to show to the caller.

    Reasons: ``malformed token``, ``token too large``, ``algorithm not allowed``, ``header
    carries a key``, ``unsupported header``, ``malformed key id``, ``wrong token type``,
    ``unknown issuer``, ``unknown key``, ``algorithm does not match the key``, ``bad
    signature``, ``issuer keys unavailable``, ``malformed claims``, ``missing expiry``,
    ``expired``, ``not yet valid``, ``issued in the future``, ``wrong audience``, ``missing
    subject``, ``ID token from another issuer``, ``ID token subject differs``.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid token: {reason}")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified access token says about its bearer."""

    subject: str
    issuer: str
    audience: tuple[str, ...]
    expires_at: int
    groups: tuple[str, ...]  # from the issuer's groups claim; empty when absent
    anonymous: bool  # "anon" in ``amr``: App ID's anonymous login
    scopes: tuple[str, ...]
    user_name: str | None  # ``preferred_username``
    local: bool  # issued by iotvault's own provider
    claims: Mapping[str, Any] = field(repr=False, compare=False)  # all verified claims, read-only
