"""Request limits: an oversized body or parameter is refused before it costs anything."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from server.context import ServerConfig
from tests.robustness.conftest import drained
from tests.server.conftest import MODEL, RunningServer, make_engine, serve

LIMITS = {"max_body_bytes": 2048, "max_n": 2, "max_stop": 3, "max_stop_chars": 8}


@pytest.fixture(scope="module")
def limited() -> Iterator[RunningServer]:
    with serve(make_engine(max_slots=4, max_len=64), max_queue=8, **LIMITS) as running:
        yield running


def _post(running: RunningServer, body: dict, route: str = "/v1/completions") -> httpx.Response:
    return running.http().post(route, json=body)


def test_body_over_the_limit_is_413(limited: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "x" * 4096, "max_tokens": 1}
    declared = _post(limited, body)
    assert declared.status_code == 413
    assert declared.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must count the bytes
        data = json.dumps(body).encode()
        for i in range(0, len(data), 512):
            yield data[i : i + 512]

    chunked = limited.http().post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert chunked.status_code == 413
    for route in ("/tokenize", "/v1/chat/completions"):
        assert _post(limited, {"prompt": "y" * 4096}, route).status_code == 413
    # Just under the limit is still served, streamed or not.
    small = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert _post(limited, small).status_code == 200
    with limited.http().stream("POST", "/v1/completions", json=small | {"stream": True}) as r:
        assert r.status_code == 200 and "[DONE]" in r.read().decode()


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"n": 3}, "n", "at most 2"),
        ({"stop": ["a", "b", "c", "d"]}, "stop", "at most 3 strings"),
        ({"stop": "abcdefghi"}, "stop", "at most 8 characters"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"max_tokens": 64}, "max_tokens", "lower max_tokens"),
        ({"prompt": [5] * 64}, "prompt", "shorten the prompt"),
    ],
)
def test_parameters_over_their_limit_are_400(
    limited: RunningServer, extra: dict, param: str, words: str
) -> None:
    response = _post(limited, {"model": MODEL, "prompt": "hi", "max_tokens": 2} | extra)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    if param in ("n", "stop"):  # the chat route checks the same limits
        assert _post(limited, chat | extra, "/v1/chat/completions").status_code == 400
    assert drained(limited)


def test_limits_are_validated_and_documented(limited: RunningServer) -> None:
    with pytest.raises(ValueError, match="max_n"):
        ServerConfig(model_name="m", max_n=0)
    schemas = limited.http().get("/openapi.json").json()["components"]["schemas"]
    props = schemas["CompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1, "maximum": 2} in props["n"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": 63} in props["max_tokens"]["anyOf"]
    stop = json.dumps(props["stop"])
    assert '"maxItems": 3' in stop and '"maxLength": 8' in stop
