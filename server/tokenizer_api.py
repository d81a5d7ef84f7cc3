"""vLLM's tokenizer endpoints (lm-evaluation-harness's remote tokenizer uses them)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from server.context import ServerContext, get_context
from server.errors import bad_request
from server.openapi import DetokenizeResponse, TokenizeResponse, errors
from server.protocol import DetokenizeRequest, TokenizeRequest, tools_for_template

router = APIRouter()


def _tokenize(ctx: ServerContext, body: TokenizeRequest) -> list[int]:
    if body.messages is not None:
        text = ctx.tokens.render_chat(
            [m.for_template() for m in body.messages],
            add_generation_prompt=bool(body.add_generation_prompt),
            continue_final_message=bool(body.continue_final_message),
            template_kwargs=body.chat_template_kwargs,
            tools=tools_for_template(body.tools),
        )
        # As vLLM: a rendered template carries its own special tokens unless asked otherwise.
        return ctx.tokens.encode(text, add_special_tokens=bool(body.add_special_tokens))
    assert body.prompt is not None
    add_special = True if body.add_special_tokens is None else body.add_special_tokens
    return ctx.tokens.encode(body.prompt, add_special_tokens=add_special)


@router.post("/tokenize", response_model=TokenizeResponse, responses=errors(400, 404, 413))
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    ctx = get_context(request)
    ctx.check_model(body.model)
    tokens = await run_in_threadpool(_tokenize, ctx, body)
    token_strs = [ctx.tokens.token_str(t) for t in tokens] if body.return_token_strs else None
    return {
        "count": len(tokens),
        "max_model_len": ctx.engine.max_len,
        "tokens": tokens,
        "token_strs": token_strs,
    }


@router.post("/detokenize", response_model=DetokenizeResponse, responses=errors(400, 404, 413))
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, str]:
    ctx = get_context(request)
    ctx.check_model(body.model)
    if any(t >= ctx.engine.vocab_size for t in body.tokens):
        raise bad_request(
            f"token ids must be below the vocabulary size {ctx.engine.vocab_size}", param="tokens"
        )
    # Special tokens stay, so that detokenize inverts tokenize.
    text = await run_in_threadpool(ctx.tokens.decode, body.tokens, False)
    return {"prompt": text}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    ctx = get_context(request)
    return ctx.tokens.info(ctx.engine.max_len)
