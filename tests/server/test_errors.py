"""Bad requests get OpenAI's error JSON with the right status and never reach the engine."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import MODEL, RunningServer, make_engine, serve

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

CASES = [  # (route, body, status, words the message must contain)
    (COMPLETIONS, b"{not json", 400, "malformed JSON"),
    (COMPLETIONS, [1, 2], 400, "JSON object"),
    (COMPLETIONS, {"model": MODEL}, 400, "prompt: Field required"),
    (COMPLETIONS, {"model": "gpt-4", "prompt": "hi"}, 404, "'gpt-4' does not exist"),
    (COMPLETIONS, {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "hi", "top_k": -2}, 400, "top_k"),
    (COMPLETIONS, {"prompt": "hi", "min_p": 1.5}, 400, "min_p"),
    (CHAT, {"messages": USER, "prediction": {"type": "file", "content": "x"}}, 400, "prediction"),
    (COMPLETIONS, {"prompt": "hi", "gamma": -1}, 400, "gamma"),
    (COMPLETIONS, {"prompt": "hi", "gamma": 1.5}, 400, "gamma"),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n: "),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": False}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    (COMPLETIONS, {"prompt": "hi", "stop": ""}, 400, "non-empty"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [999]}, 400, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    (COMPLETIONS, {"prompt": "hi", "frequency_penalty": "1"}, 400, "frequency_penalty"),
    (COMPLETIONS, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    (COMPLETIONS, {"prompt": "hi", "min_tokens": 17}, 400, "min_tokens must be between 0"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"a": 1}}, 400, "must be token ids"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"320": 1}}, 400, "vocabulary size 320"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (COMPLETIONS, {"prompt": [1, "a"]}, 400, "a list of token ids"),
    (COMPLETIONS, {"prompt": []}, 400, "must not be empty"),
    (COMPLETIONS, {"prompt": ""}, 400, "is empty"),
    (COMPLETIONS, {"prompt": [[1, 2], []]}, 400, "prompt 1 is empty"),
    (COMPLETIONS, {"prompt": [5, 320]}, 400, "outside [0, 320)"),
    (COMPLETIONS, {"prompt": [5] * 256}, 400, "shorten the prompt"),
    (COMPLETIONS, {"prompt": [5] * 10, "max_tokens": 250}, 400, "lower max_tokens to 246"),
    (COMPLETIONS, {"prompt": [5], "max_tokens": 300}, 400, "the prompt has 1 token and"),
    (COMPLETIONS, {"prompt": "hi", "n": 20}, 400, "at most 12"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "image_url"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, 400, "logprobs set to true"),
    (CHAT, {"messages": USER, "max_completion_tokens": 999}, 400, "max_completion_tokens to"),
    (CHAT, {"messages": USER, "model": "other"}, 404, "does not exist"),
    ("/v1/nothing", {}, 404, "no route"),
    ("/tokenize", {"prompt": "x", "messages": USER}, 400, "exactly one"),
    ("/detokenize", {"tokens": [400]}, 400, "vocabulary size"),
]


def _post(server: RunningServer, route: str, body: object) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(
            server.url + route, content=body, headers={"content-type": "application/json"}
        )
    return httpx.post(server.url + route, json=body, timeout=30)


@pytest.mark.parametrize(("route", "body", "status", "words"), CASES)
def test_bad_requests_get_openai_errors(
    server: RunningServer, route: str, body: object, status: int, words: str
) -> None:
    before = server.metrics()[("specserve:prompt_tokens_total", ())]
    response = _post(server, route, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["type"] == ("invalid_request_error" if status in (400, 404) else error["type"])
    # Nothing reached the engine: it prefilled no prompt token for a rejected request.
    assert server.metrics()[("specserve:prompt_tokens_total", ())] == before
    assert server.context.core.num_in_flight == 0


def test_sdk_raises_the_matching_exceptions(server: RunningServer) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="nope", prompt="hi")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt="hi", temperature=3)


def test_chat_without_a_template_is_a_client_error() -> None:
    with serve(make_engine(chat_template=None)) as running:
        response = httpx.post(f"{running.url}{CHAT}", json={"messages": USER}, timeout=30)
        assert response.status_code == 400
        assert "no chat template" in response.json()["error"]["message"]


def test_api_key_guards_every_v1_route() -> None:
    with serve(make_engine(), api_key="s3cret") as running:
        url = running.url
        for path in ("/v1/models", "/v1/models/tiny"):
            missing = httpx.get(url + path)
            assert missing.status_code == 401
            assert missing.headers["www-authenticate"] == "Bearer"
            assert missing.json()["error"]["code"] == "invalid_api_key"
        wrong = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "hi"},
                           headers={"Authorization": "Bearer s3cre"})  # fmt: skip
        assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").chat.completions.create(model=MODEL, messages=USER)
        ok = running.client(api_key="s3cret").completions.create(
            model=MODEL, prompt="hi", max_tokens=2
        )
        assert ok.usage.completion_tokens >= 1
        # Operations and tokenizer routes stay open, as in vLLM (probes and lm-eval need them).
        for path in ("/health", "/ready", "/metrics", "/tokenizer_info"):
            assert httpx.get(url + path).status_code == 200


def test_without_api_key_v1_is_open(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/v1/models").status_code == 200
