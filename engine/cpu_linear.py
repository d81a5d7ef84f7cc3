"""Batch-invariant bf16 (and int8 / int4) linear layers for CPU decoding.

torch's bf16 ``F.linear`` costs nearly linearly in the number of tokens for a few tokens (on
AVX2-only CPUs always; with oneDNN's AVX512-BF16 kernels up to a few dozen), so a speculative
verify forward over gamma+1 tokens would cost about gamma+1 decode steps. ``engine/csrc``'s
kernels stream each weight row once for all tokens instead, which makes a few extra tokens
nearly free; they also give every output element the same summation order whatever the batch,
so verify and plain decoding produce bit-identical logits. ``linear_bf16.c`` runs on AVX2 and
FMA; on CPUs with AVX512-BF16 ``linear_avx512.c`` takes over (``isa``, ``set_isa``,
``SPECSERVE_CPU_ISA=avx2`` to keep the AVX2 one). Prompt prefill, which needs no batch
invariance, goes to a GEMM built for long inputs (``csrc/gemm_bf16.c``) or to torch's own
(``prompt_gemm``).

The kernel is compiled on first use with the system gcc into the specserve cache and loaded with
ctypes. Anything that goes wrong (no gcc, no AVX2, a failed build or self-check) logs one
warning and leaves torch's own kernels in place.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import DRAFT_WEIGHTS, cache_dir

log = logging.getLogger("specserve.cpu_linear")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = tuple(
    _CSRC / name
    for name in (
        "linear_bf16.c",
        "linear_avx512.c",
        "gemm_bf16.c",
        "linear_int8.c",
        "linear_int4.c",
        "attention_bf16.c",
        "decoder_bf16.c",
        "decoder_step.c",
        "race.c",
    )
)
# Explicit ISA flags rather than -march=native: the cache key then fully describes the binary,
# so a cache directory shared between machines never serves code a CPU cannot run.
_CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_LIBS = ("-lm",)
_DISABLE_ENV = "SPECSERVE_CPU_KERNELS"
# "avx2" keeps the AVX2 kernels and the fp32 prompt GEMM on a CPU that has AVX512-BF16 (to
# compare, or to reproduce another machine's numbers); anything else picks the best it has.
_ISA_ENV = "SPECSERVE_CPU_ISA"
ISAS = ("avx2", "avx512")
_IO_DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _avx2_forced() -> bool:
    return os.environ.get(_ISA_ENV, "").lower() == "avx2"


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma", "f16c"} <= flags  # f16c: int4 scales
    except OSError:
        pass
    return False


def _kernel_dir() -> Path:
    return cache_dir() / "kernels"


def _compile(gcc: str) -> Path:
    source = b"".join(path.read_bytes() for path in (*_SOURCES, _CSRC / "bf16.h"))
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + " ".join(_CFLAGS).encode() + version.encode()).hexdigest()[:16]
    target = _kernel_dir() / f"specserve_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [gcc, *_CFLAGS, *map(str, _SOURCES), "-o", tmp, *_LIBS],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"gcc failed: {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would hide it from others sharing the cache
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _self_check(lib: ctypes.CDLL) -> None:
    # A miscompiled or misloaded kernel must not silently corrupt logits.
    generator = torch.Generator().manual_seed(0)
    # bf16-exact inputs: the AVX512 kernel rounds fp32 activations to bf16.
    x = torch.randn(3, 21, generator=generator).bfloat16().float()
    w = torch.randn(13, 21, generator=generator).bfloat16()
    bias = torch.randn(13, generator=generator)
    got = _run(lib, x, w, bias)
    want = F.linear(x, w.float(), bias)
    if got is None or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError("kernel self-check gave wrong results")
    got = _run_gemm(lib, x, w, bias)
    if got is None or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError("prompt GEMM self-check gave wrong results")
    x = torch.randn(3, 64, generator=generator)
    qweight, scale = quantize_int8(torch.randn(5, 64, generator=generator).bfloat16())
    got = _run_int8(lib, x, pack_int8(qweight), 5, scale, bias[:5])
    want = int8_reference(x, qweight, scale, bias[:5])
    if got is None or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError("int8 kernel self-check gave wrong results")
    q, d, m = quantize_int4(torch.randn(5, 64, generator=generator).bfloat16())
    got = _run_int4(lib, x, pack_int4(q, d, m), 5, bias[:5])
    want = int4_reference(x, q, d, m, bias[:5])
    if got is None or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError("int4 kernel self-check gave wrong results")


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get(_DISABLE_ENV, "1") == "0":
            log.info("CPU bf16 kernels disabled by %s=0", _DISABLE_ENV)
            return None
        if not _cpu_supported():
            log.info("CPU bf16 kernels need an x86-64 CPU with AVX2 and FMA; using torch")
            return None
        # gcc specifically: its libgomp is the OpenMP runtime torch already loaded, so the
        # kernel shares torch's thread pool instead of starting a competing one.
        gcc = shutil.which("gcc")
        if gcc is None:
            log.warning("gcc not found; CPU bf16 kernels unavailable, using torch")
            return None
        try:
            lib = ctypes.CDLL(str(_compile(gcc)))
            fn = lib.specserve_linear_bf16
            fn.restype = ctypes.c_int
            fn.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
            ]  # fmt: skip
            lib.specserve_gemm_bf16.restype = ctypes.c_int
            lib.specserve_gemm_bf16.argtypes = fn.argtypes
            int8 = lib.specserve_linear_int8
            int8.restype = ctypes.c_int
            int8.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                ctypes.c_int,
            ]  # fmt: skip
            int4 = lib.specserve_linear_int4
            int4.restype = ctypes.c_int
            int4.argtypes = [
                ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
            ]  # fmt: skip
            lib.specserve_set_isa.restype = ctypes.c_int
            lib.specserve_set_isa.argtypes = [ctypes.c_int]
            lib.specserve_isa.restype = ctypes.c_int
            lib.specserve_best_isa.restype = ctypes.c_int
            lib.specserve_set_isa(0 if _avx2_forced() else 1)
            race = lib.specserve_race_noise
            race.restype = ctypes.c_int
            race.argtypes = [
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                ctypes.c_void_p, ctypes.c_int,
            ]  # fmt: skip
            _self_check(lib)
            # The attention and decoder kernels ship in the same library.
            from engine import cpu_attention, fused_decoder

            cpu_attention.bind(lib)
            fused_decoder.bind(lib)
        except Exception as exc:  # any failure here must degrade to torch, never crash
            log.warning("CPU bf16 kernels unavailable, using torch: %s", exc)
            return None
        _lib = lib
        return lib


def build() -> str | None:
    """The loaded library's file name, which carries the digest of its sources, flags and
    compiler (None where none loaded): what a timing of the kernels holds for."""
    lib = _lib if _tried else _load()
    return None if lib is None else Path(lib._name).name


def available() -> bool:
    """Whether the fast kernel can be used in this process (compiles it on first call)."""
    return _load() is not None


def race_noise(keys: torch.Tensor, ids: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The coupled race's noise [..., n] for CPU ``keys`` [...] (csrc/race.c; ``ids`` [n] or
    None for ids 0..n-1), or None without the kernel."""
    lib = _load()
    if lib is None:
        return None
    keys = keys.contiguous()
    if ids is not None:
        ids = ids.contiguous()
    out = torch.empty((*keys.shape, n), dtype=torch.float32)
    status = lib.specserve_race_noise(
        keys.data_ptr(),
        keys.numel(),
        None if ids is None else ids.data_ptr(),
        n,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError("race noise kernel failed")
    return out


def supported_isas() -> list[str]:
    """The instruction sets the bf16 linear kernel can run on this CPU (none without it)."""
    lib = _load()
    return [] if lib is None else list(ISAS[: lib.specserve_best_isa() + 1])


def isa() -> str | None:
    """The instruction set the bf16 linear kernel runs now, None without the kernel."""
    lib = _load()
    return None if lib is None else ISAS[lib.specserve_isa()]


def set_isa(name: str) -> str:
    """Run the bf16 linear kernel on ``name`` ("avx2" or "avx512", where the CPU has it), for
    tests and comparisons. Returns the instruction set in force. The two sum in different orders,
    so switching between a model's forwards breaks verify/decode bit-identity."""
    lib = _load()
    if lib is None:
        raise RuntimeError("CPU kernels unavailable")
    return ISAS[lib.specserve_set_isa(ISAS.index(name))]


def _operands(
    x: torch.Tensor, bias: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x made contiguous, bias in x's dtype, and the output [..., n] both kernels write."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return x.contiguous(), bias, torch.empty((*x.shape[:-1], n), dtype=x.dtype)


def _bf16_product(
    entry: Callable[..., int], x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``x[..., K] @ weight[N, K]^T + bias`` for a contiguous bf16 ``weight``, ``x`` fp32 or
    bf16, by one of the library's bf16 entry points (they share a signature).

    Returns None if the kernel could not allocate its scratch buffers.
    """
    # Called ~200 times per decode step, so it avoids reshapes and other per-call tensor ops.
    x, bias, y = _operands(x, bias, weight.shape[0])
    n, k = weight.shape
    status = entry(
        x.data_ptr(), weight.data_ptr(), None if bias is None else bias.contiguous().data_ptr(),
        y.data_ptr(), x.numel() // k, n, k, x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return y if status == 0 else None


def _run(
    lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """The product by the decode kernel (``csrc/linear_bf16.c`` or ``linear_avx512.c``)."""
    return _bf16_product(lib.specserve_linear_bf16, x, weight, bias)


def _run_gemm(
    lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """The product by the GEMM for long inputs (prompts), ``csrc/gemm_bf16.c``."""
    return _bf16_product(lib.specserve_gemm_bf16, x, weight, bias)


def quantize_int8(weight: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: ``weight ~ qweight * scale[:, None]``. In chunks of
    rows, so a 150k-row LM head never exists in fp32 all at once."""
    qweight = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start : start + chunk].float()
        row_scale = rows.abs().amax(dim=1).clamp_(min=1e-12) / 127.0
        qweight[start : start + chunk] = (rows / row_scale[:, None]).round_().clamp_(-127, 127)
        scale[start : start + chunk] = row_scale
    return qweight, scale


INT8_BLOCK = 32  # the int8 kernel quantises activations in blocks of this many channels
INT8_GROUP = 4  # weight rows the int8 kernel reads as one packed stream


def pack_int8(qweight: torch.Tensor) -> torch.Tensor:
    """``qweight`` [N, K] in the int8 kernel's layout: rows in groups of ``INT8_GROUP`` (N padded
    with zero rows to whole groups), each group stored block by block (``INT8_BLOCK`` columns of
    each of its rows in turn), so one tile of the kernel streams contiguous memory.
    Shape [padded N, K]; ``unpack_int8`` inverts it. A K the kernel cannot take (not whole
    blocks) stays row-major."""
    n, k = qweight.shape
    if k % INT8_BLOCK:
        return qweight
    padded = -(-n // INT8_GROUP) * INT8_GROUP
    if padded != n:
        qweight = torch.cat([qweight, qweight.new_zeros(padded - n, k)])
    grouped = qweight.reshape(padded // INT8_GROUP, INT8_GROUP, k // INT8_BLOCK, INT8_BLOCK)
    return grouped.transpose(1, 2).contiguous().view(padded, k)


def unpack_int8(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of the row-major matrix ``pack_int8`` packed."""
    padded, k = packed.shape
    if k % INT8_BLOCK:
        return packed[:rows]
    grouped = packed.view(padded // INT8_GROUP, k // INT8_BLOCK, INT8_GROUP, INT8_BLOCK)
    return grouped.transpose(1, 2).reshape(padded, k)[:rows]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the int8 kernel does to its input: int8 blocks of ``INT8_BLOCK`` channels with one
    fp32 scale each, ``x ~ xq * scale`` blockwise (round half to even, like the kernel)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, INT8_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = amax / 127.0
    # Multiplied by 127 / amax as the kernel does: dividing by the scale rounds differently
    # now and then, and a value on a .5 boundary would then land on another integer.
    # (A true division: ``127.0 / amax`` would be reciprocal, then multiply.)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = (blocks * inverse).round_().clamp_(-127, 127)
    return xq.reshape(x.shape).to(torch.int8), block_scale.squeeze(-1)


def int8_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The int8 kernel's result computed with torch (fp32, output in x's dtype)."""
    xq, block_scale = quantize_activations(x)
    dequantized = xq.float().reshape(*x.shape[:-1], -1, INT8_BLOCK) * block_scale[..., None]
    out = F.linear(dequantized.reshape(x.shape), qweight.float() * scale[:, None])
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _run_int8(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    packed: torch.Tensor,
    n: int,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """``x @ W^T + bias`` where ``packed`` is ``pack_int8`` of W's ``n`` int8 rows."""
    x, bias, y = _operands(x, bias, n)
    k = packed.shape[1]
    status = lib.specserve_linear_int8(
        x.data_ptr(), packed.data_ptr(), scale.data_ptr(),
        None if bias is None else bias.contiguous().data_ptr(), y.data_ptr(),
        x.numel() // k, n, k, x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return y if status == 0 else None


INT4_BLOCK = 32  # weights per (d, m) pair along K; also the activation block (INT8_BLOCK)
INT4_GROUP = 4  # weight rows the int4 kernel reads as one packed stream
_INT4_BLOCK_BYTES = INT4_GROUP * INT4_BLOCK // 2 + 2 * INT4_GROUP * 2  # nibbles, then d, m


def quantize_int4(
    weight: torch.Tensor, chunk: int = 8192
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit groups of ``INT4_BLOCK`` along K (GGUF's Q4_1): ``weight ~ q * d + m``
    per group, q uint8 [N, K] in 0..15, d and m fp16 [N, K / INT4_BLOCK]. d and m are rounded to
    fp16 before q is chosen, so q fits the values the kernel multiplies by. In chunks of rows,
    so a 150k-row LM head never exists in fp32 all at once."""
    n, k = weight.shape
    if k % INT4_BLOCK:
        raise ValueError(f"int4 needs K in whole blocks of {INT4_BLOCK}, got {k}")
    q = torch.empty(weight.shape, dtype=torch.uint8)
    d = torch.empty(n, k // INT4_BLOCK, dtype=torch.float16)
    m = torch.empty(n, k // INT4_BLOCK, dtype=torch.float16)
    for start in range(0, n, chunk):
        rows = weight[start : start + chunk].float().reshape(-1, k // INT4_BLOCK, INT4_BLOCK)
        low = rows.amin(dim=-1).half()
        step = ((rows.amax(dim=-1) - low.float()) / 15.0).half()
        safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
        levels = ((rows - low.float()[..., None]) / safe[..., None]).round_().clamp_(0, 15)
        q[start : start + chunk] = levels.reshape(-1, k).to(torch.uint8)
        d[start : start + chunk] = step
        m[start : start + chunk] = low
    return q, d, m


def pack_int4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``quantize_int4``'s output in the int4 kernel's layout (engine/csrc/linear_int4.c): rows
    in groups of ``INT4_GROUP`` (N padded with zero rows), each group block by block, 80 bytes a
    block: rows 0 and 1's 32 values as low and high nibbles of 32 bytes, rows 2 and 3's likewise,
    then the 4 rows' d, then their m (fp16). uint8 [groups, K / INT4_BLOCK * 80]; one group's
    stream is one contiguous row, so groups concatenate and slice along dim 0."""
    n, k = q.shape
    padded = -(-n // INT4_GROUP) * INT4_GROUP
    if padded != n:
        q = torch.cat([q, q.new_zeros(padded - n, k)])
        d = torch.cat([d, d.new_zeros(padded - n, d.shape[1])])
        m = torch.cat([m, m.new_zeros(padded - n, m.shape[1])])
    groups, blocks = padded // INT4_GROUP, k // INT4_BLOCK
    values = q.reshape(groups, INT4_GROUP // 2, 2, blocks, INT4_BLOCK)
    nibbles = values[:, :, 0] | (values[:, :, 1] << 4)  # [groups, pairs, blocks, 32]

    def per_block(t: torch.Tensor) -> torch.Tensor:  # fp16 [padded, blocks] -> [g, blocks, 8]
        return t.reshape(groups, INT4_GROUP, blocks).transpose(1, 2).contiguous().view(torch.uint8)

    stream = torch.cat(
        [nibbles.transpose(1, 2).reshape(groups, blocks, -1), per_block(d), per_block(m)], dim=2
    )
    return stream.reshape(groups, blocks * _INT4_BLOCK_BYTES)


def unpack_int4(packed: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, d and m of the first ``rows`` rows ``pack_int4`` packed."""
    groups, blocks = packed.shape[0], packed.shape[1] // _INT4_BLOCK_BYTES
    stream = packed.reshape(groups, blocks, _INT4_BLOCK_BYTES)
    nibble_bytes = INT4_GROUP * INT4_BLOCK // 2
    pairs = stream[..., :nibble_bytes].reshape(groups, blocks, INT4_GROUP // 2, 1, INT4_BLOCK)
    values = torch.cat([pairs & 0x0F, pairs >> 4], dim=3)  # [g, blocks, pairs, 2, 32]
    q = values.permute(0, 2, 3, 1, 4).reshape(groups * INT4_GROUP, blocks * INT4_BLOCK)

    def per_row(part: torch.Tensor) -> torch.Tensor:  # uint8 [g, blocks, 8] -> fp16 [rows, b]
        halves = part.contiguous().view(torch.float16)  # [g, blocks, 4]
        return halves.transpose(1, 2).reshape(groups * INT4_GROUP, blocks)

    scales = stream[..., nibble_bytes:]
    d, m = per_row(scales[..., : 2 * INT4_GROUP]), per_row(scales[..., 2 * INT4_GROUP :])
    return q[:rows], d[:rows], m[:rows]


def int4_reference(
    x: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """The int4 kernel's result computed with torch (fp32, output in x's dtype)."""
    xq, block_scale = quantize_activations(x)
    dequantized = xq.float().reshape(*x.shape[:-1], -1, INT8_BLOCK) * block_scale[..., None]
    blocks = q.float().reshape(q.shape[0], -1, INT4_BLOCK)
    weight = blocks * d.float()[..., None] + m.float()[..., None]
    out = F.linear(dequantized.reshape(x.shape), weight.reshape(q.shape))
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def _run_int4(
    lib: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``x @ W^T + bias`` where ``packed`` is ``pack_int4`` of W's ``n`` rows; None when the
    kernel refused (more than ``Int4Linear.MAX_ROWS`` rows) or failed."""
    x, bias, y = _operands(x, bias, n)
    k = packed.shape[1] // _INT4_BLOCK_BYTES * INT4_BLOCK
    status = lib.specserve_linear_int4(
        x.data_ptr(), packed.data_ptr(), None if bias is None else bias.contiguous().data_ptr(),
        y.data_ptr(), x.numel() // k, n, k, x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return y if status == 0 else None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a bf16 ``weight`` on CPU via the kernel; output dtype follows ``x``.

    Falls back to ``F.linear`` when the kernel is unavailable or the inputs do not fit it
    (other devices or dtypes, a non-contiguous weight, autograd).
    """
    lib = _lib if _tried else _load()
    if (
        lib is None
        or weight.dtype != torch.bfloat16
        or x.dtype not in _IO_DTYPES
        or not (x.is_cpu and weight.is_cpu)
        or weight.dim() != 2
        or not weight.is_contiguous()  # copying the weight on every call would cost more
        or x.shape[-1] != weight.shape[1]
        or x.numel() == 0
        or weight.numel() == 0
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return _fallback(x, weight, bias)
    if getattr(_prompt_mode, "on", False):
        if _native_bf16_gemm() and x.numel() >= PROMPT_NATIVE_MIN_ROWS * weight.shape[1]:
            return _native_gemm(x, weight, bias)
        if (
            PROMPT_GEMM_MIN_ROWS is not None
            and x.numel() >= PROMPT_GEMM_MIN_ROWS * weight.shape[1]
            and weight.numel() <= PROMPT_GEMM_MAX_WEIGHT
        ):
            return _torch_fp32_gemm(x, weight, bias)
        if x.numel() >= PROMPT_TILED_MIN_ROWS * weight.shape[1]:
            y = _run_gemm(lib, x, weight, bias)
            if y is not None:
                return y
    y = _run(lib, x, weight, bias)
    return _fallback(x, weight, bias) if y is None else y


# Inside prompt_gemm(), inputs of at least this many rows use torch's fp32 GEMM (None: never).
# Where it wins depends on the CPU: on one AVX2 box MKL's sgemm reached ~175 GFLOP/s against
# the decode kernel's ~135 once the bf16 -> fp32 weight copy was shared by 128 rows; on a Zen 3
# box even the decode kernel was faster up to 1024 rows on every layer, and our prompt GEMM
# (below) is faster still, so untimed it is never taken. ``tune_prompt_gemm`` times torch's
# against ours here. Weights above the limit (LM heads) stay on our kernels rather than
# needing a scratch copy of a gigabyte.
PROMPT_GEMM_MIN_ROWS: int | None = None
PROMPT_GEMM_MAX_WEIGHT = 32 * 2**20
# Inside prompt_gemm(), inputs of at least this many rows that the fp32 route does not take go
# to csrc/gemm_bf16.c instead of the decode kernel (it packs 16 weight rows at a time, which a
# few rows of x do not repay). One layer of the 1.5B target on a Zen 3 box, GEMM vs decode
# kernel, ms: 64 rows 58 vs 60, 128 rows 101 vs 120, 256 rows 186 vs 242, 1024 rows 782 vs 1003.
PROMPT_TILED_MIN_ROWS = 96
# Where torch's own bf16 GEMM has native bf16 instructions under it (oneDNN on AVX512-BF16 or
# AMX), it multiplies prompts in bf16 directly: ~400 GFLOP/s on a 2-core Zen 4 against ~120 for
# the fp32 route above, and no weight copy. From this many rows on it matches our AVX512 kernel
# (below, ours is faster: 1.6 vs 2.4 ms for 16 rows of a 1536 x 8960 projection).
PROMPT_NATIVE_MIN_ROWS = 64
_prompt_mode = threading.local()


def _native_bf16_gemm() -> bool:
    global _NATIVE_BF16
    if _NATIVE_BF16 is None:
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        # SPECSERVE_CPU_ISA=avx2 stands for a CPU without bf16 instructions in prefill too.
        _NATIVE_BF16 = not _avx2_forced() and any(
            getattr(torch.cpu, name, lambda: False)() for name in probes
        )
    return _NATIVE_BF16


_NATIVE_BF16: bool | None = None


def in_prompt_gemm() -> bool:
    """Whether this thread is inside ``prompt_gemm()`` (a prompt prefill)."""
    return getattr(_prompt_mode, "on", False)


@contextmanager
def prompt_gemm() -> Iterator[None]:
    """Long inputs in this block (prompt prefill) trade the kernel's batch invariance, which
    only decoding and verification need, for a faster GEMM."""
    previous = getattr(_prompt_mode, "on", False)
    _prompt_mode.on = True
    try:
        yield
    finally:
        _prompt_mode.on = previous


def _torch_fp32_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    scratch = getattr(_prompt_mode, "scratch", None)
    if scratch is None or scratch.numel() < weight.numel():
        # One buffer per thread, grown to the largest layer: a fresh fp32 tensor per call would
        # pay page faults on every layer (~10x the conversion itself).
        scratch = _prompt_mode.scratch = torch.empty(weight.numel(), dtype=torch.float32)
    weight32 = scratch[: weight.numel()].view(weight.shape).copy_(weight)
    out = F.linear(x.float(), weight32, None if bias is None else bias.float())
    return out.to(x.dtype)


def choose_prompt_gemm_rows(
    weight: torch.Tensor,
    max_rows: int = 1024,
    repeats: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> int | None:
    """The fewest rows from which torch's fp32 GEMM beats ours (``csrc/gemm_bf16.c``) on
    ``weight`` here, or None if it loses at ``max_rows``.

    Times both routes (interleaved, best of ``repeats``) at ``max_rows``, then at half as many
    while the fp32 route keeps winning, down to 128: its weight copy costs the same for any
    number of rows, so its lead only grows with them, and where it loses at the largest size
    the shorter ones need no timing.
    """
    k = weight.shape[1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(max_rows, k, generator=generator).to(weight.dtype)
    lib = _lib if _tried else _load()
    if lib is None:
        return None
    routes: dict[str, Callable[[torch.Tensor], object]] = {
        "fp32": lambda rows: _torch_fp32_gemm(rows, weight, None),
        "ours": lambda rows: _run_gemm(lib, rows, weight, None),
    }
    with torch.inference_mode():
        for route in routes.values():  # untimed: the scratch buffer's first-touch page faults
            route(x[:1])
        chosen = None
        rows = max_rows
        while rows >= 128:
            best = dict.fromkeys(routes, float("inf"))
            for _ in range(repeats):
                for name, route in routes.items():
                    started = clock()
                    route(x[:rows])
                    best[name] = min(best[name], clock() - started)
            if best["fp32"] >= best["ours"]:
                break
            chosen = rows
            rows //= 2
    return chosen


def tune_prompt_gemm(weight: torch.Tensor, max_rows: int = 1024) -> int | None:
    """Sets ``PROMPT_GEMM_MIN_ROWS`` from ``choose_prompt_gemm_rows`` the first time it is
    called in a process and returns it; later calls keep that choice, so every engine in a
    process prefills alike (a target-only engine and a speculative one give the same output).

    A no-op where prompts take torch's native bf16 GEMM or the kernel cannot run.
    """
    global PROMPT_GEMM_MIN_ROWS, _prompt_gemm_tuned
    if _prompt_gemm_tuned or _native_bf16_gemm() or weight.dtype != torch.bfloat16:
        return PROMPT_GEMM_MIN_ROWS
    if (_lib if _tried else _load()) is None:
        return PROMPT_GEMM_MIN_ROWS
    started = time.perf_counter()
    PROMPT_GEMM_MIN_ROWS = choose_prompt_gemm_rows(weight.detach(), max_rows)
    _prompt_gemm_tuned = True
    where = "never" if PROMPT_GEMM_MIN_ROWS is None else f"from {PROMPT_GEMM_MIN_ROWS} rows"
    log.info(
        "prompt prefill: torch's fp32 GEMM %s, ours otherwise (timed in %.1f s)",
        where,
        time.perf_counter() - started,
    )
    return PROMPT_GEMM_MIN_ROWS


_prompt_gemm_tuned = False


def _native_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        bias = bias.to(torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), weight, bias).to(x.dtype)


def _fallback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # Same contract as the kernel (result in x's dtype) even for mixed dtypes, which plain
    # F.linear rejects; models never mix them, so the weight copy stays off the hot path.
    if x.dtype != weight.dtype and x.is_floating_point():
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)


class FastLinear(nn.Linear):
    """An ``nn.Linear`` computed by the CPU kernel, sharing the original's parameters.

    Subclassing ``nn.Linear`` (without running its initialiser, which would allocate new
    weights) keeps ``isinstance`` checks, state-dict keys and weight tying working unchanged.
    """

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Int8Linear(FastLinear):
    """A draft model's linear with an int8 copy of its weight for decode steps.

    Draft steps carry a few rows and are bound by reading weights, which int8 halves. Longer
    inputs (the draft's prompt prefill) keep the bf16 kernel: they are bound by arithmetic, and
    the bf16 weight stays shared with the model (tied embeddings, state dict) anyway.
    """

    MAX_ROWS = 8

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        qweight, scale = quantize_int8(linear.weight.detach())
        # Only the kernel's packed layout is kept; ``qweight`` unpacks it for inspection.
        self.register_buffer("packed", pack_int8(qweight), persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    @property
    def qweight(self) -> torch.Tensor:
        """The int8 weight [N, K], row-major (a copy)."""
        return unpack_int8(self.packed, self.out_features)

    def _fits(self, x: torch.Tensor, max_rows: int) -> bool:
        """Whether a quantised kernel can take ``x``: CPU fp32/bf16 rows of whole activation
        blocks, 1 to ``max_rows`` of them, no autograd."""
        return (
            x.dtype in _IO_DTYPES
            and x.is_cpu
            and x.shape[-1] == self.in_features
            and self.in_features % INT8_BLOCK == 0
            and 0 < x.numel() <= max_rows * self.in_features
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = _lib
        if lib is not None and self._fits(x, self.MAX_ROWS):
            y = _run_int8(lib, x, self.packed, self.out_features, self.scale, self.bias)
            if y is not None:
                return y
        return linear(x, self.weight, self.bias)


class Int4Linear(Int8Linear):
    """A draft model's linear that also keeps a 4-bit copy of its weight (``quantize_int4``:
    0.625 bytes a weight against int8's 1) for one- and two-row inputs, the batch-1 draft steps.

    Why both copies: the int4 kernel sums each block of every row of x horizontally, so its
    arithmetic grows with the rows while int8's barely does. A whole 0.5B draft step measured
    (``python -m engine.bench --forwards``, 2 threads) 15.8 vs 23.3 ms at one row, 25.9 vs 27.2
    at two, 42.8 vs 43.3 at four and 76.5 vs 61.7 at eight: int4 where it streams fewer bytes
    than int8 costs, int8 (``Int8Linear``) from 3 to ``MAX_ROWS`` rows, bf16 beyond.
    """

    INT4_ROWS = 2

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        # Only the kernel's packed layout is kept; ``quantized`` unpacks it for inspection.
        self.register_buffer(
            "packed4", pack_int4(*quantize_int4(linear.weight.detach())), persistent=False
        )

    @property
    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, d and m as ``quantize_int4`` gives them (copies)."""
        return unpack_int4(self.packed4, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = _lib
        if lib is not None and self._fits(x, self.INT4_ROWS):
            y = _run_int4(lib, x, self.packed4, self.out_features, self.bias)
            if y is not None:
                return y
        return super().forward(x)


def concatenate(modules: Sequence[nn.Linear]) -> nn.Linear | None:
    """One linear whose output is ``modules``' outputs side by side (for linears sharing an
    input: a layer's q/k/v or gate/up projections), or None when they are of different kinds.

    One call instead of several saves the per-call overhead and the ramp-up of streaming a
    small matrix, which dominate a 0.5B draft step's narrowest layers. The originals' weights
    (and int8 or int4 copies) become views into the new ones: nothing is duplicated, and the
    originals keep computing the same thing.
    """
    kind = type(modules[0])
    kinds = (nn.Linear, FastLinear, Int8Linear, Int4Linear)
    if kind not in kinds or any(type(m) is not kind for m in modules):
        return None
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = None
    if any(m.bias is not None for m in modules):
        bias = torch.cat(
            [
                m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                for m in modules
            ]
        )
    base = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(base)
    base.in_features = modules[0].in_features
    base.out_features = weight.shape[0]
    base.weight = nn.Parameter(weight, requires_grad=False)
    base.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    fused: nn.Linear = base
    if kind is FastLinear:
        fused = FastLinear(base)
    elif kind in (Int8Linear, Int4Linear):
        fused = kind.__new__(kind)
        FastLinear.__init__(fused, base)
        # Whole groups per member: the packed members side by side are the packed whole.
        aligned = all(m.out_features % INT8_GROUP == 0 for m in modules)
        if aligned:
            packed = torch.cat([m.packed for m in modules])
        else:
            packed = pack_int8(torch.cat([m.qweight for m in modules]))
        fused.register_buffer("packed", packed, persistent=False)
        fused.register_buffer("scale", torch.cat([m.scale for m in modules]), persistent=False)
        if kind is Int4Linear:
            if aligned:  # INT4_GROUP == INT8_GROUP
                packed4 = torch.cat([m.packed4 for m in modules])
            else:
                parts = [m.quantized for m in modules]
                packed4 = pack_int4(*(torch.cat(part) for part in zip(*parts, strict=True)))
            fused.register_buffer("packed4", packed4, persistent=False)
    start = 0
    for module in modules:
        rows = slice(start, start + module.out_features)
        grad = module.weight.requires_grad
        module.weight = nn.Parameter(fused.weight[rows], requires_grad=grad)
        if module.bias is not None:
            module.bias = nn.Parameter(fused.bias[rows], requires_grad=module.bias.requires_grad)
        if kind in (Int8Linear, Int4Linear) and aligned:
            module.packed = fused.packed[rows]
            module.scale = fused.scale[rows]
        if kind is Int4Linear and aligned:
            module.packed4 = fused.packed4[rows.start // INT4_GROUP : rows.stop // INT4_GROUP]
        start += module.out_features
    return fused


def _eligible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.weight.dtype == torch.bfloat16
        and module.weight.device.type == "cpu"
    )


def patch_model(model: nn.Module, weights: str = "bf16") -> int:
    """Swap every bf16 CPU ``nn.Linear`` in ``model`` (LM head included) for a ``FastLinear``,
    or with ``weights`` "int8" / "int4" an ``Int8Linear`` / ``Int4Linear`` (for draft models,
    whose outputs need not be exact; int4 needs K in whole blocks, other linears stay bf16).

    Returns the number of modules replaced; 0 when the kernel is unavailable. Layers of other
    types, such as GPT-2's transposed ``Conv1D``, keep torch's implementation.
    """
    if weights not in DRAFT_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(DRAFT_WEIGHTS)}, got {weights!r}")
    if not available():
        return 0
    # Collect first: replacing children while named_modules() walks them is unsafe.
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if _eligible(child)
    ]
    replaced: dict[int, FastLinear] = {}
    for parent, name, child in targets:
        # A module reachable under two names must stay one module.
        if id(child) not in replaced:
            replaced[id(child)] = _patched(child, weights)
        fast = replaced[id(child)]
        setattr(parent, name, fast)
    return len(replaced)


def _patched(module: nn.Linear, weights: str) -> FastLinear:
    if weights == "int4" and module.in_features % INT4_BLOCK == 0:
        return Int4Linear(module)
    if weights in ("int8", "int4"):
        return Int8Linear(module)
    return FastLinear(module)


def patch_linear(module: nn.Linear, weights: str = "bf16") -> nn.Linear:
    """``module`` computed by the kernel (from ``weights``, as in ``patch_model``) when it
    qualifies, else ``module`` itself."""
    return _patched(module, weights) if available() and _eligible(module) else module
