"""The provider's shared state and the rules every endpoint relies on.

:class:`IdentityProvider` is built once per process from the settings and the opened
:class:`IdentityResources` (a :class:`~iotvault.context.Context`); it builds nothing at import
and opens nothing itself. Its endpoints live in :mod:`~iotvault.identity.browser` (what a
person's browser sees) and :mod:`~iotvault.identity.grants` (what a client program calls);
this module keeps what both need: discovery, keys, the checks that decide whether a session
or a grant still stands, and the issuing of codes and tokens.

Every method here blocks (database, argon2): the HTTP adapter calls them in a worker thread.

**When a login stops counting.** A browser session or a grant (token family) ends when it
expires, at logout, when it is revoked, and — checked on every use — when its user is deleted,
disabled, or changed in any way: each records ``users.updated_us`` at login (the user's
*stamp*), and a different stamp ends it for good. Disabling a user therefore ends its sessions
and makes the API refuse its tokens at once; enabling it again does not bring them back, and
neither does a password change (which also moves the stamp).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from typing import Any, Final, Protocol

from joserfc import jwt
from joserfc.errors import JoseError
from sqlalchemy.engine import Engine

from iotvault.clock import now_us
from iotvault.config import Settings
from iotvault.crypto.master_key import MasterKey
from iotvault.domain.audit import printable
from iotvault.identity.clients import GRANT_TYPES, authenticate_client, is_client_id
from iotvault.identity.keys import ALG, SigningKeys
from iotvault.identity.minting import SCOPES, Minter, parse_scope, profile_claims, subject_for
from iotvault.identity.records import (
    Authentication,
    ClientRecord,
    CodeRecord,
    GrantRecord,
    IdentityEvent,
    SessionRecord,
)
from iotvault.identity.store import IdentityStore
from iotvault.identity.throttle import UserLoginThrottle
from iotvault.identity.web import Answer, Call, Cookies, json_answer, new_token, sha256_hex
from iotvault.storage.accounts import AccountStore
from iotvault.storage.repository import SecurityEvent
from iotvault.storage.sql import SqlStore

log = logging.getLogger(__name__)

CODE_TTL_S: Final = 60
REQUEST_TTL_S: Final = 600  # a login page may stay open this long
DEVICE_CODE_TTL_S: Final = 600
DEVICE_POLL_INTERVAL_S: Final = 5
HOUSEKEEPING_INTERVAL_S: Final = 600
CLAIMS: Final = (
    *("iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "amr", "sid", "at_hash"),
    *("name", "preferred_username", "locale", "email", "email_verified"),
)

_OAUTH: Final = "/oauth"
PATHS: Final = {
    "discovery": "/.well-known/openid-configuration",
    "authorization": _OAUTH + "/authorize",
    "token": _OAUTH + "/token",
    "jwks": _OAUTH + "/jwks",
    "userinfo": _OAUTH + "/userinfo",
    "revocation": _OAUTH + "/revoke",
    "end_session": _OAUTH + "/logout",
    "device_authorization": _OAUTH + "/device_authorization",
    "login": "/login",
    "device": "/device",
    "device_confirm": "/device/confirm",
}
BEARER: Final = "Bearer"  # the token type (RFC 6750)
# identity events whose user name is an account that signed in, so it may be logged in clear
_NAMED_IN_LOGS: Final = frozenset(
    {"login_succeeded", "logout", "token_issued", "token_refreshed", "token_revoked", "device_approved"}
)


def api_audience(public_url: str) -> str:
    """The ``aud`` of the provider's access tokens: the API under the public URL."""
    return public_url.rstrip("/") + "/iotf"


class IdentityResources(Protocol):
    """What the provider uses (:class:`iotvault.context.Context` is one)."""

    @property
    def engine(self) -> Engine: ...
    @property
    def accounts(self) -> AccountStore: ...
    @property
    def master(self) -> MasterKey: ...
    @property
    def store(self) -> SqlStore: ...


