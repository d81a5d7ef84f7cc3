"""POST /v1/completions: plain prompts (text, token ids, or several of either)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from engine.request import TokenLogprob
from server.async_engine import EngineFailure, RequestStream
from server.context import ServerContext, get_context
from server.errors import error_body
from server.generation import Choice, complete, make_choices, submit, usage, with_metrics
from server.logprobs import CompletionLogprobs
from server.openapi import CompletionResponse, generation
from server.prompts import Prompt, completion_prompts, structured_output, submissions
from server.protocol import CompletionRequest
from server.sse import DONE, EventStream

router = APIRouter()


def _echo_text(ctx: ServerContext, prompt: Prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return ctx.tokens.decode(prompt.ids, skip_special_tokens=False)


def _prompt_entries(choice: Choice) -> list[tuple[int, TokenLogprob | None]]:
    ids = choice.prompt.ids
    return list(zip(ids, choice.prompt_logprobs or [None] * len(ids), strict=True))


def _choice(ctx: ServerContext, body: CompletionRequest, choice: Choice) -> dict[str, Any]:
    text = choice.text
    entries: list[tuple[int, TokenLogprob | None]] = [(e.token_id, e) for e in choice.logprobs]
    if body.echo:
        text = _echo_text(ctx, choice.prompt) + text
        entries = _prompt_entries(choice) + entries
    logprobs = None
    if body.logprobs is not None:
        logprobs = CompletionLogprobs(ctx.tokens).build(entries)
    return {
        "index": choice.index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
    }


async def _events(
    ctx: ServerContext,
    body: CompletionRequest,
    head: dict[str, Any],
    stream: RequestStream,
    choices: list[Choice],
    prompts: list[Prompt],
) -> AsyncIterator[dict | str]:
    formatters = [CompletionLogprobs(ctx.tokens) for _ in choices]
    try:
        async for index, output in stream:
            choice = choices[index]
            choice.add(output)
            text = output.new_text
            entries: list[tuple[int, TokenLogprob | None]] = [
                (e.token_id, e) for e in output.new_logprobs or []
            ]
            if not choice.started and body.echo:
                text = _echo_text(ctx, choice.prompt) + text
                entries = _prompt_entries(choice) + entries
            choice.started = True
            wants_logprobs = body.logprobs is not None and bool(entries)
            if not (text or output.finished or wants_logprobs):
                continue  # tokens held back (a possible stop string, an incomplete character)
            item = {
                "index": index,
                "text": text,
                "logprobs": formatters[index].build(entries) if body.logprobs is not None else None,
                "finish_reason": choice.finish_reason,
            }
            chunk: dict[str, Any] = {**head, "choices": [item]}
            if body.continuous_usage:
                chunk["usage"] = usage(choices, prompts)
            yield chunk
        if body.include_usage:
            final = {**head, "choices": [], "usage": usage(choices, prompts)}
            yield with_metrics(final, choices, ctx.engine.gamma)
    except EngineFailure as exc:
        yield error_body(500, str(exc))
    finally:
        stream.close()
    yield DONE


@router.post("/v1/completions", response_model=None, responses=generation(CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    arrival = time.monotonic()
    model = ctx.check_model(body.model)
    prompts = await run_in_threadpool(completion_prompts, body, ctx)
    wants_prompt_logprobs = body.echo and body.logprobs is not None
    grammar = await run_in_threadpool(structured_output, body, ctx)
    subs = submissions(
        body,
        prompts,
        ctx,
        max_tokens=body.max_tokens,
        explicit=body.max_tokens_explicit,
        max_tokens_param="max_tokens",
        logprobs=body.logprobs,
        prompt_logprobs=body.logprobs if wants_prompt_logprobs else None,
        grammar=grammar,
    )
    stream = submit(ctx, subs, arrival)
    choices = make_choices(prompts, body.choices_per_prompt, body.prediction is not None)
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if body.stream:
        events = _events(ctx, body, head, stream, choices, prompts)
        return EventStream(events, ctx.config.send_timeout_s)
    return await complete(
        request, stream, choices, prompts, head, lambda c: _choice(ctx, body, c), ctx.engine.gamma
    )
