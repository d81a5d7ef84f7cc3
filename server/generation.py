"""What completions and chat completions share: submission, per-choice accumulation, usage,
and the per-response speculation statistics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.request import RequestOutput, RequestStats, TokenLogprob
from server.async_engine import (
    EngineFailure,
    EngineUnavailableError,
    QueueFullError,
    RequestStream,
    Submission,
)
from server.context import ServerContext
from server.errors import APIError, bad_request, error_response
from server.prompts import Prompt


@dataclass
class Choice:
    index: int
    prompt: Prompt
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    stats: RequestStats | None = None
    num_generated: int = 0
    started: bool = False  # has anything been sent for it (streaming)
    predicted: bool = False  # the request came with a predicted output

    def add(self, output: RequestOutput) -> None:
        self.token_ids += output.new_token_ids
        self.text += output.new_text
        if output.new_logprobs:
            self.logprobs += output.new_logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.num_generated = output.num_generated
        self.stats = output.stats
        if output.finished:
            self.finish_reason = output.finish_reason


def make_choices(prompts: list[Prompt], n: int, predicted: bool = False) -> list[Choice]:
    return [
        Choice(index=i, prompt=prompts[i // n], predicted=predicted)
        for i in range(len(prompts) * n)
    ]


def submit(ctx: ServerContext, subs: list[Submission], arrival: float) -> RequestStream:
    try:
        return ctx.core.submit(subs, arrival)
    except QueueFullError:
        ctx.metrics.on_reject("queue_full")
        core = ctx.core
        raise APIError(
            429,
            f"the server is at capacity ({core.max_slots} requests running and {core.max_queue} "
            "waiting): retry after the Retry-After delay",
            code="queue_full",
            headers={"Retry-After": str(ctx.config.retry_after_s)},
        ) from None
    except EngineUnavailableError as exc:
        ctx.metrics.on_reject("unavailable")
        raise APIError(
            503, str(exc), headers={"Retry-After": str(ctx.config.retry_after_s)}
        ) from None
    except ValueError as exc:  # the engine's own validation; the prompts module should catch all
        raise bad_request(str(exc)) from None


async def _wait_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the client leaving (or our response
    # completing, which cannot happen before we return).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, stream: RequestStream, choices: list[Choice]) -> bool:
    """Runs every choice to its end; False when the client left first (its requests are then
    aborted). Raises EngineFailure when the engine failed the request."""

    async def consume() -> None:
        async for index, output in stream:
            choices[index].add(output)

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
        stream.close()
    if consumer.cancelled():
        return False
    consumer.result()
    return True


def usage(choices: list[Choice], prompts: list[Prompt]) -> dict:
    prompt_tokens = sum(len(p.ids) for p in prompts)  # once per prompt, however many choices
    completion_tokens = sum(c.num_generated for c in choices)
    # Prompt tokens whose K/V a slot already held (OpenAI's field), again once per prompt: the
    # fewest over its choices, since the others copy what the first computes.
    cached: dict[int, int] = {}
    for choice in choices:
        held = choice.stats.cached_tokens if choice.stats is not None else 0
        cached[id(choice.prompt)] = min(cached.get(id(choice.prompt), held), held)
    result = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(cached.values())},
    }
    stats = [c.stats for c in choices if c.stats is not None]
    if any(c.predicted for c in choices):
        # OpenAI's fields for predicted outputs: here, copied drafts the target kept / refused.
        result["completion_tokens_details"] = {
            "accepted_prediction_tokens": sum(s.prediction_accepted for s in stats),
            "rejected_prediction_tokens": sum(s.prediction_rejected for s in stats),
        }
    return result


def speculative_metrics(choices: list[Choice], gamma: int) -> dict | None:
    """vLLM's per-response ``metrics.speculative_decoding`` shape, summed over the choices.

    Only rounds that drafted count as steps, so the histogram sums to ``num_spec_steps`` and its
    weighted sum is ``num_accepted_draft_tokens``.
    """
    if gamma == 0:
        return None
    histogram = [0] * (gamma + 1)
    drafted = accepted = 0
    for choice in choices:
        if choice.stats is None:
            continue
        for j, count in enumerate(choice.stats.acceptance_histogram[: gamma + 1]):
            histogram[j] += count
        drafted += choice.stats.drafted
        accepted += choice.stats.accepted
    steps = sum(histogram)
    return {
        "speculative_decoding": {
            "num_spec_tokens": gamma,
            "num_spec_steps": steps,
            "num_draft_tokens": drafted,
            "num_accepted_draft_tokens": accepted,
            "mean_acceptance_length": 1.0 + accepted / steps if steps else 1.0,
            "draft_acceptance_rate": accepted / drafted if drafted else 0.0,
            "acceptance_histogram": histogram,
        }
    }


def with_metrics(body: dict, choices: list[Choice], gamma: int) -> dict:
    metrics = speculative_metrics(choices, gamma)
    if metrics is not None:
        body["metrics"] = metrics
    return body


async def complete(
    request: Request,
    stream: RequestStream,
    choices: list[Choice],
    prompts: list[Prompt],
    head: dict,
    render: Callable[[Choice], dict],
    gamma: int,
) -> Response:
    """The non-streaming answer shared by completions and chat: wait, then one JSON body."""
    try:
        finished = await collect(request, stream, choices)
    except EngineFailure as exc:
        raise APIError(500, str(exc)) from None
    if not finished:
        return error_response(APIError(400, "the client disconnected"))
    result = {**head, "choices": [render(c) for c in choices], "usage": usage(choices, prompts)}
    return JSONResponse(with_metrics(result, choices, gamma))