class IdentityProvider:
    def __init__(self, settings: Settings, ctx: IdentityResources) -> None:
        self.settings = settings
        self.ctx = ctx
        self.issuer = settings.public_url
        self.audience = api_audience(settings.public_url)
        self.base = settings.public_url.rstrip("/")
        self.store = IdentityStore(ctx.engine, ctx.accounts.url)
        self.keys = SigningKeys(
            self.store,
            ctx.master,
            token_ttl_s=settings.oidc_access_token_ttl_s,
            cache_ttl_s=settings.key_cache_ttl_s,
        )
        self.minter = Minter(
            issuer=self.issuer, audience=self.audience, keys=self.keys, ttl_s=settings.oidc_access_token_ttl_s
        )
        self.throttle = UserLoginThrottle(
            self.store,
            self.record,
            max_failures=settings.oidc_login_max_failures,
            window_s=settings.oidc_lockout_s,
            anonymous_rate=settings.oidc_anonymous_rate,
        )
        self.cookies = Cookies(https=settings.public_url.startswith("https://"))
        self.device_poll_interval_s = DEVICE_POLL_INTERVAL_S
        self._housekept_at = time.monotonic()
        self._housekeeping = threading.Lock()

    def url(self, name: str) -> str:
        return self.base + PATHS[name]

    # ---- discovery and keys --------------------------------------------------------------
    def discovery(self) -> Answer:
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "authorization_endpoint": self.url("authorization"),
            "token_endpoint": self.url("token"),
            "jwks_uri": self.url("jwks"),
            "userinfo_endpoint": self.url("userinfo"),
            "revocation_endpoint": self.url("revocation"),
            "end_session_endpoint": self.url("end_session"),
            "device_authorization_endpoint": self.url("device_authorization"),
            "response_types_supported": ["code"],
            "response_modes_supported": ["query"],
            "grant_types_supported": list(GRANT_TYPES),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ALG],
            "userinfo_signing_alg_values_supported": ["none"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": list(SCOPES),
            "claims_supported": list(CLAIMS),
            "prompt_values_supported": ["none", "login"],
            "claims_parameter_supported": False,
            "request_parameter_supported": False,
            "request_uri_parameter_supported": False,
            "authorization_response_iss_parameter_supported": True,
            "backchannel_logout_supported": False,
            "frontchannel_logout_supported": False,
        }
        return json_answer(doc, cache="public, max-age=300")

    def jwks(self) -> Answer:
        return json_answer(self.keys.public_jwks(), cache="public, max-age=60")

    def decode_own(self, token: str) -> dict[str, Any] | None:
        """The claims of a JWT this provider signed (expired or not), or None."""
        if not isinstance(token, str) or token.count(".") != 2 or len(token) > 8192:
            return None
        try:
            decoded = jwt.decode(token, self.keys.public_keys(), algorithms=[ALG])
        except (JoseError, ValueError, TypeError):
            return None
        claims = dict(decoded.claims)
        return claims if claims.get("iss") == self.issuer else None

    # ---- events and housekeeping ---------------------------------------------------------
    def event(
        self,
        kind: str,
        *,
        user_name: str | None = None,
        client_id: str | None = None,
        address: str | None = None,
        detail: str = "",
    ) -> None:
        self.record(IdentityEvent(now_us(), kind, user_name, client_id, address, detail))

    def record(self, event: IdentityEvent) -> None:
        """Keep an identity event (the throttle counts these) and report it as a security event
        (``oidc_<kind>``, listed at ``/iotf/security/events``)."""
        self.store.add_event(event)
        detail = {"address": event.address, "clientId": event.client_id, "detail": event.detail}
        subject = event.user_name or event.client_id or event.address or "-"
        self.ctx.store.add_security_events(
            [
                SecurityEvent(
                    event.at_us,
                    f"oidc_{event.kind}"[:32],
                    subject[:128],
                    {k: v for k, v in detail.items() if v},
                )
            ]
        )
        # A failed login's "user name" may be a password typed into the wrong field: only the
        # names of successful sign-ins are written to the log (the audit log keeps a keyed hash).
        user = (
            event.user_name if event.kind in _NAMED_IN_LOGS else ("<not logged>" if event.user_name else None)
        )
        log.info(
            "identity event %s user=%s client=%s address=%s %s",
            event.kind,
            printable(user or "-"),
            printable(event.client_id or "-"),
            event.address,
            printable(event.detail),
        )

    def housekeeping(self, *, force: bool = False) -> dict[str, int]:
        """Delete spent codes, dead grants, old events and expired keys, at most every 10 min."""
        if not force and time.monotonic() - self._housekept_at < HOUSEKEEPING_INTERVAL_S:
            return {}
        if not self._housekeeping.acquire(blocking=False):
            return {}
        try:
            self._housekept_at = time.monotonic()
            removed = self.store.purge(now_us())
            self.keys.invalidate()
            return removed
        finally:
            self._housekeeping.release()

    # ---- clients -------------------------------------------------------------------------
    def client(self, client_id: str | None) -> ClientRecord | None:
        found = self.store.get_client(client_id) if client_id and is_client_id(client_id) else None
        return found[0] if found is not None else None

    def authenticate_client(self, client_id: str, secret: str) -> ClientRecord | None:
        return authenticate_client(self.store, client_id, secret)

    # ---- is it still valid? ----------------------------------------------------------------
    def _user_current(self, user_name: str | None, stamp: int | None) -> str | None:
        """None if the user is as it was at login, else why not."""
        if user_name is None or stamp is None:
            return "user_unknown"
        state = self.store.user_state(user_name)
        if state is None:
            return "user_deleted"
        if state.disabled:
            return "user_disabled"
        if state.updated_us != stamp:
            return "user_changed"
        return None

    def live_session(self, call: Call) -> tuple[SessionRecord, str] | None:
        """The browser's session and its cookie value, if it still stands (else it is ended)."""
        token = call.cookies.get(self.cookies.session)
        if not token or len(token) > 128:
            return None
        session = self.store.session_by_token(sha256_hex(token))
        if session is None or session.ended_us is not None:
            return None
        now = now_us()
        if session.expires_us <= now:
            return None  # expired, not ended: the apps' refresh tokens outlive the browser session
        reason = self._user_current(session.user_name, session.user_stamp)
        if reason is not None:
            self.store.end_session(session.session_id, now, reason)
            return None
        return session, token

    def live_grant(self, grant_id: object) -> GrantRecord | None:
        """The grant if it still stands; revoked for good when its user changed."""
        if not isinstance(grant_id, str) or not 0 < len(grant_id) <= 64:
            return None
        grant = self.store.get_grant(grant_id)
        now = now_us()
        if grant is None or grant.revoked_us is not None or grant.expires_us <= now:
            return None
        if not grant.who.anonymous:
            reason = self._user_current(grant.who.user_name, grant.who.user_stamp)
            if reason is not None:
                if grant.who.session_id is not None:
                    self.store.end_session(grant.who.session_id, now, reason)
                self.store.revoke_grant(grant.grant_id, now, reason)
                return None
        if grant.who.session_id is not None:
            # ended (logout, another user's login) ends its grants; expired (or expired and
            # purged) does not: refresh tokens are meant to outlive the browser session
            session = self.store.get_session(grant.who.session_id)
            if session is not None and session.ended_us is not None:
                self.store.revoke_grant(grant.grant_id, now, "session_ended")
                return None
        return grant

    def revoke_grant(self, grant: GrantRecord, reason: str) -> None:
        if self.store.revoke_grant(grant.grant_id, now_us(), reason):
            log.info("grant %s of client %s revoked: %s", grant.grant_id, grant.client_id, reason)

    # ---- issuing ---------------------------------------------------------------------------
    def login_as(self, user_name: str) -> Authentication | None:
        """What a password login of ``user_name`` carries (its stamp read after the login)."""
        state = self.store.user_state(user_name)
        if state is None or state.disabled:
            return None
        return Authentication(
            subject=subject_for(user_name, state.created_us),
            user_name=user_name,
            user_stamp=state.updated_us,
            anonymous=False,
            amr="pwd",
            auth_time_us=now_us(),
        )

    def new_session(
        self, who: Authentication, previous: SessionRecord | None = None
    ) -> tuple[SessionRecord, str]:
        """A session for a fresh login, always behind a new cookie (no session fixation).

        A re-login of the same user (``prompt=login``, ``max_age``) renews ``previous``, so the
        logins other apps made in it stand; another user's login ends it.
        """
        if who.user_name is None or who.user_stamp is None:
            raise ValueError("only a person's login has a browser session")
        token = new_token()
        at = now_us()
        session = SessionRecord(
            session_id=new_token()[:32],
            user_name=who.user_name,
            user_stamp=who.user_stamp,
            amr=who.amr,
            auth_time_us=who.auth_time_us,
            created_us=at,
            expires_us=at + self.settings.oidc_session_ttl_s * 1_000_000,
            ended_us=None,
        )
        if previous is not None and previous.user_name == who.user_name:
            renewed = replace(session, session_id=previous.session_id, created_us=previous.created_us)
            if self.store.renew_session(previous.session_id, sha256_hex(token), renewed):
                return renewed, token
        if previous is not None:
            self.store.end_session(previous.session_id, at, "replaced")
        self.store.add_session(session, sha256_hex(token))
        return session, token

    def issue_code(
        self,
        client: ClientRecord,
        *,
        redirect_uri: str,
        scope: str,
        code_challenge: str | None,
        nonce: str | None,
        who: Authentication,
    ) -> str:
        code = new_token()
        self.store.add_code(
            sha256_hex(code),
            CodeRecord(
                client_id=client.client_id,
                redirect_uri=redirect_uri,
                code_challenge=code_challenge,
                nonce=nonce,
                scope=scope,
                who=who,
                expires_us=now_us() + CODE_TTL_S * 1_000_000,
                used_us=None,
                grant_id=None,
            ),
        )
        return code

    def new_grant(
        self,
        client: ClientRecord,
        *,
        scope: str,
        who: Authentication,
        nonce: str | None = None,
        code_hash: str | None = None,
    ) -> Answer:
        """Start a token family and answer with its first tokens."""
        at = now_us()
        grant = GrantRecord(
            grant_id=new_token()[:32],
            client_id=client.client_id,
            scope=scope,
            who=who,
            created_us=at,
            expires_us=at + self.settings.oidc_refresh_token_ttl_s * 1_000_000,
            revoked_us=None,
            revoke_reason=None,
        )
        refresh = new_token() if "refresh_token" in client.grant_types else None
        self.store.add_grant(
            grant,
            refresh_hash=sha256_hex(refresh) if refresh is not None else None,
            refresh_expires_us=grant.expires_us,
            code_hash=code_hash,
        )
        return self.token_answer(grant, scope=scope, nonce=nonce, refresh_token=refresh)

    def token_answer(
        self, grant: GrantRecord, *, scope: str, nonce: str | None, refresh_token: str | None
    ) -> Answer:
        access = self.minter.access_token(grant, scope)
        doc: dict[str, Any] = {
            "access_token": access,
            "token_type": BEARER,
            "expires_in": self.minter.ttl_s,
            "scope": scope,
        }
        if "openid" in scope.split():
            user = self.ctx.accounts.get_user(grant.who.user_name) if grant.who.user_name else None
            doc["id_token"] = self.minter.id_token(
                grant, scope=scope, access_token=access, nonce=nonce, user=user
            )
        if refresh_token is not None:
            doc["refresh_token"] = refresh_token
        return json_answer(doc)

    # ---- userinfo --------------------------------------------------------------------------
    def userinfo(self, grant: GrantRecord, scope: str) -> Answer:
        """The claims about the grant's subject that ``scope`` allows (OpenID Connect 5.3)."""
        if "openid" not in scope.split():
            return json_answer(
                {"error": "insufficient_scope", "error_description": "the token lacks the openid scope"},
                403,
                {"WWW-Authenticate": 'Bearer error="insufficient_scope", scope="openid"'},
            )
        user = self.ctx.accounts.get_user(grant.who.user_name) if grant.who.user_name else None
        doc: dict[str, Any] = {"sub": grant.who.subject, **profile_claims(user, scope)}
        if grant.who.anonymous:
            doc["amr"] = ["anon"]
        return json_answer(doc)

    @staticmethod
    def scope_of(requested: str | None) -> str:
        return parse_scope(requested)
