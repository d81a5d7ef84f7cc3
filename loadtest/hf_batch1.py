"""HF ``generate`` baselines at batch 1, in-process: plain, assisted by the draft, and prompt
lookup. Run by ``python -m loadtest hf`` in a child process, so the models' memory and threads
go away before the next system starts and a crash is reported rather than fatal."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from engine.bench import chat_ids
from engine.loader import LoadedModel
from loadtest.prompts import Prompt
from loadtest.records import RequestRecord, failed
from loadtest.results import SystemResult
from loadtest.stats import summarise
from loadtest.systems import HF_ASSISTED, HF_PLAIN, HF_PROMPT_LOOKUP

PROMPT_LOOKUP_TOKENS = 10


def variant_kwargs(system: str, draft: LoadedModel | None) -> dict[str, Any]:
    if system == HF_PLAIN:
        return {}
    if system == HF_ASSISTED:
        if draft is None:
            raise ValueError("hf-assisted needs a draft model")
        return {"assistant_model": draft.model}
    if system == HF_PROMPT_LOOKUP:
        return {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}
    raise ValueError(f"unknown HF system {system!r}")


@torch.inference_mode()
def generate_once(
    target: LoadedModel,
    ids: list[int],
    max_tokens: int,
    temperature: float,
    kwargs: dict[str, Any],
) -> int:
    """New tokens generated for one prompt."""
    input_ids = torch.tensor([ids], device=target.model.device)
    sampling: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature}
    out = target.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_tokens,
        pad_token_id=target.tokenizer.pad_token_id or target.tokenizer.eos_token_id,
        **sampling,
        **kwargs,
    )
    return int(out.shape[1] - len(ids))


def _timed(
    target: LoadedModel, prompt: Prompt, ids: list[int], max_tokens: int, temperature: float,
    kwargs: dict[str, Any],
) -> RequestRecord:  # fmt: skip
    start = time.perf_counter()
    try:
        tokens = generate_once(target, ids, max_tokens, temperature, kwargs)
    except Exception as exc:  # one failed prompt must not end the baseline
        record = failed(prompt.task, start, time.perf_counter(), f"{type(exc).__name__}: {exc}")
    else:
        end = time.perf_counter()
        record = RequestRecord(
            prompt.task, True, start, end, output_tokens=tokens, exact_tokens=True
        )
    record.prompt = prompt.key
    return record


def measure_hf(
    systems: list[str],
    target: LoadedModel,
    draft: LoadedModel | None,
    prompts: list[Prompt],
    max_tokens: int,
    temperature: float = 0.0,
    warmup: int = 1,
    duration_s: float | None = None,
) -> list[SystemResult]:
    """Each prompt goes through every variant in turn, so slow drifts of a shared machine hit
    all of them alike. Tokens/s = new tokens over generate's wall time, summed. No new prompt
    starts after ``duration_s``."""
    results = {
        name: SystemResult(name=name, kind="in-process", model=target.name) for name in systems
    }
    kwargs: dict[str, dict[str, Any]] = {}
    for name in systems:
        try:
            kwargs[name] = variant_kwargs(name, draft)
        except ValueError as exc:
            results[name].error = str(exc)
    records: dict[str, list[RequestRecord]] = {name: [] for name in kwargs}
    encoded = [chat_ids(target, p.text) for p in prompts]
    for extra in kwargs.values():
        for _ in range(warmup):
            _timed(target, prompts[0], encoded[0], min(max_tokens, 8), temperature, extra)
    deadline = time.perf_counter() + duration_s if duration_s is not None else float("inf")
    for index, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
        if time.perf_counter() >= deadline:
            break
        for name, extra in kwargs.items():
            records[name].append(_timed(target, prompt, ids, max_tokens, temperature, extra))
        print(
            f"[loadtest hf] {index + 1}/{len(prompts)} {prompt.task}", file=sys.stderr, flush=True
        )
    for name, recs in records.items():
        wall = sum(r.e2e for r in recs)
        results[name].levels.append(summarise(recs, wall, "c=1", concurrency=1))
    return list(results.values())
