"""Slow and abusive HTTP clients against a real ``iotvault serve``, on raw sockets (issue 18).

Slowloris headers and bodies, idle keep-alive connections, connections that never send a
byte, huge header blocks: each is bounded by a deadline or a limit, the slow ones and the
huge ones become security events, the server keeps answering others meanwhile, and its
descriptors return to where they were.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ServerProcess, server_env

from iotvault.config import load_settings
from iotvault.context import context

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 3
IDLE_TIMEOUT_S = 2


class Node:
    def __init__(self, tmp_path: Path, parser: str = "httptools") -> None:
        self.env = server_env(
            tmp_path,
            http_parser=parser,
            http_header_timeout_s=str(HEADER_TIMEOUT_S),
            http_body_timeout_s=str(BODY_TIMEOUT_S),
            http_idle_timeout_s=str(IDLE_TIMEOUT_S),
            http_max_connections="200",
        )
        self.port = int(self.env["IOTVAULT_HTTP_PORT"])
        self.server = ServerProcess(self.env, tmp_path / "server.log")

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def fds(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/fd").iterdir()))

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def healthz_s(self) -> float:
        """How long an honest caller waits for /healthz, on a fresh connection."""
        started = time.monotonic()
        r = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=10)
        assert r.status_code == 200
        return time.monotonic() - started

    def security_events(self, kind: str) -> list[dict[str, object]]:
        deadline = time.monotonic() + 5  # written in batches, once a second
        while True:
            with context(load_settings(environ=self.env)) as ctx:
                found = [
                    {"subject": e.subject, **e.detail} for e in ctx.store.list_security_events(kinds=[kind])
                ]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.3)


@pytest.fixture(params=["httptools", "h11"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    """Each bound holds with both HTTP parsers (IOTVAULT_HTTP_PARSER)."""
    n = Node(tmp_path, request.param)
    n.server.start()
    yield n
    n.server.stop()


def _closed_by_peer(sock: socket.socket, within: float) -> tuple[bool, bytes]:
    """Whether the server closes the connection within ``within`` seconds; what it sent first."""
    sock.settimeout(within)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            return False, got
    return True, got


def test_slowloris_headers_and_silent_connections_are_closed_and_others_still_served(node: Node) -> None:
    baseline = node.fds()
    silent = [node.connect() for _ in range(50)]  # connect and say nothing
    trickling = [node.connect() for _ in range(50)]
    stop = threading.Event()

    def trickle() -> None:  # one header byte at a time, forever
        line = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        for i in range(len(line)):
            if stop.is_set():
                return
            for s in trickling:
                with contextlib.suppress(OSError):
                    s.sendall(line[i : i + 1])
            time.sleep(0.5)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        assert node.healthz_s() < 1.0  # served while 100 connections hang on
        assert node.fds() >= baseline + 100
        time.sleep(HEADER_TIMEOUT_S + 1)
        for s in silent + trickling:
            closed, got = _closed_by_peer(s, 2)
            assert closed, "a slow connection outlived the header deadline"
            assert got == b""  # closed, not answered
        assert node.healthz_s() < 1.0
    finally:
        stop.set()
        t.join(5)
        for s in silent + trickling:
            s.close()
    events = node.security_events("http_slow_client")
    assert events
    assert events[0]["subject"] == "127.0.0.1"
    assert events[0]["phase"] == "headers"
    deadline = time.monotonic() + 5
    while node.fds() > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.fds() <= baseline + 2


def test_the_next_requests_headers_have_their_own_deadline_from_the_previous_answer(node: Node) -> None:
    """One timer per connection: the next request's headers, trickled after an answer, are
    given ``HEADER_TIMEOUT_S`` from that answer, not from the connection or the first timer."""
    s = node.connect()
    try:
        time.sleep(HEADER_TIMEOUT_S * 0.6)  # the first request comes late, but within its time
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        answered = time.monotonic()
        closed_at: list[float] = []

        def trickle() -> None:  # the next request, a byte every 0.2 s: never idle, never complete
            for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                try:
                    s.sendall(bytes([b]))
                except OSError:
                    return
                time.sleep(0.2)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        closed, got = _closed_by_peer(s, HEADER_TIMEOUT_S + 5)
        closed_at.append(time.monotonic())
        t.join(5)
    finally:
        s.close()
    assert closed
    assert got == b""
    took = closed_at[0] - answered
    assert HEADER_TIMEOUT_S - 0.3 < took < HEADER_TIMEOUT_S + 1.5, took


def test_a_slow_body_answers_408_and_the_connection_ends(node: Node) -> None:
    s = node.connect()
    s.sendall(
        b"POST /iotf/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b"{" + b" " * 10
    )
    started = time.monotonic()
    closed, got = _closed_by_peer(s, BODY_TIMEOUT_S + 5)
    took = time.monotonic() - started
    s.close()
    assert got.startswith(b"HTTP/1.1 408 ")
    assert closed
    assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 3
    events = node.security_events("http_slow_client")
    assert any(e["phase"] == "body" for e in events)


def test_a_body_without_a_length_that_grows_too_large_answers_413_and_the_connection_ends(node: Node) -> None:
    limit = load_settings(environ=node.env).max_request_bytes
    chunk = b"%x\r\n%s\r\n" % (65536, b" " * 65536)
    node.healthz_s()  # the server's own descriptors (pool, logs) are open before the count
    baseline = node.fds()
    for _ in range(10):  # one after another: each is cut off at the limit and its connection ends
        s = node.connect()
        s.sendall(
            b"POST /iotf/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # the server may close first
            for _ in range(limit // 65536 + 2):
                s.sendall(chunk)
        closed, got = _closed_by_peer(s, 10)
        s.close()
        assert got.startswith(b"HTTP/1.1 413 "), got[:200]  # not FastAPI's 400 for a body it failed to read
        assert b"larger than" in got
        assert closed
    deadline = time.monotonic() + 5
    while node.fds() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert node.fds() <= baseline
    assert node.healthz_s() < 2  # and others are still served


def test_idle_keep_alive_connections_are_closed(node: Node) -> None:
    baseline = node.fds()
    conns = [node.connect() for _ in range(100)]
    for s in conns:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    for s in conns:
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert node.fds() >= baseline + 100
    time.sleep(IDLE_TIMEOUT_S + 1)
    for s in conns:
        closed, _ = _closed_by_peer(s, 2)
        assert closed
        s.close()
    assert node.fds() <= baseline + 2


def test_huge_headers_are_refused_and_recorded(node: Node) -> None:
    s = node.connect()
    s.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 8000) for i in range(16))
    )
    closed, got = _closed_by_peer(s, 5)
    s.close()
    assert got.startswith(b"HTTP/1.1 400 ")
    assert closed
    # a large but legitimate header block (a 16 KiB bearer pair) is still accepted
    r = httpx.get(f"http://127.0.0.1:{node.port}/healthz", headers={"X-Pad": "a" * 30_000}, timeout=10)
    assert r.status_code == 200
    events = node.security_events("http_headers_too_large")
    assert events
    assert events[0]["subject"] == "127.0.0.1"
    assert node.healthz_s() < 1.0
