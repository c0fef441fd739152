"""Mosquitto's refusals as security events, read from its log file.

Mosquitto 2.0's dynamic-security plugin publishes no notifications, and ``$SYS`` counts no
refusals, so its log is the only place that says that a login or a PUBLISH was refused. When
iotvault runs beside Mosquitto and may read its log (``IOTVAULT_BROKER_LOG_FILE``; Mosquitto
with ``log_type all``, as both lines are debug-level), the ingest node follows the file and
records:

==========================================================  =================================
Mosquitto 2.0.11 writes                                     security event
==========================================================  =================================
``Sending CONNACK to 10.0.0.7 (0, 5)``                       ``login_failed`` (address only:
                                                             Mosquitto does not log who)
``Denied PUBLISH from unit-a (d0, q1, r0, m4, 'topic', …)``  ``acl_denied`` (client, topic)
==========================================================  =================================

Only lines written after iotvault started are read; a rotated or truncated file is followed
from its new beginning. Lines are parsed, never evaluated, and their fields cut to size.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from pathlib import Path
from typing import Final

from iotvault.broker.security_log import SecurityEventLog

log = logging.getLogger(__name__)

_REFUSED: Final = re.compile(r"^\d+: Sending CONNACK to (\S+) \(\d+, [45]\)$")
_DENIED: Final = re.compile(
    r"^\d+: Denied PUBLISH from (\S+) \(d\d, q\d, r\d, m\d+, '(.*)', \.\.\. \(\d+ bytes\)\)$"
)
_MAX_LINE: Final = 4096
_READ_CHUNK: Final = 1 << 16


def parse_line(line: str, events: SecurityEventLog) -> bool:
    """Record the event a log line reports, if it reports one."""
    if (m := _REFUSED.match(line)) is not None:
        events.record(
            "login_failed", "<unknown>", action="connect", reason="not authorised", address=m[1][:64]
        )
        return True
    if (m := _DENIED.match(line)) is not None:
        events.record("acl_denied", m[1][:128], action="publish", reason="not allowed", topic=m[2][:256])
        return True
    return False


class MosquittoLogWatcher:
    def __init__(self, path: str | Path, events: SecurityEventLog, *, poll_s: float = 0.5) -> None:
        self._path = Path(path).expanduser()
        self._events = events
        self._poll_s = poll_s
        self._inode: int | None = None
        self._offset = 0
        self._partial = b""

    def _start_at_end(self) -> None:
        try:
            st = self._path.stat()
        except OSError:
            return
        self._inode, self._offset = st.st_ino, st.st_size

    def poll(self) -> int:
        """Read what was appended since the last call; return how many events it held."""
        try:
            st = self._path.stat()
        except OSError:
            return 0
        if st.st_ino != self._inode or st.st_size < self._offset:  # rotated or truncated
            self._inode, self._offset, self._partial = st.st_ino, 0, b""
        if st.st_size == self._offset:
            return 0
        found = 0
        fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.lseek(fd, self._offset, os.SEEK_SET)
            while chunk := os.read(fd, _READ_CHUNK):
                self._offset += len(chunk)
                lines = (self._partial + chunk).split(b"\n")
                self._partial = lines.pop()[-_MAX_LINE:]
                for raw in lines:
                    found += parse_line(raw[:_MAX_LINE].decode("utf-8", "replace").rstrip("\r"), self._events)
        finally:
            os.close(fd)
        return found

    async def run(self) -> None:
        await asyncio.to_thread(self._start_at_end)
        if self._inode is None:
            log.warning("broker: %s does not exist (yet); refusals are read once it does", self._path)
        else:
            log.info("broker: reading refusals from %s", self._path)
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await asyncio.to_thread(self.poll)
            except OSError as exc:
                log.warning("broker: cannot read %s: %s", self._path, exc)
