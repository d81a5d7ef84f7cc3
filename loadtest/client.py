"""One streaming request over httpx, parsed as server-sent events."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from loadtest.prompts import Prompt
from loadtest.records import RequestRecord, StreamAccumulator, failed

Endpoint = Literal["chat", "completions"]
PATHS: dict[str, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
FULL_STREAM_OPTIONS: dict[str, bool] = {"include_usage": True, "continuous_usage_stats": True}


@dataclass(frozen=True)
class RequestOptions:
    endpoint: Endpoint = "chat"
    model: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0
    # None leaves stream_options out for servers that refuse it.
    stream_options: dict[str, bool] | None = field(default_factory=lambda: FULL_STREAM_OPTIONS)
    extra_body: dict[str, Any] = field(default_factory=dict)


def root_url(base_url: str) -> str:
    """Accepts ``http://host:port`` or ``http://host:port/v1``; /metrics lives at the root."""
    url = base_url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def request_body(options: RequestOptions, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "max_tokens": options.max_tokens,
        "temperature": options.temperature,
        "stream": True,
    }
    if options.model is not None:
        body["model"] = options.model
    if options.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if options.stream_options is not None:
        body["stream_options"] = dict(options.stream_options)
    return body | options.extra_body


async def stream_request(
    client: httpx.AsyncClient, options: RequestOptions, prompt: Prompt
) -> RequestRecord:
    """Never raises for a failed request: the failure is measured like a success."""
    start = time.perf_counter()
    body = request_body(options, prompt.text)
    try:
        async with client.stream("POST", PATHS[options.endpoint], json=body) as response:
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")
                error = f"HTTP {response.status_code}: {text[:300]}"
                return failed(prompt.task, start, time.perf_counter(), error)
            acc = StreamAccumulator(prompt.task, start)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                payload = json.loads(data)
                if isinstance(payload, dict):
                    acc.add(time.perf_counter(), payload)
            return acc.finish(time.perf_counter())
    except Exception as exc:  # transport, protocol or parse errors: all count as a failure
        return failed(prompt.task, start, time.perf_counter(), f"{type(exc).__name__}: {exc}")
