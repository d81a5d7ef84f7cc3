"""The API key never reaches a log, and no request parameter makes the server load a model or
read a file."""

from __future__ import annotations

import builtins
import logging
from typing import Any

import pytest

import engine.loader
from server.context import ServerConfig
from tests.robustness.conftest import hear_uvicorn
from tests.server.conftest import MODEL, make_engine, serve

KEY = "sk-test-3f9a1c77e0b24d5e"
WRONG = "sk-wrong-8b1e0f6c2d"


def test_the_api_key_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert KEY not in repr(ServerConfig(model_name="m", api_key=KEY))
    caplog.set_level(logging.DEBUG)
    with (
        serve(make_engine(), api_key=KEY) as running,
        hear_uvicorn(caplog),
        running.http() as http,
    ):
        good = {"Authorization": f"Bearer {KEY}"}
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        assert http.post("/v1/completions", json=body, headers=good).status_code == 200
        assert http.post("/v1/completions", json=body | {"n": 0}, headers=good).status_code == 400
        assert http.get("/v1/models", headers=good).status_code == 200
        for headers in ({"Authorization": f"Bearer {WRONG}"}, {"Authorization": KEY}, {}):
            assert http.post("/v1/completions", json=body, headers=headers).status_code == 401
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.name.startswith("uvicorn") for r in server_side)  # the logs were heard
    for record in server_side:
        text = f"{record.getMessage()} {record.args!r} {record.__dict__!r}"
        assert KEY not in text and WRONG not in text, record.name


PROBES = ["/etc/passwd", "../../../../etc/passwd", "Qwen/Qwen2.5-0.5B", "smollm2-135m-instruct",
          "qwen2.5-coder", "file:///etc/passwd", "hf://gpt2"]  # fmt: skip


def test_no_parameter_loads_a_model_or_reads_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def forbidden(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(f"{name}{args}")
            raise AssertionError(f"the server called {name}")

        return call

    for name in ("load_model", "load_pair", "ensure_builtin", "_hub_snapshot"):
        monkeypatch.setattr(engine.loader, name, forbidden(name))
    opened: list[str] = []
    real_open = builtins.open

    def watched_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if any(probe.split("/")[-1] in str(file) for probe in PROBES):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", watched_open)
    with serve(make_engine()) as running, running.http() as http:
        for probe in PROBES:
            user = [{"role": "user", "content": "hi"}]
            answers = [
                http.post("/v1/completions", json={"model": probe, "prompt": "hi"}),
                http.post("/v1/chat/completions", json={"model": probe, "messages": user}),
                http.post("/tokenize", json={"model": probe, "prompt": "hi"}),
                http.post("/detokenize", json={"model": probe, "tokens": [5]}),
                http.get(f"/v1/models/{probe}"),
            ]
            for response in answers:
                assert response.status_code == 404, (probe, response.text)
                assert response.json()["error"]["code"] in ("model_not_found", None)
                assert "root:" not in response.text
        # Extra keys pass into the chat template as plain data, never as a path to load.
        tricky = {
            "messages": [{"role": "user", "content": "hi", "template": "/etc/passwd"}],
            "chat_template_kwargs": {"chat_template": "/etc/passwd"},
            "max_tokens": 2,
        }
        response = http.post("/v1/chat/completions", json=tricky)
        assert response.status_code in (200, 400) and "root:" not in response.text
        assert http.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert not calls and not opened
