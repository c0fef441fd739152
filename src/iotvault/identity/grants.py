"""What client programs call: the token endpoint, device authorization, revocation.

**Client authentication.** A confidential client authenticates with ``client_secret_basic``
only; ``client_secret_post`` is refused, so a secret never sits in a form body that a proxy may
log. A public client names itself with ``client_id`` and proves possession of its code with
PKCE instead.

**Grant types.** ``authorization_code`` (PKCE S256; the ``redirect_uri`` exactly as in the
authorization request), ``refresh_token`` (rotating) and
``urn:ietf:params:oauth:grant-type:device_code`` (RFC 8628), each only for clients registered
for it. ``password`` (ROPC), ``client_credentials`` and anything else answer
``unsupported_grant_type``: a client never sees a person's password.

**Single use, and what reuse means** (RFC 9700, 4.14 and 2.2.2):

* an authorization code works once and for 60 seconds; presenting it again revokes the grant
  its first use started (every token it issued), because either the code or that grant is in
  the wrong hands;
* each refresh answers a new refresh token and spends the old one; presenting a spent one
  revokes the whole family, whichever of the two holders — the client or a thief — comes back
  second;
* a code issued without PKCE is refused when the token request nevertheless carries a
  ``code_verifier`` (a PKCE downgrade), and a verifier that does not match is refused.

**Revocation** (RFC 7009): a refresh token or an access token of the calling client revokes
its grant — the family and its access tokens at the API. Unknown, foreign or malformed tokens
answer 200 like the rest, so the endpoint tells nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import replace
from typing import Final, NoReturn
from urllib.parse import unquote_plus

from iotvault.clock import now_us
from iotvault.errors import OAuthError
from iotvault.identity.clients import AUTHORIZATION_CODE, DEVICE_CODE, REFRESH_TOKEN
from iotvault.identity.minting import narrower, parse_scope
from iotvault.identity.provider import DEVICE_CODE_TTL_S, IdentityProvider
from iotvault.identity.records import Authentication, ClientRecord, CodeRecord, DeviceCodeRecord
from iotvault.identity.requests import USER_CODE_ALPHABET, USER_CODE_LENGTH, format_user_code
from iotvault.identity.web import Answer, Call, b64url, json_answer, new_token, sha256_hex, with_query

_VERIFIER_RE: Final = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636, 4.1
_MAX_SECRET: Final = 256
CODE_REUSED: Final = "code_reused"
REFRESH_REUSED: Final = "refresh_token_reused"


def oauth_error_answer(exc: OAuthError) -> Answer:
    doc = {"error": exc.error}
    if exc.description:
        doc["error_description"] = exc.description
    headers = {"WWW-Authenticate": 'Basic realm="iotvault", charset="UTF-8"'} if exc.status == 401 else {}
    return json_answer(doc, exc.status, headers)


def _invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, status=401)


def _no_repeats(call: Call) -> None:
    if call.repeated:
        raise OAuthError("invalid_request", f"repeated parameter: {sorted(call.repeated)[0]}")


def _required(call: Call, name: str) -> str:
    value = call.get(name)
    if value is None:
        raise OAuthError("invalid_request", f"{name} is required")
    return value


def _device_client(client: ClientRecord, scope: str) -> None:
    if DEVICE_CODE not in client.grant_types:
        raise OAuthError("unauthorized_client", "this client may not use the device authorization grant")
    if not scope:
        raise OAuthError("invalid_scope", "none of the requested scopes is supported")


def _check_pkce(client: ClientRecord, challenge: str | None, verifier: str | None) -> None:
    """RFC 7636 4.6, and no downgrade: a verifier for a code issued without a challenge fails."""
    if challenge is None:
        if verifier is not None or client.public:
            raise OAuthError("invalid_grant", "the authorization request had no code_challenge")
        return
    if verifier is None:
        raise OAuthError("invalid_grant", "code_verifier is required")
    computed = b64url(hashlib.sha256(verifier.encode("ascii")).digest())
    if not hmac.compare_digest(computed, challenge):
        raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")


class Grants:
    def __init__(self, idp: IdentityProvider) -> None:
        self.idp = idp

    # ---- client authentication -------------------------------------------------------------
    def client_of(self, call: Call) -> ClientRecord:
        """The calling client (RFC 6749 2.3): HTTP Basic for confidential ones, ``client_id``
        alone for public ones."""
        if "client_secret" in call.params:
            raise _invalid_client("client_secret_post is not supported; use HTTP Basic (client_secret_basic)")
        named = call.get("client_id")
        if call.authorization is not None:
            scheme, _, value = call.authorization.strip().partition(" ")
            if scheme.lower() != "basic":
                raise _invalid_client("authenticate with HTTP Basic (client_secret_basic)")
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                raise _invalid_client("malformed Basic credentials") from None
            raw_id, sep, raw_secret = decoded.partition(":")
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            if not sep or not client_id or not secret or len(secret) > _MAX_SECRET:
                raise _invalid_client("malformed Basic credentials")
            client = self.idp.authenticate_client(client_id, secret)
            if client is None:
                raise _invalid_client("unknown client or wrong secret")
            if named is not None and named != client.client_id:
                raise OAuthError("invalid_request", "client_id differs from the authenticated client")
            return client
        if named is None:
            raise _invalid_client("client authentication is required")
        client = self.idp.client(named)
        if client is None:
            raise _invalid_client("unknown client")
        if not client.public:
            raise _invalid_client("this client must authenticate with HTTP Basic (client_secret_basic)")
        return client

    # ---- token endpoint ----------------------------------------------------------------------
    def token(self, call: Call) -> Answer:
        try:
            return self._token(call)
        except OAuthError as exc:
            return oauth_error_answer(exc)

    def _token(self, call: Call) -> Answer:
        _no_repeats(call)
        client = self.client_of(call)
        grant_type = call.get("grant_type")
        if grant_type is None:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type not in (AUTHORIZATION_CODE, REFRESH_TOKEN, DEVICE_CODE):
            raise OAuthError("unsupported_grant_type", f"{grant_type[:64]} is not supported")
        if grant_type not in client.grant_types:
            raise OAuthError("unauthorized_client", f"this client may not use {grant_type}")
        self.idp.housekeeping()
        if grant_type == AUTHORIZATION_CODE:
            return self._authorization_code(client, call)
        if grant_type == REFRESH_TOKEN:
            return self._refresh(client, call)
        return self._device_code(client, call)

    def _authorization_code(self, client: ClientRecord, call: Call) -> Answer:
        code, redirect_uri, verifier = call.get("code"), call.get("redirect_uri"), call.get("code_verifier")
        if code is None or redirect_uri is None:
            raise OAuthError("invalid_request", "code and redirect_uri are required")
        if verifier is not None and not _VERIFIER_RE.fullmatch(verifier):
            raise OAuthError("invalid_request", "code_verifier must be 43-128 characters of [A-Za-z0-9-._~]")
        code_hash = sha256_hex(code)
        used = self.idp.store.use_code(code_hash, client.client_id, now_us())
        if used is None:
            raise OAuthError("invalid_grant", "unknown or expired authorization code")
        record, first = used
        if not first:
            self._code_replayed(record, client, call)
        if record.expires_us <= now_us():
            raise OAuthError("invalid_grant", "unknown or expired authorization code")
        if not hmac.compare_digest(redirect_uri.encode(), record.redirect_uri.encode()):
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request")
        _check_pkce(client, record.code_challenge, verifier)
        if not self._still_stands(record.who):
            raise OAuthError("invalid_grant", "the login of this code no longer stands")
        answer = self.idp.new_grant(
            client, scope=record.scope, who=record.who, nonce=record.nonce, code_hash=code_hash
        )
        self.idp.event(
            "token_issued", user_name=record.who.user_name, client_id=client.client_id, address=call.address
        )
        return answer

    def _code_replayed(self, record: CodeRecord, client: ClientRecord, call: Call) -> NoReturn:
        grant = self.idp.store.get_grant(record.grant_id) if record.grant_id else None
        if grant is not None:
            self.idp.revoke_grant(grant, CODE_REUSED)
        self.idp.event(
            CODE_REUSED,
            user_name=record.who.user_name,
            client_id=client.client_id,
            address=call.address,
            detail="the tokens it issued are revoked" if grant is not None else "",
        )
        raise OAuthError("invalid_grant", "authorization code already used")

    def _still_stands(self, who: Authentication) -> bool:
        """Whether the login behind a code is as it was: same user, session not ended."""
        if who.anonymous:
            return True
        current = self.idp.login_as(who.user_name or "")
        if current is None or current.user_stamp != who.user_stamp:
            return False
        if who.session_id is None:
            return True
        session = self.idp.store.get_session(who.session_id)
        return session is None or session.ended_us is None  # ended, not merely expired

    def _refresh(self, client: ClientRecord, call: Call) -> Answer:
        token = call.get("refresh_token")
        if token is None:
            raise OAuthError("invalid_request", "refresh_token is required")
        token_hash = sha256_hex(token)
        found = self.idp.store.refresh_token(token_hash)
        grant = self.idp.store.get_grant(found[0]) if found is not None else None
        if found is None or grant is None or grant.client_id != client.client_id:
            raise OAuthError("invalid_grant", "unknown refresh token")
        _, expires_us, used_us = found
        if used_us is not None:
            self._replayed(grant.grant_id, client, call)
        live = self.idp.live_grant(grant.grant_id)
        if live is None or expires_us <= now_us():
            raise OAuthError("invalid_grant", "the refresh token is expired or revoked")
        scope = grant.scope
        requested = call.get("scope")
        if requested is not None:
            scope = parse_scope(requested)
            if not scope or not narrower(scope, grant.scope):
                raise OAuthError("invalid_scope", "a refresh may only narrow the scope")
        fresh = new_token()
        if not self.idp.store.rotate_refresh_token(
            token_hash, sha256_hex(fresh), grant.grant_id, now_us(), live.expires_us
        ):
            self._replayed(grant.grant_id, client, call)  # a concurrent refresh won the race
        answer = self.idp.token_answer(live, scope=scope, nonce=None, refresh_token=fresh)
        self.idp.event(
            "token_refreshed", user_name=grant.who.user_name, client_id=client.client_id, address=call.address
        )
        return answer

    def _replayed(self, grant_id: str, client: ClientRecord, call: Call) -> NoReturn:
        grant = self.idp.store.get_grant(grant_id)
        if grant is not None:
            self.idp.revoke_grant(grant, REFRESH_REUSED)
        self.idp.event(
            REFRESH_REUSED,
            user_name=grant.who.user_name if grant is not None else None,
            client_id=client.client_id,
            address=call.address,
            detail="the token family is revoked",
        )
        raise OAuthError("invalid_grant", "refresh token already used; the token family is revoked")

    def _device_code(self, client: ClientRecord, call: Call) -> Answer:
        device_code = call.get("device_code")
        if device_code is None:
            raise OAuthError("invalid_request", "device_code is required")
        device_hash = sha256_hex(device_code)
        record = self.idp.store.device_code(device_hash)
        if record is None or record.client_id != client.client_id:
            raise OAuthError("invalid_grant", "unknown device code")
        now = now_us()
        if record.expires_us <= now:
            raise OAuthError("expired_token", "the device code has expired; start again")
        if record.status == "denied":
            raise OAuthError("access_denied", "the user denied the request")
        if record.status == "consumed":
            raise OAuthError("invalid_grant", "the device code was already used")
        if record.status == "pending":
            too_soon = (
                record.last_poll_us is not None and now - record.last_poll_us < record.interval_s * 1_000_000
            )
            self.idp.store.poll_device_code(device_hash, now, slow_down=too_soon)
            if too_soon:
                raise OAuthError("slow_down", f"poll at most every {record.interval_s + 5} seconds")
            raise OAuthError("authorization_pending", "the user has not decided yet")
        return self._device_approved(client, record)

    def _device_approved(self, client: ClientRecord, record: DeviceCodeRecord) -> Answer:
        current = self.idp.login_as(record.user_name or "")
        if current is None or current.user_stamp != record.user_stamp or record.auth_time_us is None:
            raise OAuthError("access_denied", "the approving user no longer stands")
        if not self.idp.store.consume_device_code(record.device_code_hash):
            raise OAuthError("invalid_grant", "the device code was already used")
        who = replace(current, auth_time_us=record.auth_time_us)
        return self.idp.new_grant(client, scope=record.scope, who=who)

    # ---- device authorization endpoint (RFC 8628, 3.1) ------------------------------------
    def device_authorization(self, call: Call) -> Answer:
        try:
            _no_repeats(call)
            client = self.client_of(call)
            scope = parse_scope(call.get("scope"))
            _device_client(client, scope)
        except OAuthError as exc:
            return oauth_error_answer(exc)
        device_code = new_token()
        user_code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
        now = now_us()
        self.idp.store.add_device_code(
            DeviceCodeRecord(
                device_code_hash=sha256_hex(device_code),
                client_id=client.client_id,
                scope=scope,
                created_us=now,
                expires_us=now + DEVICE_CODE_TTL_S * 1_000_000,
                interval_s=self.idp.device_poll_interval_s,
                last_poll_us=None,
                status="pending",
                user_name=None,
                user_stamp=None,
                auth_time_us=None,
            ),
            sha256_hex(user_code),
        )
        shown = format_user_code(user_code)
        return json_answer(
            {
                "device_code": device_code,
                "user_code": shown,
                "verification_uri": self.idp.url("device"),
                "verification_uri_complete": with_query(self.idp.url("device"), {"user_code": shown}),
                "expires_in": DEVICE_CODE_TTL_S,
                "interval": self.idp.device_poll_interval_s,
            }
        )

    # ---- revocation (RFC 7009) -----------------------------------------------------------------
    def revoke(self, call: Call) -> Answer:
        try:
            _no_repeats(call)
            client = self.client_of(call)
            token = _required(call, "token")
        except OAuthError as exc:
            return oauth_error_answer(exc)
        hint = call.get("token_type_hint")
        grant_id: str | None = None
        if hint != "refresh_token" and token.count(".") == 2:
            claims = self.idp.decode_own(token)
            if claims is not None and claims.get("client_id", claims.get("aud")) == client.client_id:
                sid = claims.get("sid")
                grant_id = sid if isinstance(sid, str) else None
        if grant_id is None:
            found = self.idp.store.refresh_token(sha256_hex(token))
            grant_id = found[0] if found is not None else None
        grant = self.idp.store.get_grant(grant_id) if grant_id is not None else None
        if grant is not None and grant.client_id == client.client_id:
            self.idp.revoke_grant(grant, "revoked")
            self.idp.event(
                "token_revoked",
                user_name=grant.who.user_name,
                client_id=client.client_id,
                address=call.address,
            )
        return json_answer({})
