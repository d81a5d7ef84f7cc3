"""The ``specserve`` command: serve, generate, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"SPECSERVE_{name}", default)


def _env_int(name: str, default: int) -> int:
    value = _env(name)
    return int(value) if value else default


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
    group.add_argument(
        "--gamma",
        type=int,
        default=_env_int("GAMMA", 6),
        help="most draft tokens per round (0 = target-only); adaptive gamma picks 0..this",
    )
    group.add_argument(
        "--max-slots",
        type=int,
        default=_env_int("MAX_SLOTS", 8),
        help="KV slots (concurrent requests)",
    )
    group.add_argument(
        "--max-len",
        type=int,
        default=_env_int("MAX_LEN", 2048),
        help="tokens per slot (prompt + output)",
    )
    group.add_argument(
        "--dtype", default=_env("DTYPE", "auto"), choices=["auto", "bf16", "fp16", "fp32"]
    )
    group.add_argument("--device", default=_env("DEVICE", "auto"), help="auto, cpu, cuda, cuda:N")
    group.add_argument(
        "--draft-vocab",
        type=int,
        default=_env_int("DRAFT_VOCAB", 0),
        help="restrict the draft's LM head to the N most frequent token ids (0 = full)",
    )
    group.add_argument(
        "--adaptive-gamma",
        action=argparse.BooleanOptionalAction,
        default=_env("ADAPTIVE_GAMMA", "1") != "0",
        help="choose each round's gamma (up to --gamma, 0 included) from measured costs and "
        "per-request acceptance (default on)",
    )
    group.add_argument(
        "--prompt-lookup",
        type=int,
        default=_env_int("PROMPT_LOOKUP", 3),
        help="longest n-gram prompt lookup matches (free drafts copied from the context, used "
        "per row when they promise more than the draft model; 0 = off)",
    )
    group.add_argument(
        "--prefill-budget",
        type=int,
        default=_env_int("PREFILL_BUDGET", 1024),
        help="prompt tokens admitted per engine step, so decoding goes on between long "
        "prefills (at least one request per step; 0 = fill every free slot at once)",
    )
    group.add_argument(
        "--prefill-chunk",
        type=int,
        default=_env_int("PREFILL_CHUNK", 512),
        help="prompt tokens computed per engine step: a longer prompt is prefilled over "
        "several steps with a decode round between chunks (0 = whole prompts)",
    )
    group.add_argument(
        "--draft-window",
        type=int,
        default=_env_int("DRAFT_WINDOW", 256),
        help="context tokens the draft model copies when a row first drafts (0 = all)",
    )
    group.add_argument(
        "--cpu-kernels",
        action=argparse.BooleanOptionalAction,
        default=_env("CPU_KERNELS", "1") != "0",
        help="CPU bf16: use specserve's GEMM kernel and eager attention (default on)",
    )
    group.add_argument(
        "--draft-int8",
        action=argparse.BooleanOptionalAction,
        default=_env("DRAFT_INT8", "1") != "0",
        help="with the CPU kernels, draft decode steps use int8 weights (default on)",
    )
    group.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=_env("PREFIX_CACHE", "1") != "0",
        help="a request reuses the K/V of the longest prefix of its prompt that a free slot "
        "still holds (a chat's earlier turns; default on)",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=_env_int("THREADS", 0),
        help="CPU threads (0 = torch default)",
    )


def build_engine(args: argparse.Namespace):
    """Loads the pair named by ``args`` and returns (engine, target LoadedModel, draft)."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.loader import load_pair

    lookup_only = args.draft == "ngram"
    draft_name = "none" if lookup_only else args.draft
    target, draft = load_pair(args.target, draft_name, dtype=args.dtype, device=args.device)
    speculates = draft is not None or (lookup_only and args.prompt_lookup > 0)
    gamma = args.gamma if speculates else 0
    config = EngineConfig(
        gamma=gamma,
        max_slots=args.max_slots,
        max_len=args.max_len,
        dtype=args.dtype,
        device=args.device,
        num_threads=args.threads or None,
        cpu_kernels=args.cpu_kernels,
        draft_int8=args.draft_int8,
        prefix_cache=args.prefix_cache,
        draft_vocab=args.draft_vocab,
        adaptive_gamma=args.adaptive_gamma,
        draft_window=args.draft_window,
        prompt_lookup=args.prompt_lookup if speculates else 0,
        prefill_budget=args.prefill_budget,
        prefill_chunk=args.prefill_chunk,
    )
    engine = Engine(
        target.model, draft.model if draft is not None else None, config, target.tokenizer
    )
    return engine, target, draft


def _generate(args: argparse.Namespace) -> int:
    from engine.config import SamplingParams

    started = time.perf_counter()
    engine, target, draft = build_engine(args)
    loaded = time.perf_counter()
    prompt = args.prompt
    if args.chat:
        prompt = target.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop or [],
    )
    request_id = engine.add_request(prompt, params)
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
    serve.add_argument(
        "--max-queue",
        type=int,
        default=_env_int("MAX_QUEUE", 64),
        help="waiting requests before 429",
    )
    serve.add_argument(
        "--send-timeout",
        type=float,
        default=float(_env("SEND_TIMEOUT", "30") or 30),
        help="seconds a streaming client may stop reading before it is dropped",
    )
    limits = serve.add_argument_group("request limits (past them: 413 for the body, else 400)")
    limits.add_argument("--max-body-bytes", type=int, default=_env_int("MAX_BODY_BYTES", 4 * 2**20))
    limits.add_argument(
        "--max-n", type=int, default=_env_int("MAX_N", 16), help="choices per prompt"
    )
    limits.add_argument(
        "--max-stop", type=int, default=_env_int("MAX_STOP", 16), help="stop strings per request"
    )
    limits.add_argument(
        "--max-stop-chars",
        type=int,
        default=_env_int("MAX_STOP_CHARS", 256),
        help="characters per stop string",
    )
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
    if args.command == "generate":
        return _generate(args)
    if args.command == "bench":
        from engine.bench import main as bench_main

        return bench_main(args.bench_args)
    from server.serve import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
