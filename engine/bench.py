"""Batch-1 benchmark on Spec-Bench prompts: our target-only vs our speculation vs HF.

    python -m engine.bench --per-task 2          # 12 prompts, a few minutes on a laptop CPU
    python -m engine.bench                       # all 48 prompts
    python -m engine.bench --repeats 2           # best of two alternating runs per prompt
    python -m engine.bench --forwards            # milliseconds per model forward, by shape
    python -m engine.bench --sampled 0.7         # sampled: seeded (coupled) vs unseeded

Prints a Markdown table (tokens/s end to end, speedup, acceptance, tokens per round) per task
and overall, and writes the raw figures to JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from engine import cpu_linear
from engine.config import (
    CLI_DRAFT_HEAD,
    CLI_DRAFT_VOCAB,
    CLI_DRAFT_WINDOW,
    DRAFT_WEIGHTS,
    EngineConfig,
    SamplingParams,
    default_draft_head,
)
from engine.engine import Engine, draft_vocab_subset
from engine.loader import LoadedModel, load_pair
from engine.runner import RaggedBatch

DEFAULT_PROMPTS = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "spec_bench_dev.jsonl"
)


def load_prompts(
    path: Path, per_task: int | None, tasks: set[str] | None = None
) -> list[tuple[str, str]]:
    taken: dict[str, int] = defaultdict(int)
    prompts = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        task = item.get("task") or item.get("category") or "all"
        if (per_task is not None and taken[task] >= per_task) or (tasks and task not in tasks):
            continue
        taken[task] += 1
        prompts.append((task, item["turns"][0]))
    return prompts


def chat_ids(target: LoadedModel, prompt: str) -> list[int]:
    text = target.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return list(target.tokenizer(text, add_special_tokens=False).input_ids)


def run_engine(
    engine: Engine,
    ids: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    seed: int | None = None,
    coupled: bool = True,
) -> dict:
    """One request alone. Sampled (``temperature`` > 0) with ``seed``: as the client's seed
    (coupled sampling) when ``coupled``, else as the seed the server draws for a request
    without one (rejection sampling), so both paths replay the same randomness each run."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    if temperature > 0 and coupled:
        params = replace(params, seed=seed)
    seeds = [seed] if temperature > 0 and not coupled and seed is not None else None
    started = time.perf_counter()
    (result,) = engine.generate([ids], params, seeds=seeds)
    elapsed = time.perf_counter() - started
    stats = result.stats
    return {
        "tokens": len(result.token_ids),
        "seconds": elapsed,
        # Prompt processing up to the first token: the same work for target-only and spec.
        "ttft": stats.first_token_time - stats.arrival_time,
        "token_ids": result.token_ids,
        "rounds": stats.rounds,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
    }


@torch.inference_mode()
def run_hf(target: LoadedModel, draft: LoadedModel | None, ids: list[int], max_tokens: int) -> dict:
    input_ids = torch.tensor([ids], device=target.model.device)
    kwargs = {"assistant_model": draft.model} if draft is not None else {}
    started = time.perf_counter()
    out = target.model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_tokens,
        do_sample=False,
        pad_token_id=target.tokenizer.pad_token_id or target.tokenizer.eos_token_id,
        **kwargs,
    )
    elapsed = time.perf_counter() - started
    return {"tokens": out.shape[1] - len(ids), "seconds": elapsed}


def _rate(group: list[dict], system: str) -> float:
    """Tokens per second of ``system`` over the group's rows, end to end."""
    tokens = sum(r[system]["tokens"] for r in group)
    seconds = sum(r[system]["seconds"] for r in group)
    return tokens / seconds if seconds else 0.0


def _decode_rate(group: list[dict], system: str) -> float:
    """Tokens per second after the first token: what speculation changes, without the shared
    prompt prefill."""
    tokens = sum(r[system]["tokens"] - 1 for r in group)
    seconds = sum(r[system]["seconds"] - r[system]["ttft"] for r in group)
    return tokens / seconds if seconds else 0.0


