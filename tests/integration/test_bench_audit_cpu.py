"""``python -m bench.audit_cpu`` still measures: tiny counts, both databases, no figure judged."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import pg_admin_connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_audit_cpu_bench_prints_both_sides_and_its_chain_verifies(db: str) -> None:
    if db == "postgres":
        with pg_admin_connect() as conn:
            conn.execute("SELECT 1")
    tiny = ["--db", db, "--requests", "600", "--batch", "200", "--repeat", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "bench.audit_cpu", *tiny],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr  # it exits 1 when the chain it wrote does not verify
    number = r"\d+\.\d\d"
    assert re.search(
        rf"^{db}: loop best {number}, median {number} µs per request; "
        rf"writer best {number}, median {number} µs per record \(batches of 200\)$",
        done.stdout,
        re.MULTILINE,
    ), done.stdout
