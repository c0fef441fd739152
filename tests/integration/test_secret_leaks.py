"""No secret a run uses reaches the server's log or the audit log.

One real ``iotvault serve`` (embedded broker, SQLite, JSON-lines logs) is driven through what
handles secrets: a user's password (set, typed wrong, typed into the user-name field), an
OpenID Connect login with its tokens (issued, refreshed, used, revoked, used again), API-key
passwords (right, wrong, revoked), device credentials (registered, rotated, used on the broker),
generated passwords, and an event's payload. Every secret is collected as it is made; then the
server's log and ``iotvault audit export --jsonl`` are searched for each. Every log line must
also be one JSON object (``IOTVAULT_LOG_FORMAT=json``), so a client's CR/LF forged no line.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServerProcess, server_env

from iotvault.device.connection import DeviceConnection, DeviceCredential
from oidcfixture import hidden_fields, pkce, query_of

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

REDIRECT = "http://127.0.0.1/app/callback"


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "iotvault", *args],
        env=env, input=stdin, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in args else done.stdout


async def oidc_tokens(http: httpx.AsyncClient, user: str, password: str) -> dict[str, Any]:
    verifier, challenge = pkce()
    params = {
        "response_type": "code", "client_id": "leakapp", "redirect_uri": REDIRECT,
        "scope": "openid profile", "state": "s1", "nonce": "n1",
        "code_challenge": challenge, "code_challenge_method": "S256",
    }  # fmt: skip
    r = await http.get("/oauth/authorize", params=params)
    assert r.status_code == 302, r.text
    login = r.headers["location"]
    form = hidden_fields((await http.get(login)).text)
    r = await http.post("/login", data={**form, "username": user, "password": password})
    assert r.status_code == 303, r.text
    code = query_of(r.headers["location"])["code"]
    r = await http.post(
        "/oauth/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
              "client_id": "leakapp", "code_verifier": verifier},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    tokens: dict[str, Any] = r.json()
    return tokens | {"code": code, "verifier": verifier}


async def failed_login(base: str, user: str, password: str) -> None:
    """A refused sign-in, in a browser of its own (no single sign-on session)."""
    async with httpx.AsyncClient(base_url=base, timeout=20) as http:
        await _refused(http, user, password)


async def _refused(http: httpx.AsyncClient, user: str, password: str) -> None:
    _verifier, challenge = pkce()
    params = {
        "response_type": "code", "client_id": "leakapp", "redirect_uri": REDIRECT, "scope": "openid",
        "state": "s2", "code_challenge": challenge, "code_challenge_method": "S256",
    }  # fmt: skip
    login = (await http.get("/oauth/authorize", params=params)).headers["location"]
    form = hidden_fields((await http.get(login)).text)
    r = await http.post("/login", data={**form, "username": user, "password": password})
    assert not r.headers.get("location", "").startswith(REDIRECT)  # refused: no code for the app


async def test_no_secret_of_a_run_reaches_the_log_or_the_audit_log(tmp_path: Path) -> None:
    env = server_env(tmp_path, log_format="json")
    found: list[str] = []  # every secret this run makes or types

    def keep(secret: str) -> str:
        assert len(secret) >= 8
        found.append(secret)
        return secret

    device = cli(env, "devices", "register", "thermo", "leak-1", "--json")
    keep(device["password"])
    admin = cli(env, "apikeys", "add", "--admin", "--json")
    reader = cli(env, "apikeys", "add", "--reader", "--device", "leak-1", "--json")
    for k in (admin, reader):
        keep(k["password"])
    cli(env, "groups", "add", "leakers", "--reader", "--device", "leak-1")
    alice_pw = keep("alice-Pw-" + secrets.token_urlsafe(12))
    cli(env, "users", "add", "alice", "--group", "leakers", "--password-stdin", stdin=alice_pw + "\n")
    cli(env, "clients", "add", "leakapp", "--redirect-uri", REDIRECT)
    plaintext = keep("payload-plaintext-" + secrets.token_hex(8))

    server = ServerProcess(env, tmp_path / "serve.log")
    server.start()
    base = f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=20) as http:
            # people: a login with its tokens, wrong passwords, a password in the name field
            tokens = await oidc_tokens(http, "alice", alice_pw)
            for name in ("access_token", "id_token", "refresh_token", "code", "verifier"):
                keep(tokens[name])
            await failed_login(base, "alice", keep("wrong-" + secrets.token_urlsafe(10)))
            await failed_login(base, keep("typed-in-name-" + secrets.token_urlsafe(10)), "x" * 12)
            bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
            assert (await http.get("/iotf/devices", headers=bearer)).status_code == 200
            r = await http.post(
                "/oauth/token",
                data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                      "client_id": "leakapp"},
            )  # fmt: skip
            assert r.status_code == 200, r.text
            fresh = r.json()
            keep(fresh["access_token"])
            keep(fresh["refresh_token"])
            r = await http.post(
                "/oauth/revoke", data={"token": fresh["refresh_token"], "client_id": "leakapp"}
            )
            assert r.status_code == 200
            revoked = {"Authorization": f"Bearer {fresh['access_token']}"}  # its login is revoked
            assert (await http.get("/iotf/devices", headers=revoked)).status_code == 401

            # a device: its credential on the broker, an event whose payload must stay secret
            cred = DeviceCredential("leak-1", "thermo", device["password"])
            async with DeviceConnection(cred, "127.0.0.1", int(env["IOTVAULT_MQTT_PORT"])) as dev:
                await dev.publish_event("reading", {"secret": plaintext})
                assert await dev.wait_acknowledged(timeout=15)
            wrong_cred = DeviceCredential("leak-1", "thermo", keep("wrong-cred-" + secrets.token_hex(10)))
            with pytest.raises(Exception):  # noqa: B017, PT011 - refused: which error is the library's
                async with DeviceConnection(wrong_cred, "127.0.0.1", int(env["IOTVAULT_MQTT_PORT"])):
                    pass

            # API keys: right, wrong, and after revocation; administration that makes secrets
            auth = (reader["key"], reader["password"])
            for _ in range(50):
                r = await http.get("/iotf/devices/leak-1", auth=auth)
                if r.json()["events"]:
                    break
                await asyncio.sleep(0.1)
            assert r.json()["events"][0]["payload"] == {"secret": plaintext}
            bad = (reader["key"], keep("bad-key-pw-" + secrets.token_urlsafe(10)))
            assert (await http.get("/iotf/devices/leak-1", auth=bad)).status_code == 401
            adm = (admin["key"], admin["password"])
            r = await http.post("/iotf/users", json={"userName": "bob", "groups": ["leakers"]}, auth=adm)
            keep(r.json()["password"])
            keep((await http.post("/iotf/users/bob/password", auth=adm)).json()["password"])
            r = await http.post("/iotf/devices/leak-1/credential", json={}, auth=adm)
            keep(r.json()["password"])
            r = await http.post("/iotf/apikeys", json={"roleAdmin": True}, auth=adm)
            keep(r.json()["password"])
            assert (await http.delete(f"/iotf/apikeys/{reader['key']}", auth=adm)).status_code == 204
            assert (await http.get("/iotf/devices/leak-1", auth=auth)).status_code == 401
    finally:
        server.stop()

    exported = cli(env, "audit", "export", "--jsonl")
    log = (tmp_path / "serve.log").read_text(encoding="utf-8", errors="replace")
    assert "oidc.token_issued" in exported  # the scan reads records that were there to read
    assert "apikey.revoke" in exported
    compact = exported.replace(" ", "")
    assert f'"credential":"apikey:{reader["key"]}"' in compact  # both revoked credentials were marked
    assert '"credential":"token#' in compact
    leaks = [
        (where, s[:12] + "…")
        for s in found
        for where, text in (("log", log), ("audit", exported))
        if s in text
    ]
    assert leaks == []
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) > 5
    for line in lines:
        doc = json.loads(line)  # one object per line: nothing a client sent split or forged one
        assert set(doc) >= {"time", "level", "logger", "message"}
