"""The API's token verifier, aware of the provider's revocations.

:class:`~iotvault.auth.tokens.TokenVerifier` checks signatures and claims, which is all a JWT
can say by itself. The provider also knows when a login stopped counting before its tokens
expire — logout, revocation, a replayed code or refresh token, a disabled or changed user — so
for tokens of the local issuer this verifier also asks whether the grant named by ``sid`` still
stands (one indexed read; the API keeps a verified principal for at most
:data:`iotvault.api.security.CACHE_TTL_S` seconds, which bounds how long a revoked token may
still be served). Tokens of external issuers are verified as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from iotvault.auth.claims import InvalidTokenError, TokenClaims
from iotvault.auth.tokens import IssuerConfig, TokenVerifier
from iotvault.identity.provider import IdentityProvider
from iotvault.identity.records import GrantRecord


def local_issuer(provider: IdentityProvider) -> IssuerConfig:
    """The provider as an issuer the API trusts: its public URL, its audience, its keys."""
    return IssuerConfig(issuer=provider.issuer, audience=provider.audience, keys=provider.keys, local=True)


class ProviderVerifier(TokenVerifier):
    def __init__(self, provider: IdentityProvider, others: Sequence[IssuerConfig] = ()) -> None:
        super().__init__([local_issuer(provider), *others])
        self.provider = provider

    async def verify(self, access_token: str, id_token: str | None = None) -> TokenClaims:
        claims = await super().verify(access_token, id_token)
        if claims.issuer == self.provider.issuer:
            await self._grant(claims)
        return claims

    async def verify_local(self, access_token: str) -> tuple[TokenClaims, GrantRecord]:
        """An access token of the provider itself and its live grant (for userinfo)."""
        claims = await super().verify(access_token)
        if claims.issuer != self.provider.issuer:
            raise InvalidTokenError("unknown issuer")
        return claims, await self._grant(claims)

    async def _grant(self, claims: TokenClaims) -> GrantRecord:
        grant = await asyncio.to_thread(self.provider.live_grant, claims.claims.get("sid"))
        if grant is None or grant.who.subject != claims.subject:
            raise InvalidTokenError("revoked")
        return grant
