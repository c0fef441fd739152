"""The audit log of a real ``iotvault serve``: what it records, what an administrator reads, the
alert a brute force raises (delivered to a webhook), and ``iotvault audit verify`` catching an edit.

On SQLite and PostgreSQL: the chain's writers serialise on the database, so both must hold.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServerProcess, audit_writers_of, basic, cli, new_key, server_env
from sqlalchemy import create_engine, text

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WEBHOOK_SECRET = "a-webhook-secret-of-the-test"


class Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((dict(self.headers.items()), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def appender_of(pid: int) -> int:
    """The pid of the audit writer process ``pid`` started (``iotvault.audit.appender``)."""
    deadline = time.monotonic() + 10
    while not (found := audit_writers_of(pid)):
        assert time.monotonic() < deadline, f"process {pid} started no audit writer process"
        time.sleep(0.05)
    (writer,) = found
    return writer


def test_records_alerts_and_verification_of_a_running_node(
    tmp_path: Path, database_url: str, receiver: Receiver
) -> None:
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/alerts"
    env = server_env(
        tmp_path, database_url=database_url, alert_webhook_url=hook, alert_webhook_secret=WEBHOOK_SECRET
    )
    done = cli(env, "devices", "register", "thermo", "d1", "--json")
    assert done.returncode == 0, done.stderr
    device_credential = json.loads(done.stdout)["password"]
    reader = new_key(env, "--reader", "--device", "d1")
    admin = new_key(env, "--admin")

    server = ServerProcess(env, tmp_path / "serve.log")
    server.start()
    base = f"http://127.0.0.1:{env['IOTVAULT_HTTP_PORT']}"
    assert server.proc is not None
    writer = appender_of(server.proc.pid)  # the chain is written by a child, off the loop's lock
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            r = http.get("/iotf/devices/d1?count=5", headers={**basic(*reader), "X-Request-Id": "req-read-1"})
            assert r.status_code == 200
            assert r.headers["x-request-id"] == "req-read-1"
            assert (
                http.get("/iotf/devices/d1", headers=basic(reader[0], "wrong-password-1")).status_code == 401
            )
            for i in range(11):  # a brute force on the reader's key: one alert, not eleven
                http.get("/iotf/devices/d1", headers=basic(reader[0], f"wrong-password-{i + 2}"))
            assert http.get("/iotf/audit", headers=basic(*reader)).status_code == 403  # audit:read is admin's

            records: list[dict[str, Any]] = []
            for _ in range(50):
                page = http.get("/iotf/audit?target=d1&outcome=success", headers=basic(*admin)).json()
                records = [r for r in page["records"] if r["requestId"] == "req-read-1"]
                if records:
                    break
                time.sleep(0.2)
            (read,) = records
            assert read["actor"] == f"api_key:{reader[0]}"
            assert read["detail"]["events"] == 0
            assert read["detail"]["route"] == "/iotf/devices/{deviceId}"

            alerts: list[dict[str, Any]] = []
            for _ in range(50):
                alerts = http.get("/iotf/alerts", headers=basic(*admin)).json()["alerts"]
                if alerts and receiver.received:
                    break
                time.sleep(0.2)
            assert [(a["kind"], a["subject"]) for a in alerts] == [
                ("brute_force", "http-credentials@127.0.0.1")
            ]
            (headers, body), = receiver.received  # fmt: skip
            mac = hmac.new(
                WEBHOOK_SECRET.encode(),
                headers["X-Iotvault-Timestamp"].encode() + b"." + body,
                hashlib.sha256,
            )
            assert headers["X-Iotvault-Signature"] == "sha256=" + mac.hexdigest()

            checked = http.get("/iotf/audit?verify=true&count=1", headers=basic(*admin)).json()
            assert checked["verification"]["ok"] is True
    finally:
        server.stop()
    assert not Path(f"/proc/{writer}").exists()  # gone with the node, after its last records

    verified = cli(env, "audit", "verify", "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"] is True

    exported = cli(env, "audit", "export", "--jsonl")
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines() if line.strip()]
    actions = {r["action"] for r in lines}
    assert {"cli.devices.register", "cli.apikeys.add", "node.start", "node.stop", "http.request"} <= actions
    start = next(r for r in lines if r["action"] == "node.start")
    assert start["detail"]["alert_webhook_secret"] == "set"
    everything = exported.stdout
    for secret in (WEBHOOK_SECRET, reader[1], admin[1], device_credential, "wrong-password-1"):
        assert secret not in everything
    assert "wrong-password-1" not in (tmp_path / "serve.log").read_text()

    # Someone with database access edits one record: verify names it and fails.
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(text("UPDATE audit_log SET target = target || '-forged' WHERE seq = 3"))
    engine.dispose()
    tampered = cli(env, "audit", "verify")
    assert tampered.returncode == 1
    assert "record 3" in tampered.stderr
