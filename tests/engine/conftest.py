from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)


@pytest.fixture(params=("avx2", "avx512"))
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each bf16 kernel this CPU can run, restoring the one in force afterwards."""
    from engine import cpu_linear

    if request.param not in cpu_linear.supported_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    before = cpu_linear.isa()
    assert cpu_linear.set_isa(request.param) == request.param
    try:
        yield request.param
    finally:
        cpu_linear.set_isa(before)


VOCAB = 320
ARCHITECTURES = ("llama", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox")


def tiny_config(arch: str, layers: int = 2, hidden: int = 64, vocab: int = VOCAB):
    # Untied heads: with tied embeddings a random model mostly repeats its input token, and then
    # any two random models agree, which would make "unrelated draft" tests meaningless.
    common = {
        "vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False,
    }  # fmt: skip
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **common,
        )  # fmt: skip
    if arch == "qwen2":
        return Qwen2Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            **common,
        )  # fmt: skip
    if arch == "qwen3":
        return Qwen3Config(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            max_position_embeddings=512, **common,
        )  # fmt: skip
    if arch == "opt":
        return OPTConfig(
            hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=hidden,
            **common,
        )  # fmt: skip
    if arch == "gpt2":
        return GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common,
        )  # fmt: skip
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.25, **common,
        )  # fmt: skip
    raise ValueError(arch)


def tiny_model(
    arch: str,
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    vocab: int = VOCAB,
    sharpen: float = 8.0,
) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = tiny_config(arch, layers, hidden, vocab)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives nearly flat logits; sharpen them so greedy argmax is well separated and
    # a draft equal to the target really accepts everything.
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(sharpen)
    return model.eval().requires_grad_(False)


def reference_penalise(
    logits: torch.Tensor,
    generated: list[int],
    prompt: list[int],
    presence: float,
    frequency: float,
    repetition: float,
    bias: dict[int, float],
) -> torch.Tensor:
    """One position's logits [V] after logit bias and repetition, frequency and presence
    penalties, the plain way, token by token (engine/penalties.py does it batched)."""
    out = logits.double().clone()
    for token, value in bias.items():
        out[token] += value
    for token in set(prompt) | set(generated):
        if repetition != 1.0:
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in set(generated):
        out[token] -= frequency * generated.count(token) + presence
    return out


def perturbed(model: PreTrainedModel, scale: float, seed: int = 123) -> PreTrainedModel:
    """A copy of ``model`` with noise on every weight: a draft that agrees only partly."""
    clone = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    clone.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in clone.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale * param.std())
    return clone.eval().requires_grad_(False)


def build_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the spot: real multi-byte and merge behaviour."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(
        ["the quick brown fox jumps over the lazy dog", "hello world", "def f(x): return x"]
    )
