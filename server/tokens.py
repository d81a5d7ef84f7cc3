"""The HTTP side's tokenizer: prompts to ids, ids to text, chat templates, token strings."""

from __future__ import annotations

import copy
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from server.errors import bad_request


def _text(token: Any) -> str | None:
    return None if token is None else str(token)


class TokenText:
    """Wraps a private copy of the tokenizer.

    The engine thread decodes with the original while requests are encoded here; a Rust fast
    tokenizer raises "Already borrowed" when one thread mutates it (truncation settings) while
    another uses it, so the two sides never share one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None) -> None:
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._token_strs: dict[int, str] = {}

    def _require(self) -> PreTrainedTokenizerBase:
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids")
        return self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tokenizer = self._require()
        return list(tokenizer(text, add_special_tokens=add_special_tokens).input_ids)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        """One token as text (special tokens included), cached: logprobs ask for thousands."""
        text = self._token_strs.get(token_id)
        if text is None:
            text = self.decode([token_id], skip_special_tokens=False)
            self._token_strs[token_id] = text
        return text

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool,
        template_kwargs: dict[str, Any] | None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        tokenizer = self._require()
        if not tokenizer.chat_template:
            raise bad_request(
                "this model has no chat template: use /v1/completions with a plain prompt"
            )
        kwargs = dict(template_kwargs or {})
        if tools is not None:
            kwargs["tools"] = tools  # the request's own field wins over a template kwarg
        try:
            return tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **kwargs,
            )
        except (TemplateError, ValueError, TypeError, KeyError) as exc:
            raise bad_request(f"cannot apply the chat template to these messages: {exc}") from exc

    def info(self, max_model_len: int) -> dict[str, Any]:
        tokenizer = self._require()
        return {
            "tokenizer_class": type(tokenizer).__name__,
            "eos_token": _text(tokenizer.eos_token),
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token": _text(tokenizer.bos_token),
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token": _text(tokenizer.pad_token),
            "unk_token": _text(tokenizer.unk_token),
            "chat_template": tokenizer.chat_template,
            "model_max_length": max_model_len,
            "vocab_size": len(tokenizer),
        }
