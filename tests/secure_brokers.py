"""Mosquitto 2 with the dynamic-security plugin, started by the tests on a free port.

The plugin ships with Debian's ``mosquitto`` package; it is found with ``dpkg -L mosquitto`` or
in a few standard places. Its configuration file is written here (an admin account whose
password hash is PBKDF2-SHA512, as ``mosquitto_ctrl dynsec init`` would write it), so the tests
need nothing but the broker and the plugin. Never the system broker on 1883.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from helpers import free_port, require_mosquitto, unavailable, wait_port

PLUGIN_NAME = "mosquitto_dynamic_security.so"
_PLACES = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib/arm-linux-gnueabihf",
    "/usr/lib/mosquitto",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/opt/homebrew/lib",
)


def dynsec_plugin() -> str | None:
    if shutil.which("dpkg"):
        listed = subprocess.run(["dpkg", "-L", "mosquitto"], capture_output=True, text=True, check=False)
        for line in listed.stdout.splitlines():
            if line.endswith("/" + PLUGIN_NAME) and Path(line).is_file():
                return line
    for place in _PLACES:
        candidate = Path(place) / PLUGIN_NAME
        if candidate.is_file():
            return str(candidate)
    return None


def require_dynsec() -> tuple[str, str]:
    binary = require_mosquitto()
    plugin = dynsec_plugin()
    if plugin is None:
        unavailable(f"Mosquitto's dynamic-security plugin ({PLUGIN_NAME}) was not found")
    return binary, plugin


def _dynsec_client(username: str, password: str, role: str) -> dict[str, object]:
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101, 64)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": 101,
        "roles": [{"rolename": role}],
    }


@dataclass
class DynsecMosquitto:
    workdir: Path
    port: int = field(default_factory=free_port)
    admin_username: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    tls: tuple[Path, Path] | None = None  # (certfile, keyfile)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self) -> None:
        binary, plugin = require_dynsec()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "dynsec.json"
        if not config.exists():
            admin = {
                "rolename": "admin",
                "acls": [
                    {"acltype": t, "topic": "$CONTROL/dynamic-security/#", "allow": True}
                    for t in ("publishClientSend", "publishClientReceive", "subscribePattern")
                ],
            }
            config.write_text(
                json.dumps(
                    {
                        "clients": [_dynsec_client(self.admin_username, self.admin_password, "admin")],
                        "roles": [admin],
                        "defaultACLAccess": {
                            "publishClientSend": False,
                            "publishClientReceive": True,
                            "subscribe": False,
                            "unsubscribe": True,
                        },
                    }
                )
            )
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous false",
            f"plugin {plugin}",
            f"plugin_opt_config_file {config}",
            "persistence false",
            "max_packet_size 262144",
            f"log_dest file {self.log}",
            "log_type all",
        ]
        if os.geteuid() == 0:  # as root, Mosquitto would become "mosquitto", who cannot read here
            lines.append("user root")
        if self.tls is not None:
            lines += [f"certfile {self.tls[0]}", f"keyfile {self.tls[1]}", "tls_version tlsv1.2"]
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
