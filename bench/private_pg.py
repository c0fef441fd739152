"""A PostgreSQL cluster of one's own, for runs that stop the database or lock its tables.

The machine's shared PostgreSQL is never stopped by a test or a fault run: other tests and CI
use it. This makes a throwaway cluster with ``initdb`` and runs it with ``pg_ctl`` as the
``postgres`` user (PostgreSQL refuses to run as root), on a free port below 32768 (the
ephemeral range starts there, and a port inside it may be taken by an outgoing connection
while the cluster is down), listening on 127.0.0.1 only with trust authentication.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


class PrivatePostgresError(RuntimeError):
    """The private cluster could not be made, started or stopped."""


def postgres_bin_dir() -> Path | None:
    """Where Debian installs the server binaries (``initdb`` and ``pg_ctl`` are not on PATH)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda d: int(d.parent.name))
    return dirs[-1] if dirs else None


def _free_low_port() -> int:
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise PrivatePostgresError("no free port below 32768")


class PrivatePostgres:
    """``with PrivatePostgres() as pg: pg.create_database("x")`` … ``pg.stop()``, ``pg.start()``."""

    def __init__(self) -> None:
        bindir = postgres_bin_dir()
        if bindir is None:
            raise PrivatePostgresError("initdb is not installed (apt-get install postgresql)")
        self.bindir = bindir
        self.port = _free_low_port()
        # directly in the temporary directory: the postgres user must be able to reach it
        self.root = Path(tempfile.mkdtemp(prefix="iotvault-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise PrivatePostgresError(f"{tool} failed: {done.stderr.decode(errors='replace')[-800:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 30.0) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "start", timeout=timeout
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            else:
                return

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster: ``fast`` ends the sessions, ``immediate`` is a crash."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url(), autocommit=True, connect_timeout=3)

    def create_database(self, name: str, **settings: str) -> str:
        """A new database; ``settings`` become its defaults (``lock_timeout="2s"``)."""
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
            for key, value in settings.items():
                conn.execute(f"ALTER DATABASE \"{name}\" SET {key} = '{value}'")
        return self.url(name)

    def __enter__(self) -> PrivatePostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(PrivatePostgresError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
