"""A real iotvault HTTP app with its built-in OpenID Connect provider, and a browser to drive it.

The app is wired as ``iotvault serve`` wires it (:func:`iotvault.node.build_verifier` with the
provider), over a real database seeded like :mod:`apifixture` (users alice, bob, carol, root,
olga, dave; devices d1-d3), with three OAuth clients:

* ``mobile``: public (PKCE), redirect URIs ``com.example.app:/cb`` and
  ``http://127.0.0.1:4000/cb``, logout URI ``http://127.0.0.1:4000/bye``, anonymous login on;
* ``webapp``: confidential (``client_secret_basic``), redirect URI ``https://app.example/cb``;
* ``iotvault-cli``: the device-grant client migration 0004 registers.

The HTTP client is an ``httpx.AsyncClient`` over the ASGI app with a cookie jar, which is all a
browser does here: follow the provider's redirects by hand, keep its cookies, post its forms.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from apifixture import seed
from fastapi import FastAPI

from iotvault.api.app import create_app
from iotvault.api.ratelimit import RateLimiter
from iotvault.api.services import ApiServices, watch_changes
from iotvault.config import Settings, load_settings
from iotvault.context import Context, open_context
from iotvault.identity import Identity
from iotvault.identity.clients import add_client
from iotvault.metrics import Metrics
from iotvault.node import build_verifier

PUBLIC_URL = "http://127.0.0.1:8000"
MOBILE = "mobile"
MOBILE_REDIRECT = "com.example.app:/cb"
LOOPBACK_REDIRECT = "http://127.0.0.1:4000/cb"
LOGOUT_REDIRECT = "http://127.0.0.1:4000/bye"
WEBAPP = "webapp"
WEBAPP_REDIRECT = "https://app.example/cb"
_HIDDEN = re.compile(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">')


def password_of(user: str) -> str:
    return f"{user}-password-123"


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def hidden_fields(html: str) -> dict[str, str]:
    return dict(_HIDDEN.findall(html))


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def claims_of(jwt: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (tests verify signatures where it matters)."""
    payload = jwt.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def header_of(jwt: str) -> dict[str, Any]:
    head = jwt.split(".", maxsplit=1)[0]
    return dict(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))))


@dataclass
class Flow:
    """One authorization request in progress."""

    client_id: str
    redirect_uri: str
    verifier: str | None
    state: str
    nonce: str


