"""The OpenID Connect provider's pure parts: redirect URI rules, PKCE, CSRF, pages, scopes, codes."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotvault.errors import OAuthError, ValidationError
from iotvault.identity import pages
from iotvault.identity.clients import check_client_id, check_redirect_uri
from iotvault.identity.grants import _check_pkce
from iotvault.identity.minting import narrower, parse_scope, subject_for
from iotvault.identity.records import ClientRecord
from iotvault.identity.requests import (
    USER_CODE_ALPHABET,
    format_user_code,
    normalize_user_code,
    parse_authorization,
)
from iotvault.identity.web import Call, csrf_ok, csrf_token, with_query


def client(*, public: bool = True) -> ClientRecord:
    return ClientRecord(
        client_id="app",
        display_name="App",
        public=public,
        redirect_uris=("com.example.app:/cb",),
        post_logout_redirect_uris=(),
        grant_types=("authorization_code", "refresh_token"),
        allow_anonymous=False,
        created_by="test",
        created_us=0,
    )


CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(b"v" * 43).digest()).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "uri",
    [
        "https://app.example/cb",
        "https://app.example:8443/cb?x=1",
        "http://127.0.0.1:4000/cb",
        "http://[::1]/cb",
        "http://localhost/cb",
        "com.example.app:/oauth2redirect",
    ],
)
def test_redirect_uris_that_may_be_registered(uri: str) -> None:
    assert check_redirect_uri(uri) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "http://app.example/cb",  # plain http off the loopback
        "https://app.example/cb#frag",
        "https://user:pw@app.example/cb",
        "https://*.example/cb",
        "javascript:alert(1)",
        "data:text/html,hi",
        "myapp:/cb",  # a private-use scheme needs a dot (reverse domain name)
        "com.example.app://host/cb",
        "https:///cb",
        "/relative",
        "https://app.example/c b",
        "https://app.example/cb\n",
        "https://app.example/\u00e9",
        "",
        "https://app.example/" + "a" * 600,
    ],
)
def test_redirect_uris_that_are_refused(uri: str) -> None:
    with pytest.raises(ValidationError):
        check_redirect_uri(uri)


def test_client_ids_never_look_like_the_api_audience() -> None:
    assert check_client_id("iotvault-mobile") == "iotvault-mobile"
    for bad in ("http://127.0.0.1:8000/iotf", "a/b", "a:b", "", "x" * 65, "a b"):
        with pytest.raises(ValidationError):
            check_client_id(bad)


def test_authorization_request_rules() -> None:
    def parse(**params: str) -> object:
        base = {"response_type": "code", "client_id": "app", "redirect_uri": "com.example.app:/cb"}
        return parse_authorization(client(), "com.example.app:/cb", Call({**base, **params}))

    ok = parse(code_challenge=CHALLENGE, code_challenge_method="S256", scope="openid foo profile")
    assert ok.scope == "openid profile"  # type: ignore[attr-defined]
    for params, error in (
        ({}, "invalid_request"),  # a public client without PKCE
        ({"code_challenge": CHALLENGE, "code_challenge_method": "plain"}, "invalid_request"),
        ({"code_challenge": CHALLENGE}, "invalid_request"),  # method defaults to plain
        ({"code_challenge": "short", "code_challenge_method": "S256"}, "invalid_request"),
        ({"code_challenge_method": "S256"}, "invalid_request"),
        (
            {"response_type": "token", "code_challenge": CHALLENGE, "code_challenge_method": "S256"},
            "unsupported_response_type",
        ),
        (
            {"response_type": "code token", "code_challenge": CHALLENGE, "code_challenge_method": "S256"},
            "unsupported_response_type",
        ),
        (
            {"request": "eyJ...", "code_challenge": CHALLENGE, "code_challenge_method": "S256"},
            "request_not_supported",
        ),
        (
            {"prompt": "none login", "code_challenge": CHALLENGE, "code_challenge_method": "S256"},
            "invalid_request",
        ),
        ({"max_age": "-1", "code_challenge": CHALLENGE, "code_challenge_method": "S256"}, "invalid_request"),
        (
            {"scope": "nothing-known", "code_challenge": CHALLENGE, "code_challenge_method": "S256"},
            "invalid_scope",
        ),
        (
            {"response_mode": "fragment", "code_challenge": CHALLENGE, "code_challenge_method": "S256"},
            "invalid_request",
        ),
    ):
        with pytest.raises(OAuthError) as caught:
            parse(**params)
        assert caught.value.error == error, params
    with pytest.raises(OAuthError):
        parse_authorization(
            client(),
            "com.example.app:/cb",
            Call({"response_type": "code", "code_challenge": CHALLENGE}, repeated=frozenset({"scope"})),
        )
    # a confidential client may go without PKCE, never with plain
    confidential = parse_authorization(client(public=False), "x", Call({"response_type": "code"}))
    assert confidential.code_challenge is None


def test_pkce_verification() -> None:
    verifier = "v" * 43
    _check_pkce(client(), CHALLENGE, verifier)
    for challenge, given_verifier in ((CHALLENGE, "w" * 43), (CHALLENGE, None), (None, verifier)):
        with pytest.raises(OAuthError) as caught:
            _check_pkce(client(public=False), challenge, given_verifier)
        assert caught.value.error == "invalid_grant"
    with pytest.raises(OAuthError):
        _check_pkce(client(), None, None)  # a public client's code always had a challenge
    _check_pkce(client(public=False), None, None)


def test_csrf_tokens_are_bound_to_the_browser_and_the_purpose() -> None:
    token = csrf_token("browser-secret", "login", "req-1")
    assert csrf_ok("browser-secret", token, "login", "req-1")
    assert not csrf_ok("other-browser", token, "login", "req-1")
    assert not csrf_ok("browser-secret", token, "login", "req-2")
    assert not csrf_ok("browser-secret", token, "logout")
    assert not csrf_ok(None, token, "login", "req-1")
    assert not csrf_ok("browser-secret", None, "login", "req-1")


def test_with_query_keeps_a_registered_query() -> None:
    assert with_query("com.example.app:/cb", {"code": "a b", "state": None}) == "com.example.app:/cb?code=a+b"
    assert (
        with_query("https://x.example/cb?tenant=1", {"code": "c"}) == "https://x.example/cb?tenant=1&code=c"
    )


def test_pages_escape_every_value_and_allow_only_their_style() -> None:
    html = pages.render("message.html", heading="<script>alert(1)</script>", text='" onmouseover="x')
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert "&quot; onmouseover=&quot;x" in html
    answer = pages.message("Hi", "there")
    policy = answer.headers["Content-Security-Policy"]
    assert policy.startswith("default-src 'none'; style-src 'sha256-")
    assert "script-src" not in policy
    assert pages.form_target("com.example.app:/cb") == "com.example.app:"
    assert pages.form_target("https://app.example:8443/cb?x") == "https://app.example:8443"


@given(st.text(alphabet=USER_CODE_ALPHABET, min_size=8, max_size=8))
def test_user_codes_survive_how_people_type_them(code: str) -> None:
    shown = format_user_code(code)
    assert normalize_user_code(shown) == code
    assert normalize_user_code(shown.lower()) == code
    assert normalize_user_code(shown.replace("-", " ")) == code


def test_user_codes_that_are_not_codes() -> None:
    for text in (None, "", "AAAA-AAAA", "BCDF-GHJ", "BCDF-GHJKL", "BCDF-GHJ1"):
        assert normalize_user_code(text) is None


def test_scopes_subjects_and_rates() -> None:
    assert parse_scope(None) == "openid"
    assert parse_scope("email openid evil offline_access") == "openid email offline_access"
    assert narrower("openid", "openid profile")
    assert not narrower("openid email", "openid profile")
    assert subject_for("alice", 1) == subject_for("alice", 1) != subject_for("alice", 2)
    assert "alice" not in subject_for("alice", 1)
