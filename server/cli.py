"""The ``specserve`` command: serve, generate, bench."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from dataclasses import fields, replace

from engine.config import (
    CLI_DRAFT_HEAD,
    CLI_DRAFT_VOCAB,
    CLI_DRAFT_WINDOW,
    CLI_PROMPT_LOOKUP,
    DRAFT_WEIGHTS,
    EngineConfig,
    SamplingParams,
    cache_dir,
    default_draft_head,
)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"SPECSERVE_{name}", default)


def _env_int(name: str, default: int) -> int:
    value = _env(name)
    return int(value) if value else default


def _env_name(flag: str) -> str:
    """``--prefill-chunk`` -> ``PREFILL_CHUNK`` (read as ``SPECSERVE_PREFILL_CHUNK``)."""
    return flag.lstrip("-").replace("-", "_").upper()


def _option(group, flag: str, default: int | float, help: str | None = None) -> None:
    """A number flag (of its default's type) whose default comes from its environment
    variable (as _env_int's)."""
    kind = type(default)
    value = _env(_env_name(flag))
    group.add_argument(flag, type=kind, default=kind(value) if value else default, help=help)


def _switch(group, flag: str, help: str) -> None:
    """An on-by-default ``--x/--no-x`` flag; its environment variable set to 0 turns it off."""
    group.add_argument(
        flag,
        action=argparse.BooleanOptionalAction,
        default=_env(_env_name(flag), "1") != "0",
        help=help,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument(
        "--target",
        default=_env("TARGET"),
        help="target model: builtin name, pair name (default qwen2.5-coder), local HF dir, "
        ".gguf file, or a hub id already in the local HF cache",
    )
    group.add_argument(
        "--draft",
        default=_env("DRAFT"),
        help="draft model (same forms as --target); 'none' or omitted with an explicit target "
        "means target-only; 'ngram' means prompt lookup alone, with no draft model",
    )
    _option(
        group,
        "--gamma",
        6,
        "most draft tokens per round (0 = target-only); adaptive gamma picks 0..this",
    )
    _option(group, "--max-slots", 8, "KV slots (concurrent requests)")
    _option(group, "--max-len", 2048, "tokens per slot (prompt + output)")
    group.add_argument(
        "--dtype", default=_env("DTYPE", "auto"), choices=["auto", "bf16", "fp16", "fp32"]
    )
    group.add_argument("--device", default=_env("DEVICE", "auto"), help="auto, cpu, cuda, cuda:N")
    _option(
        group,
        "--draft-vocab",
        CLI_DRAFT_VOCAB,
        "restrict the draft's LM head to the first N token ids (BPE ids go by frequency) "
        "plus the special ones and the requests' own context tokens (0 = full)",
    )
    _switch(
        group,
        "--adaptive-gamma",
        "choose each round's gamma (up to --gamma, 0 included) from measured costs and "
        "per-request acceptance (default on)",
    )
    _option(
        group,
        "--prompt-lookup",
        CLI_PROMPT_LOOKUP,
        "longest n-gram prompt lookup matches (free drafts copied from the context, used "
        "per row when they promise more than the draft model; 0 = off)",
    )
    _option(
        group,
        "--prefill-budget",
        1024,
        "prompt tokens admitted per engine step, so decoding goes on between long "
        "prefills (at least one request per step; 0 = fill every free slot at once)",
    )
    _option(
        group,
        "--prefill-chunk",
        512,
        "prompt tokens computed per engine step: a longer prompt is prefilled over "
        "several steps with a decode round between chunks (0 = whole prompts)",
    )
    _option(
        group,
        "--prefill-chunk-seconds",
        6.0,
        "fewer prompt tokens per chunk where the target's measured prompt pace would make "
        "a chunk stall the decoding streams for longer than this (0 = tokens only)",
    )
    _option(
        group,
        "--draft-window",
        CLI_DRAFT_WINDOW,
        "context tokens the draft model copies when a row first drafts (0 = all)",
    )
    head = _env("DRAFT_HEAD")
    group.add_argument(
        "--draft-head",
        type=int,
        default=int(head) if head else None,
        help="of the --draft-window tokens, how many come from the context's start (system "
        "prompt, instruction, a document's opening); the rest are the latest (default "
        f"{CLI_DRAFT_HEAD}, at most half the window)",
    )
    _switch(
        group,
        "--cpu-kernels",
        "CPU bf16: use specserve's GEMM kernel and eager attention (default on)",
    )
    group.add_argument(
        "--draft-weights",
        default=_env("DRAFT_WEIGHTS", "int4"),
        choices=DRAFT_WEIGHTS,
        help="with the CPU kernels, the weights draft decode steps stream: the model's bf16, "
        "int8, or int4 in groups of 32 (default int4)",
    )
    _switch(
        group,
        "--prefix-cache",
        "a request reuses the K/V of the longest prefix of its prompt that a slot holds: a "
        "free one's earlier request (a chat's earlier turns), or a running one's (n choices, "
        "one document; default on)",
    )
    _switch(
        group,
        "--cuda-graphs",
        "CUDA: replay decode, draft and verify forwards from CUDA graphs, one per batch "
        "shape, captured on first use (default on)",
    )
    _switch(
        group,
        "--tune-prompt-gemm",
        "CPU without bf16 instructions: time torch's fp32 GEMM against specserve's kernel at "
        "start-up (~1-2 s) and prefill prompts with the faster (default on)",
    )
    _switch(
        group,
        "--calibration-cache",
        "keep adaptive gamma's start-up timings under the cache directory ($SPECSERVE_CACHE, "
        "default ~/.cache/specserve) and reuse them when a quick check agrees (default on)",
    )
    _option(group, "--threads", 0, "CPU threads (0 = torch default)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig ``args`` ask for (ValueError when they are inconsistent), checked
    before any model loads so a bad flag costs no load."""
    head = args.draft_head
    calibration = str(cache_dir() / "calibration") if args.calibration_cache else None
    return EngineConfig(
        gamma=args.gamma,
        max_slots=args.max_slots,
        max_len=args.max_len,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.threads or None,
        cpu_kernels=args.cpu_kernels,
        draft_weights=args.draft_weights,
        prefix_cache=args.prefix_cache,
        draft_vocab=args.draft_vocab,
        adaptive_gamma=args.adaptive_gamma,
        draft_window=args.draft_window,
        draft_head=default_draft_head(args.draft_window) if head is None else head,
        prompt_lookup=args.prompt_lookup,
        prefill_budget=args.prefill_budget,
        prefill_chunk=args.prefill_chunk,
        prefill_chunk_seconds=args.prefill_chunk_seconds,
        tune_prompt_gemm=args.tune_prompt_gemm,
        cuda_graphs=args.cuda_graphs,
        calibration_cache=calibration,
    )


def build_engine(args: argparse.Namespace):
    """Loads the pair named by ``args`` and returns (engine, target LoadedModel, draft)."""
    from engine.engine import Engine
    from engine.loader import load_pair

    config = engine_config(args)
    lookup_only = args.draft == "ngram"
    draft_name = "none" if lookup_only else args.draft
    target, draft = load_pair(args.target, draft_name, dtype=args.dtype, device=args.device)
    if not (draft is not None or (lookup_only and args.prompt_lookup > 0)):
        config = replace(config, gamma=0, prompt_lookup=0)
    engine = Engine(
        target.model, draft.model if draft is not None else None, config, target.tokenizer
    )
    return engine, target, draft


# Settings whose flag is not their field's name with dashes.
FIELD_FLAGS = {"num_threads": "--threads"}


def in_flags(message: str, parser: argparse.ArgumentParser) -> str:
    """A settings error in the words the user typed: the config field names it quotes
    (``draft_head``) become the flags that set them (``--draft-head``)."""
    known = {a for action in parser._actions for a in action.option_strings}
    names = {f.name for f in fields(EngineConfig)} | {f.name for f in fields(SamplingParams)}

    def flag(match: re.Match[str]) -> str:
        word = match.group(0)
        option = FIELD_FLAGS.get(word, "--" + word.replace("_", "-"))
        return option if word in names and option in known else word

    return re.sub(r"\b[a-z][a-z_]*\b", flag, message)


def _sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
    )


def _generate(args: argparse.Namespace) -> int:
    from engine.loader import LOAD_ERRORS

    params = _sampling_params(args)  # checked in main, before the load
    started = time.perf_counter()
    try:
        engine, target, draft = build_engine(args)
    except LOAD_ERRORS as exc:
        print(f"specserve: {exc}", file=sys.stderr)
        return 1
    loaded = time.perf_counter()
    prompt = args.prompt
    if args.chat:
        prompt = target.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    try:
        request_id = engine.add_request(prompt, params)
    except ValueError as exc:  # a prompt longer than --max-len
        print(f"specserve: {exc}", file=sys.stderr)
        return 1
    stats = None
    while engine.has_work():
        for output in engine.step():
            if output.request_id != request_id:
                continue
            sys.stdout.write(output.new_text)
            sys.stdout.flush()
            if output.finished:
                stats, reason = output.stats, output.finish_reason
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - loaded
    assert stats is not None
    generated = engine.stats.generated_tokens
    print(
        f"[specserve] target={target.name} draft={draft.name if draft else None} "
        f"gamma={engine.gamma} finish={reason} tokens={generated} "
        f"rounds={stats.rounds} acceptance={stats.acceptance_rate:.1%} "
        f"tokens/round={stats.mean_accepted_per_round:.2f} "
        f"tok/s={generated / elapsed:.2f} load={loaded - started:.1f}s",
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="specserve", description="OpenAI-compatible speculative-decoding server"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    add_model_arguments(serve)
    serve.add_argument("--model-name", default=_env("MODEL_NAME"), help="name clients use")
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=_env_int("PORT", 8000))
    serve.add_argument("--api-key", default=_env("API_KEY"), help="require this Bearer key")
    _option(serve, "--max-queue", 64, "waiting requests before 429")
    serve.add_argument(
        "--send-timeout",
        type=float,
        default=float(_env("SEND_TIMEOUT", "30") or 30),
        help="seconds a streaming client may stop reading before it is dropped",
    )
    limits = serve.add_argument_group("request limits (past them: 413 for the body, else 400)")
    _option(limits, "--max-body-bytes", 4 * 2**20)
    _option(limits, "--max-n", 16, "choices per prompt")
    _option(limits, "--max-stop", 16, "stop strings per request")
    _option(limits, "--max-stop-chars", 256, "characters per stop string")
    serve.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info"),
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn log level",
    )

    generate = commands.add_parser("generate", help="complete one prompt in the terminal")
    generate.add_argument("prompt")
    add_model_arguments(generate)
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--presence-penalty", type=float, default=0.0, help="-2 to 2")
    generate.add_argument("--frequency-penalty", type=float, default=0.0, help="-2 to 2")
    generate.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="> 0; 1 = off, > 1 fewer repeats"
    )
    generate.add_argument("--stop", action="append", help="stop string (repeatable)")
    generate.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap the prompt in the chat template",
    )

    bench = commands.add_parser("bench", help="benchmark speculative vs target-only decoding")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for engine.bench")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command in ("serve", "generate"):
        try:
            engine_config(args)
            if args.command == "generate":
                _sampling_params(args)
        except ValueError as exc:
            print(
                f"specserve: {in_flags(str(exc), commands.choices[args.command])}", file=sys.stderr
            )
            return 2
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        from engine.bench import main as bench_main

        return bench_main(args.bench_args)
    from server.serve import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
