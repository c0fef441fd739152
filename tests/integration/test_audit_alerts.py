"""Alerts end to end: audit entries → one stored alert per episode → a signed webhook delivery.

The receiver is a real HTTP server in this process, which fails the first deliveries so that
the retries are exercised.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from iotvault.audit.monitor import AlertMonitor
from iotvault.audit.webhook import Webhook, WebhookSettings
from iotvault.domain.audit import AuditEntry, printable
from iotvault.storage.audit import AuditStore
from iotvault.storage.db import create_db_engine
from iotvault.storage.migrate import ensure_schema

pytestmark = pytest.mark.integration

SECRET = b"webhook-test-secret"


class Receiver(ThreadingHTTPServer):
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[dict[str, str], bytes]] = []
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.server.failures > 0:
            self.server.failures -= 1
            self.send_response(503)
        else:
            self.server.received.append((dict(self.headers.items()), body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(failures=2)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AuditStore]:
    url = f"sqlite:///{tmp_path / 'iotvault.db'}"
    engine = create_db_engine(url)
    ensure_schema(engine)
    yield AuditStore(engine, url)
    engine.dispose()


def failed_login(n: int, account: str, address: str = "198.51.100.7") -> AuditEntry:
    return AuditEntry(at_us=n * 1_000_000, actor="anonymous", action="oidc.login_failed", target=account,
                      outcome="failure", client=address)  # fmt: skip


async def test_a_brute_force_is_one_alert_delivered_signed_after_retries(
    store: AuditStore, receiver: Receiver
) -> None:
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    settings = WebhookSettings(url, SECRET, attempts=4, first_delay=0.05)
    async with Webhook(settings, on_outcome=store.set_alert_delivery) as hook:
        monitor = AlertMonitor(store, webhook=hook)
        for n in range(100):
            monitor.observe_entry(failed_login(n, "alice"))
        for _ in range(200):
            if receiver.received:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
    (alert,) = store.list_alerts()
    assert (alert.kind, alert.subject, alert.delivery) == ("brute_force", "alice", "delivered")
    (headers, body), = receiver.received  # fmt: skip
    expected = hmac.new(SECRET, headers["X-Iotvault-Timestamp"].encode() + b"." + body, hashlib.sha256)
    assert headers["X-Iotvault-Signature"] == "sha256=" + expected.hexdigest()
    assert json.loads(body)["kind"] == "brute_force"


async def test_spraying_and_an_unreachable_receiver(store: AuditStore) -> None:
    settings = WebhookSettings(
        "http://127.0.0.1:9/unreachable", SECRET, attempts=2, first_delay=0.01, timeout=1
    )
    async with Webhook(settings, on_outcome=store.set_alert_delivery) as hook:
        monitor = AlertMonitor(store, webhook=hook)
        for n in range(30):
            monitor.observe_entry(failed_login(n, f"user{n}", "203.0.113.5"))
        for _ in range(100):
            if store.list_alerts()[0].delivery != "pending":
                break
            await asyncio.sleep(0.05)
    (alert,) = store.list_alerts()
    assert (alert.kind, alert.subject, alert.delivery) == ("password_spraying", "203.0.113.5", "failed")


def test_names_cannot_forge_log_lines() -> None:
    assert printable("alice\nALERT forged\r\x1b[31m") == "alice\\x0aALERT forged\\x0d\\x1b[31m"
