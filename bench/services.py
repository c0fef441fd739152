"""The processes a benchmark run starts and stops: Mosquitto, a throwaway PostgreSQL database,
iotvault itself, the load processes, and a tiny OpenID Connect issuer for the API's tokens.

Everything listens on 127.0.0.1 only, on ports the system picks, and every wait is bounded.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from bench.publisher import connect_packet

PG_ADMIN_URL = os.environ.get(
    "IOTVAULT_BENCH_PG_ADMIN",
    os.environ.get("IOTVAULT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres"),
)


class BenchError(Exception):
    """A benchmark could not be run as described (a service missing, a process failing)."""


class PortTimeoutError(BenchError, TimeoutError):
    """Nothing listens on a port after the time allowed (a TimeoutError for the tests too)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise PortTimeoutError(f"nothing listens on port {port} after {timeout}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Ask a child to end (SIGTERM) and wait; after ``timeout`` seconds, kill it."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ---- Mosquitto --------------------------------------------------------------------------
def mosquitto_binary() -> str | None:
    """The mosquitto executable: on PATH, or where Debian (``/usr/sbin``) and source builds
    (``/usr/local/sbin``) install it, directories a user's PATH often lacks."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("mosquitto", path=path)


def mosquitto_version() -> str:
    binary = mosquitto_binary()
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5, check=False).stdout
    return out.splitlines()[0].replace("mosquitto version ", "") if out else "unknown"


class Mosquitto:
    """A Mosquitto of our own, configured as README.md tells deployments to configure it.

    Anonymous on 127.0.0.1, persistent, and with no limit on the queue of an offline persistent
    session (iotvault's ingest is one: it must not lose queued messages). The benchmarks use it
    as a context manager on a port of its own choosing; the tests' session broker
    (``tests/helpers.py``) starts and stops it on a port they chose.
    """

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = free_port() if port is None else port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BenchError("the mosquitto binary is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- PostgreSQL -------------------------------------------------------------------------
def pg_available() -> str | None:
    """None if PostgreSQL answers, else why not."""
    try:
        import psycopg  # noqa: PLC0415 - only the PostgreSQL cases need the driver
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        return f"PostgreSQL at {PG_ADMIN_URL.split('@')[-1]} does not answer: {str(exc).strip()[:100]}"
    return None


def pg_version() -> str:
    import psycopg  # noqa: PLC0415

    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


@contextlib.contextmanager
def throwaway_pg_database() -> Iterator[str]:
    """A fresh database on the admin server, dropped afterwards whatever happens."""
    import psycopg  # noqa: PLC0415

    name = f"iotvault_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# ---- child processes that talk JSON lines -----------------------------------------------
class Child:
    """A Python module run as a process; JSON lines in on stdin, out on stdout."""

    def __init__(self, name: str, module: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_fh: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_fh,
            text=True,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, name=f"bench-{name}", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # stdout closed by stop()
            for line in self.proc.stdout or ():
                self._lines.put(line)
        self._lines.put(None)

    def send(self, line: str) -> None:
        if self.proc.stdin is None:
            raise BenchError(f"{self.name}: no stdin")
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, key: str, timeout: float) -> dict[str, Any]:
        """The next JSON line holding ``key``; other lines are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no {key!r} after {timeout:.0f}s\n{tail(self.log)}")
            try:
                line = self._lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(timeout=5)
                raise BenchError(f"{self.name} exited with {self.proc.returncode}\n{tail(self.log)}")
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and key in doc:
                    return doc

    def poll(self, key: str) -> dict[str, Any] | None:
        """A JSON line holding ``key`` if one has arrived, without waiting."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return None
            if line is None:
                self._lines.put(None)
                return None
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and key in doc:
                    return doc

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            stop_process(self.proc, timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()
        self._log_fh.close()


class Server:
    """``python -m iotvault serve``: the real thing, configured by environment variables."""

    def __init__(self, env: dict[str, str], log: Path, role: str = "all") -> None:
        self.env = env
        self.log = log
        self.role = role
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError("iotvault is not running")
        return self.proc.pid

    def __enter__(self) -> Server:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iotvault", "serve", "--role", self.role],
                env=self.env,
                stdout=fh,
                stderr=fh,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"iotvault exited with {self.proc.returncode}:\n{tail(self.log)}")
            if "ready:" in tail(self.log, 100_000):
                if self.role != "ingest":  # an ingest node serves no HTTP
                    wait_port(int(self.env["IOTVAULT_HTTP_PORT"]))
                return self
            time.sleep(0.05)
        raise BenchError(f"iotvault not ready after 60s:\n{tail(self.log)}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)
            self.proc = None


def base_env() -> dict[str, str]:
    """This environment without IOTVAULT_* settings and proxies: every service is on loopback."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("IOTVAULT_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---- a probe message, to know that a subscription is in place ---------------------------
def publish_once(port: int, client_id: str, password: str | None, topic: str, payload: bytes) -> bool:
    """One QoS 1 PUBLISH over a fresh connection; True if it was acknowledged."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(connect_packet(client_id, client_id, password))
        if _read_packet(sock)[:1] != b"\x20":
            return False
        t = topic.encode()
        body = len(t).to_bytes(2, "big") + t + (1).to_bytes(2, "big") + payload
        sock.sendall(b"\x32" + bytes([len(body)]) + body)
        ok = _read_packet(sock)[:1] == b"\x40"
        sock.sendall(b"\xe0\x00")
        return ok
    return False


def _read_packet(sock: socket.socket) -> bytes:
    head = sock.recv(2)
    if len(head) < 2:
        return b""
    body = b""
    while len(body) < head[1]:
        chunk = sock.recv(head[1] - len(body))
        if not chunk:
            break
        body += chunk
    return head + body


# ---- an OpenID Connect issuer for the API's bearer tokens -------------------------------
class Issuer:
    """A small external OpenID Connect issuer: discovery and JWKS over plain HTTP on 127.0.0.1
    (iotvault allows loopback), and tokens signed with its current key.

    The API benchmark's bearer tokens come from it, and the external-issuer tests use it too:
    it counts the requests it gets (``hits``), can rotate its key, and can claim another
    issuer name in its discovery document (``named_issuer``).
    """

    DISCOVERY = "/.well-known/openid-configuration"

    def __init__(self, audience: str = "iotvault-api", subject: str = "ext-user") -> None:
        from joserfc.jwk import ECKey, KeySet  # noqa: PLC0415 - only the API benchmark needs it

        from iotvault.auth.keys import public_keyset  # noqa: PLC0415

        self.audience = audience
        self.subject = subject
        self.key = ECKey.generate_key("P-256", parameters={"kid": "key-1"}, private=True)
        self.hits: Counter[str] = Counter()
        self.named_issuer: str | None = None  # what discovery claims; None: the truth
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.hits[self.path] += 1
                if self.path == Issuer.DISCOVERY:
                    doc: Any = {
                        "issuer": issuer.named_issuer or issuer.url,
                        "jwks_uri": issuer.url + "/jwks",
                        "id_token_signing_alg_values_supported": ["ES256"],
                    }
                elif self.path == "/jwks":
                    doc = public_keyset(KeySet([issuer.key])).as_dict()
                else:
                    self.send_error(404)
                    return
                body = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=functools.partial(self.server.serve_forever, poll_interval=0.05),
            name="oidc-issuer",
            daemon=True,
        )

    def __enter__(self) -> Issuer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def rotate(self) -> None:
        """A new signing key, ``key-<n+1>``; the JWKS serves only the new one."""
        from joserfc.jwk import ECKey  # noqa: PLC0415

        number = int(str(self.key.kid).split("-")[1]) + 1
        self.key = ECKey.generate_key("P-256", parameters={"kid": f"key-{number}"}, private=True)

    @property
    def jwks_fetches(self) -> int:
        return self.hits["/jwks"]

    def token(self, *, kid: str | None = None, lifetime_s: int = 300, **claims: Any) -> str:
        """An access token for ``audience`` and ``subject``; ``claims`` add to or replace them."""
        from joserfc import jwt  # noqa: PLC0415

        now = int(time.time())
        payload = {
            "iss": self.url,
            "sub": self.subject,
            "aud": self.audience,
            "iat": now,
            "exp": now + lifetime_s,
        }
        return jwt.encode({"alg": "ES256", "kid": kid or self.key.kid}, payload | claims, self.key)
