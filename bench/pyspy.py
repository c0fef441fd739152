"""Profiles of the server while a benchmark runs, and their summary in text.

``python -m bench --profile DIR`` attaches py-spy (``py-spy record --gil --format raw``) to the
iotvault server for each measured run and writes collapsed stacks to ``DIR/<case>-<run>.txt``;
the rates of a profiled run are a little lower than those of a plain run. Only samples of the
thread holding the GIL are kept: the server is bound by one core's worth of Python, and
without ``--gil`` a thread waiting for the GIL is counted in whatever line it waits at. ``python -m
bench.pyspy FILE [N]`` prints the N functions holding the most samples: "self" (the frame
on top of the stack) and "total" (anywhere on the stack), as BENCHMARKS.md quotes them. Open
the same file in speedscope or turn it into a flame graph with ``flamegraph.pl`` for the
picture.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Recorder:
    """``py-spy record`` of one process, from ``start()`` until ``stop()``."""

    def __init__(self, pid: int, out: Path, rate: int = 250, *, threads: bool = False) -> None:
        self.pid, self.out, self.rate, self.threads = pid, out, rate, threads
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self.proc = subprocess.Popen(
            [binary, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw"]
            + (["--idle", "--threads"] if self.threads else ["--gil"])
            + ["--nonblocking", "--output", str(self.out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: lines merged."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    for anchor in ("site-packages", "src", "lib"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor) :]
            break
    return f"{func} ({'/'.join(parts[-3:])})"


def summarize(path: Path, top: int = 15) -> str:
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            anywhere[f] += n
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples"]
    lines.append("  self:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("  total (on the stack):")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in anywhere.most_common(top * 2)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 15))
