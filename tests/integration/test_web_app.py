"""The web application's HTTP surface without a browser: start-up, headers, the access API,
what a made-up cookie gets, and the page shown when the pinned assets are not installed."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from apifixture import Api, api_key_for, running_api
from bench import web_page

from iotvault.config import load_settings
from iotvault.context import context
from iotvault.domain.accounts import Roles
from iotvault.identity import Identity
from iotvault.identity.clients import add_client, remove_client
from iotvault.identity.records import ClientRecord
from iotvault.web import render
from iotvault.web.client import CLIENT_ID, WebClient

pytestmark = pytest.mark.integration
MADE_UP = {"Cookie": "iotvault-web=made-up"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with running_api(tmp_path) as a:
        yield a


async def test_the_landing_page_has_a_strict_csp(api: Api) -> None:
    r = await api.client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "unsafe" not in csp
    assert "default-src 'none'" in csp
    assert "Sign in" in r.text
    assert not re.search(r'(?:src|href|action)="(?:https?:)?//', r.text)  # nothing from elsewhere


async def test_pages_without_a_session_lead_to_sign_in(api: Api) -> None:
    for path in ("/devices", "/devices/d1", "/admin/users", "/security"):
        r = await api.client.get(path, headers=MADE_UP)
        assert r.status_code == 303, path
        assert r.headers["location"] == "/"
    r = await api.client.get("/iotf/devices", headers=MADE_UP)
    assert r.status_code == 401


async def test_a_state_change_with_a_cookie_but_no_session_is_not_authenticated(api: Api) -> None:
    r = await api.client.post("/iotf/devices/d1/commands", json={"command": "x"}, headers=MADE_UP)
    assert r.status_code == 401


async def test_the_app_starts_and_says_so_when_assets_are_missing(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    render.missing_assets.cache_clear()
    monkeypatch.setattr(render, "VENDOR", ("vendor/not-installed.js",))
    try:
        r = await api.client.get("/")
        assert r.status_code == 200
        assert "make assets" in r.text
        assert "vendor/not-installed.js" in r.text
    finally:
        render.missing_assets.cache_clear()


async def test_the_access_api_is_for_admins_and_follows_the_policy(api: Api) -> None:
    admin = {"Authorization": api_key_for(api.ctx, devices=(), roles=Roles(admin=True))}
    r = await api.client.get("/iotf/devices/d1/access", headers=admin)
    assert r.status_code == 200
    rows = {(a["kind"], a["id"]): a for a in r.json()["access"]}
    # apifixture: alice reads d1 (readers-1), bob writes it (writers-1), olga reads it (ops)
    assert rows[("user", "alice")]["read"] is True
    assert rows[("user", "alice")]["command"] is False
    assert rows[("user", "bob")]["commandVia"] == ["writers-1"]
    assert rows[("user", "olga")]["readVia"] == ["ops"]
    assert ("user", "carol") not in rows
    assert ("user", "root") not in rows  # admin alone gives no device data
    assert rows[("group", "writers-1")]["command"] is True
    assert (await api.client.get("/iotf/devices/nope/access", headers=admin)).status_code == 404
    assert (await api.client.get("/iotf/devices/d1/access", headers=api.auth("alice"))).status_code == 403
    reader_key = {"Authorization": api_key_for(api.ctx, devices=("d1",), roles=Roles(reader=True))}
    r = await api.client.get("/iotf/devices/d1/access", headers=admin)
    assert any(a["kind"] == "api_key" and a["readVia"] == ["key"] for a in r.json()["access"])
    assert (await api.client.get("/iotf/devices/d1/access", headers=reader_key)).status_code == 403


# ---- signed in through the provider, in process (no browser): paging through history --------
@pytest.fixture
async def signed_in(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app, ctx = web_page.build(tmp_path)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=web_page.BASE) as http:
            await web_page.sign_in(http)
            yield http
    finally:
        ctx.close()


def _times(html: str) -> list[str]:
    return re.findall(r'<tr data-id="[^"]+"><td><time datetime="([^"]+)"', html)


async def test_the_device_page_pages_through_history(signed_in: httpx.AsyncClient) -> None:
    first = await signed_in.get("/devices/t1", params={"count": 10})
    assert first.status_code == 200
    newest = _times(first.text)
    assert len(newest) == 10
    assert newest == sorted(newest, reverse=True)
    older = re.search(r'href="(/devices/t1\?before=[^"]+)"', first.text)
    assert older is not None
    second = await signed_in.get(older[1].replace("&amp;", "&"))
    page2 = _times(second.text)
    assert len(page2) == 10
    assert max(page2) < min(newest)  # strictly older, no overlap
    # a time range: exactly the events inside it (one a second in the fixture)
    since, until = page2[-1][:19], page2[0][:19]
    ranged = await signed_in.get("/devices/t1", params={"since": since + "Z", "until": until + "Z"})
    inside = _times(ranged.text)
    assert inside
    assert all(since <= t[:19] <= until for t in inside)
    assert "live updates" not in ranged.text  # history is not live


async def test_the_chart_gets_numeric_fields_only(signed_in: httpx.AsyncClient) -> None:
    r = await signed_in.get("/devices/t1", params={"count": 5})
    data = json.loads(
        re.search(r'<script type="application/json" id="chart-data">(.*?)</script>', r.text, re.S)[1]
    )  # type: ignore[index]
    assert set(data["series"]) == {"d.temp", "d.hum", "d.seq"}  # d.state is text: table only
    assert len(data["t"]) == 5
    assert data["t"] == sorted(data["t"])
    assert '<th scope="col">d.state</th>' in r.text


# ---- the dashboard's OAuth client --------------------------------------------------------------
def _client_at(tmp_path: Path, public_url: str) -> tuple[WebClient, ClientRecord | None]:
    settings = load_settings(environ={"IOTVAULT_DATA_DIR": str(tmp_path), "IOTVAULT_PUBLIC_URL": public_url})
    with context(settings) as ctx:
        client = WebClient(Identity(settings, ctx))
        client.ensure_client()
        found = client.identity.provider.store.get_client(CLIENT_ID)
    return client, found[0] if found is not None else None


def test_the_dashboard_registers_itself_and_follows_the_public_url(tmp_path: Path) -> None:
    _, record = _client_at(tmp_path, "http://127.0.0.1:8001")
    assert record is not None
    assert record.public
    assert record.allow_anonymous
    assert record.redirect_uris == ("http://127.0.0.1:8001/auth/callback",)
    # an administrator registers it again without anonymous sign-in: a restart keeps that
    settings = load_settings(environ={"IOTVAULT_DATA_DIR": str(tmp_path)})
    with context(settings) as ctx:
        store = Identity(settings, ctx).provider.store
        remove_client(store, CLIENT_ID)
        add_client(
            store,
            CLIENT_ID,
            redirect_uris=["http://127.0.0.1:8001/auth/callback"],
            post_logout_redirect_uris=["http://127.0.0.1:8001/"],
            created_by="root",
        )
    _, record = _client_at(tmp_path, "http://127.0.0.1:8001")
    assert record is not None
    assert not record.allow_anonymous
    # a new public URL: the redirect URIs follow, the administrator's choice stays
    _, record = _client_at(tmp_path, "http://127.0.0.1:8002")
    assert record is not None
    assert record.redirect_uris == ("http://127.0.0.1:8002/auth/callback",)
    assert not record.allow_anonymous


def test_a_public_url_the_provider_cannot_redirect_to_disables_sign_in_with_a_reason(tmp_path: Path) -> None:
    client, record = _client_at(tmp_path, "http://iot.example.com:8000")  # plain http off loopback
    assert record is None
    assert client.error is not None
    assert "iot.example.com" in client.error


async def test_docs_are_served_from_the_package_under_the_strict_csp(api: Api) -> None:
    r = await api.client.get("/docs")
    assert r.status_code == 200
    assert "unsafe" not in r.headers["content-security-policy"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in sources
    assert all(s.startswith(("/", "#")) for s in sources), sources
    for path in sources:
        if path.startswith("/static/"):
            assert (await api.client.get(path)).status_code == 200, path
    assert (await api.client.get("/openapi.json")).status_code == 200


def test_a_confidential_dashboard_client_is_refused_with_a_reason(tmp_path: Path) -> None:
    settings = load_settings(environ={"IOTVAULT_DATA_DIR": str(tmp_path)})
    with context(settings) as ctx:
        add_client(
            Identity(settings, ctx).provider.store,
            CLIENT_ID,
            confidential=True,
            redirect_uris=["http://127.0.0.1:8000/auth/callback"],
            created_by="root",
        )
    client, record = _client_at(tmp_path, "http://127.0.0.1:8000")
    assert record is not None
    assert not record.public  # left as the administrator made it
    assert client.error is not None
    assert "public" in client.error


async def test_the_session_token_is_never_added_to_the_providers_endpoints(
    signed_in: httpx.AsyncClient,
) -> None:
    r = await signed_in.post("/oauth/token", data={"grant_type": "refresh_token", "refresh_token": "x"})
    assert r.status_code == 401
    assert r.json()["error_description"] == "client authentication is required"  # saw no Bearer
    r = await signed_in.get("/oauth/userinfo")
    assert r.status_code == 401  # the session's token does not answer for the browser here
    assert (await signed_in.get("/iotf/me")).json()["id"] == "ann"  # but does on the API
