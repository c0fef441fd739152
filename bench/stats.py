"""CPU and memory of the processes in a measurement, and of the whole machine.

Everything shares two cores, so a rate means little without who used the CPU meanwhile: each
figure is printed with the CPU of every process, in percent of one core (200% is the whole
machine), and with what the rest of the machine used ("others": processes that are not part
of the run, which a quiet machine keeps near 0%).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


def _busy(t: Any) -> float:
    return float(
        t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
    )


def cpu_seconds(pid: int) -> float | None:
    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    return None


def family(pid: int) -> list[int]:
    """A process and its descendants: ``iotvault serve --api-processes N`` serves HTTP from children,
    and every node has its audit writer process."""
    with contextlib.suppress(psutil.Error):
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    return [pid]


@dataclass
class CpuWindow:
    """CPU seconds used by named groups of processes between ``start()`` and ``stop()``.

    Groups are given as functions returning the current pids, so that processes appearing
    during the window (a new PostgreSQL backend) are counted too, from their first sighting.
    Processes that report their own CPU (the publishers, which exit) are added with ``add``.
    """

    groups: dict[str, Callable[[], list[int]]]
    _first: dict[int, float] = field(default_factory=dict)
    _last: dict[int, float] = field(default_factory=dict)
    _members: dict[str, set[int]] = field(default_factory=dict)
    _extra: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _t1: float = 0.0
    _sys0: float = 0.0
    _sys1: float = 0.0
    _all0: dict[int, tuple[str, float]] = field(default_factory=dict)
    _all1: dict[int, tuple[str, float]] = field(default_factory=dict)

    def start(self) -> None:
        self._all0 = _all_processes()
        self._t0 = time.monotonic()
        self._sys0 = _busy(psutil.cpu_times())
        self.sample()

    def sample(self) -> None:
        for name, pids in self.groups.items():
            for pid in pids():
                s = cpu_seconds(pid)
                if s is None:
                    continue
                self._members.setdefault(name, set()).add(pid)
                self._first.setdefault(pid, s)
                self._last[pid] = s

    def add(self, name: str, seconds: float, pids: list[int] | None = None) -> None:
        """CPU seconds a process measured itself (its pids are then left out of "others")."""
        self._extra[name] = self._extra.get(name, 0.0) + seconds
        self._members.setdefault(f"({name})", set()).update(pids or [])

    def stop(self) -> None:
        self.sample()
        self._t1 = time.monotonic()
        self._sys1 = _busy(psutil.cpu_times())
        self._all1 = _all_processes()

    def others(self, top: int = 2) -> list[tuple[str, float]]:
        """The busiest processes outside the run: name and percent of one core."""
        ours = {p for members in self._members.values() for p in members}
        used: dict[str, float] = {}
        for pid, (name, end) in self._all1.items():
            # a process started during the window has an unknown share: left in "others"
            if pid in ours or pid == os.getpid() or pid not in self._all0:
                continue
            used[name] = used.get(name, 0.0) + 100 * (end - self._all0[pid][1]) / self.wall
        return sorted(((n, v) for n, v in used.items() if v >= 1.0), key=lambda x: -x[1])[:top]

    @property
    def wall(self) -> float:
        return max(1e-9, self._t1 - self._t0)

    def percents(self) -> dict[str, float]:
        """Percent of one core per group, then "others" (the rest of the machine) and "total"."""
        out: dict[str, float] = {}
        for name in self.groups:
            used = sum(self._last[p] - self._first[p] for p in self._members.get(name, ()) if p in self._last)
            out[name] = 100 * used / self.wall
        for name, seconds in self._extra.items():
            out[name] = out.get(name, 0.0) + 100 * seconds / self.wall
        # this process (the orchestrator: polling the database, reading pipes)
        total = 100 * (self._sys1 - self._sys0) / self.wall
        out["others"] = max(0.0, total - sum(out.values()))
        out["total"] = total
        return out


def _all_processes() -> dict[int, tuple[str, float]]:
    out = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        t = proc.info["cpu_times"]
        if t is not None:
            out[proc.pid] = (str(proc.info["name"]), float(t.user + t.system))
    return out


def fmt_cpu(p: dict[str, float], others: list[tuple[str, float]] | None = None) -> str:
    parts = [f"{k} {v:.0f}%" for k, v in p.items() if k not in ("total",)]
    text = ", ".join(parts)
    if others:
        text += " [" + ", ".join(f"{n} {v:.0f}%" for n, v in others) + "]"
    return text + f" (machine {p['total']:.0f}% of {100 * (os.cpu_count() or 1)}%)"


def memory(pid: int) -> tuple[int | None, int | None]:
    """(VmRSS, VmHWM) in bytes from /proc: the current and the peak resident set."""
    rss = hwm = None
    with contextlib.suppress(OSError), Path(f"/proc/{pid}/status").open() as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    if rss is None:
        with contextlib.suppress(psutil.Error):
            rss = int(psutil.Process(pid).memory_info().rss)
    return rss, hwm


def mib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**20:.0f} MiB"


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), Path("/proc/cpuinfo").open() as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "ram": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "sqlite": sqlite3.sqlite_version,
    }
