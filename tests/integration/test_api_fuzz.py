"""Property-based API test: schemathesis generates requests from the OpenAPI document and sends
them to the running service over HTTP. No response may be a 5xx, and each must match its schema.

(schemathesis's pytest plugin does not run under pytest 9 yet, so the operations are driven
here with Hypothesis directly: the same strategies and checks.)"""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]


def test_no_server_errors_and_documented_responses(stack_factory):
    stack = stack_factory(rate_limit="100000/minute")
    stack.add_worker("predict")
    stack.wait_ready()
    schema = schemathesis.openapi.from_url(stack.url + "/api/v1/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 8
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(base_url=stack.url, checks=CHECKS)

        check()
