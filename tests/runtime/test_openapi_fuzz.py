"""The OpenAPI schema tells the truth: schemathesis generates bodies from /openapi.json and checks that the app
never answers 5xx and that every answer (status, content type, body) is one the schema documents."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from prism_moe.runtime.engine import Engine
from prism_moe.runtime.http_api import create_app
from prism_moe.runtime.metrics import ServerMetrics


@pytest.fixture(scope="module")
def app(tiny_dir) -> Iterator:
    # A short context keeps every generated request quick (chat without max_tokens fills what is left).
    with Engine.from_pretrained(tiny_dir, device="cpu", dtype="float32", kv_cache_tokens=1024,
                                max_model_len=24) as engine:
        yield create_app(engine, ServerMetrics(), "tiny-mixtral")


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schema_documents_bodies_and_errors(api_schema) -> None:
    raw = api_schema.raw_schema
    for path in ("/v1/completions", "/v1/chat/completions"):
        op = raw["paths"][path]["post"]
        assert "requestBody" in op
        assert {"200", "400", "401", "404", "500", "503"} <= set(op["responses"]) and "422" not in op["responses"]
        assert "text/event-stream" in op["responses"]["200"]["content"]
    fields = raw["components"]["schemas"]["CompletionRequest"]["properties"]
    for name in ("logprobs", "echo", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
                 "logit_bias", "seed", "stop", "stream_options", "top_k"):
        assert name in fields, name
    assert {"logprobs", "top_logprobs", "max_completion_tokens"} <= set(raw["components"]["schemas"]["ChatRequest"]["properties"])


@pytest.mark.timeout(600)
def test_fuzz_no_5xx_and_schema_conformance(api_schema) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for op in operations:  # at most 50 generated cases per operation
        @given(case=op.as_strategy())
        @settings(max_examples=50, deadline=timedelta(seconds=30), database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.data_too_large])
        def check(case) -> None:
            case.call_and_validate(checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                                           response_schema_conformance], timeout=60)

        check()
