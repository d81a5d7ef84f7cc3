"""Schemathesis against the real server's /openapi.json: every route, every built-in check.

Positive cases (data the document allows) and negative ones (data it forbids) go to every
operation; each response must be documented (status, content type, headers, body schema), no
response may be a 5xx, forbidden data must be refused, allowed data accepted. Bounded: a fixed
number of derandomized examples per operation and mode, no shrinking.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest

from tests.server.conftest import make_engine, serve

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

ROUTES = {"GET /health", "GET /ready", "GET /metrics", "GET /v1/models",
          "GET /v1/models/{model_id}", "POST /v1/completions", "POST /v1/chat/completions",
          "POST /tokenize", "POST /detokenize", "GET /tokenizer_info"}  # fmt: skip
EXAMPLES = 25
KEY = "fuzz-key"  # the second run: every /v1 route documented as and checked for Bearer auth
MODES = ("positive", "negative")
BUDGET_S = 90.0  # the whole run; a bound, not a target

# Allowed data may still get a 400 when fields are fine alone but not together (prompt plus
# max_tokens over the context, n times the prompts over the capacity): JSON Schema cannot say it.
_CONFIG = {
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "404"]}},
}


def _run_operation(
    operation,  # noqa: ANN001 - schemathesis APIOperation
    mode,  # noqa: ANN001 - schemathesis GenerationMode
    url: str,
    failures: list[str],
    calls: Counter,
    headers: dict[str, str],
    examples: int,
) -> None:
    settings = hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )

    @settings
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def check(case) -> None:  # noqa: ANN001
        calls[operation.label, mode.value] += 1
        case.call_and_validate(base_url=url, headers=headers, timeout=30)

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        pass  # nothing about this operation can be made invalid (a GET without parameters)
    except Exception as exc:  # noqa: BLE001 - collect every operation's failure, then report
        failures.append(f"{operation.label} [{mode.value}]: {exc}")


@pytest.mark.parametrize(("api_key", "examples"), [(None, EXAMPLES), (KEY, EXAMPLES // 2)])
def test_every_route_matches_its_document(api_key: str | None, examples: int) -> None:
    started = time.monotonic()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    engine = make_engine(max_slots=2, max_len=64)
    with serve(engine, max_queue=2, api_key=api_key) as running:
        document = httpx.get(f"{running.url}/openapi.json").json()
        config = schemathesis.Config.from_dict(_CONFIG)
        schema = schemathesis.openapi.from_dict(document, config=config)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= ROUTES  # every route is in the document
        failures: list[str] = []
        calls: Counter = Counter()
        for operation in operations:
            for mode in schemathesis.GenerationMode:
                _run_operation(operation, mode, running.url, failures, calls, headers, examples)
        assert not failures, "\n\n".join(failures)
        # Really fuzzed: every operation got data, and the POST bodies many variants of both kinds.
        assert all(calls[label, "positive"] for label in ROUTES), calls
        posts = [label for label in ROUTES if label.startswith("POST")]
        assert all(calls[label, mode] >= examples // 2 for label in posts for mode in MODES)
    assert time.monotonic() - started < BUDGET_S
