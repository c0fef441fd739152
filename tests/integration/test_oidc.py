"""The built-in OpenID Connect provider end to end, with a real HTTP client over the real app.

The whole flow (discovery → authorize → login form → code → token → API call → refresh →
revoke), and a negative test for each rule of issue 4: wrong verifier, downgrade to plain,
reused code, foreign redirect URI, replayed refresh token, revoked token, logout, disabled user,
lockout, anonymous login, the device grant, key rotation; and the JWKS is checked for private
or symmetric members.

The API keeps a verified principal for ``auth_cache_ttl_s`` per token; a revocation empties
that cache at once (iotvault.api.readcache), so the tests keep the cache on: each revocation
must show at the next request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from helpers import free_port, server_env
from joserfc import jwt
from joserfc.jwk import KeySet
from sqlalchemy import update
from typer.testing import CliRunner

from iotvault.accounts import create_group, set_password, update_user
from iotvault.cli.main import app as cli
from iotvault.clock import now_us
from iotvault.domain.accounts import Roles
from iotvault.identity.clients import DEVICE_CODE
from iotvault.storage.schema import (
    identity_events,
    oidc_codes,
    oidc_device_codes,
    oidc_sessions,
    oidc_signing_keys,
)
from oidcfixture import (
    LOGOUT_REDIRECT,
    LOOPBACK_REDIRECT,
    MOBILE,
    MOBILE_REDIRECT,
    PUBLIC_URL,
    WEBAPP,
    WEBAPP_REDIRECT,
    Oidc,
    build_oidc,
    claims_of,
    header_of,
    hidden_fields,
    password_of,
    pkce,
    query_of,
    running_oidc,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

PRIVATE_OR_SYMMETRIC = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@pytest.fixture
async def oidc(tmp_path: Path) -> AsyncIterator[Oidc]:
    async with running_oidc(tmp_path) as o:
        yield o


def assert_oauth_error(response: httpx.Response, error: str, status: int = 400) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == error, response.text


# ---- discovery and keys -----------------------------------------------------------------------
async def test_discovery_lists_the_endpoints_and_only_safe_choices(oidc: Oidc) -> None:
    r = await oidc.http.get("/.well-known/openid-configuration")
    assert r.status_code == 200
    doc = r.json()
    assert doc["issuer"] == PUBLIC_URL
    for name in (
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "userinfo_endpoint",
        "revocation_endpoint",
        "end_session_endpoint",
        "device_authorization_endpoint",
    ):
        assert doc[name].startswith(PUBLIC_URL + "/"), name
        path = doc[name].removeprefix(PUBLIC_URL)
        method = "GET" if name in ("jwks_uri", "authorization_endpoint", "userinfo_endpoint") else "POST"
        assert (await oidc.http.request(method, path)).status_code != 404, name
    assert doc["response_types_supported"] == ["code"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert "password" not in doc["grant_types_supported"]
    assert "implicit" not in doc["grant_types_supported"]
    assert DEVICE_CODE in doc["grant_types_supported"]
    assert doc["id_token_signing_alg_values_supported"] == ["ES256"]
    assert set(doc["token_endpoint_auth_methods_supported"]) == {"client_secret_basic", "none"}


async def test_jwks_has_public_members_only(oidc: Oidc) -> None:
    await oidc.tokens_for("alice")  # a key exists and has signed
    oidc.identity.provider.keys.rotate()  # and a retired one is still published
    r = await oidc.http.get("/oauth/jwks")
    assert r.status_code == 200
    keys = r.json()["keys"]
    assert len(keys) == 2
    for key in keys:
        leaked = PRIVATE_OR_SYMMETRIC & set(key)
        assert not leaked, f"JWKS key {key.get('kid')} publishes {leaked}"
        assert key["kty"] == "EC"
        assert key["crv"] == "P-256"
        assert key.get("use") == "sig"
        assert key.get("alg") == "ES256"
    # the signing keys are stored wrapped: no private member in what the database holds in clear
    with oidc.ctx.engine.connect() as conn:
        rows = conn.execute(oidc_signing_keys.select()).all()
    for row in rows:
        assert not PRIVATE_OR_SYMMETRIC & set(json.loads(row.public_jwk))
        assert len(row.wrapped) == 1 + 12 + 32 + 16  # format, nonce, AES-GCM(scalar), tag


# ---- the whole flow ------------------------------------------------------------------------
async def test_whole_flow_discovery_to_revocation(tmp_path: Path, database_url: str) -> None:
    async with running_oidc(tmp_path, database_url) as oidc:
        http = oidc.http
        discovery = (await http.get("/.well-known/openid-configuration")).json()
        verifier, challenge = pkce()
        r = await http.get(
            discovery["authorization_endpoint"].removeprefix(PUBLIC_URL),
            params={
                "response_type": "code",
                "client_id": MOBILE,
                "redirect_uri": MOBILE_REDIRECT,
                "scope": "openid profile offline_access",
                "state": "st-123",
                "nonce": "n-456",
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            },
        )
        assert r.status_code == 302
        login_url = r.headers["location"]
        assert login_url.startswith(PUBLIC_URL + "/login?request=")

        page = await http.get(login_url)
        assert page.status_code == 200
        assert 'name="username"' in page.text
        assert 'name="password"' in page.text
        assert "Mobile &lt;App&gt;" in page.text  # the client's name, escaped
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        form = hidden_fields(page.text)
        assert set(form) == {"request", "csrf_token"}
        r = await http.post("/login", data={**form, "username": "alice", "password": password_of("alice")})
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "samesite=lax" in cookie.lower()
        assert "Secure" not in cookie  # plain http here; see test_cookies_are_secure_under_https
        callback = r.headers["location"]
        assert callback.startswith(MOBILE_REDIRECT + "?")
        got = query_of(callback)
        assert got["state"] == "st-123"
        assert got["iss"] == PUBLIC_URL

        r = await http.post(
            discovery["token_endpoint"].removeprefix(PUBLIC_URL),
            data={
                "grant_type": "authorization_code",
                "code": got["code"],
                "redirect_uri": MOBILE_REDIRECT,
                "client_id": MOBILE,
                "code_verifier": verifier,
            },
        )
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-store"
        tokens = r.json()
        assert tokens["token_type"] == "Bearer"
        assert tokens["expires_in"] == 300
        assert set(tokens) >= {"access_token", "id_token", "refresh_token"}

        # both tokens verify with the published keys
        jwks = KeySet.import_key_set((await http.get("/oauth/jwks")).json())
        access = jwt.decode(tokens["access_token"], jwks, algorithms=["ES256"])
        assert access.header["typ"] == "at+jwt"
        assert access.claims["iss"] == PUBLIC_URL
        assert access.claims["aud"] == PUBLIC_URL + "/iotf"
        assert access.claims["preferred_username"] == "alice"
        assert access.claims["amr"] == ["pwd"]
        assert access.claims["client_id"] == MOBILE
        id_token = jwt.decode(tokens["id_token"], jwks, algorithms=["ES256"])
        assert id_token.header["typ"] == "JWT"
        assert id_token.claims["aud"] == MOBILE
        assert id_token.claims["nonce"] == "n-456"
        assert id_token.claims["sub"] == access.claims["sub"] != "alice"  # stable and opaque
        digest = hashlib.sha256(tokens["access_token"].encode()).digest()[:16]
        assert id_token.claims["at_hash"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

        # the API: alice reads d1 only, also in the seed's "Bearer <access> <id>" form
        assert await oidc.device_ids(tokens["access_token"]) == ["d1"]
        r = await http.get(
            "/iotf/devices",
            headers={"Authorization": f"Bearer {tokens['access_token']} {tokens['id_token']}"},
        )
        assert [d["deviceId"] for d in r.json()["devices"]] == ["d1"]
        assert (await oidc.api(tokens["access_token"], "/iotf/devices/d2")).status_code == 404

        r = await http.get("/oauth/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
        assert r.json() == {"sub": access.claims["sub"], "name": "Alice", "preferred_username": "alice"}

        # refresh: a new refresh token, a new access token that works
        r = await oidc.refresh(tokens["refresh_token"])
        assert r.status_code == 200, r.text
        renewed = r.json()
        assert renewed["refresh_token"] != tokens["refresh_token"]
        assert "nonce" not in claims_of(renewed["id_token"])
        assert await oidc.device_ids(renewed["access_token"]) == ["d1"]

        # revoke (RFC 7009): the family ends, and the API refuses its access tokens
        r = await http.post(
            discovery["revocation_endpoint"].removeprefix(PUBLIC_URL),
            data={"token": renewed["refresh_token"], "token_type_hint": "refresh_token", "client_id": MOBILE},
        )
        assert r.status_code == 200
        assert_oauth_error(await oidc.refresh(renewed["refresh_token"]), "invalid_grant")
        r = await oidc.api(renewed["access_token"])
        assert r.status_code == 401
        assert "revoked" in r.json()["detail"]
        assert (await oidc.api(tokens["access_token"])).status_code == 401


# ---- PKCE ---------------------------------------------------------------------------------------
async def test_pkce_is_s256_only_and_required_for_public_clients(oidc: Oidc) -> None:
    r, flow = await oidc.authorize(use_pkce=False)  # a public client without a challenge
    assert r.status_code == 302
    err = query_of(r.headers["location"])
    assert r.headers["location"].startswith(MOBILE_REDIRECT)
    assert err["error"] == "invalid_request"
    assert err["state"] == flow.state
    assert "PKCE" in err["error_description"]

    verifier = "v" * 50  # downgrade to plain: the challenge is the verifier itself
    r, _ = await oidc.authorize(use_pkce=False, code_challenge=verifier, code_challenge_method="plain")
    assert query_of(r.headers["location"])["error"] == "invalid_request"
    r, _ = await oidc.authorize(use_pkce=False, code_challenge=verifier)  # method defaults to plain
    assert query_of(r.headers["location"])["error"] == "invalid_request"

    code, flow = await oidc.code_for("alice")
    wrong, _ = pkce()
    assert_oauth_error(await oidc.exchange(code, flow, code_verifier=wrong), "invalid_grant")
    code, flow = await oidc.code_for("alice")
    r = await oidc.exchange(code, flow, code_verifier="")  # no verifier at all
    assert_oauth_error(r, "invalid_grant")


async def test_confidential_client_basic_auth_and_no_pkce_downgrade(oidc: Oidc) -> None:
    code, _ = await oidc.code_for("bob", client_id=WEBAPP, redirect_uri=WEBAPP_REDIRECT, use_pkce=False)
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": WEBAPP_REDIRECT}
    # a verifier for a code issued without a challenge is a downgrade: refused
    r = await oidc.token({**form, "code_verifier": pkce()[0]}, auth=(WEBAPP, oidc.webapp_secret))
    assert_oauth_error(r, "invalid_grant")

    code, _flow = await oidc.code_for("bob", client_id=WEBAPP, redirect_uri=WEBAPP_REDIRECT, use_pkce=False)
    form["code"] = code
    r = await oidc.token({**form, "client_id": WEBAPP, "client_secret": oidc.webapp_secret})
    assert_oauth_error(r, "invalid_client", 401)  # client_secret_post is not supported
    r = await oidc.token(form, auth=(WEBAPP, "wrong-secret"))
    assert_oauth_error(r, "invalid_client", 401)
    assert r.headers["www-authenticate"].startswith("Basic")
    r = await oidc.token({**form, "client_id": WEBAPP})  # no authentication at all
    assert_oauth_error(r, "invalid_client", 401)
    r = await oidc.token(form, auth=(WEBAPP, oidc.webapp_secret))
    assert r.status_code == 200, r.text
    assert await oidc.device_ids(r.json()["access_token"]) == ["d1"]
    # a public client cannot pretend to have a secret
    r = await oidc.token({"grant_type": "refresh_token", "refresh_token": "x"}, auth=(MOBILE, "anything"))
    assert_oauth_error(r, "invalid_client", 401)


# ---- codes --------------------------------------------------------------------------------------
async def test_code_is_single_use_and_reuse_revokes_what_it_issued(oidc: Oidc) -> None:
    code, flow = await oidc.code_for("alice")
    first = await oidc.exchange(code, flow)
    assert first.status_code == 200
    tokens = first.json()
    assert await oidc.device_ids(tokens["access_token"]) == ["d1"]

    assert_oauth_error(await oidc.exchange(code, flow), "invalid_grant")
    assert (await oidc.api(tokens["access_token"])).status_code == 401
    assert_oauth_error(await oidc.refresh(tokens["refresh_token"]), "invalid_grant")
    (event,) = oidc.security_events("oidc_code_reused")
    assert event.subject == "alice"


async def test_code_expires_and_is_bound_to_its_client_and_redirect_uri(oidc: Oidc) -> None:
    code, flow = await oidc.code_for("alice", redirect_uri=LOOPBACK_REDIRECT)
    assert_oauth_error(await oidc.exchange(code, flow, redirect_uri=MOBILE_REDIRECT), "invalid_grant")
    code, flow = await oidc.code_for("alice")
    r = await oidc.token(
        {"grant_type": "authorization_code", "code": code, "redirect_uri": WEBAPP_REDIRECT},
        auth=(WEBAPP, oidc.webapp_secret),
    )
    assert_oauth_error(r, "invalid_grant")  # another client's code
    assert (await oidc.exchange(code, flow)).status_code == 200  # ... which left it untouched
    code, flow = await oidc.code_for("alice")
    with oidc.ctx.engine.begin() as conn:
        conn.execute(update(oidc_codes).values(expires_us=now_us() - 1))
    assert_oauth_error(await oidc.exchange(code, flow), "invalid_grant")


# ---- redirect URIs, response types, grant types ------------------------------------------------
async def test_redirect_uri_must_match_exactly_and_errors_never_redirect_elsewhere(oidc: Oidc) -> None:
    for foreign in (
        "https://evil.example/cb",
        MOBILE_REDIRECT + "/more",
        MOBILE_REDIRECT + "?x=1",
        "COM.EXAMPLE.APP:/cb",
        LOOPBACK_REDIRECT.replace("4000", "4001"),
        LOOPBACK_REDIRECT.replace("127.0.0.1", "localhost"),
        WEBAPP_REDIRECT,  # registered, but for another client
    ):
        r, _ = await oidc.authorize(redirect_uri=foreign)
        assert r.status_code == 400, foreign
        assert "location" not in r.headers, foreign
        assert r.headers["content-type"].startswith("text/html")
    r, _ = await oidc.authorize(client_id="nobody")
    assert r.status_code == 400
    assert "location" not in r.headers
    # errors after the redirect URI is known go back to it, with state and iss
    r, flow = await oidc.authorize(response_type="token")
    assert r.status_code == 302
    err = query_of(r.headers["location"])
    assert err == {
        "error": "unsupported_response_type",
        "error_description": err["error_description"],
        "state": flow.state,
        "iss": PUBLIC_URL,
    }
    r, _ = await oidc.authorize(response_type="code id_token")
    assert query_of(r.headers["location"])["error"] == "unsupported_response_type"


async def test_password_and_other_grants_are_refused(oidc: Oidc) -> None:
    r = await oidc.token(
        {"grant_type": "password", "username": "alice", "password": password_of("alice"), "client_id": MOBILE}
    )
    assert_oauth_error(r, "unsupported_grant_type")
    r = await oidc.token({"grant_type": "client_credentials"}, auth=(WEBAPP, oidc.webapp_secret))
    assert_oauth_error(r, "unsupported_grant_type")
    r = await oidc.token({"grant_type": DEVICE_CODE, "device_code": "x"}, auth=(WEBAPP, oidc.webapp_secret))
    assert_oauth_error(r, "unauthorized_client")  # not registered for it
    r = await oidc.http.post("/oauth/token", json={"grant_type": "authorization_code"})
    assert_oauth_error(r, "invalid_request")  # form bodies only
    r = await oidc.http.post(
        "/oauth/token",
        content=b"grant_type=a&grant_type=b&client_id=mobile",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_oauth_error(r, "invalid_request")  # repeated parameters
    r = await oidc.http.post("/oauth/token?password=x", data={"grant_type": "password"})
    assert r.status_code == 400  # credentials in the URL are refused before anything else


# ---- refresh tokens -------------------------------------------------------------------------------
async def test_replayed_refresh_token_revokes_the_family(oidc: Oidc) -> None:
    tokens = await oidc.tokens_for("alice")
    first = await oidc.refresh(tokens["refresh_token"])
    assert first.status_code == 200
    second = first.json()
    assert_oauth_error(await oidc.refresh(tokens["refresh_token"]), "invalid_grant")  # the replay
    assert_oauth_error(await oidc.refresh(second["refresh_token"]), "invalid_grant")  # family gone
    assert (await oidc.api(second["access_token"])).status_code == 401
    assert (await oidc.api(tokens["access_token"])).status_code == 401
    assert [e.subject for e in oidc.security_events("oidc_refresh_token_reused")] == ["alice"]
    # another login of the same user is not affected
    other = await oidc.tokens_for("alice")
    assert await oidc.device_ids(other["access_token"]) == ["d1"]


async def test_refresh_can_narrow_but_not_widen_the_scope(oidc: Oidc) -> None:
    tokens = await oidc.tokens_for("alice", scope="openid profile")
    r = await oidc.refresh(tokens["refresh_token"])
    tokens = r.json()
    r = await oidc.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": MOBILE,
            "scope": "openid email",
        }
    )
    assert_oauth_error(r, "invalid_scope")
    r = await oidc.token(
        {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": MOBILE,
            "scope": "openid",
        }
    )
    assert r.status_code == 200
    assert r.json()["scope"] == "openid"


# ---- revocation and userinfo ----------------------------------------------------------------------
async def test_revoking_an_access_token_ends_its_grant_and_foreign_tokens_are_ignored(oidc: Oidc) -> None:
    mine = await oidc.tokens_for("alice")
    theirs = await oidc.tokens_for("bob", client_id=WEBAPP, redirect_uri=WEBAPP_REDIRECT, use_pkce=False)
    # mobile cannot revoke webapp's token: 200 (RFC 7009 tells nothing), and nothing happens
    r = await oidc.http.post("/oauth/revoke", data={"token": theirs["access_token"], "client_id": MOBILE})
    assert r.status_code == 200
    assert (await oidc.api(theirs["access_token"])).status_code == 200
    r = await oidc.http.post("/oauth/revoke", data={"token": "no-such-token", "client_id": MOBILE})
    assert r.status_code == 200
    assert_oauth_error(await oidc.http.post("/oauth/revoke", data={"client_id": MOBILE}), "invalid_request")
    r = await oidc.http.post("/oauth/revoke", data={"token": mine["access_token"], "client_id": MOBILE})
    assert r.status_code == 200
    assert (await oidc.api(mine["access_token"])).status_code == 401
    assert_oauth_error(await oidc.refresh(mine["refresh_token"]), "invalid_grant")
    r = await oidc.http.post(
        "/oauth/revoke", data={"token": theirs["refresh_token"]}, auth=(WEBAPP, oidc.webapp_secret)
    )
    assert r.status_code == 200
    assert (await oidc.api(theirs["access_token"])).status_code == 401


async def test_userinfo_needs_a_live_access_token(oidc: Oidc) -> None:
    tokens = await oidc.tokens_for("alice", scope="openid email profile")
    update_user(oidc.ctx, "alice", attributes={"emailAddress": "alice@example.com", "Language": "en"})
    # the change of the user ends its login: userinfo refuses
    r = await oidc.http.get("/oauth/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert r.status_code == 401
    tokens = await oidc.tokens_for("alice", scope="openid email profile")
    r = await oidc.http.post("/oauth/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"})
    assert r.status_code == 200
    assert r.json()["email"] == "alice@example.com"
    assert r.json()["locale"] == "en"
    r = await oidc.http.get("/oauth/userinfo")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = await oidc.http.get("/oauth/userinfo", headers={"Authorization": f"Bearer {tokens['id_token']}"})
    assert r.status_code == 401  # an ID token is not an access token
    assert r.json()["error"] == "invalid_token"


# ---- the login page ----------------------------------------------------------------------------
async def test_login_form_csrf_and_same_answer_for_unknown_user_wrong_password_disabled(oidc: Oidc) -> None:
    r, _ = await oidc.authorize()
    login_url = r.headers["location"]
    form = await oidc.login_form(login_url)
    good = {**form, "username": "alice", "password": password_of("alice")}
    r = await oidc.http.post("/login", data={**good, "csrf_token": "forged"})
    assert r.status_code == 400
    async with httpx.AsyncClient(transport=oidc.http._transport, base_url=PUBLIC_URL) as stranger:
        r = await stranger.post("/login", data=good)  # no browser cookie: a cross-site post
        assert r.status_code == 400
    assert (await oidc.http.get("/login?request=made-up-request-id-made-up-request-id-xx")).status_code == 400
    assert (await oidc.http.get("/login")).status_code == 400

    update_user(oidc.ctx, "dave", disabled=True)
    answers: dict[str, str] = {}
    durations: dict[str, list[float]] = {}
    for case, user, password in (
        ("unknown", "mallory", "whatever-password"),
        ("wrong", "carol", "not-carols-password"),
        ("disabled", "dave", password_of("dave")),
    ) * 3:
        started = time.perf_counter()
        r = await oidc.http.post("/login", data={**form, "username": user, "password": password})
        durations.setdefault(case, []).append(time.perf_counter() - started)
        assert r.status_code == 303
        answers[case] = r.headers["location"]
        assert "set-cookie" not in r.headers or "iotvault-session" not in r.headers["set-cookie"]
    assert len(set(answers.values())) == 1, answers
    assert query_of(answers["unknown"])["error"] == "invalid"
    medians = {case: statistics.median(times) for case, times in durations.items()}
    assert min(medians.values()) > 0.02, medians  # an argon2 check ran in every case
    assert max(medians.values()) < 5 * min(medians.values()), medians  # loose: shared CI machines
    page = await oidc.http.get(answers["unknown"])
    assert "The user name or the password is not right." in page.text
    r = await oidc.http.post("/login", data=good)
    assert r.status_code == 303
    assert r.headers["location"].startswith(MOBILE_REDIRECT)
    # the pending request was used: posting the form again is refused
    assert (await oidc.http.post("/login", data=good)).status_code == 400


async def test_lockout_after_failures_is_temporary_and_recorded(tmp_path: Path) -> None:
    async with running_oidc(tmp_path, oidc_login_max_failures="3", oidc_lockout_s="60") as oidc:
        r, _ = await oidc.authorize()
        login_url = r.headers["location"]
        errors = []
        for _ in range(3):
            r = await oidc.submit_login(login_url, "carol", "wrong-password-1")
            errors.append(query_of(r.headers["location"])["error"])
        assert errors == ["invalid", "invalid", "locked"]
        r = await oidc.submit_login(login_url, "carol")  # the right password, but locked
        assert query_of(r.headers["location"])["error"] == "locked"
        for _ in range(3):  # an unknown name locks exactly the same way
            r = await oidc.submit_login(login_url, "nobody-here", "wrong-password-1")
        assert query_of(r.headers["location"])["error"] == "locked"
        assert {e.subject for e in oidc.security_events("oidc_account_locked")} == {"carol", "nobody-here"}
        assert len(oidc.security_events("oidc_login_failed")) == 6
        assert oidc.security_events("oidc_login_refused")[0].detail["detail"] == "locked"
        # other users are not locked out
        r = await oidc.submit_login(login_url, "alice")
        assert r.headers["location"].startswith(MOBILE_REDIRECT)
        # the lockout ends when its failures are older than oidc_lockout_s
        with oidc.ctx.engine.begin() as conn:
            conn.execute(update(identity_events).values(at_us=identity_events.c.at_us - 61_000_000))
        r, _ = await oidc.authorize(prompt="login")
        r = await oidc.submit_login(r.headers["location"], "carol")
        assert r.headers["location"].startswith(MOBILE_REDIRECT), r.headers["location"]
        oidc.http.cookies.clear()  # carol's session: log in as the administrator instead
        root = await oidc.tokens_for("root")
        r = await oidc.http.get(
            "/iotf/security/events", headers={"Authorization": f"Bearer {root['access_token']}"}
        )
        kinds = {e["kind"] for e in r.json()["events"]}
        assert {"oidc_login_failed", "oidc_account_locked", "oidc_login_succeeded"} <= kinds


async def test_session_prompt_login_and_max_age(oidc: Oidc) -> None:
    first = await oidc.tokens_for("alice")  # logs in: the browser now has a session
    r, _ = await oidc.authorize()
    assert r.headers["location"].startswith(MOBILE_REDIRECT)  # no login page: single sign-on
    r, _ = await oidc.authorize(prompt="login")
    assert r.headers["location"].startswith(PUBLIC_URL + "/login")
    cookie_before = oidc.http.cookies.get("iotvault-session")
    r = await oidc.submit_login(r.headers["location"], "alice")
    assert r.headers["location"].startswith(MOBILE_REDIRECT)
    assert oidc.http.cookies.get("iotvault-session") != cookie_before  # a new cookie every login
    assert await oidc.device_ids(first["access_token"]) == ["d1"]  # the session went on
    r, _ = await oidc.authorize(prompt="login")
    r = await oidc.submit_login(r.headers["location"], "bob")  # someone else: the session ends
    assert (await oidc.api(first["access_token"])).status_code == 401
    r, _ = await oidc.authorize(max_age="3600")
    assert r.headers["location"].startswith(MOBILE_REDIRECT)
    await asyncio.sleep(1.1)
    r, _ = await oidc.authorize(max_age="1")
    assert r.headers["location"].startswith(PUBLIC_URL + "/login")
    code, flow = await oidc.code_for("bob", max_age="1")  # logs in again
    tokens = (await oidc.exchange(code, flow)).json()
    assert time.time() - claims_of(tokens["id_token"])["auth_time"] < 5
    oidc.http.cookies.clear()
    r, flow = await oidc.authorize(prompt="none")
    assert query_of(r.headers["location"])["error"] == "login_required"


async def test_refresh_tokens_outlive_an_expired_browser_session(oidc: Oidc) -> None:
    tokens = await oidc.tokens_for("alice")
    with oidc.ctx.engine.begin() as conn:
        conn.execute(update(oidc_sessions).values(expires_us=now_us() - 1))
    r, _ = await oidc.authorize()
    assert r.headers["location"].startswith(PUBLIC_URL + "/login")  # the browser must log in again
    r = await oidc.refresh(tokens["refresh_token"])
    assert r.status_code == 200, r.text  # but the app's login goes on
    oidc.identity.provider.housekeeping(force=True)
    with oidc.ctx.engine.begin() as conn:  # even once the expired session is purged
        conn.execute(oidc_sessions.delete())
    assert (await oidc.refresh(r.json()["refresh_token"])).status_code == 200


async def test_cookies_are_secure_under_https(tmp_path: Path) -> None:
    oidc = build_oidc(tmp_path, public_url="https://iot.example")
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=oidc.app), base_url="https://iot.example"
        ) as http:
            _, challenge = pkce()
            r = await http.get(
                "/oauth/authorize",
                params={
                    "response_type": "code",
                    "client_id": MOBILE,
                    "redirect_uri": MOBILE_REDIRECT,
                    "code_challenge": challenge,
                    "code_challenge_method": "S256",
                },
            )
            assert r.headers["location"].startswith("https://iot.example/login?")
            page = await http.get(r.headers["location"])
            cookie = page.headers["set-cookie"]
            assert cookie.startswith("__Host-iotvault-browser=")
            assert "Secure" in cookie
            assert "HttpOnly" in cookie
            assert "Path=/" in cookie
            assert "Domain" not in cookie
            assert "strict-transport-security" in page.headers
    finally:
        oidc.ctx.close()


# ---- logout and disabled users -------------------------------------------------------------------
async def test_logout_with_id_token_hint_ends_session_and_tokens(oidc: Oidc) -> None:
    tokens = await oidc.tokens_for("alice")
    r = await oidc.http.get(
        "/oauth/logout",
        params={
            "id_token_hint": tokens["id_token"],
            "post_logout_redirect_uri": LOGOUT_REDIRECT,
            "state": "bye-1",
        },
    )
    assert r.status_code == 302
    assert r.headers["location"] == LOGOUT_REDIRECT + "?state=bye-1"
    assert "Max-Age=0" in r.headers["set-cookie"] or "max-age=0" in r.headers["set-cookie"].lower()
    assert (await oidc.api(tokens["access_token"])).status_code == 401
    assert_oauth_error(await oidc.refresh(tokens["refresh_token"]), "invalid_grant")
    r, _ = await oidc.authorize()
    assert r.headers["location"].startswith(PUBLIC_URL + "/login")  # the session is gone
    # an unregistered place to go afterwards is refused, not followed
    r = await oidc.http.get(
        "/oauth/logout", params={"client_id": MOBILE, "post_logout_redirect_uri": "https://evil.example/"}
    )
    assert r.status_code == 400
    assert "location" not in r.headers


async def test_logout_without_hint_asks_first(oidc: Oidc) -> None:
    tokens = await oidc.tokens_for("alice")
    r = await oidc.http.get("/oauth/logout")
    assert r.status_code == 200
    form = hidden_fields(r.text)
    assert "csrf_token" in form
    assert (await oidc.api(tokens["access_token"])).status_code == 200  # nothing ended yet
    r = await oidc.http.post("/oauth/logout", data={**form, "csrf_token": "forged", "confirm": "yes"})
    assert r.status_code == 200
    assert (await oidc.api(tokens["access_token"])).status_code == 200  # a forged form ends nothing
    r = await oidc.http.post("/oauth/logout", data={**form, "confirm": "yes"})
    assert r.status_code == 200
    assert "signed out" in r.text
    assert (await oidc.api(tokens["access_token"])).status_code == 401
    assert_oauth_error(await oidc.refresh(tokens["refresh_token"]), "invalid_grant")


async def test_disabling_a_user_ends_its_sessions_and_tokens_for_good(oidc: Oidc) -> None:
    tokens = await oidc.tokens_for("alice")
    update_user(oidc.ctx, "alice", disabled=True)
    assert (await oidc.api(tokens["access_token"])).status_code == 401
    assert_oauth_error(await oidc.refresh(tokens["refresh_token"]), "invalid_grant")
    update_user(oidc.ctx, "alice", disabled=False)
    r, _ = await oidc.authorize()
    assert r.headers["location"].startswith(PUBLIC_URL + "/login")  # the browser session ended
    assert (await oidc.api(tokens["access_token"])).status_code == 401  # and stays ended
    assert_oauth_error(await oidc.refresh(tokens["refresh_token"]), "invalid_grant")
    # a password change ends logins too
    fresh = await oidc.tokens_for("alice")
    set_password(oidc.ctx, "alice", "a-new-password-for-alice")
    assert (await oidc.api(fresh["access_token"])).status_code == 401


# ---- anonymous login ------------------------------------------------------------------------------
async def test_anonymous_login_sees_only_what_the_anonymous_group_grants(tmp_path: Path) -> None:
    async with running_oidc(tmp_path, oidc_anonymous_rate="3/hour") as oidc:
        r, flow = await oidc.authorize()
        page = await oidc.http.get(r.headers["location"])
        assert "Continue without an account" in page.text
        form = hidden_fields(page.text)
        r = await oidc.http.post("/login", data={**form, "action": "anonymous"})
        assert r.status_code == 303
        assert "iotvault-session" not in r.headers.get("set-cookie", "")  # no session for nobody
        tokens = (await oidc.exchange(query_of(r.headers["location"])["code"], flow)).json()
        claims = claims_of(tokens["access_token"])
        assert claims["amr"] == ["anon"]
        assert "preferred_username" not in claims
        assert claims["sub"].startswith("anon-")
        assert await oidc.device_ids(tokens["access_token"]) == []
        create_group(oidc.ctx, "anonymous", roles=Roles(reader=True), devices=("d3",))
        assert await oidc.device_ids(tokens["access_token"]) == ["d3"]
        assert (await oidc.api(tokens["access_token"], "/iotf/users")).status_code == 403
        renewed = (await oidc.refresh(tokens["refresh_token"])).json()
        assert claims_of(renewed["access_token"])["sub"] == claims["sub"]

        # App ID's SDK style: straight from the authorization request
        code, flow = await oidc.code_for(idp="anonymous")
        assert claims_of((await oidc.exchange(code, flow)).json()["access_token"])["amr"] == ["anon"]
        r, flow = await oidc.authorize(idp="anonymous")  # the third in this hour
        assert "code" in query_of(r.headers["location"])
        r, flow = await oidc.authorize(idp="anonymous")  # rate-limited
        assert query_of(r.headers["location"])["error"] == "temporarily_unavailable"
        # a client registered without it gets no anonymous tokens
        r, _ = await oidc.authorize(
            client_id=WEBAPP, redirect_uri=WEBAPP_REDIRECT, use_pkce=False, idp="anonymous"
        )
        assert query_of(r.headers["location"])["error"] == "access_denied"


# ---- device authorization grant (RFC 8628) --------------------------------------------------------
async def _start_device(oidc: Oidc, client_id: str = "iotvault-cli") -> dict[str, Any]:
    r = await oidc.http.post(
        "/oauth/device_authorization", data={"client_id": client_id, "scope": "openid profile"}
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def _poll(oidc: Oidc, started: dict[str, Any]) -> httpx.Response:
    return await oidc.token(
        {"grant_type": DEVICE_CODE, "device_code": started["device_code"], "client_id": "iotvault-cli"}
    )


async def _allow(
    http: httpx.AsyncClient, base: str, user_code: str, user: str = "alice", decision: str = "allow"
) -> httpx.Response:
    """What a person does in the browser: type the code, log in if asked, allow or deny."""
    page = await http.get("/device", params={"user_code": user_code})
    assert page.status_code == 200
    r = await http.post("/device", data={**hidden_fields(page.text), "user_code": user_code.lower()})
    assert r.status_code == 303, r.text
    if r.headers["location"].startswith(base + "/login"):
        page = await http.get(r.headers["location"])
        r = await http.post(
            "/login", data={**hidden_fields(page.text), "username": user, "password": password_of(user)}
        )
        assert r.status_code == 303
    assert r.headers["location"].startswith(base + "/device/confirm")
    page = await http.get(r.headers["location"])
    assert user_code in page.text
    return await http.post("/device/confirm", data={**hidden_fields(page.text), "decision": decision})


async def test_device_grant_pending_slow_down_allow_and_deny(oidc: Oidc) -> None:
    oidc.identity.provider.device_poll_interval_s = 1
    started = await _start_device(oidc)
    assert started["verification_uri"] == PUBLIC_URL + "/device"
    assert started["interval"] == 1
    assert len(started["user_code"]) == 9
    assert_oauth_error(await _poll(oidc, started), "authorization_pending")
    assert_oauth_error(await _poll(oidc, started), "slow_down")

    started = await _start_device(oidc)
    r = await _allow(oidc.http, PUBLIC_URL, started["user_code"])
    assert r.status_code == 303
    assert r.headers["location"].endswith("/device?result=approved")
    r = await _poll(oidc, started)
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert await oidc.device_ids(tokens["access_token"]) == ["d1"]
    assert "refresh_token" in tokens
    assert_oauth_error(await _poll(oidc, started), "invalid_grant")  # used once

    started = await _start_device(oidc)
    r = await _allow(oidc.http, PUBLIC_URL, started["user_code"], decision="deny")
    assert r.headers["location"].endswith("/device?result=denied")
    assert_oauth_error(await _poll(oidc, started), "access_denied")

    started = await _start_device(oidc)
    with oidc.ctx.engine.begin() as conn:
        conn.execute(update(oidc_device_codes).values(expires_us=now_us() - 1))
    assert_oauth_error(await _poll(oidc, started), "expired_token")

    page = await oidc.http.get("/device")
    r = await oidc.http.post("/device", data={**hidden_fields(page.text), "user_code": "BCDF-GHJK"})
    assert r.headers["location"].endswith("/device?error=invalid")
    r = await oidc.http.post("/oauth/device_authorization", data={"client_id": MOBILE})
    assert_oauth_error(r, "unauthorized_client")  # not registered for the device grant


async def test_iotvault_login_against_a_real_server(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with running_oidc(tmp_path, public_url=url) as oidc:
        oidc.identity.provider.device_poll_interval_s = 1
        server = uvicorn.Server(
            uvicorn.Config(oidc.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        task = asyncio.create_task(server.serve())
        try:
            while not server.started:  # noqa: ASYNC110 - uvicorn has no started event
                await asyncio.sleep(0.02)
            env = server_env(tmp_path / "cli")

            # a URL that is not the issuer is refused, in one line
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "iotvault", "login", "--url", f"http://localhost:{port}", "--json",
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 1
            assert b"is not an iotvault issuer" in err
            assert b"Traceback" not in err

            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "iotvault", "login", "--url", url, "--json",
                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stderr is not None
            user_code = None
            async with asyncio.timeout(30):
                while user_code is None:
                    line = (await proc.stderr.readline()).decode()
                    assert line, "iotvault login ended without showing a code"
                    if "enter the code" in line:
                        user_code = line.split()[-1]
                        assert f"open {url}/device" in line
            async with httpx.AsyncClient(base_url=url, timeout=10) as browser:
                r = await _allow(browser, url, user_code, "carol")
                assert r.headers["location"].endswith("/device?result=approved")
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            tokens = json.loads(out)
            assert claims_of(tokens["access_token"])["client_id"] == "iotvault-cli"
            assert await oidc.device_ids(tokens["access_token"]) == ["d2"]
        finally:
            server.should_exit = True
            await task


# ---- signing keys ------------------------------------------------------------------------------
async def test_signing_key_rotation_keeps_old_tokens_valid_until_they_expire(tmp_path: Path) -> None:
    # the test retires the key before its tokens expire (a real retirement comes after them):
    # no cached authentication result, which would outlive the key by up to auth_cache_ttl_s
    async with running_oidc(tmp_path, key_cache_ttl_s="0", auth_cache_ttl_s="0") as oidc:
        before = await oidc.tokens_for("alice")
        old_kid = header_of(before["access_token"])["kid"]
        env = {
            "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
            "IOTVAULT_PUBLIC_URL": PUBLIC_URL,
            "IOTVAULT_KEY_CACHE_TTL_S": "0",
        }
        result = CliRunner().invoke(cli, ["keys", "rotate", "--signing", "--json"], env=env)
        assert result.exit_code == 0, result.output
        rotated = json.loads(result.stdout)["signing"]
        assert rotated["retired"] == [old_kid]
        after = await oidc.tokens_for("alice")
        assert header_of(after["access_token"])["kid"] == rotated["kid"] != old_kid
        kids = {k["kid"] for k in (await oidc.http.get("/oauth/jwks")).json()["keys"]}
        assert kids == {old_kid, rotated["kid"]}
        assert await oidc.device_ids(before["access_token"]) == ["d1"]  # still published
        assert await oidc.device_ids(after["access_token"]) == ["d1"]
        # once the old key's tokens have all expired, it leaves the JWKS and the database
        with oidc.ctx.engine.begin() as conn:
            conn.execute(
                update(oidc_signing_keys)
                .where(oidc_signing_keys.c.kid == old_kid)
                .values(publish_until_us=now_us() - 1)
            )
        oidc.identity.provider.housekeeping(force=True)
        kids = {k["kid"] for k in (await oidc.http.get("/oauth/jwks")).json()["keys"]}
        assert kids == {rotated["kid"]}
        r = await oidc.api(before["access_token"])
        assert r.status_code == 401
        assert "unknown key" in r.json()["detail"]
        with oidc.ctx.engine.connect() as conn:
            assert [r.kid for r in conn.execute(oidc_signing_keys.select())] == [rotated["kid"]]
        # --signing leaves the device data keys alone; --reencrypt does not combine with it
        result = CliRunner().invoke(cli, ["keys", "rotate", "--signing", "--reencrypt"], env=env)
        assert result.exit_code != 0


# ---- client administration ------------------------------------------------------------------------
async def test_clients_admin_api(oidc: Oidc) -> None:
    root = {"Authorization": f"Bearer {(await oidc.tokens_for('root'))['access_token']}"}
    oidc.http.cookies.clear()
    alice = {"Authorization": f"Bearer {(await oidc.tokens_for('alice'))['access_token']}"}
    r = await oidc.http.get("/iotf/clients", headers=alice)
    assert r.status_code == 403
    r = await oidc.http.get("/iotf/clients", headers=root)
    assert {c["clientId"] for c in r.json()["clients"]} == {"iotvault-cli", "iotvault-web", MOBILE, WEBAPP}
    assert all("clientSecret" not in c and "secret" not in json.dumps(c).lower() for c in r.json()["clients"])
    body = {"clientId": "spa", "redirectUris": ["https://spa.example/cb"]}
    r = await oidc.http.post("/iotf/clients", json=body, headers=root)
    assert r.status_code == 201, r.text
    assert r.json()["confidential"] is False
    assert "clientSecret" not in r.json()
    assert (await oidc.http.post("/iotf/clients", json=body, headers=root)).status_code == 409
    for bad in (
        "http://spa.example/cb",
        "https://spa.example/cb#frag",
        "https://*.example/cb",
        "javascript:alert(1)",
    ):
        r = await oidc.http.post(
            "/iotf/clients", json={"clientId": "bad", "redirectUris": [bad]}, headers=root
        )
        assert r.status_code == 422, bad
    r = await oidc.http.post(
        "/iotf/clients",
        json={"clientId": "srv", "confidential": True, "redirectUris": ["https://srv.example/cb"]},
        headers=root,
    )
    secret = r.json()["clientSecret"]
    assert len(secret) >= 43
    assert secret not in (await oidc.http.get("/iotf/clients/srv", headers=root)).text
    assert (await oidc.http.delete("/iotf/clients/spa", headers=root)).status_code == 204
    assert (await oidc.http.get("/iotf/clients/spa", headers=root)).status_code == 404
    assert (await oidc.http.delete("/iotf/clients/spa", headers=root)).status_code == 404


def test_clients_cli_add_list_remove(tmp_path: Path) -> None:
    env = {"IOTVAULT_DATA_DIR": str(tmp_path / "data")}
    runner = CliRunner()
    r = runner.invoke(
        cli, ["clients", "add", "app1", "-r", "com.example.app1:/cb", "--anonymous", "--json"], env=env
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["grantTypes"] == ["authorization_code", "refresh_token"]
    assert doc["allowAnonymous"] is True
    r = runner.invoke(
        cli, ["clients", "add", "web1", "-r", "https://web.example/cb", "--confidential"], env=env
    )
    assert r.exit_code == 0, r.output
    assert "client secret (shown once): " in r.stdout
    r = runner.invoke(cli, ["clients", "add", "tv", "--device", "--no-refresh", "--json"], env=env)
    assert json.loads(r.stdout)["grantTypes"] == [DEVICE_CODE]
    r = runner.invoke(cli, ["clients", "add", "nothing"], env=env)
    assert r.exit_code != 0
    r = runner.invoke(cli, ["clients", "list", "--json"], env=env)
    listed = json.loads(r.stdout)
    assert [c["clientId"] for c in listed] == ["app1", "iotvault-cli", "tv", "web1"]
    assert "secret" not in r.stdout.lower()
    r = runner.invoke(cli, ["clients", "remove", "app1", "--yes"], env=env)
    assert r.exit_code == 0
    r = runner.invoke(cli, ["clients", "remove", "app1", "--yes"], env=env)
    assert r.exit_code != 0
