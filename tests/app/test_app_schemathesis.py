"""Property-based run of schemathesis against the served OpenAPI schema: whatever the generator sends
to any operation (schema-valid and schema-invalid query, headers, multipart and JSON bodies), the server
never answers 5xx, never hangs, and its answers conform to the documented schema, status codes and
content types.

(schemathesis' lazy pytest loader, `schemathesis.pytest.from_fixture`, does not run under pytest 9
— it reads `request.node._nodeid` — so the operations are driven through hypothesis directly.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support.harness import API_KEY, Server

MAX_EXAMPLES = 25  # per operation


# Invalid data may also be refused with 413 (too many images / too large): a rejection, as the check wants.
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": [*NEGATIVE_DATA_REJECTION_EXPECTED_STATUSES, "413"]}}}
)


def operations(server: Server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", config=CONFIG)
    return [result.ok() for result in schema.get_all_operations()]


def _with_time_to_answer(case) -> None:
    """A valid X-Request-Timeout too short to decode an image in (the generator likes 5e-324 s) is answered
    504, as documented: a deadline that passed, not a server fault. Such a value becomes 30 s; invalid ones
    (not a number, <= 0, > 3600) are kept, so that their refusal is still checked."""
    for name in list(case.headers or {}):
        if name.lower() == "x-request-timeout":
            try:
                seconds = float(case.headers[name])
            except (TypeError, ValueError):
                continue
            if 0 < seconds < 1:
                case.headers[name] = "30"


def test_schemathesis_no_5xx(server: Server):
    ops = operations(server)
    labels = sorted(f"{op.method.upper()} {op.path}" for op in ops)
    assert {"POST /classify", "POST /detect", "POST /segment", "GET /models", "GET /readyz"} <= set(labels)
    failures = []
    for op in ops:

        @given(
            case=st.one_of(op.as_strategy(GenerationMode.POSITIVE), op.as_strategy(GenerationMode.NEGATIVE))
        )
        @settings(
            max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def run(case):
            _with_time_to_answer(case)
            # Every check but positive_data_acceptance: a schema-valid body may still hold bytes that are
            # no image (400/415), which the schema cannot express.
            case.call_and_validate(
                headers={"X-API-Key": API_KEY}, timeout=30, excluded_checks=[positive_data_acceptance]
            )

        try:
            run()
        except Exception as exc:  # collect every operation's failure, then fail once
            failures.append(f"{op.method.upper()} {op.path}: {exc}")
    if failures:
        pytest.fail("\n\n".join(failures))
