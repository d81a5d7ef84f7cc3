"""Batch-invariant bf16 linear layers for CPUs without native bf16 matrix instructions.

On AVX2-only CPUs torch's bf16 ``F.linear`` costs linearly in the number of tokens, so a
speculative verify forward over gamma+1 tokens costs gamma+1 decode steps and speculation can
never win. ``engine/csrc/linear_bf16.c`` streams each weight row once for all tokens instead,
which makes a few extra tokens nearly free; it also gives every output element the same
summation order whatever the batch, so verify and plain decoding produce bit-identical logits.

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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from engine.loader import cache_dir

log = logging.getLogger("specserve.cpu_linear")

_SOURCE = Path(__file__).parent / "csrc" / "linear_bf16.c"
# Explicit ISA flags rather than -march=native: the cache key then fully describes the binary,
# so a cache directory shared between machines never serves code a CPU cannot run.
_CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_DISABLE_ENV = "SPECSERVE_CPU_KERNELS"

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_supported() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def _kernel_dir() -> Path:
    return cache_dir() / "kernels"


def _compile(gcc: str) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(source + " ".join(_CFLAGS).encode() + version.encode()).hexdigest()[:16]
    target = _kernel_dir() / f"linear_bf16-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [gcc, *_CFLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"gcc failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _self_check(lib: ctypes.CDLL) -> None:
    # A miscompiled or misloaded kernel must not silently corrupt logits.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 21, generator=generator)
    w = torch.randn(7, 21, generator=generator).bfloat16()
    bias = torch.randn(7, generator=generator)
    got = _run(lib, x, w, bias)
    want = F.linear(x, w.float(), bias)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError("kernel self-check gave wrong results")


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
        gcc = shutil.which(os.environ.get("CC", "gcc"))
        if gcc is None:
            log.warning("no C compiler found; CPU bf16 kernels unavailable, using torch")
            return None
        try:
            lib = ctypes.CDLL(str(_compile(gcc)))
            fn = lib.specserve_linear_bf16
            fn.restype = None
            fn.argtypes = [
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
            ]  # fmt: skip
            _self_check(lib)
        except Exception as exc:  # any failure here must degrade to torch, never crash
            log.warning("CPU bf16 kernels unavailable, using torch: %s", exc)
            return None
        _lib = lib
        return lib


def available() -> bool:
    """Whether the fast kernel can be used in this process (compiles it on first call)."""
    return _load() is not None


def _run(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """fp32 ``x[M, K] @ weight[N, K]^T + bias`` with ``weight`` bf16; returns fp32 [M, N]."""
    m, k = x.shape
    n = weight.shape[0]
    padded = (k + 7) // 8 * 8
    if padded == k:
        xf = x.to(torch.float32).contiguous()
    else:
        # The kernel reads x in whole 8-lane chunks; zero columns make the tail contribute 0.
        xf = x.new_zeros((m, padded), dtype=torch.float32)
        xf[:, :k] = x
    w = weight.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty((m, n), dtype=torch.float32)
    lib.specserve_linear_bf16(
        xf.data_ptr(), padded, w.data_ptr(), None if b is None else b.data_ptr(),
        y.data_ptr(), m, n, k, torch.get_num_threads(),
    )  # fmt: skip
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a bf16 ``weight`` on CPU via the kernel; output dtype follows ``x``.

    Falls back to ``F.linear`` when the kernel is unavailable or the inputs do not fit it.
    """
    lib = _load()
    if (
        lib is None
        or weight.dtype != torch.bfloat16
        or weight.dim() != 2
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
        or x.dtype not in (torch.bfloat16, torch.float32)
        or x.shape[-1] != weight.shape[1]
        or x.numel() == 0
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    y = _run(lib, x.reshape(-1, x.shape[-1]), weight, bias)
    return y.to(x.dtype).reshape(*lead, weight.shape[0])


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


def _eligible(module: nn.Module) -> bool:
    return (
        type(module) is nn.Linear
        and module.weight.dtype == torch.bfloat16
        and module.weight.device.type == "cpu"
    )


def patch_model(model: nn.Module) -> int:
    """Swap every bf16 CPU ``nn.Linear`` in ``model`` (LM head included) for a ``FastLinear``.

    Returns the number of modules replaced; 0 when the kernel is unavailable. Layers of other
    types, such as GPT-2's transposed ``Conv1D``, keep torch's implementation.
    """
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
        fast = replaced.setdefault(id(child), FastLinear(child))
        setattr(parent, name, fast)
    return len(replaced)
