"""Whom a real ``iotvault serve`` believes about the client's address (``IOTVAULT_TRUSTED_PROXIES``).

By default nobody: a client that sends ``X-Forwarded-For`` from the same machine (uvicorn's own
default trusts loopback) cannot choose the address its failures are counted under, its audit
records name or its alerts blame. Behind a proxy that is named, the proxy's word is taken, and
only the proxy's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServerProcess, basic, cli, new_key, server_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def client_of(http: httpx.Client, admin: tuple[str, str], request_id: str) -> str:
    """The client address the audit record of request ``request_id`` names."""
    for _ in range(100):
        page = http.get("/iotf/audit?target=d1&count=100", headers=basic(*admin)).json()
        found = [r["client"] for r in page["records"] if r["requestId"] == request_id]
        if found:
            return str(found[0])
        time.sleep(0.1)
    raise AssertionError(f"no audit record of {request_id}")


def serving(tmp_path: Path, **settings: str) -> tuple[ServerProcess, dict[str, str], Any, Any]:
    env = server_env(tmp_path, **settings)
    assert cli(env, "devices", "register", "thermo", "d1").returncode == 0
    reader, admin = new_key(env, "--reader", "--device", "d1"), new_key(env, "--admin")
    server = ServerProcess(env, tmp_path / "serve.log")
    server.start()
    return server, env, reader, admin


def test_by_default_a_forwarded_address_is_not_believed(tmp_path: Path) -> None:
    server, env, reader, admin = serving(tmp_path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}", timeout=10) as http:
            forged = {
                "X-Forwarded-For": "203.0.113.7",
                "X-Forwarded-Proto": "https",
                "X-Request-Id": "read-1",
            }
            assert http.get("/iotf/devices/d1", headers={**basic(*reader), **forged}).status_code == 200
            assert client_of(http, admin, "read-1") == "127.0.0.1"

            # A brute force that names a new address on every try is still one address's: blamed
            # on the connection's, and blocked as one.
            statuses = [
                http.get(
                    "/iotf/devices/d1",
                    headers={**basic(reader[0], f"wrong-{i}"), "X-Forwarded-For": f"198.51.100.{i + 1}"},
                ).status_code
                for i in range(14)
            ]
            assert statuses[0] == 401
            assert set(statuses) <= {401, 429}
            alerts: list[dict[str, Any]] = []
            for _ in range(100):
                alerts = http.get("/iotf/alerts", headers=basic(*admin)).json()["alerts"]
                if alerts:
                    break
                time.sleep(0.1)
            assert [(a["kind"], a["subject"]) for a in alerts] == [
                ("brute_force", "http-credentials@127.0.0.1")
            ]
    finally:
        server.stop()


def test_a_named_proxy_is_believed_and_only_its_own_word(tmp_path: Path) -> None:
    # 127.0.0.5/8: host bits are allowed and mean the network 127.0.0.0/8
    server, env, reader, admin = serving(tmp_path, trusted_proxies="192.0.2.1, 127.0.0.5/8")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}", timeout=10) as http:
            one = {"X-Forwarded-For": "203.0.113.7", "X-Request-Id": "via-proxy"}
            assert http.get("/iotf/devices/d1", headers={**basic(*reader), **one}).status_code == 200
            assert client_of(http, admin, "via-proxy") == "203.0.113.7"
            # read from the right: 127.0.0.2 is in the trusted network (uvicorn's own default
            # would stop there), 203.0.113.8 is not: what the client put before it is not believed
            chain = {"X-Forwarded-For": "10.9.9.9, 203.0.113.8, 127.0.0.2", "X-Request-Id": "chain"}
            assert http.get("/iotf/devices/d1", headers={**basic(*reader), **chain}).status_code == 200
            assert client_of(http, admin, "chain") == "203.0.113.8"
    finally:
        server.stop()


def test_a_setting_that_is_not_an_address_stops_the_start_with_one_line(tmp_path: Path) -> None:
    env = server_env(tmp_path, trusted_proxies="127.0.0.1, nginx.internal")
    done = cli(env, "serve")  # refused before it binds anything
    assert done.returncode == 2
    line = "iotvault: error: invalid setting IOTVAULT_TRUSTED_PROXIES: 'nginx.internal' is not an IP address"
    assert done.stderr.strip().splitlines() == [f"{line} or a network like 10.0.0.0/8"]
