from __future__ import annotations

import math

import httpx

from engine.engine import Engine
from tests.server.conftest import MODEL, RunningServer, make_engine, reference_run, serve

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def spec_stats(payload: dict) -> dict:
    return payload["metrics"]["speculative_decoding"]


def assert_consistent(spec: dict, gamma: int = 4) -> None:
    histogram = spec["acceptance_histogram"]
    assert len(histogram) == gamma + 1 == spec["num_spec_tokens"] + 1
    assert sum(histogram) == spec["num_spec_steps"] > 0
    assert sum(j * c for j, c in enumerate(histogram)) == spec["num_accepted_draft_tokens"]
    assert spec["num_accepted_draft_tokens"] <= spec["num_draft_tokens"]
    rate = spec["num_accepted_draft_tokens"] / spec["num_draft_tokens"]
    assert math.isclose(spec["draft_acceptance_rate"], rate)
    mean = 1 + spec["num_accepted_draft_tokens"] / spec["num_spec_steps"]
    assert math.isclose(spec["mean_acceptance_length"], mean)


def test_completion_equals_the_engine_output(server: RunningServer, reference: Engine) -> None:
    result = server.client().completions.create(
        model=MODEL, prompt="hello world", max_tokens=12, **GREEDY
    )
    expected = reference_run(
        reference, "hello world", max_tokens=12, temperature=0, ignore_eos=True
    )
    assert result.object == "text_completion" and result.model == MODEL
    assert result.id.startswith("cmpl-") and result.created > 0
    [choice] = result.choices
    assert (choice.index, choice.text, choice.finish_reason) == (0, expected.text, "length")
    assert result.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    spec = spec_stats(result.model_extra)
    assert_consistent(spec)
    assert 0 < spec["draft_acceptance_rate"] < 1  # the tiny draft agrees only partly


def test_stream_matches_non_stream_and_ends_with_usage(server: RunningServer) -> None:
    client = server.client()
    full = client.completions.create(model=MODEL, prompt="the quick", max_tokens=40, **GREEDY)
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="the quick",
            max_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    *content, last = chunks
    assert all(len(c.choices) == 1 and c.usage is None for c in content)
    assert "".join(c.choices[0].text for c in content) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert last.choices == []
    assert last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens
    assert last.usage.completion_tokens == 40
    # Rounds emit several accepted tokens at once, so there are fewer chunks than tokens.
    assert len(content) < 40
    assert spec_stats(last.model_extra) == spec_stats(full.model_extra)


def test_sse_wire_format(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 8, "stream": True, "temperature": 0}
    with server.http() as http:
        response = http.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "\r" not in response.text
    events = response.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_continuous_usage_stats(server: RunningServer) -> None:
    stream = server.client().completions.create(
        model=MODEL,
        prompt="hello",
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        **GREEDY,
    )
    counts = [chunk.usage.completion_tokens for chunk in stream]
    assert counts == sorted(counts) and counts[-1] == 20 and len(counts) >= 2


def test_stop_string_cuts_the_text(server: RunningServer, reference: Engine) -> None:
    text = reference_run(reference, "hello", max_tokens=40, temperature=0, ignore_eos=True).text
    start = next(
        i for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2] and text[i] != " "
    )
    stop = text[start : start + 2]
    client = server.client()
    result = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=40, stop=[stop, "never appears"], **GREEDY
    )
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].text == text[: text.index(stop)]
    streamed = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=40, stop=stop, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_seed_reproducible_and_n_choices(server: RunningServer, reference: Engine) -> None:
    client = server.client()

    def sample(seed: int, n: int = 1) -> list[str]:
        result = client.completions.create(
            model=MODEL, prompt="hello", max_tokens=16, temperature=1.0, seed=seed, n=n,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert [c.index for c in result.choices] == list(range(n))
        assert result.usage.prompt_tokens == len(reference.tokenize("hello"))
        assert result.usage.completion_tokens == 16 * n
        return [c.text for c in result.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    three = sample(7, n=3)
    # Choice i is sampled with seed + i: reproducible, yet the choices differ.
    for i, text in enumerate(three):
        params = {"max_tokens": 16, "temperature": 1.0, "seed": 7 + i, "ignore_eos": True}
        assert text == reference_run(reference, "hello", **params).text
    assert len(set(three)) == 3


def test_penalties_and_logit_bias_reach_the_engine(
    server: RunningServer, reference: Engine
) -> None:
    client = server.client()
    token = reference.tokenize("hello")[-1]
    settings = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "logit_bias": {str(token): 3.0}}
    result = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=24, temperature=0, seed=3,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.4}, **settings,
    )  # fmt: skip
    params = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    expected = reference_run(
        reference, "hello", **params, presence_penalty=1.5, frequency_penalty=0.5,
        repetition_penalty=1.4, logit_bias={token: 3.0},
    )  # fmt: skip
    assert result.choices[0].text == expected.text
    assert expected.text != reference_run(reference, "hello", **params).text
    # The chat route takes the same fields; +100 makes that token every greedy choice.
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0,
        logit_bias={str(token): 100}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert chat.choices[0].message.content == reference.tokenizer.decode([token] * 6)


