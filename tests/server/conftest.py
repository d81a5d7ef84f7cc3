"""Runs the real server (uvicorn on a free port) over tiny random models."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from transformers import PreTrainedTokenizerFast

from engine.config import EngineConfig, SamplingParams
from engine.engine import Completion, Engine
from server.app import create_app
from server.context import ServerConfig, ServerContext
from tests.engine.conftest import build_tokenizer as build_bpe_tokenizer
from tests.engine.conftest import perturbed, tiny_model

MODEL = "tiny"
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, say hello to the user and the assistant",
    "def f(x): return x + 1",
]


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    fast = build_bpe_tokenizer(_CORPUS)
    fast.chat_template = chat_template
    return fast


def make_engine(
    gamma: int = 4,
    max_slots: int = 4,
    max_len: int = 256,
    chat_template: str | None = CHAT_TEMPLATE,
    step_delay: float = 0.0,
    eos_token_id: int | None = None,
) -> Engine:
    """A llama-shaped target with a draft that agrees only partly (so rounds both accept and
    reject). ``step_delay`` makes every step sleep first, standing in for a big model;
    ``eos_token_id`` makes the target end text with that token."""
    target = tiny_model("llama", seed=0)
    draft = perturbed(target, 0.1) if gamma else None
    if eos_token_id is not None:
        target.generation_config.eos_token_id = eos_token_id
    config = EngineConfig(gamma=gamma, max_slots=max_slots, max_len=max_len)
    engine = Engine(target, draft, config, build_tokenizer(chat_template))
    if step_delay:
        real_step = engine.step

        def slow_step() -> list:
            time.sleep(step_delay)
            return real_step()

        engine.step = slow_step  # type: ignore[method-assign]
    return engine


def hold_steps(engine: Engine) -> threading.Event:
    """Makes the engine's steps wait while the returned event is clear (set it again before
    the server stops): a test can then look at requests in flight for as long as it needs,
    however slowly a loaded machine runs it. At most the step already running completes."""
    running = threading.Event()
    running.set()
    real_step = engine.step

    def held_step() -> list:
        running.wait()
        return real_step()

    engine.step = held_step  # type: ignore[method-assign]
    return running


@dataclass
class RunningServer:
    url: str
    app: FastAPI
    engine: Engine

    @property
    def context(self) -> ServerContext:
        return self.app.state.context

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(api_key=api_key, base_url=f"{self.url}/v1", **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(base_url=self.url, **kwargs)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.01)


@contextlib.contextmanager
def serve(engine: Engine, wait_ready: bool = True, **config: Any) -> Iterator[RunningServer]:
    config.setdefault("model_name", MODEL)
    config.setdefault("draft_name", "tiny-draft")
    app = create_app(engine, ServerConfig(**config))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    running = RunningServer(url, app, engine)
    try:
        running.wait_for(lambda: server.started, timeout=30)
        if wait_ready:
            running.wait_for(lambda: httpx.get(f"{url}/ready").status_code == 200, timeout=60)
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    """The shared server: gamma 4, 4 slots, 256-token context. Tests that need other settings,
    or that break the engine, start their own."""
    with serve(make_engine(), max_queue=8) as running:
        yield running


@pytest.fixture(scope="session")
def reference() -> Engine:
    """An engine with the served weights that no server drives: isolated, unbatched outputs."""
    return make_engine()


def reference_run(engine: Engine, prompt: str | list[int], **params: Any) -> Completion:
    return engine.generate([prompt], SamplingParams(**params))[0]


def assert_refused_before_engine(
    server: RunningServer, path: str, body: dict, param: str | None, words: str
) -> None:
    """``body`` gets OpenAI's 400 naming ``param`` with ``words``, and no prompt token reaches
    the engine."""
    before = server.metrics()[("specserve:prompt_tokens_total", ())]
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert words in error["message"]
    assert server.metrics()[("specserve:prompt_tokens_total", ())] == before
