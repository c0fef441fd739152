"""Helpers shared by the tests: real services and an iotvault server process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
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


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )


@dataclass
class Mosquitto:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = mosquitto_binary() or "mosquitto"
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
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class ServerProcess:
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as fh:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iotvault", "serve"],
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
