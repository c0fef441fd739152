"""What a browser brings to the provider, checked: the authorization request and user codes.

:func:`parse_authorization` is where the rules of the authorization endpoint live (code flow
only, PKCE with S256, bounded ``state`` and ``nonce``, no request objects); the user codes of
device authorization (RFC 8628) are made, shown and read back here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from iotvault.errors import OAuthError
from iotvault.identity.clients import AUTHORIZATION_CODE
from iotvault.identity.minting import parse_scope
from iotvault.identity.records import ClientRecord
from iotvault.identity.web import Call

_CHALLENGE_RE: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of a SHA-256
_MAX_AGE_RE: Final = re.compile(r"[0-9]{1,9}")
MAX_STATE: Final = 2048
MAX_NONCE: Final = 512
PROMPTS: Final = frozenset({"none", "login", "consent", "select_account"})
USER_CODE_ALPHABET: Final = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels (no words), no look-alikes
USER_CODE_LENGTH: Final = 8


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A checked authorization request, as stored while the person logs in."""

    client_id: str
    redirect_uri: str
    scope: str
    state: str | None
    nonce: str | None
    code_challenge: str | None
    prompt: tuple[str, ...]
    max_age: int | None
    anonymous: bool

    def as_params(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": self.scope,
            "state": self.state,
            "nonce": self.nonce,
            "code_challenge": self.code_challenge,
            "prompt": list(self.prompt),
            "max_age": self.max_age,
            "anonymous": self.anonymous,
        }

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> AuthorizationRequest:
        return cls(
            client_id=p["client_id"],
            redirect_uri=p["redirect_uri"],
            scope=p["scope"],
            state=p.get("state"),
            nonce=p.get("nonce"),
            code_challenge=p.get("code_challenge"),
            prompt=tuple(p.get("prompt") or ()),
            max_age=p.get("max_age"),
            anonymous=bool(p.get("anonymous")),
        )


def parse_authorization(client: ClientRecord, redirect_uri: str, call: Call) -> AuthorizationRequest:
    """Check an authorization request of a known client; OAuthError for the client to see."""
    if call.repeated:
        raise OAuthError("invalid_request", f"repeated parameter: {sorted(call.repeated)[0]}")
    if call.get("request") is not None:
        raise OAuthError("request_not_supported", "request objects are not supported")
    if call.get("request_uri") is not None:
        raise OAuthError("request_uri_not_supported", "request_uri is not supported")
    state = call.get("state")
    if state is not None and len(state) > MAX_STATE:
        raise OAuthError("invalid_request", f"state longer than {MAX_STATE} characters")
    response_type = call.get("response_type")
    if response_type is None:
        raise OAuthError("invalid_request", "response_type is required")
    if response_type != "code":
        raise OAuthError("unsupported_response_type", "only response_type=code (with PKCE) is supported")
    if AUTHORIZATION_CODE not in client.grant_types:
        raise OAuthError("unauthorized_client", "this client may not use the authorization code flow")
    if call.get("response_mode") not in (None, "query"):
        raise OAuthError("invalid_request", "only response_mode=query is supported")
    challenge = _pkce_challenge(client, call)
    nonce = call.get("nonce")
    if nonce is not None and len(nonce) > MAX_NONCE:
        raise OAuthError("invalid_request", f"nonce longer than {MAX_NONCE} characters")
    prompt, max_age = _prompt(call)
    scope = parse_scope(call.get("scope"))
    if not scope:
        raise OAuthError("invalid_scope", "none of the requested scopes is supported")
    idp = call.get("idp")
    if idp not in (None, "anonymous"):
        raise OAuthError("invalid_request", "idp may only be 'anonymous'")
    return AuthorizationRequest(
        client_id=client.client_id,
        redirect_uri=redirect_uri,
        scope=scope,
        state=state,
        nonce=nonce,
        code_challenge=challenge,
        prompt=prompt,
        max_age=max_age,
        anonymous=idp == "anonymous",
    )


def _pkce_challenge(client: ClientRecord, call: Call) -> str | None:
    """RFC 7636 with S256 only: ``plain`` is refused, and so is no challenge from a public client."""
    challenge, method = call.get("code_challenge"), call.get("code_challenge_method")
    if challenge is not None:
        if method != "S256":
            raise OAuthError("invalid_request", "code_challenge_method must be S256 (plain is not accepted)")
        if not _CHALLENGE_RE.fullmatch(challenge):
            raise OAuthError("invalid_request", "code_challenge must be 43 base64url characters (S256)")
    elif method is not None:
        raise OAuthError("invalid_request", "code_challenge_method without code_challenge")
    elif client.public:
        raise OAuthError(
            "invalid_request", "PKCE is required: send code_challenge with code_challenge_method=S256"
        )
    return challenge


def _prompt(call: Call) -> tuple[tuple[str, ...], int | None]:
    prompt = tuple(sorted(set((call.get("prompt") or "").split())))
    if not set(prompt) <= PROMPTS or ("none" in prompt and len(prompt) > 1):
        raise OAuthError("invalid_request", "prompt must be none, or some of login, consent, select_account")
    max_age = call.get("max_age")
    if max_age is not None and not _MAX_AGE_RE.fullmatch(max_age):
        raise OAuthError("invalid_request", "max_age must be a number of seconds")
    return prompt, int(max_age) if max_age is not None else None


def normalize_user_code(text: str | None) -> str | None:
    if text is None:
        return None
    code = "".join(c for c in text.upper() if c not in "- ")
    if len(code) != USER_CODE_LENGTH or any(c not in USER_CODE_ALPHABET for c in code):
        return None
    return code


def format_user_code(code: str) -> str:
    half = USER_CODE_LENGTH // 2
    return f"{code[:half]}-{code[half:]}"
