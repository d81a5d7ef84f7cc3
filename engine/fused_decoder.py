"""A hand-written forward for Llama-family decoders (Llama, Qwen2, Qwen3) in bf16 on CPU.

Driving transformers' modules costs ~50 operator dispatches and a dozen module calls per layer
beyond the matrix products; on this class of CPU that is a third of a 0.5B draft step and an
eighth of a 1.5B verify. This forward keeps the models' own weights, linear layers (so the CPU
kernels patched into them still run), rotary table, attention interface and our slot cache, and
replaces only the glue: residual add + RMSNorm, rotary embedding and SiLU-gating each become one
kernel call (``engine/csrc/decoder_bf16.c``, rounded like the modules they replace).

Both engines of a comparison (target-only and speculative) run the same forward, and every step
in it treats each token alone, so greedy speculation stays token-identical to plain decoding.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import weakref

import torch
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from engine.cpu_linear import (
    INT8_BLOCK,
    FastLinear,
    Int4Linear,
    Int8Linear,
    concatenate,
    in_prompt_gemm,
)

log = logging.getLogger("specserve.fused_decoder")

MODEL_TYPES = ("llama", "qwen2", "qwen3")
_norm: ctypes._CFuncPtr | None = None
_rope: ctypes._CFuncPtr | None = None
_silu_mul: ctypes._CFuncPtr | None = None
_step: ctypes._CFuncPtr | None = None


def bind(lib: ctypes.CDLL) -> None:
    """Binds the kernels from the freshly loaded CPU library (a failure only disables this
    forward)."""
    global _norm, _rope, _silu_mul, _step
    try:
        norm = lib.specserve_add_rms_norm
        norm.restype = ctypes.c_int
        norm.argtypes = (
            [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
        )
        rope = lib.specserve_rope
        rope.restype = ctypes.c_int
        rope.argtypes = (
            [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
            + [ctypes.c_int64] * 3
            + [ctypes.c_int]
        )  # fmt: skip
        silu_mul = lib.specserve_silu_mul
        silu_mul.restype = ctypes.c_int
        silu_mul.argtypes = (
            [ctypes.c_void_p] * 2
            + [ctypes.c_int64, ctypes.c_void_p]
            + [ctypes.c_int64] * 2
            + [ctypes.c_int]
        )  # fmt: skip
        step = lib.specserve_decoder_step
        step.restype = ctypes.c_int
        step.argtypes = (
            [ctypes.c_int64] + [ctypes.c_void_p] * 10
            + [ctypes.c_int64] * 3
            + [ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
        )  # fmt: skip
    except AttributeError as exc:
        log.warning("fused decoder kernels unavailable: %s", exc)
        return
    _norm, _rope, _silu_mul, _step = norm, rope, silu_mul, step


def available() -> bool:
    from engine import cpu_linear

    cpu_linear.available()  # loads the library, which binds these kernels
    return _norm is not None


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out: torch.Tensor
) -> torch.Tensor:
    """``x += delta`` in place (when given), then ``out = RMSNorm(x) * weight``; all bf16,
    contiguous, normalised over the last dimension."""
    assert _norm is not None
    dim = x.shape[-1]
    _norm(
        x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
        out.data_ptr(), x.numel() // dim, dim, eps, torch.get_num_threads(),
    )  # fmt: skip
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rotary embedding in place on ``x`` [B, T, heads * head_dim], a view whose tokens are
    evenly strided and each token's heads contiguous; ``cos``/``sin`` [B, T, head_dim]."""
    assert _rope is not None
    tokens = x.shape[0] * x.shape[1]
    _rope(
        x.data_ptr(), x.stride(1), cos.data_ptr(), sin.data_ptr(), tokens,
        x.shape[2] // head_dim, head_dim, torch.get_num_threads(),
    )  # fmt: skip
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` [..., 2 * I] holds gate then up (contiguous)."""
    assert _silu_mul is not None
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], width))
    _silu_mul(
        gate_up.data_ptr(), gate_up[..., width:].data_ptr(), 2 * width, out.data_ptr(),
        gate_up.numel() // (2 * width), width, torch.get_num_threads(),
    )  # fmt: skip
    return out


def _eps(norm: torch.nn.Module) -> float:
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))


def _refusal(model: PreTrainedModel) -> str | None:
    """Why this forward cannot run ``model`` (None: it can)."""
    config = model.config
    parameter = next(model.parameters())
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r}"
    if parameter.dtype != torch.bfloat16 or parameter.device.type != "cpu":
        return "not bf16 on CPU"
    if not available():
        return "kernels unavailable"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r}"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "sliding-window layers"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    body = model.base_model
    head_dim = body.layers[0].self_attn.head_dim
    if head_dim % 2:
        return "odd head dim"
    return None


# Fused projections per first member module, so that two runners over one model (a draft that
# is the target, tests) share them rather than concatenating twice.
_fused: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def _concatenated(modules: list[torch.nn.Module]) -> torch.nn.Module | None:
    fused = _fused.get(modules[0])
    if fused is None:
        fused = concatenate(modules)
        if fused is not None:
            _fused[modules[0]] = fused
    return fused


def _return_freed_memory() -> None:
    """Hands the separate projections' freed int8 copies back to the OS: glibc keeps freed
    blocks of their size in its heap (~0.4 GB on the default pair). The replaced bf16 weights
    were mapped from the safetensors cache: their pages are clean and the kernel reclaims them
    when memory runs short."""
    with contextlib.suppress(AttributeError, OSError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


STEP_FIELDS = 23  # pointers per layer in the step's table (engine/csrc/decoder_step.c)


class _StepTable:
    """Everything ``specserve_decoder_step`` reads about one model and its slot cache: weight,
    norm and cache pointers per layer, sizes and epsilons. Built once the cache exists; the
    tensors behind the pointers live as long as the model and the cache."""

    def __init__(
        self,
        sizes: list[int],
        pointers: list,
        eps: list[float],
        final_norm: int,
        final_eps: float,
        scaling: float,
    ) -> None:
        self.layers = len(pointers) // STEP_FIELDS
        self.sizes = (ctypes.c_int64 * len(sizes))(*sizes)
        self.pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        self.eps = (ctypes.c_float * len(eps))(*eps)
        self.final_norm = final_norm
        self.final_eps = final_eps
        self.scaling = scaling

    @classmethod
    def build(cls, decoder: FusedDecoder, cache) -> _StepTable | None:
        """The table, or None when some layer is not of the shape the C step handles (then the
        Python loop runs it)."""
        body = decoder.body
        attn0 = body.layers[0].self_attn
        q_size, kv_size, v_size = decoder.qkv_sizes[0]
        head_dim = attn0.head_dim
        if kv_size != v_size or q_size % head_dim or kv_size % head_dim:
            return None
        pointers: list[int | None] = []
        eps: list[float] = []

        def tensor(t: torch.Tensor | None, dtype: torch.dtype | None = torch.bfloat16) -> int:
            if t is None or (dtype is not None and t.dtype != dtype) or not t.is_contiguous():
                raise ValueError
            return t.data_ptr()

        try:
            for index, layer in enumerate(body.layers):
                attn, mlp = layer.self_attn, layer.mlp
                qkv, gate_up = decoder.qkv[index], decoder.gate_up[index]
                o_proj, down = attn.o_proj, mlp.down_proj
                same_shape = decoder.qkv_sizes[index] == decoder.qkv_sizes[0]
                if not same_shape or attn.scaling != attn0.scaling:
                    return None
                for linear in (qkv, o_proj, gate_up, down):
                    if not isinstance(linear, FastLinear) or linear.weight is None:
                        return None
                    pointers.append(tensor(linear.weight))
                    if isinstance(linear, Int8Linear) and linear.in_features % INT8_BLOCK == 0:
                        pointers += [tensor(linear.packed, None), tensor(linear.scale, None)]
                    else:
                        pointers += [None, None]
                    if isinstance(linear, Int4Linear):
                        pointers.append(tensor(linear.packed4, None))
                    else:
                        pointers.append(None)
                    if linear is qkv:
                        pointers.append(None if qkv.bias is None else tensor(qkv.bias))
                    elif linear.bias is not None:
                        return None
                pointers += [
                    tensor(layer.input_layernorm.weight),
                    tensor(layer.post_attention_layernorm.weight),
                ]
                if decoder.qk_norm:
                    pointers += [tensor(attn.q_norm.weight), tensor(attn.k_norm.weight)]
                    qk_eps = [_eps(attn.q_norm), _eps(attn.k_norm)]
                else:
                    pointers += [None, None]
                    qk_eps = [0.0, 0.0]
                keys, values = cache.keys[index], cache.values[index]
                if keys.shape[1:] != (kv_size // head_dim, cache.capacity, head_dim):
                    return None
                pointers += [tensor(keys), tensor(values)]
                eps += [*decoder.eps[index], *qk_eps]
            final_norm = tensor(body.norm.weight)
        except ValueError:
            return None
        sizes = [
            body.layers[0].input_layernorm.weight.shape[0],
            q_size,
            kv_size,
            decoder.gate_up[0].out_features // 2,
            q_size // head_dim,
            kv_size // head_dim,
            head_dim,
            cache.capacity,
            Int8Linear.MAX_ROWS,
            Int4Linear.INT4_ROWS,
        ]
        return cls(sizes, pointers, eps, final_norm, decoder.final_eps, float(attn0.scaling))

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_mask: torch.Tensor,
        cache,
    ) -> torch.Tensor | None:
        """The final normed hidden states (x is the residual stream, updated in place), or None
        when the kernel failed."""
        assert _step is not None
        rows, width = x.shape[:2]
        normed = torch.empty_like(x)
        mask = attention_mask[:, 0].float().contiguous()  # [B, T, read_len]
        write_slot, write_pos, read_slots = (t.contiguous() for t in cache.planned())
        status = _step(
            self.layers, ctypes.addressof(self.sizes), ctypes.addressof(self.pointers),
            ctypes.addressof(self.eps), x.data_ptr(), normed.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), write_slot.data_ptr(), write_pos.data_ptr(), read_slots.data_ptr(),
            rows, width, mask.shape[-1], mask.data_ptr(), self.scaling, self.final_norm,
            self.final_eps, torch.get_num_threads(),
        )  # fmt: skip
        return normed if status == 0 else None


class FusedDecoder:
    """``forward(input_ids, mask, position_ids, cache)`` -> final hidden states, as
    ``model.base_model(...)`` would give them through our cache."""

    def __init__(self, model: PreTrainedModel, qkv: list, gate_up: list) -> None:
        self.body = model.base_model
        self.config = model.config
        self.qkv = qkv
        self.gate_up = gate_up
        # Per layer, fixed for the model's life: where the fused q/k/v output splits, and the
        # norms' epsilons (looked up once rather than on every forward).
        self.qkv_sizes = [
            [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
            for a in (layer.self_attn for layer in self.body.layers)
        ]
        self.eps = [
            (_eps(layer.input_layernorm), _eps(layer.post_attention_layernorm))
            for layer in self.body.layers
        ]
        self.final_eps = _eps(self.body.norm)
        self.qk_norm = self.config.model_type == "qwen3"
        # "eager" is not registered with the interface: each model module has its own.
        attention_module = sys.modules[type(self.body.layers[0].self_attn).__module__]
        self.eager_attention = attention_module.eager_attention_forward
        # Decode and verify forwards run as one C call once the slot cache exists
        # (engine/csrc/decoder_step.c); tests turn it off to compare it with the Python loop.
        self.use_step = True
        self._step_table: _StepTable | None = None
        self._step_cache = None  # the cache the table points into

    def _table_for(self, cache) -> _StepTable | None:
        """The C step's table when this forward may run as one C call: a decode or verify
        forward (prompts run the Python loop with their own GEMM and attention) on a cache that
        already holds its buffers."""
        if not self.use_step or _step is None or in_prompt_gemm() or not cache.allocated:
            return None
        if self._step_cache is not cache:
            self._step_cache = cache
            self._step_table = _StepTable.build(self, cache)
        return self._step_table

    @classmethod
    def build(cls, model: PreTrainedModel) -> FusedDecoder | None:
        reason = _refusal(model)
        qkv, gate_up = [], []
        if reason is None:
            for layer in model.base_model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv.append(_concatenated([attn.q_proj, attn.k_proj, attn.v_proj]))
                gate_up.append(_concatenated([mlp.gate_proj, mlp.up_proj]))
            if any(m is None for m in qkv + gate_up):
                reason = "projections of different kinds"
        if reason is not None:
            log.debug("fused decoder not used: %s", reason)
            return None
        _return_freed_memory()
        return cls(model, qkv, gate_up)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        kv_only: bool = False,
    ) -> torch.Tensor | None:
        """``kv_only``: the caller wants the K/V in the cache and no hidden states (a prompt
        prefill, whose last token the first decode round feeds again; a draft catch-up). The
        last layer then stops once its K/V are written: its attention, output projection and
        MLP would only feed the final hidden states (on the 1.5B target 3 % of a prefill's
        arithmetic, on the 0.5B draft 4 %). Returns None then, except from the C step, which
        runs whole (it serves decode and verify forwards, which want their outputs)."""
        body = self.body
        rows, width = input_ids.shape
        # A fresh tensor from the embedding: the residual stream, updated in place from here on.
        x = body.embed_tokens(input_ids)
        cos, sin = (t.contiguous() for t in body.rotary_emb(x, position_ids))
        table = self._table_for(cache)
        if table is not None:
            normed = table.run(x, cos, sin, attention_mask, cache)
            if normed is not None:
                return normed
            x = body.embed_tokens(input_ids)  # the failed call may have left x half-updated
        normed = torch.empty_like(x)
        # Read per forward: prompt prefill swaps the implementation (see ModelRunner.prefill).
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self.eager_attention
        )
        delta: torch.Tensor | None = None
        layers = zip(body.layers, self.qkv, self.qkv_sizes, self.gate_up, self.eps, strict=True)
        last = len(body.layers) - 1
        for index, (layer, qkv, sizes, gate_up, (input_eps, post_eps)) in enumerate(layers):
            attn = layer.self_attn
            head_dim = attn.head_dim
            add_rms_norm(x, delta, layer.input_layernorm.weight, input_eps, normed)
            query, key, value = qkv.forward(normed).split(sizes, dim=-1)
            if self.qk_norm:
                query, key = query.contiguous(), key.contiguous()
                # Per head: rows of head_dim.
                heads = query.view(-1, head_dim)
                add_rms_norm(heads, None, attn.q_norm.weight, _eps(attn.q_norm), heads)
                heads = key.view(-1, head_dim)
                add_rms_norm(heads, None, attn.k_norm.weight, _eps(attn.k_norm), heads)
            rope_(query, cos, sin, head_dim)
            rope_(key, cos, sin, head_dim)
            query = query.view(rows, width, -1, head_dim).transpose(1, 2)
            key = key.view(rows, width, -1, head_dim).transpose(1, 2)
            value = value.view(rows, width, -1, head_dim).transpose(1, 2)
            key, value = cache.update(key, value, attn.layer_idx)
            if kv_only and index == last:
                return None
            out, _ = attention(
                attn, query, key, value, attention_mask, dropout=0.0, scaling=attn.scaling,
                sliding_window=getattr(attn, "sliding_window", None),
            )  # fmt: skip
            delta = attn.o_proj.forward(out.reshape(rows, width, -1))
            add_rms_norm(x, delta, layer.post_attention_layernorm.weight, post_eps, normed)
            delta = layer.mlp.down_proj.forward(silu_mul(gate_up.forward(normed)))
        add_rms_norm(x, delta, body.norm.weight, self.final_eps, normed)
        return normed
