"""The fault-injection suite, short version (``make faults`` runs the long one): bench/faults.py.

Numbered QoS 1 events from several devices while iotvault is SIGKILLed and SIGTERMed with
live streams open, Mosquitto restarts, PostgreSQL stops, table locks are held across commits
and the SQLite disk fills up; API reads throughout. Nothing acknowledged may be lost, nothing
stored twice, nothing undecryptable, no 5xx but 503 with Retry-After, no hang.
"""

from __future__ import annotations

import pytest
from bench.faults import SHORT, ServiceMissingError, run
from helpers import unavailable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.mark.parametrize("scenario", ["external", "embedded"])
def test_short_fault_run_loses_and_duplicates_nothing(scenario: str) -> None:
    try:
        (report,) = run(SHORT, [scenario])
    except ServiceMissingError as exc:
        unavailable(str(exc))
    report.print()
    assert report.ok, f"{report.problems[:5]}"
    assert report.acknowledged == report.published > 0
    assert report.stored == report.acknowledged + report.broker_resends
    assert report.duplicates == report.lost == report.undecryptable == 0
    assert report.api.get("read 200", 0) > 0  # the API answered reads between the faults
    states = [line.split("s ", 1)[1] for line in report.readiness]
    assert any(s.startswith("not ready") for s in states), "readiness never reflected a fault"
    assert states[-1] == "ready"
