"""Helpers shared by the tests: real services and an iotvault server process.

Mosquitto, ports and stopping a child are the benchmark harness's (:mod:`bench.services`):
one broker configuration for both, the one README.md gives deployments.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest
from bench import services as bench_services  # bench/ is on the tests' path (pytest pythonpath)
from bench.services import free_port, mosquitto_binary, stop_process, wait_port

import leakscan

__all__ = [
    "IN_CI",
    "PG_ADMIN_URL",
    "Mosquitto",
    "ServerProcess",
    "free_port",
    "mosquitto_binary",
    "pg_admin_connect",
    "require_mosquitto",
    "server_env",
    "unavailable",
    "wait_port",
]


def is_ci(value: str | None) -> bool:
    """Whether a ``CI`` environment value means "running in CI" (``true``, ``1``, ``yes``)."""
    return (value or "").strip().lower() in ("true", "1", "yes")


IN_CI = is_ci(os.environ.get("CI"))
PG_ADMIN_URL = os.environ.get("IOTVAULT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def unavailable(reason: str, *, in_ci: bool | None = None) -> NoReturn:
    """Fail under CI, where every service must be there; elsewhere skip with a loud reason.

    The only place a test may skip for a missing service: PostgreSQL, Redis and Mosquitto are
    installed in CI, so there a missing one is a broken machine, never a reason to go green.
    """
    if IN_CI if in_ci is None else in_ci:
        pytest.fail(f"required service unavailable under CI: {reason}")
    pytest.skip(f"SERVICE UNAVAILABLE: {reason}")


def require_mosquitto() -> str:
    """The mosquitto binary, or :func:`unavailable`."""
    found = mosquitto_binary()
    if found is None:
        unavailable("the mosquitto binary is not installed (apt-get install mosquitto)")
    return found


def pg_admin_connect() -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection to the PostgreSQL the tests use, or :func:`unavailable`."""
    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL at {PG_ADMIN_URL.split('@')[-1]} does not answer: {str(exc).strip()[:120]}")


class Mosquitto(bench_services.Mosquitto):
    """The benchmarks' open, persistent Mosquitto, on a port the caller chose."""

    def __init__(self, port: int, workdir: Path) -> None:
        super().__init__(workdir, port)


@dataclass
class ServerProcess:
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()  # after ``serve``, e.g. ("--role", "ingest")

    def start(self, timeout: float = 30.0) -> None:
        leakscan.server_log(self.log)  # searched for the run's secrets when the session ends
        for name, value in self.env.items():  # e.g. IOTVAULT_BROKER_ADMIN_PASSWORD, _WEBHOOK_SECRET
            if name.startswith("IOTVAULT_") and name.endswith(("PASSWORD", "SECRET", "TOKEN")):
                leakscan.secret(value, f"setting {name}")
        if export := self.env.get("IOTVAULT_AUDIT_EXPORT_FILE"):
            leakscan.audit_export(Path(export))
        with self.log.open("ab") as fh:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iotvault", "serve", *self.args],
                env=self.env,
                stdout=fh,
                stderr=fh,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        port = int(self.env["IOTVAULT_HTTP_PORT"])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"iotvault exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            if "ready:" in self.log.read_text(errors="replace"):
                if self.args[-2:] != ("--role", "ingest"):  # an ingest node serves no HTTP
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
            stop_process(self.proc, timeout=15)
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


def audit_writers_of(pid: int) -> list[int]:
    """The audit writer processes (``python -m iotvault.audit.appender``) that ``pid`` started
    and that still run (a zombie, dead and not yet reaped, does not count)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"iotvault.audit.appender" in cmdline:
            found.append(int(proc.name))
    return found


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``iotvault ARGS`` in a process of its own, with ``env``: its exit code and its output."""
    return subprocess.run(
        [sys.executable, "-m", "iotvault", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def basic(key: str, password: str) -> dict[str, str]:
    """The Authorization header of an API key."""
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:{password}".encode()).decode()}


def new_key(env: dict[str, str], *roles: str) -> tuple[str, str]:
    """A new API key made by ``iotvault apikeys add ROLES``: (key, password)."""
    done = cli(env, "apikeys", "add", *roles, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    return doc["key"], doc["password"]
