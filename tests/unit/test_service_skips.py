"""The one skip-or-fail rule for missing services: a skip outside CI, a failure in it."""

from __future__ import annotations

import pytest
from _pytest.outcomes import Failed, Skipped
from helpers import is_ci, unavailable


def test_a_missing_service_fails_under_ci() -> None:
    with pytest.raises(Failed, match="required service unavailable under CI: no broker"):
        unavailable("no broker", in_ci=True)


def test_a_missing_service_is_a_loud_skip_elsewhere() -> None:
    with pytest.raises(Skipped, match="SERVICE UNAVAILABLE: no broker"):
        unavailable("no broker", in_ci=False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("True", True), ("1", True), ("yes", True), ("", False), ("0", False), (None, False)],
)
def test_ci_is_recognised_as_ci_systems_set_it(value: str | None, expected: bool) -> None:
    assert is_ci(value) is expected
