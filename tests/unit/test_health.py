"""What /readyz reports, from the node's phase, the database probe and ingest (iotvault.health)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from iotvault.health import Failing, Phase, Readiness, sqlite_space_problem


class _Pipeline:
    """The two things readiness reads from the ingest pipeline."""

    def __init__(self) -> None:
        self.trouble: str | None = None
        self.feeds: dict[str, Any] = {}


def _readiness(tmp_path: Path, pipeline: _Pipeline | None = None) -> Readiness:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    return Readiness(create_engine(url), url, pipeline=pipeline)  # type: ignore[arg-type]


def test_not_ready_until_started_and_names_every_failing_dependency(tmp_path: Path) -> None:
    p = _Pipeline()
    r = _readiness(tmp_path, p)
    assert r.failing() == [Failing("node", "starting")]
    r.phase = Phase.READY
    assert r.failing() == []
    p.trouble = "disk is full"
    connected = False
    p.feeds["broker mqtt://b:1883"] = lambda: connected
    assert r.failing() == [
        Failing("ingest", "paused: commits are failing (disk is full)"),
        Failing("broker mqtt://b:1883", "disconnected"),
    ]
    p.trouble, connected = None, True
    assert r.failing() == []
    r.phase = Phase.STOPPING
    assert r.failing() == [Failing("node", "stopping")]


async def test_the_probe_finds_an_unreachable_database_and_its_recovery(tmp_path: Path) -> None:
    r = _readiness(tmp_path / "missing-dir")  # SQLite cannot create a file there
    r.phase = Phase.READY
    await r.probe_once()
    (failing,) = r.failing()
    assert failing.dependency == "database"
    assert failing.reason.startswith("unreachable")
    assert "sqlite" not in failing.reason  # no URL in what /readyz shows
    (tmp_path / "missing-dir").mkdir()
    await r.probe_once()
    assert r.failing() == []


def test_space_problems_of_a_sqlite_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sqlite_space_problem(tmp_path / "x.db") is None
    assert sqlite_space_problem(tmp_path / "x.db", min_free=1 << 62) is not None
    assert "disk full" in (sqlite_space_problem(tmp_path / "x.db", min_free=1 << 62) or "")
    real = os.statvfs

    class _ReadOnly:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_flag = st.f_flag | os.ST_RDONLY
            self.f_bavail, self.f_frsize = st.f_bavail, st.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda p: _ReadOnly(real(p)))
    assert sqlite_space_problem(tmp_path / "x.db") == "read-only file system"
    assert sqlite_space_problem(tmp_path / "nowhere" / "x.db") is not None
