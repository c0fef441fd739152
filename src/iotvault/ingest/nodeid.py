"""Which persistent MQTT session an ingest node owns when several share the load.

With ``ingest_share_group`` set, every ingest node subscribes through
``$share/<group>/...`` and the broker hands each message to one member. Each member needs a
session of its own (its own client id): two nodes on one client id would take the session
from each other instead of sharing the work. The client id is ``<ingest_client_id>-<node id>``.

The node id is the identity of that session, so it must outlive the process: a broker such as
Mosquitto 2 keeps the messages it queued for a member that died in that member's session, and
they are delivered only when a client with the same id connects again. Hence the id is either
set (``IOTVAULT_INGEST_NODE_ID``, what an orchestrator does for a replacement: start it with the
dead node's id) or generated once and kept in ``<data_dir>/ingest-node-id``, so a restart on the
same disk resumes the same session. The dedupe records (``ingest_inflight``) are keyed by the
same client id and live in the shared database, so a replacement on another machine with the
dead node's id also recognises the redeliveries of what the dead node committed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

from iotvault.config import Settings
from iotvault.errors import ConfigError

FILE_NAME = "ingest-node-id"
_VALID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def node_id(s: Settings) -> str:
    """This ingest node's id: the setting, else the one kept in the data dir (made on first use)."""
    if s.ingest_node_id:
        return s.ingest_node_id
    path = Path(s.data_dir) / FILE_NAME
    for _ in range(2):
        with contextlib.suppress(FileNotFoundError):
            kept = path.read_text(encoding="utf-8").strip()
            if not _VALID.fullmatch(kept):
                raise ConfigError("ingest_node_id", f"{path} holds no valid node id; fix or remove it")
            return kept
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first: read theirs
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(secrets.token_hex(6) + "\n")
    raise ConfigError("ingest_node_id", f"could not create {path}")


def ingest_client_id(s: Settings) -> str:
    """The MQTT client id of this node's ingest session.

    Without a share group it is ``ingest_client_id`` as before (one ingest node), so upgrading
    a single node keeps its session and the messages queued in it.
    """
    if not s.ingest_share_group:
        return s.ingest_client_id
    return f"{s.ingest_client_id}-{node_id(s)}"
