"""What every command of the ``iotvault`` command line shares.

The state of one invocation (the ``--config`` file, the settings loaded from it, the two
consoles) lives in :class:`CliState`, carried by ``typer.Context.obj`` from the root callback
to the command: nothing is kept in a module global, so a test can run the app twice in one
process with different settings.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from iotvault.audit.changes import Origin, origin
from iotvault.clock import now_us
from iotvault.config import Settings, load_settings
from iotvault.context import Context, context
from iotvault.documents import describe, iso
from iotvault.domain.accounts import Roles
from iotvault.domain.audit import AuditEntry
from iotvault.errors import ConfigError, MasterKeyError, NotFoundError, NotInitialisedError
from iotvault.fanout import ACCESS_CHANGED, announce
from iotvault.logformat import formatter

PIPED_WIDTH = 1_000
"""Columns of a console that is not a terminal: rich would cut tables to 80 when piped."""


def _console(*, stderr: bool) -> Console:
    console = Console(stderr=stderr, soft_wrap=True)
    if not console.is_terminal:
        console.width = PIPED_WIDTH
    return console


@dataclass
class CliState:
    """One invocation: where the settings come from, the settings once loaded, the consoles."""

    config: Path | None = None
    out: Console = field(default_factory=lambda: _console(stderr=False))
    err: Console = field(default_factory=lambda: _console(stderr=True))
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config, warn=self.warn)
        return self._settings

    def use(self, settings: Settings) -> None:
        """Settings changed by the command itself (the demo's fallback ports)."""
        self._settings = settings

    def warn(self, message: str) -> None:
        self.err.print(f"iotvault: warning: {message}", highlight=False)


def state(cli: typer.Context) -> CliState:
    return cli.ensure_object(CliState)


def where(s: Settings) -> str:
    """The database a command used, for its "not found" errors."""
    from iotvault.storage.db import redact

    if s.database_url:
        return f"database {redact(s.database_url)}"
    return f"data dir {s.data_dir.resolve()}"


@contextmanager
def opened(cli: typer.Context, *, read_only: bool = False) -> Iterator[Context]:
    """The installation's resources for one command.

    A command that only reads (``read_only``) never creates anything: a missing data dir,
    SQLite file or master key is an error naming where it looked, not a fresh empty
    installation with a new key. Every "not found" error says which database was used.
    """
    s = state(cli).settings
    if read_only:
        _require_installation(s)
    try:
        with context(s, create=not read_only) as ctx:
            if read_only:
                yield ctx
                return
            outcome = "failure"
            changes: list[bool] = []
            ctx.accounts.on_change = lambda: changes.append(True)
            try:
                with origin(Origin(ctx.audit.record, lambda: "cli", describe)):
                    yield ctx
                outcome = "success"
            finally:
                ctx.audit.record(_cli_entry(cli, outcome))
                if changes:  # running nodes empty their caches of authentication results now
                    announce(s.redis_url, s.database_url, ACCESS_CHANGED, data_dir=s.data_dir)
    except NotFoundError as exc:
        exc.add_note(where(s))
        raise


# command parameters whose values name what a command changed (never a secret)
_TARGET_PARAMS = ("device_id", "type_id", "user_name", "name", "group_name", "key", "client_id")


def _cli_entry(cli: typer.Context, outcome: str) -> AuditEntry:
    """The audit record of a command that may change something (actor ``cli``)."""
    target = next((str(cli.params[p]) for p in _TARGET_PARAMS if cli.params.get(p)), "")
    command = cli.command_path.removeprefix(cli.find_root().info_name or "iotvault").strip()
    return AuditEntry(now_us(), "cli", "cli." + command.replace(" ", "."), target, outcome)


def _require_installation(s: Settings) -> None:
    if not s.database_url:  # a server database: ensure_schema refuses an empty one
        db = s.data_dir / "iotvault.db"
        if not db.is_file():
            raise NotInitialisedError(str(s.data_dir.resolve()))
    key = s.effective_master_key_file
    if not key.exists():
        raise MasterKeyError(
            str(key.resolve()),
            f"does not exist ({where(s)}); point IOTVAULT_MASTER_KEY_FILE at the key this database "
            "was made with (a command that only reads never creates one)",
        )


def setup_logging(level: str, kind: str = "text") -> None:
    """Log to stderr as text or JSON lines (``IOTVAULT_LOG_FORMAT``); see :mod:`iotvault.logformat`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    for noisy in ("amqtt", "transitions", "gmqtt", "uvicorn.error", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def iso_text(us: int | None) -> str:
    """A time for a person: as in the JSON documents, and ``-`` for none."""
    return iso(us) or "-"


def roles_text(roles: Roles) -> str:
    return ", ".join(n.removeprefix("role").lower() for n in roles.names()) or "-"


def read_json(option: str, path: Path | None) -> Any:
    import json

    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(option, f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(option, f"{path} is not valid JSON: {exc}") from None


def password_from_stdin() -> str:
    line = sys.stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
YesOption = Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")]
IdArg = Annotated[str, typer.Argument(metavar="ID")]
NameArg = Annotated[str, typer.Argument(metavar="NAME")]
GroupArg = Annotated[str, typer.Argument(metavar="GROUP")]
UserArg = Annotated[str, typer.Argument(metavar="USER")]
DeviceArg = Annotated[str, typer.Argument(metavar="DEVICE")]
PasswordStdinOption = Annotated[
    bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
]
