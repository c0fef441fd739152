"""Replay protection that survives reconnects and restarts: a sliding window over ``seq``.

The platform numbers each device's commands 1, 2, 3, … (``seq``, signed). The device keeps the
highest ``seq`` it accepted and which of the ``window`` numbers below it it has seen (the
anti-replay window of IPsec, RFC 4303 section 3.4.3), plus the nonces of commands that have
not expired yet. A command is refused as ``replayed`` if its nonce or its ``seq`` was seen, or
if its ``seq`` is older than the window. The window, rather than "greater than the last one",
is there because two API nodes may publish a device's commands slightly out of order.

The state is written to a small JSON file (atomically: temporary file, fsync, rename) *before*
the handler runs, so a device that crashes and restarts refuses what it already accepted:
commands run at most once. A state file that cannot be written refuses the command
(``state_unavailable``) rather than risk running it twice. A state file names its device, so one
copied to another device is refused at start.

Deleting the state file forgets every command seen: only do it together with re-registering the
device under a new id.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Final

from iotvault.device.verify import Command
from iotvault.domain.commands import Reason
from iotvault.errors import CommandRejectedError, ValidationError

FORMAT: Final = 1


class ReplayGuard:
    def __init__(
        self,
        path: Path | None,
        device_id: str,
        *,
        window: int = 256,
        max_nonces: int = 4096,
    ) -> None:
        if window < 1 or max_nonces < 1:
            raise ValueError("window and max_nonces must be positive")
        self._path = path
        self.device_id = device_id
        self._window = window
        self._max_nonces = max_nonces
        self.max_seq = 0
        self._seqs: set[int] = set()
        self._nonces: dict[str, int] = {}  # nonce -> expiresAt (ms)
        if path is not None:
            self._load(path)

    def check(self, command: Command) -> None:
        """Raise ``replayed`` if the command was seen before or is older than the window."""
        if (
            command.nonce in self._nonces
            or command.seq in self._seqs
            or command.seq <= self.max_seq - self._window
        ):
            raise CommandRejectedError(Reason.REPLAYED, command.command_id)

    def accept(self, command: Command, now_ms: int) -> None:
        """Check, remember and persist; only then may the handler run."""
        self.check(command)
        seqs, nonces, top = set(self._seqs), dict(self._nonces), max(self.max_seq, command.seq)
        seqs.add(command.seq)
        seqs = {s for s in seqs if s > top - self._window}
        nonces[command.nonce] = command.expires_ms
        # expired commands are refused by their expiry anyway; the seq window covers the rest
        nonces = {n: exp for n, exp in nonces.items() if exp >= now_ms - 300_000}
        if len(nonces) > self._max_nonces:
            nonces = dict(sorted(nonces.items(), key=lambda item: item[1])[-self._max_nonces :])
        try:
            self._save(top, seqs, nonces)
        except OSError:
            raise CommandRejectedError(Reason.STATE_UNAVAILABLE, command.command_id) from None
        self.max_seq, self._seqs, self._nonces = top, seqs, nonces

    # ---- the state file --------------------------------------------------------------------
    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValidationError("command state file", f"{path} cannot be read: {exc}") from None
        if not isinstance(data, dict) or data.get("v") != FORMAT:
            raise ValidationError("command state file", f"{path} is not a command state file")
        if data.get("deviceId") != self.device_id:
            raise ValidationError(
                "command state file", f"{path} belongs to device {data.get('deviceId')!r}, not this one"
            )
        try:
            self.max_seq = int(data["maxSeq"])
            self._seqs = {int(s) for s in data["seqs"]}
            self._nonces = {str(n): int(e) for n, e in dict(data["nonces"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError("command state file", f"{path} is damaged ({exc})") from None

    def _save(self, top: int, seqs: set[int], nonces: dict[str, int]) -> None:
        if self._path is None:
            return
        doc: dict[str, Any] = {
            "v": FORMAT,
            "deviceId": self.device_id,
            "maxSeq": top,
            "seqs": sorted(seqs),
            "nonces": nonces,
        }
        path = self._path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", closefd=False) as fh:
                json.dump(doc, fh, separators=(",", ":"))
                fh.flush()
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        tmp.replace(path)
        with contextlib.suppress(OSError):  # not every file system lets a directory be synced
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
