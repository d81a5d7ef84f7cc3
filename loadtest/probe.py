"""Finds out, before measuring, what a server needs: its model name and the stream options
it accepts. Peers differ: some reject unknown ``stream_options`` keys, some lack /v1/models."""

from __future__ import annotations

import dataclasses

import httpx

from loadtest.client import FULL_STREAM_OPTIONS, RequestOptions, stream_request
from loadtest.prompts import Prompt

# Most to least informative; None sends no stream_options at all.
STREAM_OPTION_CHOICES: tuple[dict[str, bool] | None, ...] = (
    FULL_STREAM_OPTIONS,
    {"include_usage": True},
    None,
)


async def discover_model(client: httpx.AsyncClient) -> str | None:
    """The first model /v1/models lists, or None (requests then name no model)."""
    try:
        response = await client.get("/v1/models", timeout=30)
        response.raise_for_status()
        return str(response.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
        return None


async def choose_stream_options(
    client: httpx.AsyncClient, options: RequestOptions, prompt: Prompt
) -> tuple[RequestOptions, list[str]]:
    """The options of the first probe request that succeeds, and notes on what was learned."""
    notes: list[str] = []
    probe_tokens = min(options.max_tokens, 8)
    for choice in STREAM_OPTION_CHOICES:
        trial = dataclasses.replace(options, stream_options=choice, max_tokens=probe_tokens)
        record = await stream_request(client, trial, prompt)
        if not record.ok:
            notes.append(f"probe with stream_options={choice} failed: {record.error}")
            continue
        if not record.exact_tokens:
            notes.append("no usage in the stream: output tokens are counted as content chunks")
        elif not record.per_token_itl:
            notes.append("no per-chunk usage: inter-token latency is measured per chunk")
        return dataclasses.replace(options, stream_options=choice), notes
    notes.append("every probe request failed; measuring anyway")
    return options, notes
