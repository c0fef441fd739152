"""schemathesis against the API's own OpenAPI document, with valid credentials.

Every documented operation is called with generated, schema-valid input by an administrator who
also reads a device: no answer may be a 5xx, and every answer must match the documented status
codes, content types and schemas. The number of examples per operation is bounded so the suite
stays fast. (Operations are driven with hypothesis directly: schemathesis' pytest fixture
loader does not run under pytest 9.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from apifixture import build_api
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 25


def exercise(operation: schemathesis.APIOperation, headers: dict[str, str]) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


def test_every_operation_conforms_and_never_fails(tmp_path: Path) -> None:
    built = build_api(tmp_path)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", built.app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 20
        tested = []
        for operation in operations:
            if operation.path.endswith("/stream"):
                continue  # never ends; test_api.py::test_stream_delivers_new_events_only_to_readers
            exercise(operation, {"Authorization": f"Bearer {built.token('olga')}"})
            tested.append(f"{operation.method.upper()} {operation.path}")
        assert "GET /iotf/devices/{deviceId}" in tested
    finally:
        built.close()
