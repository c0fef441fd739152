"""The benchmark harness still works: ``python -m bench --smoke`` prints every figure and ratio.

Tiny counts, so this checks the harness (brokers, databases, publishers, baselines, the API
load generator, the crypto timing and the report), not the speed: no figure is compared with a
target here. It covers both brokers and both databases in two cases: SQLite with Mosquitto and
PostgreSQL with the embedded broker, each with the API benchmark.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import pg_admin_connect, require_mosquitto

pytestmark = [
    pytest.mark.integration,
    pytest.mark.postgres,
    pytest.mark.mosquitto,
    pytest.mark.slow,
    pytest.mark.timeout(240),
]

ROOT = Path(__file__).resolve().parents[2]
CASES = ("sqlite/mosquitto", "postgres/embedded")
NUMBER = r"[\d,]+(?:\.\d+)?"


def _services() -> None:
    require_mosquitto()
    with pg_admin_connect() as conn:
        conn.execute("SELECT 1")


def _line(out: str, pattern: str) -> re.Match[str]:
    match = re.search(pattern, out, re.MULTILINE)
    assert match is not None, f"no line matching {pattern!r} in:\n{out}"
    return match


def test_the_smoke_benchmark_prints_every_figure_beside_its_baseline() -> None:
    _services()
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--cases", ",".join(CASES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    assert "Traceback" not in out + result.stderr
    _line(out, r"^== machine: \d+ cores, .+ RAM")

    for case in CASES:
        ingest = _line(
            out,
            rf"^ingest {case}: ({NUMBER}) events/s durable \| ack-only baseline ({NUMBER}) events/s "
            rf"\| ratio (\d+\.\d\d) \| stored (\d+)/(\d+) \| peak RSS (\d+) MiB",
        )
        stored, published = int(ingest[4]), int(ingest[5])
        assert stored == published > 0, "the benchmark must store exactly what was published"
        assert int(ingest[6]) > 0
        figure = rf"p50 ({NUMBER}) ms \| p99 ({NUMBER}) ms \| ({NUMBER}) req/s \| (\d+)/(\d+) 2xx"
        hello = _line(out, rf"^api {case} hello: {figure}")
        assert int(hello[4]) == int(hello[5]) > 0, "the hello baseline must answer"
        for endpoint in ("healthz", "last-50", r"last-50 \(idle\)"):
            api = _line(
                out,
                rf"^api {case} {endpoint}: {figure} \| ingest meanwhile {NUMBER} events/s "
                rf"\| hello baseline ({NUMBER}) req/s, p99 ({NUMBER}) ms -> ratio (\d+\.\d\d\d)$",
            )
            assert int(api[4]) == int(api[5]) > 0, f"{endpoint}: every answer must be a 2xx"
            ratio, rps, base = float(api[8]), float(api[3].replace(",", "")), float(api[6].replace(",", ""))
            assert ratio == pytest.approx(rps / base, abs=0.002), "the ratio: this figure / the baseline"
        _line(out, rf"^api {case} ratio: throughput last-50/healthz (\d+\.\d\d) \| p99 last-50/healthz ")

    # beside each ingest figure: the server's CPU per event and every process's CPU
    for pattern in (
        r"^    server CPU per event: iotvault \d+ µs \| ack-only \d+ µs$",
        r"^    cpu iotvault run: iotvault \d+%.*\(machine \d+% of \d+%\)$",
        r"^    cpu baseline run: ack-only \d+%.*\(machine \d+% of \d+%\)$",
    ):
        assert len(re.findall(pattern, out, re.MULTILINE)) == len(CASES), pattern

    _line(
        out, rf"^crypto: iotvault ({NUMBER}) µs/event \| raw AESGCM ({NUMBER}) µs/event \| ratio (\d+\.\d\d)"
    )
    _line(out, r"^== targets: ")
