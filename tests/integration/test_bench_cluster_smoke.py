"""The several-nodes benchmark still works: ``python -m bench.cluster --smoke`` prints every figure.

Tiny counts (this checks the harness, not the speed): the ack-only baseline and one, then two,
ingest nodes on a shared subscription with every event stored exactly once; the fan-out latency
from a device to an SSE client on another node beside a plain MQTT subscriber's.
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
    pytest.mark.timeout(400),
]

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"[\d,]+(?:\.\d+)?"


def test_the_cluster_smoke_benchmark_prints_every_figure_beside_its_baseline() -> None:
    require_mosquitto()
    with pg_admin_connect() as conn:
        conn.execute("SELECT 1")
    result = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=380,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, f"{out}\n{result.stderr}"
    assert "Traceback" not in out + result.stderr
    for nodes in ("1 node", "2 nodes"):
        m = re.search(
            rf"^cluster ingest {nodes}: ({NUMBER}) events/s durable \| ack-only baseline ({NUMBER}) events/s "
            rf"\| ratio (\d+\.\d\d) \| stored (\d+)/(\d+)$",
            out,
            re.MULTILINE,
        )
        assert m is not None, out
        assert int(m[4]) == int(m[5]) > 0, "every event stored exactly once"
    assert re.search(r"^cluster ingest scaling: two nodes / one node \d+\.\d\d$", out, re.MULTILINE), out
    m = re.search(
        rf"^cluster fan-out via PostgreSQL NOTIFY: SSE on API node A, ingested by node B, 50 events: "
        rf"p50 ({NUMBER}) ms \| p99 ({NUMBER}) ms \| max {NUMBER} ms \| plain MQTT subscriber baseline "
        rf"p50 ({NUMBER}) ms \| p99 ({NUMBER}) ms$",
        out,
        re.MULTILINE,
    )
    assert m is not None, out
    assert 0 < float(m[1]) <= float(m[2])