@dataclass
class Oidc:
    settings: Settings
    ctx: Context
    identity: Identity
    app: FastAPI
    http: httpx.AsyncClient
    webapp_secret: str
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- the browser side -----------------------------------------------------------
    async def authorize(
        self,
        client_id: str = MOBILE,
        redirect_uri: str = MOBILE_REDIRECT,
        *,
        pkce_pair: tuple[str, str] | None = None,
        use_pkce: bool = True,
        scope: str = "openid profile email",
        **extra: str,
    ) -> tuple[httpx.Response, Flow]:
        verifier, challenge = pkce_pair or pkce()
        flow = Flow(
            client_id,
            redirect_uri,
            verifier if use_pkce else None,
            secrets.token_urlsafe(8),
            secrets.token_urlsafe(8),
        )
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": scope,
            "state": flow.state,
            "nonce": flow.nonce,
        }
        if use_pkce:
            params |= {"code_challenge": challenge, "code_challenge_method": "S256"}
        params |= extra
        response = await self.http.get("/oauth/authorize", params={k: v for k, v in params.items() if v})
        return response, flow

    async def login_form(self, login_url: str) -> dict[str, str]:
        page = await self.http.get(login_url)
        assert page.status_code == 200, page.text
        assert page.headers["content-type"].startswith("text/html")
        return hidden_fields(page.text)

    async def submit_login(self, login_url: str, user: str, password: str | None = None) -> httpx.Response:
        form = await self.login_form(login_url)
        return await self.http.post(
            "/login",
            data={**form, "username": user, "password": password_of(user) if password is None else password},
        )

    async def code_for(self, user: str = "alice", **authorize: Any) -> tuple[str, Flow]:
        """Authorize, log in as ``user`` if asked to, and return the code and the flow."""
        response, flow = await self.authorize(**authorize)
        assert response.status_code == 302, response.text
        location = response.headers["location"]
        if location.startswith(PUBLIC_URL + "/login"):
            response = await self.submit_login(location, user)
            assert response.status_code == 303, response.text
            location = response.headers["location"]
        assert location.startswith(flow.redirect_uri), location
        got = query_of(location)
        assert got.get("state") == flow.state, got
        assert "code" in got, got
        return got["code"], flow

    # ---- the client side ----------------------------------------------------------------
    async def token(self, form: Mapping[str, str], *, auth: tuple[str, str] | None = None) -> httpx.Response:
        return await self.http.post("/oauth/token", data=dict(form), auth=auth)

    async def exchange(self, code: str, flow: Flow, **overrides: str) -> httpx.Response:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": flow.redirect_uri,
            "client_id": flow.client_id,
        }
        if flow.verifier is not None:
            form["code_verifier"] = flow.verifier
        form |= overrides
        auth = (WEBAPP, self.webapp_secret) if flow.client_id == WEBAPP else None
        if auth is not None:
            form.pop("client_id")
        return await self.token({k: v for k, v in form.items() if v}, auth=auth)

    async def tokens_for(self, user: str = "alice", **authorize: Any) -> dict[str, Any]:
        code, flow = await self.code_for(user, **authorize)
        response = await self.exchange(code, flow)
        assert response.status_code == 200, response.text
        tokens: dict[str, Any] = response.json()
        return tokens

    async def refresh(self, refresh_token: str, client_id: str = MOBILE) -> httpx.Response:
        return await self.token(
            {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id}
        )

    async def api(self, access_token: str, path: str = "/iotf/devices") -> httpx.Response:
        return await self.http.get(path, headers={"Authorization": f"Bearer {access_token}"})

    async def device_ids(self, access_token: str) -> list[str]:
        response = await self.api(access_token)
        assert response.status_code == 200, response.text
        return [d["deviceId"] for d in response.json()["devices"]]

    def security_events(self, kind: str) -> list[Any]:
        return [e for e in self.ctx.store.list_security_events(1000) if e.kind == kind]


def build_oidc(tmp_path: Path, database_url: str | None = None, **settings: str) -> Oidc:
    env = {"IOTVAULT_DATA_DIR": str(tmp_path / "data"), "IOTVAULT_PUBLIC_URL": PUBLIC_URL}
    if database_url:
        env["IOTVAULT_DATABASE_URL"] = database_url
    env.update({f"IOTVAULT_{k.upper()}": v for k, v in settings.items()})
    s = load_settings(environ=env)
    ctx = open_context(s)
    seed(ctx, events_per_device=3)
    identity = Identity(s, ctx)
    store = identity.provider.store
    add_client(
        store,
        MOBILE,
        display_name="Mobile <App>",
        redirect_uris=[MOBILE_REDIRECT, LOOPBACK_REDIRECT],
        post_logout_redirect_uris=[LOGOUT_REDIRECT],
        allow_anonymous=True,
        created_by="test",
    )
    webapp = add_client(store, WEBAPP, confidential=True, redirect_uris=[WEBAPP_REDIRECT], created_by="test")
    assert webapp.secret is not None
    svc = ApiServices(
        settings=s,
        ctx=ctx,
        metrics=Metrics(),
        verifier=build_verifier(s, identity),
        limiter=RateLimiter(
            per_address="100000/minute", per_principal="100000/minute", auth_failures="100000/minute"
        ),
    )
    store.on_change = watch_changes(ctx, svc.principals, svc.event_docs)
    app = create_app(svc, identity=identity)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL)
    return Oidc(s, ctx, identity, app, http, webapp.secret, {"svc": svc})


@asynccontextmanager
async def running_oidc(
    tmp_path: Path, database_url: str | None = None, **settings: str
) -> AsyncIterator[Oidc]:
    oidc = build_oidc(tmp_path, database_url, **settings)
    try:
        async with oidc.http:
            yield oidc
    finally:
        oidc.extra["svc"].stopping.set()
        oidc.ctx.close()
