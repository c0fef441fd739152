"""Honest readiness, waiting for the database at start, and a shutdown that ends (issue 18).

Real ``iotvault serve`` processes; the PostgreSQL they depend on is a private cluster that the
tests stop and start; the full disk is a small tmpfs mounted for the test.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from bench.private_pg import PrivatePostgres
from helpers import Mosquitto, ServerProcess, free_port, require_mosquitto, server_env, unavailable

from iotvault.accounts import create_api_key
from iotvault.config import load_settings
from iotvault.context import context
from iotvault.devices import register_device
from iotvault.domain.accounts import Roles
from rawmqtt import RawDevice, publish_packet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


class Setup:
    """A node's environment with one device and a reader API key for it."""

    def __init__(self, tmp_path: Path, **settings: str) -> None:
        self.env = server_env(tmp_path, **settings)
        self.settings = load_settings(environ=self.env)
        with context(self.settings) as ctx:
            dev = register_device(ctx, "thermo", "dev-1")
            key = create_api_key(ctx, roles=Roles(reader=True), devices=["dev-1"], created_by="test")
        self.device_id, self.password = dev.device_id, dev.credential
        self.auth = "Basic " + base64.b64encode(f"{key.key}:{key.password}".encode()).decode()
        self.topic = f"iot-2/type/thermo/id/{self.device_id}/evt/reading/fmt/json"
        self.log = tmp_path / "server.log"
        self.base = f"http://127.0.0.1:{self.env['IOTVAULT_HTTP_PORT']}"

    def device(self) -> RawDevice:
        return RawDevice(int(self.env["IOTVAULT_MQTT_PORT"]), self.device_id, self.password)

    def readyz(self) -> httpx.Response:
        return httpx.get(self.base + "/readyz", timeout=10)

    def stored(self) -> int:
        with context(self.settings) as ctx:
            return len(ctx.store.events_page(self.device_id, count=1000))


