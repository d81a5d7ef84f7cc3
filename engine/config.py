from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PROPOSERS = ("auto", "draft", "ngram")
# What a request's output may be constrained to (engine/grammar.py): a JSON schema, any JSON
# object, a regular expression, one of a list of strings (JSON text), a Lark or GBNF grammar.
GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
DRAFT_WEIGHTS = ("bf16", "int8", "int4")  # the weights a draft may decode on (cpu_linear)
# The command line's draft context (serve, generate, bench): see draft_window and draft_head.
CLI_DRAFT_WINDOW = 256
CLI_DRAFT_HEAD = 128  # of the window: 128 + the latest 128
# The command line's restricted draft head (draft_vocab): on the default pair a draft step 16 %
# cheaper for about the same acceptance (README, "--draft-vocab").
CLI_DRAFT_VOCAB = 32768
# The command line's prompt lookup (longest n-gram); also what a request's predicted output is
# looked up with where the engine's own lookup is off.
CLI_PROMPT_LOOKUP = 3


def cache_dir() -> Path:
    """Where converted models, built kernels and kept calibrations live ($SPECSERVE_CACHE).
    Here, with the settings, so the command line can name it without importing torch."""
    configured = os.environ.get("SPECSERVE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "specserve"


def default_draft_head(window: int) -> int:
    """The command line's draft head when none is given: CLI_DRAFT_HEAD, but never more than
    half of a smaller window, so that ``--draft-window 64`` alone means 32 + the latest 32."""
    return min(CLI_DRAFT_HEAD, window // 2)


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings; fixed for the life of an engine."""

    gamma: int = 4  # draft tokens proposed per row per round; 0 = target-only
    max_slots: int = 8  # KV slots, i.e. the most requests decoded at once
    max_len: int = 2048  # prompt + generated tokens per slot
    dtype: str = "auto"  # auto | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int | None = None  # CPU intra-op threads; None keeps torch's default
    # CPU bf16: our small-batch GEMM kernel (engine/cpu_linear.py) and eager attention for the
    # target, so a 5-token verify costs ~1.2x one token and its logits are bit-identical to
    # one-token decoding.
    cpu_kernels: bool = True
    # With the CPU kernels: the weights the draft model's decode steps (<= 8 tokens) stream:
    # "bf16" (the model's own), "int8" (one scale per row; half the bytes) or "int4" (groups of
    # 32 with a scale and a min, GGUF Q4_1-like; 0.625 bytes a weight). The steps are bound by
    # streaming weights, and on the default pair greedy agreement measured 70 % (bf16), 70 %
    # (int8), 69 % (int4; 68 % with groups of 64), so int4, the fewest bytes, is the default.
    # Activations are int8 in the quantised kinds. Proposals may shift slightly, the output
    # cannot: the target verifies.
    draft_weights: str = "int4"
    # With the CPU kernels on a CPU without bf16 instructions: time torch's fp32 GEMM against
    # our prompt GEMM on one of the target's layers at start-up and send prompts to whichever
    # is faster at their length (engine/cpu_linear.py ``tune_prompt_gemm``; once per process).
    # Off: prompts always take ours.
    tune_prompt_gemm: bool = False
    # With the CPU kernels: Llama/Qwen2/Qwen3 run our own layer loop (engine/fused_decoder.py)
    # instead of transformers' modules; same weights, same numbers, a fraction of the glue.
    fused_decoder: bool = True
    # On CUDA: decode, draft and verify forwards replay CUDA graphs (engine/graphs.py), one per
    # shape (rows and keys rounded up to powers of two), captured the first time it comes.
    cuda_graphs: bool = True
    # Draft LM head restricted to the first N token ids (byte-level BPE ids follow merge order,
    # i.e. frequency), plus the special tokens at the end of the vocabulary and the rows'
    # own context tokens (a document's rare names recur in its answer). 0 = full head.
    # Lossless either way: the target verifies against its full distribution.
    draft_vocab: int = 0
    # Choose each round's gamma (0..gamma) from per-request acceptance and start-up timings of
    # the draft and verify forwards (engine/gamma.py).
    adaptive_gamma: bool = False
    # When a row first drafts, its draft slot gets at most this many of the tokens so far
    # (0 = all): the first draft_head of them and the latest. Prefilling a long prompt into
    # the draft costs a third of the target's prefill on the default pair; verification keeps
    # the output lossless whatever the draft sees.
    draft_window: int = 0
    # Part of the window taken from the start of the context: the system prompt, the
    # instruction, the start of a document (a summary draws on an article's opening; the
    # latest tokens alone read like more article).
    draft_head: int = 0
    # Prompt lookup (engine/ngram.py): rows whose last 2..N tokens occurred earlier in their
    # context may take the tokens that followed as free drafts, when that promises more tokens
    # per second than the draft model. 0 = off. With no draft model and gamma > 0 it is the
    # only proposer.
    prompt_lookup: int = 0
    # A new request goes to the free slot whose target K/V (left by its previous request) shares
    # the longest prefix with its prompt, and computes only the rest; a prefix another running
    # request holds, or is computing, is copied from its slot (engine/scheduler.py).
    prefix_cache: bool = True
    # Prompt tokens admitted per step (at least one request; 0 = every free slot at once).
    # Decode rounds of running requests go on between admissions.
    prefill_budget: int = 1024
    # Prompt tokens computed per step across the rows still prefilling while other rows decode
    # (0 = whole prompts): a long prompt is prefilled over several steps with a decode round
    # between its chunks, so the running rows stall for one chunk at a time, not for the whole
    # prompt. With nothing decoding, the shortest prompts go first, this many tokens at most,
    # so that a prompt arriving meanwhile does not wait out a long one either.
    prefill_chunk: int = 512
    # ... and fewer where the target's measured prompt pace would make a chunk last longer
    # than this many seconds (engine/prefill_pace.py; 0 = tokens only): on a GPU 512 tokens
    # take milliseconds, on a 2-core CPU ~11 s of frozen streams.
    prefill_chunk_seconds: float = 6.0
    # A directory where adaptive gamma keeps its start-up timings (engine/calibration.py): a
    # later start with the same models, machine and settings checks a few of them instead of
    # timing everything (None: time at every start).
    calibration_cache: str | None = None

    def __post_init__(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.draft_window < 0:
            raise ValueError(f"draft_window must be >= 0, got {self.draft_window}")
        if self.draft_head < 0 or (self.draft_window and self.draft_head >= self.draft_window):
            raise ValueError(
                f"draft_head must be >= 0 and below draft_window ({self.draft_window}), "
                f"got {self.draft_head}"
            )
        if self.prefill_budget < 0:
            raise ValueError(f"prefill_budget must be >= 0, got {self.prefill_budget}")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0, got {self.prefill_chunk}")
        if self.prefill_chunk_seconds < 0:
            raise ValueError(
                f"prefill_chunk_seconds must be >= 0, got {self.prefill_chunk_seconds}"
            )
        if self.prompt_lookup < 0:
            raise ValueError(f"prompt_lookup must be >= 0, got {self.prompt_lookup}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.draft_weights not in DRAFT_WEIGHTS:
            raise ValueError(
                f"draft_weights must be one of {', '.join(DRAFT_WEIGHTS)}, "
                f"got {self.draft_weights!r}"
            )
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint on a request's output: ``kind`` one of GRAMMAR_KINDS, ``text`` its source
    (the schema as JSON text, the regex, the JSON list of choices, the Lark or GBNF grammar;
    ignored for json_object)."""

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(
                f"grammar kind must be one of {', '.join(GRAMMAR_KINDS)}, got {self.kind!r}"
            )


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI semantics; temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0  # vLLM's: drop tokens below min_p x the top token's probability (0 = off)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    gamma: int | None = None  # lower the engine's gamma for this request
    logprobs: int | None = None  # top-N target logprobs per generated token (0 = chosen token only)
    prompt_logprobs: int | None = None  # same for prompt tokens (first is None)
    # Where draft tokens come from: "auto" (prompt lookup when it pays, else the draft model),
    # "draft" (the draft model only) or "ngram" (prompt lookup only, never the draft model).
    proposer: str = "auto"
    # OpenAI's: subtract presence_penalty from the logit of every token the request has
    # generated, and frequency_penalty times its count (both in [-2, 2]; engine/penalties.py).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's: tokens of the prompt or the output get their logit divided by it when positive,
    # multiplied when negative (1 = off; > 1 discourages repeats).
    repetition_penalty: float = 1.0
    # OpenAI's: token id -> value in [-100, 100] added to its logit.
    logit_bias: dict[int, float] | None = None
    # vLLM's: no EOS or stop token id can be generated, and no stop string completes, within
    # the first min_tokens tokens.
    min_tokens: int = 0
    # OpenAI's predicted outputs: token ids the output is expected to mostly repeat (a file
    # being edited). Prompt lookup copies from them first; the target verifies as ever.
    prediction: list[int] | None = None
    # Structured output: only text the grammar accepts is generated, and the request stops
    # when the grammar is complete (engine/grammar.py).
    grammar: GrammarSpec | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), "
                f"got {self.min_tokens}"
            )
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if self.gamma is not None and self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                raise ValueError(f"{name} must be between 0 and 20, got {value}")
        if self.proposer not in PROPOSERS:
            raise ValueError(
                f"proposer must be one of {', '.join(PROPOSERS)}, got {self.proposer!r}"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = float(getattr(self, name))
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be between -2 and 2, got {value}")
            setattr(self, name, value)
        self.repetition_penalty = float(self.repetition_penalty)
        if not 0 < self.repetition_penalty <= 100:
            raise ValueError(
                f"repetition_penalty must be above 0 (1 = off), got {self.repetition_penalty}"
            )
        if self.logit_bias:
            bias = {int(token): float(value) for token, value in self.logit_bias.items()}
            for token, value in bias.items():
                if token < 0:
                    raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
                if not -100 <= value <= 100:
                    raise ValueError(
                        f"logit_bias values must be between -100 and 100, got {value} for {token}"
                    )
            self.logit_bias = bias

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