def test_a_predicted_output_changes_nothing_but_is_counted(
    server: RunningServer, reference: Engine
) -> None:
    client = server.client()
    messages = [{"role": "user", "content": "hi there"}]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    text = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # only with a prediction
    predicted = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0,
        prediction={"type": "content", "content": text}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert predicted.choices[0].message.content == text
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 12
    assert details.rejected_prediction_tokens is not None
    # As a list of text parts, on the completions route too.
    completion = client.completions.create(
        model=MODEL, prompt="hello", max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True, "prediction": {"type": "content", "content": [
            {"type": "text", "text": "nothing like it"}]}},
    )  # fmt: skip
    expected = reference_run(reference, "hello", max_tokens=16, temperature=0, ignore_eos=True)
    assert completion.choices[0].text == expected.text
    assert completion.usage.completion_tokens_details is not None


def test_min_p_reaches_the_engine(server: RunningServer, reference: Engine) -> None:
    params = {"max_tokens": 24, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    result = server.client().completions.create(
        model=MODEL, prompt="hello", max_tokens=24, temperature=1.0, seed=5,
        extra_body={"ignore_eos": True, "min_p": 0.5},
    )  # fmt: skip
    expected = reference_run(reference, "hello", **params, min_p=0.5)
    assert result.choices[0].text == expected.text
    assert expected.text != reference_run(reference, "hello", **params).text


def test_min_tokens_holds_back_the_end(reference: Engine) -> None:
    # A server whose target ends text with a token it emits early on.
    plain = reference_run(reference, "hello", max_tokens=24, temperature=0, ignore_eos=True)
    eos = plain.token_ids[2]
    with serve(make_engine(eos_token_id=eos)) as running:
        client = running.client()
        ended = client.completions.create(model=MODEL, prompt="hello", max_tokens=24, temperature=0)
        assert ended.choices[0].finish_reason == "stop"
        assert ended.usage.completion_tokens <= 3
        held = client.completions.create(
            model=MODEL, prompt="hello", max_tokens=24, temperature=0,
            extra_body={"min_tokens": 10},
        )  # fmt: skip
        assert held.usage.completion_tokens >= 10


def test_several_token_prompts_answered_by_index(server: RunningServer, reference: Engine) -> None:
    prompts = [[5, 6, 7, 8], [40, 41]]
    body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0}
    with server.http() as http:
        result = http.post("/v1/completions", json={**body, "ignore_eos": True}).json()
    choices = sorted(result["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for index, choice in enumerate(choices):
        expected = reference_run(
            reference, prompts[index // 2], max_tokens=6, temperature=0, ignore_eos=True
        )
        assert choice["text"] == expected.text
    assert result["usage"]["prompt_tokens"] == 6  # each prompt once, whatever n is


def test_the_choices_of_one_prompt_compute_it_once(
    server: RunningServer, reference: Engine
) -> None:
    prompt = list(range(91, 111))  # ids no other test sends first: no free slot holds them
    body = {"model": MODEL, "prompt": prompt, "n": 3, "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    cached_total = ("specserve:prompt_tokens_cached_total", ())
    before = server.metrics()[cached_total]
    with server.http() as http:
        result = http.post("/v1/completions", json=body).json()
    expected = reference_run(reference, prompt, max_tokens=5, temperature=0, ignore_eos=True)
    assert [c["text"] for c in result["choices"]] == [expected.text] * 3
    # The prompt, counted once, was computed once for this request...
    assert result["usage"]["prompt_tokens"] == len(prompt)
    assert result["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # ... by one choice: the other two copied its K/V (all but the last token, which each
    # choice's first round feeds).
    assert server.metrics()[cached_total] - before == 2 * (len(prompt) - 1)


def test_a_seeded_sample_is_what_target_only_sampling_gives(server: RunningServer) -> None:
    body = {"model": MODEL, "prompt": [7, 8, 9, 10], "max_tokens": 16, "temperature": 1.0,
            "seed": 5, "ignore_eos": True}  # fmt: skip
    with server.http() as http:
        texts = [http.post("/v1/completions", json=body).json()["choices"][0]["text"]]
        # Again, batched beside another prompt: other rows and other drafts change nothing.
        crowd = http.post("/v1/completions", json={**body, "prompt": [[1, 2, 3], [7, 8, 9, 10]]})
        texts.append(sorted(crowd.json()["choices"], key=lambda c: c["index"])[1]["text"])
    plain = make_engine(gamma=0)
    expected = reference_run(
        plain, [7, 8, 9, 10], max_tokens=16, temperature=1.0, seed=5, ignore_eos=True
    )
    assert texts == [expected.text] * 2


def test_echo_with_logprobs_as_lm_eval_sends_it(server: RunningServer, reference: Engine) -> None:
    """lm-evaluation-harness loglikelihood requests: token ids, echo, 1 generated token."""
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    with server.http() as http:
        result = http.post("/v1/completions", json=body).json()
    choices = sorted(result["choices"], key=lambda c: c["index"])
    for choice, prompt in zip(choices, prompts, strict=True):
        expected = reference_run(
            reference, prompt, max_tokens=1, temperature=0, logprobs=1, prompt_logprobs=1
        )
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(prompt) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
        want = [e.logprob for e in expected.prompt_logprobs[1:]] + [expected.logprobs[0].logprob]
        got = logprobs["token_logprobs"][1:]
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(got, want, strict=True))
        assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])
        # lm-eval's greedy check: the generated (greedy) token is the top-1 alternative.
        assert logprobs["token_logprobs"][-1] == max(logprobs["top_logprobs"][-1].values())
        assert choice["text"].endswith(expected.text)


def test_echo_string_prompt_through_the_sdk(server: RunningServer) -> None:
    result = server.client().completions.create(
        model=MODEL, prompt="hello world", echo=True, logprobs=2, max_tokens=3, **GREEDY
    )
    choice = result.choices[0]
    assert choice.text.startswith("hello world")
    assert len(choice.logprobs.tokens) == result.usage.prompt_tokens + 3
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs[1:])


def test_max_tokens_defaults(server: RunningServer) -> None:
    with server.http() as http:
        default = http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "hello", "temperature": 0, "ignore_eos": True},
        ).json()
        assert default["usage"]["completion_tokens"] == 16  # OpenAI's default
        # A null max_tokens, or an implicit default that does not fit, means "what fits".
        prompt = list(range(3, 248))  # 245 tokens: 11 fit
        for extra in ({"max_tokens": None}, {}):
            fill = http.post(
                "/v1/completions",
                json={"model": MODEL, "prompt": prompt, "temperature": 0, "ignore_eos": True}
                | extra,
            ).json()
            assert fill["usage"]["completion_tokens"] == 256 - len(prompt)


