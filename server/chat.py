"""POST /v1/chat/completions: messages rendered through the model's chat template."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from engine.request import RequestOutput
from server.async_engine import EngineFailure, RequestStream
from server.context import ServerContext, get_context
from server.errors import error_body
from server.generation import Choice, complete, make_choices, submit, usage, with_metrics
from server.logprobs import chat_logprobs
from server.openapi import ChatCompletionResponse, generation
from server.prompts import Prompt, chat_prompt, structured_output, submissions
from server.protocol import ChatCompletionRequest
from server.sse import DONE, EventStream
from server.tools import (
    CLOSE,
    ToolCallStream,
    finish_reason,
    forced_grammar,
    forced_prefix,
    parse_tool_calls,
)

router = APIRouter()


def _message(body: ChatCompletionRequest, choice: Choice) -> tuple[dict[str, Any], str | None]:
    """A finished choice's assistant message, and its finish reason."""
    if not body.tools_active:
        return {"role": "assistant", "content": choice.text}, choice.finish_reason
    # The parser reads the answer as the model saw it: after any forced start of a call.
    parsed = parse_tool_calls(
        forced_prefix(body.tool_choice) + choice.text, body.tool_names, body.one_tool_call
    )
    if not parsed.calls:
        return {"role": "assistant", "content": parsed.content}, choice.finish_reason
    message = {"role": "assistant", "content": parsed.content or None, "tool_calls": parsed.calls}
    return message, finish_reason(choice.finish_reason, called=True)


def _choice(ctx: ServerContext, body: ChatCompletionRequest, choice: Choice) -> dict[str, Any]:
    logprobs = None
    if body.logprobs:
        logprobs = {"content": chat_logprobs(ctx.tokens, choice.logprobs)}
    message, reason = _message(body, choice)
    return {
        "index": choice.index,
        "message": message,
        "logprobs": logprobs,
        "finish_reason": reason,
    }


def _tool_delta(reader: ToolCallStream, output: RequestOutput) -> dict[str, Any]:
    """The content and the calls that became ready with this output (OpenAI's delta shape)."""
    first = len(reader.calls)
    ready = reader.feed(output.new_text, last=output.finished)
    delta: dict[str, Any] = {}
    if ready.content:
        delta["content"] = ready.content
    if ready.calls:
        delta["tool_calls"] = [{"index": first + i, **call} for i, call in enumerate(ready.calls)]
    return delta


async def _events(
    ctx: ServerContext,
    body: ChatCompletionRequest,
    head: dict[str, Any],
    stream: RequestStream,
    choices: list[Choice],
    prompts: list[Prompt],
) -> AsyncIterator[dict | str]:
    def chunk(index: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
        item = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **extra}
        result: dict[str, Any] = {**head, "choices": [item]}
        if body.continuous_usage:
            result["usage"] = usage(choices, prompts)
        return result

    # One reader per choice, each already past any forced start of a call.
    prefix = forced_prefix(body.tool_choice)
    readers = None
    if body.tools_active:
        readers = [ToolCallStream(prefix, body.tool_names, body.one_tool_call) for _ in choices]
    try:
        # The role goes first, before any model work, so clients see the response start at once.
        for choice in choices:
            yield chunk(choice.index, {"role": "assistant", "content": ""})
        async for index, output in stream:
            choice = choices[index]
            choice.add(output)
            reason = choice.finish_reason
            if readers is None:
                delta = {"content": output.new_text} if output.new_text else {}
            else:
                delta = _tool_delta(readers[index], output)
                reason = finish_reason(reason, called=bool(readers[index].calls))
            wants_logprobs = bool(body.logprobs and output.new_logprobs)
            if not (delta or output.finished or wants_logprobs):
                # Held back: a possible stop string, an incomplete character, a possible call.
                continue
            logprobs = None
            if body.logprobs:
                logprobs = {"content": chat_logprobs(ctx.tokens, output.new_logprobs or [])}
            yield chunk(index, delta, logprobs=logprobs, finish_reason=reason)
        if body.include_usage:
            final = {**head, "choices": [], "usage": usage(choices, prompts)}
            yield with_metrics(final, choices, ctx.engine.gamma)
    except EngineFailure as exc:
        yield error_body(500, str(exc))
    finally:
        stream.close()
    yield DONE


@router.post(
    "/v1/chat/completions", response_model=None, responses=generation(ChatCompletionResponse)
)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    arrival = time.monotonic()
    model = ctx.check_model(body.model)
    prompt = await run_in_threadpool(chat_prompt, body, ctx)
    prompts = [prompt]
    forced = forced_grammar(body.tool_choice, body.tools or []) if body.tools_active else None
    grammar = await run_in_threadpool(structured_output, body, ctx, forced)
    # One call at most: the answer ends at its closing tag, which the parser does without
    # (an unclosed last block counts). A forced call ends after one anyway.
    one_call = body.one_tool_call and forced is None
    subs = submissions(
        body,
        prompts,
        ctx,
        max_tokens=body.max_tokens_limit,
        explicit=body.max_tokens_limit is not None,
        max_tokens_param="max_completion_tokens" if body.max_completion_tokens else "max_tokens",
        logprobs=body.logprobs_top_n,
        grammar=grammar,
        server_stop=(CLOSE,) if one_call else (),
    )
    stream = submit(ctx, subs, arrival)
    choices = make_choices(prompts, body.choices_per_prompt, body.prediction is not None)
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if body.stream else "chat.completion",
        "created": int(time.time()),
        "model": model,
    }
    if body.stream:
        events = _events(ctx, body, head, stream, choices, prompts)
        return EventStream(events, ctx.config.send_timeout_s)
    return await complete(
        request, stream, choices, prompts, head, lambda c: _choice(ctx, body, c), ctx.engine.gamma
    )
