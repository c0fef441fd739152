"""The dashboard as an OAuth client of the built-in provider: registration and token calls.

A new install registers the client itself (:func:`ensure_client`, at start): ``iotvault-web``,
a *public* client (authorization code with PKCE S256, rotating refresh tokens) whose only
redirect URI is ``<public URL>/auth/callback``. It is public rather than confidential because
the web application runs inside the same process as the provider and calls its token endpoint
directly (:meth:`WebClient.token`), never over the network: a client secret would be kept next
to the code that checks it and protect nothing. The tokens still never leave the server
(:mod:`iotvault.web.session`). The client allows anonymous sign-in ("continue without an
account"); anonymous callers see only what the group named ``anonymous`` grants, nothing when
there is none. An administrator who wants no anonymous sign-in registers the client again
without it (``iotvault clients``); an existing registration is kept as it is, except that its
redirect URIs follow the public URL when that changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from typing import Any, Final
from urllib.parse import urlencode

from iotvault.errors import ClientExistsError, IotVaultError
from iotvault.identity import Identity
from iotvault.identity.clients import add_client, remove_client
from iotvault.identity.web import Call

log = logging.getLogger(__name__)

CLIENT_ID: Final = "iotvault-web"
CALLBACK: Final = "/auth/callback"
SCOPE: Final = "openid profile offline_access"


def challenge(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class WebClient:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.base = identity.provider.base
        self.redirect_uri = self.base + CALLBACK
        self.home = self.base + "/"
        self.error: str | None = None  # why the dashboard cannot sign people in, if it cannot

    def ensure_client(self) -> None:
        """Register the dashboard's client, or make its redirect URIs follow the public URL."""
        store = self.identity.provider.store
        found = store.get_client(CLIENT_ID)
        allow_anonymous = True
        if found is not None:
            record = found[0]
            if not record.public:
                self.error = f"the dashboard's client {CLIENT_ID} must be public (PKCE), not confidential"
                log.warning("web: %s", self.error)
                return
            if self.redirect_uri in record.redirect_uris and self.home in record.post_logout_redirect_uris:
                return
            allow_anonymous = record.allow_anonymous
            remove_client(store, CLIENT_ID)
        try:
            add_client(
                store,
                CLIENT_ID,
                display_name="iotvault dashboard",
                redirect_uris=[self.redirect_uri],
                post_logout_redirect_uris=[self.home],
                allow_anonymous=allow_anonymous,
                created_by="iotvault",
            )
        except ClientExistsError:  # another node registered it at the same moment
            if not self._registered():
                self.error = f"the dashboard's client {CLIENT_ID} is registered for another public URL"
                log.warning("web: %s", self.error)
        except IotVaultError as exc:
            self.error = f"the dashboard cannot be registered for {self.base}: {exc}"
            log.warning("web: %s", self.error)

    def _registered(self) -> bool:
        found = self.identity.provider.store.get_client(CLIENT_ID)
        return found is not None and self.redirect_uri in found[0].redirect_uris

    def authorization_url(self, state: str, nonce: str, verifier: str, *, anonymous: bool = False) -> str:
        params = {
            "response_type": "code",
            "client_id": CLIENT_ID,
            "redirect_uri": self.redirect_uri,
            "scope": SCOPE,
            "state": state,
            "nonce": nonce,
            "code_challenge": challenge(verifier),
            "code_challenge_method": "S256",
        }
        if anonymous:
            params["idp"] = "anonymous"
        return self.identity.provider.url("authorization") + "?" + urlencode(params)

    def logout_url(self, id_token: str | None) -> str:
        params = {"client_id": CLIENT_ID, "post_logout_redirect_uri": self.home}
        if id_token:
            params["id_token_hint"] = id_token
        return self.identity.provider.url("end_session") + "?" + urlencode(params)

    # ---- the token endpoint, in-process (blocking: call in a worker thread) ------------------
    def _post(self, handler: Any, params: dict[str, str], address: str) -> tuple[int, dict[str, Any]]:
        answer = handler(Call(params={**params, "client_id": CLIENT_ID}, method="POST", address=address))
        try:
            doc = json.loads(answer.body or b"{}")
        except ValueError:
            doc = {}
        return answer.status, doc if isinstance(doc, dict) else {}

    def exchange(self, code: str, verifier: str, address: str) -> dict[str, Any] | None:
        status, doc = self._post(
            self.identity.grants.token,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": verifier,
            },
            address,
        )
        return doc if status == 200 and "access_token" in doc else None

    def refresh(self, refresh_token: str, address: str) -> dict[str, Any] | None:
        status, doc = self._post(
            self.identity.grants.token,
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            address,
        )
        return doc if status == 200 and "access_token" in doc else None

    def revoke(self, token: str, address: str) -> None:
        """Revoke the grant behind ``token`` (its whole family and its access tokens)."""
        self._post(self.identity.grants.revoke, {"token": token}, address)
