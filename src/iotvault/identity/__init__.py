"""iotvault's own OpenID Connect provider: what IBM App ID did for the seed's clients.

People log in here — the web dashboard, mobile apps and command-line clients — and get tokens
the API accepts. The folder reads from the outside in:

``web``       the HTTP vocabulary without a framework: :class:`~.web.Call` in, :class:`~.web.Answer` out
``browser``   what a browser sees: authorization, login page, logout, device verification pages
``requests``  what a browser brings, checked: the authorization request, device user codes
``grants``    what a client program calls: token endpoint, device authorization, revocation
``provider``  the rules both share: discovery, sessions, grants, issuing codes and tokens
``minting``   the token formats (agreed with :mod:`iotvault.auth.tokens`)
``keys``      ES256 signing keys wrapped by the master key, rotation, the JWKS
``clients``   the OAuth client registry
``throttle``  login throttling and lockout, counted in the identity events
``verifier``  the API's verifier that also honours revocation
``store``     the SQL, and only there: one table store per aggregate in ``tables/``, the
              records in ``records``
``pages``     the HTML templates in ``templates/``

The protocol code is written here on top of joserfc (JWS/JWT) rather than with Authlib's
server classes; the README ("OpenID Connect provider") says why. The FastAPI adapter is
:mod:`iotvault.api.routes.oidc`; it only translates requests and answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from iotvault.auth.claims import InvalidTokenError
from iotvault.auth.tokens import IssuerConfig
from iotvault.config import Settings
from iotvault.identity.browser import Browser
from iotvault.identity.grants import Grants
from iotvault.identity.provider import PATHS, IdentityProvider, IdentityResources, api_audience
from iotvault.identity.verifier import ProviderVerifier
from iotvault.identity.web import Answer, json_answer

__all__ = ["PATHS", "Identity", "IdentityProvider", "ProviderVerifier", "api_audience"]


class Identity:
    """The provider with its two faces, built once per process (``create_app`` and ``Node``)."""

    def __init__(self, settings: Settings, ctx: IdentityResources) -> None:
        self.provider = IdentityProvider(settings, ctx)
        self.browser = Browser(self.provider)
        self.grants = Grants(self.provider)
        self.verifier = ProviderVerifier(self.provider)  # this issuer only: userinfo

    def api_verifier(self, others: Sequence[IssuerConfig] = ()) -> ProviderVerifier:
        """The verifier for the API: this provider's tokens, and those of ``others``."""
        return ProviderVerifier(self.provider, others)

    async def userinfo(self, authorization: str | None) -> Answer:
        """OpenID Connect Core 5.3: the bearer's claims; 401 with ``invalid_token`` if none."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            return json_answer(
                {"error": "invalid_token", "error_description": "send Authorization: Bearer <access_token>"},
                401,
                {"WWW-Authenticate": 'Bearer realm="iotvault"'},
            )
        try:
            claims, grant = await self.verifier.verify_local(token)
        except InvalidTokenError as exc:
            challenge = f'Bearer realm="iotvault", error="invalid_token", error_description="{exc.reason}"'
            return json_answer(
                {"error": "invalid_token", "error_description": exc.reason},
                401,
                {"WWW-Authenticate": challenge},
            )
        return await asyncio.to_thread(self.provider.userinfo, grant, " ".join(claims.scopes))
