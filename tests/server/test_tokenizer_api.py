"""Models list, probes, and vLLM's tokenizer endpoints as lm-evaluation-harness uses them."""

from __future__ import annotations

import httpx

from engine.engine import Engine
from tests.server.conftest import MODEL, RunningServer


def test_models_list_shows_the_draft(server: RunningServer) -> None:
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL]
    card = models[0].model_extra
    assert card["speculative_decoding"] == {
        "draft_model": "tiny-draft",
        "num_speculative_tokens": 4,
    }
    assert card["max_model_len"] == 256
    assert server.client().models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/v1/models/other").status_code == 404


def test_probes(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}


def test_tokenize_and_detokenize_round_trip(server: RunningServer, reference: Engine) -> None:
    tokenizer = reference.tokenizer
    with server.http() as http:
        # lm-eval's probe for remote tokenizer support, then its encode/decode calls.
        info = http.get("/tokenizer_info").json()
        assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>"
        assert info["chat_template"] == tokenizer.chat_template
        assert info["model_max_length"] == 256
        tokens = http.post("/tokenize", json={"prompt": "hello world", "add_special_tokens": False})
        ids = tokens.json()["tokens"]
        assert ids == tokenizer("hello world", add_special_tokens=False).input_ids
        assert tokens.json()["count"] == len(ids) and tokens.json()["max_model_len"] == 256
        assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": "hello world"}
        eos = http.post("/tokenize", json={"prompt": "</s>", "add_special_tokens": False}).json()
        assert eos["tokens"] == [tokenizer.eos_token_id]
        strs = http.post("/tokenize", json={"prompt": "hello", "return_token_strs": True}).json()
        assert "".join(strs["token_strs"]) == "hello"


def test_tokenize_messages_uses_the_chat_template(server: RunningServer, reference: Engine) -> None:
    messages = [{"role": "user", "content": "hello"}]
    text = reference.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    expected = reference.tokenizer(text, add_special_tokens=False).input_ids
    response = httpx.post(f"{server.url}/tokenize", json={"messages": messages})
    assert response.json()["tokens"] == expected


def test_tools_without_messages_are_refused(server: RunningServer) -> None:
    tool = {"type": "function", "function": {"name": "f"}}
    response = httpx.post(f"{server.url}/tokenize", json={"prompt": "hi", "tools": [tool]})
    assert response.status_code == 400
    assert "send them with messages" in response.json()["error"]["message"]
