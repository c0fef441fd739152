"""Shared fixtures: real services, started or found, and skipped loudly when absent.

Under CI (``CI=true``) a missing service is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_ADMIN_URL = os.environ.get("IOTVAULT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def unavailable(reason: str) -> None:
    """Skip with a loud reason, or fail under CI."""
    if IN_CI:
        pytest.fail(f"required service unavailable under CI: {reason}")
    pytest.skip(f"SERVICE UNAVAILABLE: {reason}")


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
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


# ---- Mosquitto ----------------------------------------------------------------------
@dataclass
class Mosquitto:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            # an offline persistent session (iotvault's ingest) must not lose queued messages
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
        )
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        unavailable("the mosquitto binary is not installed (apt-get install mosquitto)")
    m = Mosquitto(free_port(), tmp_path_factory.mktemp("mosquitto"))
    m.start()
    yield m
    m.stop()


# ---- PostgreSQL ---------------------------------------------------------------------
def _pg_admin_connect():  # type: ignore[no-untyped-def]
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed (pip install 'iotvault[postgres]')")
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN_URL.split('@')[-1]} does not answer: {str(exc).strip()[:120]}")
        raise


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    name = f"iotvault_t_{uuid.uuid4().hex[:12]}"
    with _pg_admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with _pg_admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'data' / 'iotvault.db'}"
    return str(request.getfixturevalue("pg_url"))


# ---- an iotvault server in its own process ------------------------------------------
@dataclass
class ServerProcess:
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iotvault", "serve"], env=self.env, stdout=fh, stderr=fh, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        port = int(self.env["IOTVAULT_HTTP_PORT"])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"iotvault exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if "ready:" in self.log.read_text(errors="replace"):
                wait_port(port)
                return
            time.sleep(0.05)
        raise TimeoutError(f"iotvault not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def server_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTVAULT_")}
    env.update(
        {
            "IOTVAULT_DATA_DIR": str(tmp_path / "data"),
            "IOTVAULT_HTTP_PORT": str(free_port()),
            "IOTVAULT_MQTT_PORT": str(free_port()),
            "IOTVAULT_LOG_LEVEL": "info",
        }
    )
    env.update({f"IOTVAULT_{k.upper()}": v for k, v in settings.items()})
    return env


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    servers: list[ServerProcess] = []
    yield servers
    for s in servers:
        s.stop()
