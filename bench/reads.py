"""The API's same-run baseline and how its figures are judged against it (issue 17).

:class:`Hello` runs :mod:`bench.hello` (a minimal ASGI app on uvicorn with httptools and
uvloop) in a process of its own; ``python -m bench`` measures it with the same load generator
and concurrency right before each set of iotvault API figures, idle and under ingest, and
prints every API figure beside it and as a ratio (:func:`versus`). Its rate moves with the
machine (other work on the two cores, the load generator's own CPU); the ratio moves much less.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any, Protocol

from bench.services import Child, base_env, free_port


class Figure(Protocol):
    endpoint: str
    rps: float
    p50_ms: float
    p99_ms: float


class Hello:
    """``python -m bench.hello PORT`` for the length of a ``with`` block."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self._child = Child("hello", "bench.hello", [str(self.port)], base_env(), workdir / "hello.log")
        self.stack: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        return self._child.pid

    def __enter__(self) -> Hello:
        try:
            self.stack = self._child.expect("ready", 30)
        except BaseException:
            self._child.stop(timeout=5)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._child.stop(timeout=5)


def versus(f: Figure, hello: Figure | None) -> str:
    """``f`` against the hello baseline: its req/s, p99 and the throughput ratio."""
    if hello is None or not hello.rps:
        return ""
    return (
        f" | hello baseline {hello.rps:,.0f} req/s, p99 {hello.p99_ms:.1f} ms"
        f" -> ratio {f.rps / hello.rps:.3f}"
    )


def find(figures: list[Any], name: str) -> Any:
    """The figure whose endpoint starts with ``name`` (suffixes name the process), or None."""
    return next((f for f in figures if f.endpoint.split(" ", 1)[0] == name), None)


HISTORY_RANGE = "since=2000-01-01T00:00:00Z&until=2100-01-01T00:00:00Z"


def history_paths(devices: list[str]) -> list[str]:
    """Paged history reads: up to 1000 events of a device in a time range (all of them here)."""
    return [f"/iotf/devices/{d}/events?count=1000&{HISTORY_RANGE}" for d in devices]


def page_events(http_port: int, paths: list[str], headers: dict[str, str]) -> float:
    """The mean number of events in these pages (what one request of the history figure serves)."""
    total = 0
    for path in paths[:10]:
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}{path}", headers=headers)
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - as above
            total += len(json.loads(resp.read())["events"])
    return total / min(10, len(paths))