def test_ignore_eos_is_honoured(reference: Engine) -> None:
    tokens = reference_run(reference, "hello", max_tokens=12, temperature=0, ignore_eos=True)
    eos = tokens.token_ids[4]
    stop_at = tokens.token_ids.index(eos) + 1
    with serve(make_engine(eos_token_id=eos)) as running:
        client = running.client()
        stopped = client.completions.create(
            model=MODEL, prompt="hello", max_tokens=12, temperature=0
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.usage.completion_tokens == stop_at  # the eos token counts
        ignored = client.completions.create(model=MODEL, prompt="hello", max_tokens=12, **GREEDY)
        assert ignored.choices[0].finish_reason == "length"
        assert ignored.usage.completion_tokens == 12


def test_unknown_fields_are_ignored(server: RunningServer) -> None:
    body = {
        "model": MODEL,
        "prompt": "hi",
        "max_tokens": 2,
        "foo": {"x": 1},
        "user": "u1",
        "stream_options": {"include_usage": True},
        "presence_penalty": 0,
    }
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 2


def test_gamma_field_lowers_speculation_for_one_request(server: RunningServer) -> None:
    def run(**extra: int) -> dict:
        body = {"model": MODEL, "prompt": "hello world", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, **extra}  # fmt: skip
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=30).json()

    default, lowered, off = run(), run(gamma=1), run(gamma=0)
    spec = [r["metrics"]["speculative_decoding"] for r in (default, lowered, off)]
    # The server drafts 4 per round; this request at most 1, or none at all. Same text: lossless.
    assert spec[0]["num_draft_tokens"] > spec[0]["num_spec_steps"]
    assert spec[1]["num_draft_tokens"] == spec[1]["num_spec_steps"] > 0
    assert spec[2]["num_draft_tokens"] == 0
    assert default["choices"][0]["text"] == lowered["choices"][0]["text"]
    assert default["choices"][0]["text"] == off["choices"][0]["text"]
    # Asking for more than the server's gamma is not an error, and drafts no more than it.
    higher = run(gamma=16)["metrics"]["speculative_decoding"]
    assert higher["num_draft_tokens"] <= 4 * higher["num_spec_steps"]