def _wait_ready(setup: Setup, want: int, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = setup.readyz()
        if r.status_code == want or time.monotonic() > deadline:
            return r
        time.sleep(0.25)


def _failing(r: httpx.Response) -> dict[str, str]:
    return {f["dependency"]: f["reason"] for f in r.json().get("failing", [])}


# ---- SIGTERM with a live stream open (finding 3) ------------------------------------------
def test_sigterm_ends_with_a_live_stream_open_and_stops_acknowledging_first(tmp_path: Path) -> None:
    setup = Setup(tmp_path, http_shutdown_grace_s="2")
    server = ServerProcess(setup.env, setup.log)
    server.start()
    assert server.proc is not None
    try:
        sse = socket.create_connection(("127.0.0.1", int(setup.env["IOTVAULT_HTTP_PORT"])), timeout=10)
        sse.sendall(
            f"GET /iotf/devices/{setup.device_id}/stream HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: {setup.auth}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        assert b"200 OK" in sse.recv(4096)
        dev = setup.device()
        acked: list[int] = []
        stop = threading.Event()

        def publish() -> None:  # numbered events, one at a time, until the node goes away
            pid = 1
            with contextlib.suppress(OSError, ConnectionError):
                while not stop.is_set():
                    dev.send(publish_packet(setup.topic, f'{{"seq": {pid}}}'.encode(), pid))
                    got = dev.pubacks(1, 3)
                    if not got:
                        return
                    acked.extend(got)
                    pid += 1

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        time.sleep(1.0)
        assert acked, "nothing was acknowledged before the SIGTERM"
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=20)  # before the fix: never, while the stream stays open
        took = time.monotonic() - started
        stop.set()
        publisher.join(10)
        dev.close()
        sse.settimeout(5)
        rest = b""
        with contextlib.suppress(OSError):
            while chunk := sse.recv(65536):
                rest += chunk
        sse.close()
        assert took < 10, f"shutdown took {took:.1f}s"
        assert server.proc.returncode == 0
        # every acknowledged event is stored, and nothing unacknowledged was taken on the way out
        assert setup.stored() == len(acked)
    finally:
        server.kill()


# ---- readiness during a PostgreSQL outage; waiting for the database at start ---------------
def test_readyz_follows_a_postgresql_outage_and_503s_say_retry_after(
    tmp_path: Path, private_pg: PrivatePostgres
) -> None:
    url = private_pg.create_database(f"health_{uuid.uuid4().hex[:10]}")
    setup = Setup(tmp_path, database_url=url)
    server = ServerProcess(setup.env, setup.log)
    server.start()
    try:
        assert setup.readyz().status_code == 200
        dev = setup.device()
        dev.send(publish_packet(setup.topic, b'{"seq": 0}', 1))
        assert dev.pubacks(1, 20) == [1]
        dev.close()
        page = f"{setup.base}/iotf/devices/{setup.device_id}?count=50"
        for _ in range(2):  # the second from the cached page (iotvault.api.readcache)
            r = httpx.get(page, headers={"Authorization": setup.auth}, timeout=10)
            assert len(r.json()["events"]) == 1, r.text
        private_pg.stop()
        try:
            r = _wait_ready(setup, 503, 10)
            assert r.status_code == 503
            assert "database" in _failing(r)
            assert int(r.headers["retry-after"]) > 0
            assert url.split("@")[-1] not in r.text  # no URL, no credentials
            api = httpx.get(setup.base + "/iotf/devices", headers={"Authorization": setup.auth}, timeout=10)
            assert api.status_code == 503
            assert int(api.headers["retry-after"]) > 0
            cached = httpx.get(page, headers={"Authorization": setup.auth}, timeout=10)
            assert cached.status_code == 503, cached.text  # never a page the database cannot confirm
            assert httpx.get(setup.base + "/healthz", timeout=5).status_code == 200  # still alive
        finally:
            private_pg.start()
        started = time.monotonic()
        r = _wait_ready(setup, 200, 15)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 10
    finally:
        server.stop()


def test_serve_waits_for_the_database_unless_told_to_fail_fast(
    tmp_path: Path, private_pg: PrivatePostgres
) -> None:
    url = private_pg.create_database(f"wait_{uuid.uuid4().hex[:10]}")
    setup = Setup(tmp_path, database_url=url)  # schema made while the database is up
    fast = dict(setup.env, IOTVAULT_STARTUP_FAIL_FAST="true")
    server = ServerProcess(setup.env, setup.log)
    private_pg.stop()
    try:
        try:
            done = subprocess.run(
                [sys.executable, "-m", "iotvault", "serve"],
                env=fast,
                capture_output=True,
                timeout=60,
                check=False,
            )
            assert done.returncode != 0
            assert "cannot reach the database" in done.stderr.decode()
            waiting = threading.Thread(target=server.start, kwargs={"timeout": 90}, daemon=True)
            waiting.start()
            deadline = time.monotonic() + 30
            text = ""
            while "attempt 2" not in text and time.monotonic() < deadline:
                time.sleep(0.2)
                text = setup.log.read_text(errors="replace") if setup.log.exists() else ""
            assert "database not available (attempt 1" in text
            assert "attempt 2" in text
            assert server.proc is not None
            assert server.proc.poll() is None  # still waiting, not exited
        finally:
            private_pg.start()
        waiting.join(60)
        assert setup.readyz().status_code == 200
    finally:
        server.stop()


# ---- a full SQLite disk (findings 4 and 6) ------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True, check=False
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a small tmpfs (needs root): {done.stderr.decode().strip()[:200]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_sqlite_disk_is_reported_as_such_and_ingest_resumes(tmp_path: Path, small_disk: Path) -> None:
    setup = Setup(tmp_path, data_dir=str(small_disk / "data"))
    server = ServerProcess(setup.env, setup.log)
    server.start()
    filler = small_disk / "filler"
    try:
        dev = setup.device()
        dev.send(publish_packet(setup.topic, b'{"seq": 0}', 1))
        assert dev.pubacks(1, 20) == [1]
        with filler.open("wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
                os.fsync(fh.fileno())
        r = _wait_ready(setup, 503, 10)
        assert r.status_code == 503
        assert "disk full" in _failing(r).get("database", ""), r.text
        dev.send(publish_packet(setup.topic, b'{"seq": 1}' + b" " * 20000, 2))
        assert dev.pubacks(1, 4) == []  # not stored, so not acknowledged
        filler.unlink()
        started = time.monotonic()
        assert dev.pubacks(1, 20) == [2]
        dev.close()
        r = _wait_ready(setup, 200, 15)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started < 15
        assert setup.stored() == 2
        text = setup.log.read_text(errors="replace")
        if "commit of 1 messages failed" in text:  # the commit itself hit the full disk
            assert "cannot write" in text
        assert "cannot reach the database" not in text
    finally:
        server.stop()


# ---- an external broker that goes away ----------------------------------------------------
def test_readyz_names_a_disconnected_external_broker(tmp_path: Path) -> None:
    require_mosquitto()
    mosq = Mosquitto(free_port(), tmp_path / "mosquitto")
    mosq.start()
    try:
        setup = Setup(tmp_path, broker_url=f"mqtt://127.0.0.1:{mosq.port}")
        server = ServerProcess(setup.env, setup.log)
        server.start()
        try:
            assert setup.readyz().status_code == 200
            mosq.stop()
            r = _wait_ready(setup, 503, 10)
            assert r.status_code == 503
            assert _failing(r) == {f"broker mqtt://127.0.0.1:{mosq.port}": "disconnected"}
            assert int(r.headers["retry-after"]) > 0
            mosq.start()
            r = _wait_ready(setup, 200, 15)
            assert r.status_code == 200, r.text
        finally:
            server.stop()
    finally:
        mosq.stop()