def summarise(rows: list[dict], systems: list[str]) -> str:
    tasks = sorted({r["task"] for r in rows}) + ["overall"]
    header = ["task", "n"] + [f"{s} tok/s" for s in systems]
    header += ["spec speedup", "HF assisted speedup", "decode speedup", "acceptance"]
    header += ["tokens/round"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        group = [r for r in rows if task in ("overall", r["task"])]
        rate = {system: _rate(group, system) for system in systems}
        drafted = sum(r["spec"]["drafted"] for r in group)
        accepted = sum(r["spec"]["accepted"] for r in group)
        rounds = sum(r["spec"]["rounds"] for r in group)
        cells = [task, str(len(group))] + [f"{rate[s]:.2f}" for s in systems]
        cells.append(f"{rate['spec'] / rate['target']:.2f}x")
        if "hf_assisted" in rate and rate.get("hf_target"):
            cells.append(f"{rate['hf_assisted'] / rate['hf_target']:.2f}x")
        else:
            cells.append("-")
        decode = {system: _decode_rate(group, system) for system in ("target", "spec")}
        cells.append(f"{decode['spec'] / decode['target']:.2f}x" if decode["target"] else "-")
        cells.append(f"{accepted / drafted:.1%}" if drafted else "-")
        cells.append(f"{(accepted + rounds) / rounds:.2f}" if rounds else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SAMPLED_SYSTEMS = ("target", "spec", "spec_rejection")


def summarise_sampled(rows: list[dict]) -> str:
    """The ``--sampled`` table: target-only sampling, speculation on a seeded request
    (coupled) and on an unseeded one (rejection), per task and overall."""
    tasks = sorted({r["task"] for r in rows}) + ["overall"]
    header = ["task", "n", "target tok/s", "coupled tok/s", "rejection tok/s"]
    header += ["coupled decode speedup", "rejection decode speedup"]
    header += ["coupled acceptance", "rejection acceptance", "coupled = target-only"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        group = [r for r in rows if task in ("overall", r["task"])]
        rate = {system: _rate(group, system) for system in SAMPLED_SYSTEMS}
        decode = {system: _decode_rate(group, system) for system in SAMPLED_SYSTEMS}
        cells = [task, str(len(group))] + [f"{rate[s]:.2f}" for s in SAMPLED_SYSTEMS]
        for system in SAMPLED_SYSTEMS[1:]:
            cells.append(f"{decode[system] / decode['target']:.2f}x" if decode["target"] else "-")
        for system in SAMPLED_SYSTEMS[1:]:
            drafted = sum(r[system]["drafted"] for r in group)
            accepted = sum(r[system]["accepted"] for r in group)
            cells.append(f"{accepted / drafted:.1%}" if drafted else "-")
        cells.append(f"{sum(r['identical'] for r in group)}/{len(group)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def forward_times(engine: Engine, context: int = 200, calls: int = 10) -> str:
    """Median milliseconds of one target and one draft forward per shape, ``context`` tokens
    into slot 0 (the shapes a batch-1 round and a 4-row round run). The draft's go through
    the head its steps use (restricted under ``--draft-vocab``)."""
    forwards: list[tuple[str, Callable[[RaggedBatch], object]]] = [
        ("target", lambda batch: engine.target.forward(batch, "last"))
    ]
    if engine.proposer is not None:
        forwards.append(("draft", engine.proposer.logits))
    # (rows, tokens per row): a batch-1 round's draft steps take 1-2 tokens, its verify ~5.
    shapes = [(1, 1), (1, 2), (1, 4), (2, 1), (4, 1), (8, 1)]
    shapes = [(r, t) for r, t in shapes if r <= engine.config.max_slots]
    lines = ["| model | " + " | ".join(f"{r} row x {t} tok" for r, t in shapes) + " |"]
    lines.append("|---" * (len(shapes) + 1) + "|")
    for name, forward in forwards:
        cells = []
        for rows, tokens in shapes:
            batch = RaggedBatch(
                [[1] * tokens] * rows, list(range(rows)), [context] * rows, [tokens] * rows
            )
            times = []
            for _ in range(calls + 2):
                start = time.perf_counter()
                forward(batch)
                times.append(time.perf_counter() - start)
            cells.append(f"{statistics.median(times[2:]) * 1000:.1f} ms")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_window(spec: str) -> tuple[int, int]:
    """``"256"`` (the last 256 tokens), ``"128+128"`` (the first 128 and the last 128) or
    ``"0"`` (the whole context) as (head, window)."""
    head, _, window = spec.rpartition("+")
    return int(head or 0), int(window)


def draft_context(ids: list[int], head: int, window: int) -> list[int]:
    """What the draft's slot holds of a context: all of it, or its head and its window."""
    if window == 0 or len(ids) <= head + window:
        return ids
    return ids[:head] + ids[-window:]


def _with_context(
    candidates: torch.Tensor, tokens: list[int], kept: set[int], outside: set[int]
) -> torch.Tensor:
    """``candidates`` (the ids a restricted head scores) plus those of ``tokens`` neither in
    its subset (``kept``) nor already added (``outside``, updated)."""
    new = sorted({t for t in tokens if t not in kept} - outside)
    if not new:
        return candidates
    outside.update(new)
    return torch.cat([candidates, torch.tensor(new, dtype=torch.long, device=candidates.device)])


def draft_agreement(
    engine: Engine,
    prompts: list[tuple[str, list[int]]],
    windows: list[tuple[int, int]],
    max_tokens: int,
    vocabs: tuple[int, ...] = (0,),
) -> str:
    """How often the draft's argmax equals the target's greedy token, per task, draft context,
    given as (head, window) (window 0 = whole context), and draft vocabulary (0 = the head the
    engine runs; N = its first N ids, the special ones and the context's own tokens, as
    ``--draft-vocab N``): each prompt's target continuation is generated once, then the draft,
    given the context's first ``head`` and last ``window`` tokens, predicts it one token at a
    time as its decode steps would (teacher forcing: no rejection cuts a run short)."""
    assert engine.proposer is not None
    proposer = engine.proposer
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    continuations = [engine.generate([ids], params)[0].token_ids for _, ids in prompts]
    tasks = sorted({task for task, _ in prompts})
    lines = [
        "| draft window | " + " | ".join(tasks) + " | overall |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    subsets = {
        size: draft_vocab_subset(size, engine.vocab_size, engine.special_ids) for size in vocabs
    }
    kept = {size: set(s.tolist()) for size, s in subsets.items() if s is not None}
    for head, window in windows:
        hits: dict[int, dict[str, list[int]]] = {
            size: defaultdict(lambda: [0, 0]) for size in vocabs
        }
        for (task, ids), continuation in zip(prompts, continuations, strict=True):
            context = draft_context(ids[:-1], head, window)
            proposer.runner.prefill(RaggedBatch([context], [0], [0], [len(context)]))
            fed = [ids[-1], *continuation[:-1]]
            # Each restricted head scores its subset and the context's tokens it lacks.
            outside: dict[int, set[int]] = {size: set() for size in kept}
            candidates = {
                size: _with_context(subsets[size], ids, kept[size], outside[size]) for size in kept
            }
            # The engine's own head, when restricted, scores the context's tokens as in serving.
            own_outside = proposer.outside(ids)
            for position, (token, target_token) in enumerate(zip(fed, continuation, strict=True)):
                batch = RaggedBatch([[token]], [0], [len(context) + position], [1])
                own_outside |= proposer.outside([token])
                proposer.also_score(own_outside)
                logits = proposer.logits(batch)[0]
                for size in vocabs:
                    guess = logits.argmax().item()
                    if size in kept:
                        candidates[size] = _with_context(
                            candidates[size], [token], kept[size], outside[size]
                        )
                        guess = candidates[size][logits[candidates[size]].argmax()].item()
                    hits[size][task][0] += int(guess == target_token)
                    hits[size][task][1] += 1
        for size in vocabs:
            counts = hits[size]
            total = [sum(h[0] for h in counts.values()), sum(h[1] for h in counts.values())]
            cells = [f"{counts[t][0] / counts[t][1]:.1%}" if counts[t][1] else "-" for t in tasks]
            cells.append(f"{total[0] / total[1]:.1%}" if total[1] else "-")
            label = "all" if window == 0 else f"{head}+{window}" if head else str(window)
            if size:
                label += f", first {size} ids"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve bench", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--per-task", type=int, default=None, help="prompts per task (all)")
    parser.add_argument(
        "--tasks", default=None, help="comma-separated tasks to take prompts from (all)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--gamma", type=int, default=6)
    parser.add_argument(
        "--draft-vocab", type=int, default=CLI_DRAFT_VOCAB, help="draft LM head size (0 = full)"
    )
    parser.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--adaptive-gamma", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tune-prompt-gemm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--draft-window", type=int, default=CLI_DRAFT_WINDOW)
    parser.add_argument(
        "--draft-head",
        type=int,
        default=None,
        help=f"default {CLI_DRAFT_HEAD}, at most half the window",
    )
    parser.add_argument("--prompt-lookup", type=int, default=3, help="0 = off")
    parser.add_argument("--draft-weights", choices=DRAFT_WEIGHTS, default="int4")
    parser.add_argument(
        "--fused-decoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="our layer loop for Llama-family models (else transformers' modules)",
    )
    parser.add_argument(
        "--forwards", action="store_true", help="only time single forwards per shape and exit"
    )
    parser.add_argument(
        "--agreement",
        default=None,
        help="only measure draft/target greedy agreement for these comma-separated draft "
        "contexts (256: the last 256 tokens; 128+128: the first 128 and the last 128, as "
        "--draft-window 256 --draft-head 128; 0: the whole context) and exit",
    )
    parser.add_argument(
        "--agreement-vocab",
        default="0",
        help="with --agreement, also for the draft's head restricted to the first N token ids "
        "(comma-separated sizes, as --draft-vocab N; 0: the head the engine runs)",
    )
    parser.add_argument("--target", default=None)
    parser.add_argument("--draft", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    parser.add_argument(
        "--sampled",
        type=float,
        default=None,
        metavar="T",
        help="sample at temperature T instead of greedy: target-only sampling, speculation on "
        "a request with a seed (coupled) and on one without (rejection), each prompt with the "
        "seeds --seed + its index; no HF baselines",
    )
    parser.add_argument("--seed", type=int, default=100, help="with --sampled: the first seed")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each prompt this many times per system, alternating systems, and keep the "
        "fastest (a shared machine only ever slows a run down)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"))
    args = parser.parse_args(argv)

    target, draft = load_pair(args.target, args.draft, args.dtype, args.device, progress=True)
    if draft is None:
        parser.error("the benchmark needs a draft model")
    prompts = load_prompts(
        args.prompts, args.per_task, set(args.tasks.split(",")) if args.tasks else None
    )
    if not prompts:
        parser.error(f"no prompts in {args.prompts} for tasks {args.tasks}")
    max_len = max(len(chat_ids(target, p)) for _, p in prompts) + args.max_tokens + 8
    # Cold prompts: with the prefix cache a repeat (or the next prompt's shared chat header)
    # would skip prefill, and HF's generate, the other column, caches nothing across calls.
    config = EngineConfig(
        gamma=0,
        max_slots=1,
        max_len=max_len,
        cpu_kernels=args.cpu_kernels,
        fused_decoder=args.fused_decoder,
        prefix_cache=False,
        tune_prompt_gemm=args.tune_prompt_gemm,
    )
    # The speculative engine differs from the baseline only in its speculation settings.
    spec_config = replace(
        config,
        gamma=args.gamma,
        draft_vocab=args.draft_vocab,
        adaptive_gamma=args.adaptive_gamma,
        draft_window=args.draft_window,
        draft_head=default_draft_head(args.draft_window)
        if args.draft_head is None
        else args.draft_head,
        prompt_lookup=args.prompt_lookup,
        draft_weights=args.draft_weights,
    )
    if args.agreement is not None:
        windows = [parse_window(w) for w in args.agreement.split(",")]
        probe = replace(spec_config, adaptive_gamma=False)  # no use for start-up timings
        engine = Engine(target.model, draft.model, probe, target.tokenizer)
        tokenized = [(task, chat_ids(target, p)) for task, p in prompts]
        vocabs = tuple(int(size) for size in args.agreement_vocab.split(","))
        print(draft_agreement(engine, tokenized, windows, args.max_tokens, vocabs))
        return 0
    if args.forwards:
        timing = replace(spec_config, adaptive_gamma=False, max_slots=8, max_len=max(max_len, 256))
        print(forward_times(Engine(target.model, draft.model, timing, target.tokenizer)))
        return 0
    baseline = Engine(target.model, None, config, target.tokenizer)
    speculative = Engine(target.model, draft.model, spec_config, target.tokenizer)
    if args.sampled is not None and args.sampled <= 0:
        parser.error("--sampled needs a temperature above 0")
    hf_target = hf_draft = None
    if args.sampled is not None:
        # HF's sampling draws other random numbers: nothing to compare.
        systems = list(SAMPLED_SYSTEMS)
    else:
        systems = ["target", "spec"] + ([] if args.no_hf else ["hf_target", "hf_assisted"])
    if "hf_target" in systems:
        # Our engines patch their models' linears; HF runs on untouched copies of the weights.
        hf_target, hf_draft = load_pair(args.target, args.draft, args.dtype, args.device)
    temperature = args.sampled or 0.0

    def run_system(system: str, ids: list[int], seed: int) -> dict:
        if system == "target":
            return run_engine(baseline, ids, args.max_tokens, temperature, seed)
        if system in ("spec", "spec_rejection"):
            coupled = system == "spec"
            return run_engine(speculative, ids, args.max_tokens, temperature, seed, coupled)
        draft_model = hf_draft if system == "hf_assisted" else None
        return run_hf(hf_target, draft_model, ids, args.max_tokens)

    # Warm-up: first calls pay one-off allocation and kernel selection.
    warm = chat_ids(target, "Say hi.")
    run_engine(baseline, warm, 4)
    run_engine(speculative, warm, 8)

    rows = []
    for index, (task, prompt) in enumerate(prompts):
        ids = chat_ids(target, prompt)
        row = {"task": task, "prompt_tokens": len(ids)}
        for _ in range(max(1, args.repeats)):
            for system in systems:
                result = run_system(system, ids, args.seed + index)
                if system not in row or result["seconds"] < row[system]["seconds"]:
                    row[system] = result
        row["identical"] = row["target"]["token_ids"] == row["spec"]["token_ids"]
        rows.append(row)
        rates = "  ".join(
            f"{s}={row[s]['tokens'] / row[s]['seconds']:.2f}" for s in systems if row[s]["seconds"]
        )
        print(f"[{index + 1}/{len(prompts)}] {task:<14} {rates}", file=sys.stderr, flush=True)

    identical = sum(r["identical"] for r in rows)
    table = summarise(rows, systems) if args.sampled is None else summarise_sampled(rows)
    decoding = "greedy" if args.sampled is None else f"sampled at T {args.sampled}"
    kernels = cpu_linear.isa() if args.cpu_kernels else "off"
    machine = (
        f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {speculative.target.dtype}, "
        f"device {speculative.target.device}, CPU kernels {kernels}"
    )
    print(table)
    print(
        f"\n{len(rows)} prompts, {decoding}, max {args.max_tokens} new tokens, batch 1, "
        f"gamma={args.gamma}; spec output identical to target-only on {identical}/{len(rows)}; "
        f"machine: {machine}"
    )
    for r in rows:
        for system in systems:
            r[system].pop("token_ids", None)
    args.out.write_text(
        json.dumps(
            {
                "machine": machine,
                "args": vars(args) | {"prompts": str(args.prompts), "out": str(args.out)},
                "rows": rows,
                "table": table,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
