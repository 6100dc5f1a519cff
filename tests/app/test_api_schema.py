"""Property-based requests generated from the OpenAPI schema (schemathesis), with the API key: no input causes a 5xx.

`MATVIT_FUZZ_EXAMPLES` sets the cases per operation (default 25); `MATVIT_FUZZ_REPORT=PATH` writes the
operations and status code counts there as JSON (see docs/results/api-fuzz.md).
"""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from app.api import Settings, create_app
from matvit import provenance
from retrieval import build
from retrieval.encoder import Encoder

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("MATVIT_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def app(trained_dir, tmp_path_factory):
    """A server on an index of its own (the fuzz may add and delete items)."""
    index = tmp_path_factory.mktemp("schema-index")
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "test", 8, 1), index)
    return create_app(Settings(index=index, checkpoint=trained_dir, api_key=KEY, metrics_need_key=True),
                      load_in_background=False)


def test_no_server_errors(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # runs the app's lifespan: loads the service
    assert app.state.service.retriever is not None
    operations = [result.ok() for result in schema.get_all_operations()]
    operations.sort(key=lambda op: op.method.upper() == "DELETE")  # deletes last: the other item calls find items
    assert len(operations) >= 11
    seen: Counter = Counter()  # (operation, status code) -> cases
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call(headers={"X-API-Key": KEY})
            case.validate_response(response, checks=[not_a_server_error])
            assert response.status_code < 500, (case.method, case.path, response.text)
            seen[case.operation.label, response.status_code] += 1

        check()
    total = Counter()
    per_operation: dict[str, dict[str, int]] = {}
    for (label, status), n in sorted(seen.items()):
        total[status] += n
        per_operation.setdefault(label, {})[str(status)] = n
    if os.environ.get("MATVIT_FUZZ_REPORT"):
        Path(os.environ["MATVIT_FUZZ_REPORT"]).write_text(json.dumps({
            **provenance.record(), "examples_per_operation": EXAMPLES, "operations": len(operations),
            "cases": total.total(), "status_counts": {str(k): v for k, v in sorted(total.items())},
            "per_operation": per_operation,
        }, indent=2))
    assert len(per_operation) == len(operations) and total.total() > 100
    assert {200, 404, 415, 422} <= set(total) and 401 not in total
    assert not any(status >= 500 for status in total)
