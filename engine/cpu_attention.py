"""Batch-invariant bf16 attention for decode and verify forwards on CPU.

Registered with transformers as the attention implementation ``"specserve_cpu"``. Eager
attention is batch-invariant but runs torch's bf16 batched matmul, which on AVX2-only CPUs costs
about as much per extra query token as a whole decode step once the context is long; SDPA is
fast but not batch-invariant. ``engine/csrc/attention_bf16.c`` (built into the same library as
the linear kernel) computes with fp32 arithmetic all the queries that share a kv head together,
yet each query by the same operations whatever came with it, so a verify forward costs little
more than a decode step and gives each token bit-identical output.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

log = logging.getLogger("specserve.cpu_attention")

NAME = "specserve_cpu"
_MAX_HEAD_DIM = 256
_function: ctypes._CFuncPtr | None = None
_exp_function: ctypes._CFuncPtr | None = None


def _kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor | None:
    """``[B, T, H, D]`` attention output, or None when the kernel refused the arguments."""
    assert _function is not None
    batch, heads, queries, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if mask is not None:
        if mask.dtype == torch.bool:  # True = may attend
            mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
        mask = mask.to(torch.float32).expand(batch, 1, queries, keys).contiguous()
    out = torch.empty((batch, queries, heads, head_dim), dtype=torch.bfloat16)
    status = _function(
        query.data_ptr(), *query.stride()[:3],
        key.data_ptr(), *key.stride()[:3],
        value.data_ptr(), *value.stride()[:3],
        None if mask is None else mask.data_ptr(),
        out.data_ptr(),
        batch, heads, kv_heads, queries, keys, head_dim,
        scaling, torch.get_num_threads(),
    )  # fmt: skip
    return out if status == 0 else None


def vector_exp(x: torch.Tensor) -> torch.Tensor:
    """The kernel's softmax exp applied to fp32 ``x`` elementwise (for the tests)."""
    assert _exp_function is not None
    x = x.to(torch.float32).contiguous()
    y = torch.empty_like(x)
    _exp_function(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def _fits(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask, kwargs) -> bool:
    return (
        _function is not None
        and query.dtype == key.dtype == value.dtype == torch.bfloat16
        and query.is_cpu
        and key.is_cpu
        and value.is_cpu
        and query.dim() == key.dim() == value.dim() == 4
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[-1] % 8 == 0
        and query.shape[-1] <= _MAX_HEAD_DIM
        and key.shape[1] > 0
        and query.shape[1] % key.shape[1] == 0
        and key.shape[2] > 0
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1))
        and kwargs.get("sliding_window") is None
        and kwargs.get("softcap") is None
        and kwargs.get("s_aux") is None
    )


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, H, T, D], key/value [B, H_kv, S, D], a mask
    [B, 1, T, S] (additive, or boolean True = visible; None = causal over the last T
    positions); returns ([B, T, H, D], no weights)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if dropout == 0.0 and _fits(query, key, value, attention_mask, kwargs):
        out = _kernel(query, key, value, attention_mask, float(scaling))
        if out is not None:
            return out, None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """The same attention in fp32 torch ops, ``[B, T, H, D]`` (for the self-check and tests)."""
    group = query.shape[1] // key.shape[1]
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    scores = query.float() @ k.transpose(2, 3) * scaling
    if mask is None:
        queries, keys = scores.shape[-2:]
        causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        mask = torch.zeros(queries, keys).masked_fill_(~causal, float("-inf"))
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))
    scores = scores + mask.float()
    return (scores.softmax(-1) @ v).transpose(1, 2)


def bind(lib: ctypes.CDLL) -> None:
    """Binds the kernel from the freshly loaded library and registers it with transformers.
    A failure here only leaves attention to transformers."""
    global _function, _exp_function
    try:
        fn = lib.specserve_attention_bf16
        fn.restype = ctypes.c_int
        fn.argtypes = (
            [ctypes.c_void_p] + [ctypes.c_int64] * 3
            + [ctypes.c_void_p] + [ctypes.c_int64] * 3
            + [ctypes.c_void_p] + [ctypes.c_int64] * 3
            + [ctypes.c_void_p, ctypes.c_void_p]
            + [ctypes.c_int64] * 6
            + [ctypes.c_float, ctypes.c_int]
        )  # fmt: skip
        exp = lib.specserve_exp_f32
        exp.restype = None
        exp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        _function, _exp_function = fn, exp
        _self_check()
    except Exception as exc:  # never crash model loading over an optional kernel
        _function = None
        log.warning("CPU attention kernel unavailable, using transformers': %s", exc)
        return
    AttentionInterface.register(NAME, attention_forward)
    # Models that build their own masks (no 4D mask passed in) then build SDPA's kind.
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def available() -> bool:
    from engine import cpu_linear

    cpu_linear.available()  # loads the library, which binds this kernel
    return _function is not None


def _self_check() -> None:
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 3, 16, generator=generator).bfloat16()
    key = torch.randn(2, 2, 7, 16, generator=generator).bfloat16()
    value = torch.randn(2, 2, 7, 16, generator=generator).bfloat16()
    mask = torch.zeros(2, 1, 3, 7)
    mask[0, :, :, 5:] = torch.finfo(torch.bfloat16).min
    got = _kernel(query, key, value, mask, 0.25)
    want = reference(query, key, value, mask, 0.25)
    if got is None or not torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2):
        raise RuntimeError("attention kernel self-check gave wrong results")
