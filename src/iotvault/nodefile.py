"""Where the running node really listens, written into its data dir for the commands that follow.

The demo moves its broker (and its HTTP server) to another port when the usual one is taken;
``iotvault simulate``, ``iotvault login`` and ``iotvault token`` then need the ports the node
took, not the ones the settings name. A node writes ``node.json`` (mode 0600) when it is
ready and removes it when it stops; a reader ignores a file whose process is gone, so a node
killed with SIGKILL leaves nothing misleading behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

FILE_NAME = "node.json"


@dataclass(frozen=True, slots=True)
class NodeAddress:
    pid: int
    http_host: str | None
    http_port: int | None
    mqtt_host: str | None  # None: no embedded broker in this node
    mqtt_port: int | None
    public_url: str


def write(data_dir: Path, address: NodeAddress) -> Path:
    """Write ``node.json`` atomically, readable by the owner only."""
    path = data_dir / FILE_NAME
    tmp = data_dir / f".{FILE_NAME}.{address.pid}"
    # a node on PostgreSQL with its master key elsewhere has written nothing here yet
    data_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "pid": address.pid,
        "httpHost": address.http_host,
        "httpPort": address.http_port,
        "mqttHost": address.mqtt_host,
        "mqttPort": address.mqtt_port,
        "publicUrl": address.public_url,
    }
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh)
    tmp.replace(path)
    return path


def remove(data_dir: Path, pid: int) -> None:
    """Remove ``node.json`` if this process wrote it (another node may have replaced it)."""
    found = read(data_dir, check_alive=False)
    if found is not None and found.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            (data_dir / FILE_NAME).unlink()


def read(data_dir: Path, *, check_alive: bool = True) -> NodeAddress | None:
    """The running node's address, or None if no node of this data dir is running."""
    try:
        doc = json.loads((data_dir / FILE_NAME).read_text(encoding="utf-8"))
        address = NodeAddress(
            pid=int(doc["pid"]),
            http_host=_opt_str(doc.get("httpHost")),
            http_port=_opt_int(doc.get("httpPort")),
            mqtt_host=_opt_str(doc.get("mqttHost")),
            mqtt_port=_opt_int(doc.get("mqttPort")),
            public_url=str(doc["publicUrl"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if check_alive and not _alive(address.pid):
        return None
    return address


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _opt_int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process holds that pid: treat as alive, the ports decide
    return True
