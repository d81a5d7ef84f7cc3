"""Turns request bodies into engine submissions, rejecting what the engine could not run.

Everything the engine would refuse is caught here with a message that says what to fix, so a
bad request never reaches the engine loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import GrammarSpec, SamplingParams
from server.async_engine import Submission
from server.context import ServerContext
from server.errors import bad_request
from server.limits import check_limits
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.tools import forced_prefix

_INT64 = 2**63


@dataclass
class Prompt:
    ids: list[int]
    text: str | None = None  # the caller's own text, echoed back verbatim; None for token ids


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"


def _check(prompt: Prompt, ctx: ServerContext, where: str) -> None:
    engine = ctx.engine
    if not prompt.ids:
        raise bad_request(f"{where} is empty", param="prompt")
    if any(t >= engine.vocab_size for t in prompt.ids):
        raise bad_request(f"{where} has token ids outside [0, {engine.vocab_size})", param="prompt")
    if len(prompt.ids) >= engine.max_len:
        raise bad_request(
            f"{where} has {len(prompt.ids)} tokens but the context holds {engine.max_len} "
            "(prompt plus at least one generated token): shorten the prompt",
            param="prompt",
        )


def completion_prompts(body: CompletionRequest, ctx: ServerContext) -> list[Prompt]:
    raw = body.prompt
    items = [raw] if isinstance(raw, str) or isinstance(raw[0], int) else list(raw)
    prompts = [
        Prompt(ctx.tokens.encode(item), item) if isinstance(item, str) else Prompt(list(item))
        for item in items
    ]
    for index, prompt in enumerate(prompts):
        _check(prompt, ctx, "the prompt" if len(prompts) == 1 else f"prompt {index}")
    return prompts


def chat_prompt(body: ChatCompletionRequest, ctx: ServerContext) -> Prompt:
    text = ctx.tokens.render_chat(
        [m.for_template() for m in body.messages],
        add_generation_prompt=bool(body.add_generation_prompt),
        continue_final_message=bool(body.continue_final_message),
        template_kwargs=body.chat_template_kwargs,
        tools=body.template_tools,
    )
    # A forced tool_choice opens the call in the assistant's turn; the model continues it.
    text += forced_prefix(body.tool_choice)
    # The template already wrote any BOS it wants; adding special tokens again would double it.
    prompt = Prompt(ctx.tokens.encode(text, add_special_tokens=False))
    _check(prompt, ctx, "the chat prompt")
    return prompt


def structured_output(
    body: SamplingFields, ctx: ServerContext, forced: GrammarSpec | None = None
) -> GrammarSpec | None:
    """The request's grammar (``forced``: a forced tool call's), compiled once here (off the
    event loop and the engine thread: the first one also builds the tokenizer's matcher tables,
    a second or more) so an invalid one is a 400 and the engine gets it from the compiled
    cache."""
    spec = forced or body.grammar
    if spec is None:
        return None
    if forced is not None:
        param = "tools"
    elif body.structured_outputs is not None:
        param = "structured_outputs"
    else:
        param = "response_format"
    try:
        ctx.engine.grammars.matcher(spec)
    except ValueError as exc:
        raise bad_request(str(exc), param=param) from exc
    return spec


def _max_tokens(
    requested: int | None, explicit: bool, param: str, prompt_len: int, max_len: int
) -> int:
    room = max_len - prompt_len
    if requested is None or (requested > room and not explicit):
        return room
    if requested > room:
        raise bad_request(
            f"{param} is too large: the prompt has {_tokens(prompt_len)} and the context holds "
            f"{max_len}, so at most {room} can be generated; lower {param} to {room} or less",
            param=param,
        )
    return requested


def _choice_seed(seed: int | None, index: int) -> int | None:
    # Choices of one request must differ, yet stay reproducible from the request's seed.
    if seed is None:
        return None
    return (seed + index + _INT64) % (2 * _INT64) - _INT64


def submissions(
    body: SamplingFields,
    prompts: list[Prompt],
    ctx: ServerContext,
    *,
    max_tokens: int | None,
    explicit: bool,
    max_tokens_param: str,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    grammar: GrammarSpec | None = None,
    server_stop: tuple[str, ...] = (),
) -> list[Submission]:
    """``n`` engine requests per prompt, in OpenAI's choice order (prompt-major);
    ``server_stop``: stop strings the server adds to the request's own."""
    engine = ctx.engine
    if body.stop_token_ids and any(t >= engine.vocab_size for t in body.stop_token_ids):
        raise bad_request(
            f"stop_token_ids must be below the vocabulary size {engine.vocab_size}",
            param="stop_token_ids",
        )
    token_bias = body.token_bias
    if any(t >= engine.vocab_size for t in token_bias):
        raise bad_request(
            f"logit_bias token ids must be below the vocabulary size {engine.vocab_size}",
            param="logit_bias",
        )
    prediction = None
    if body.prediction is not None and body.prediction.text:
        if ctx.tokens.tokenizer is None:
            raise bad_request("prediction needs a tokenizer, and this model has none", "prediction")
        prediction = ctx.tokens.encode(body.prediction.text, add_special_tokens=False)
    if body.stop and ctx.tokens.tokenizer is None:
        raise bad_request("stop strings need a tokenizer, and this model has none", param="stop")
    n = body.choices_per_prompt
    total = n * len(prompts)
    if total > ctx.core.capacity:
        raise bad_request(
            f"this request needs {total} sequences but the server holds at most "
            f"{ctx.core.capacity} at once: lower n or send fewer prompts",
            param="n",
        )
    check_limits(body, ctx.config)
    result = []
    for prompt in prompts:
        limit = _max_tokens(max_tokens, explicit, max_tokens_param, len(prompt.ids), engine.max_len)
        for j in range(n):
            try:
                params = SamplingParams(
                    max_tokens=limit,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p,
                    top_k=body.top_k or 0,
                    min_p=body.min_p or 0.0,
                    seed=_choice_seed(body.seed, j),
                    stop=[*(body.stop or []), *server_stop],
                    stop_token_ids=list(body.stop_token_ids or []),
                    ignore_eos=bool(body.ignore_eos),
                    proposer=body.proposer or "auto",
                    gamma=body.gamma,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                    presence_penalty=body.presence_penalty or 0.0,
                    frequency_penalty=body.frequency_penalty or 0.0,
                    repetition_penalty=(
                        1.0 if body.repetition_penalty is None else body.repetition_penalty
                    ),
                    logit_bias=token_bias or None,
                    min_tokens=body.min_tokens or 0,
                    prediction=prediction,
                    grammar=grammar,
                )
            except ValueError as exc:
                raise bad_request(str(exc)) from exc
            result.append(Submission(prompt.ids, params))
    return result
