"""Property-based requests generated from the OpenAPI schema (schemathesis): no input causes a 5xx."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from app.api import Settings, create_app
from retrieval import build
from retrieval.encoder import Encoder


@pytest.fixture(scope="module")
def app(trained_dir, tmp_path_factory):
    index = tmp_path_factory.mktemp("schema-index")
    build.build(Encoder.load(trained_dir), build.DatasetSource("digits", "test", 8, 1), index)
    app = create_app(Settings(index=index, checkpoint=trained_dir), load_in_background=False)
    app.state.service.load()
    return app


def test_no_server_errors(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    statuses = []
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error])
            assert response.status_code < 500, (case.method, case.path, response.text)
            statuses.append(response.status_code)

        check()
    assert len(statuses) > 100 and {200, 422} <= set(statuses)
