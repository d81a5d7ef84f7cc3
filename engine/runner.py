from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from engine.cpu_linear import in_prompt_gemm, prompt_gemm
from engine.device import to_device
from engine.fused_decoder import FusedDecoder
from engine.graphs import ForwardGraphs
from engine.kv_cache import SlotKVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox")


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass
class RaggedBatch:
    """One ragged forward: row b feeds ``num_new[b]`` tokens into ``slot[b]`` from ``start[b]``.

    Host lists, converted to device tensors once per forward.
    """

    tokens: list[list[int]] | torch.Tensor  # per-row token lists, or a ready [B, T] device tensor
    slots: list[int]
    starts: list[int]
    num_new: list[int]


def max_context(model: PreTrainedModel) -> int | None:
    """Longest sequence a model with learned absolute positions can embed (None: rotary)."""
    if model.config.model_type in ("gpt2", "opt"):
        return int(model.config.max_position_embeddings)
    return None


class ModelRunner:
    """Drives a transformers causal LM over ragged batches on its own slot cache."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_slots: int,
        capacity: int,
        fused: bool = True,
        graph_width: int = 0,
    ) -> None:
        """``graph_width``: on CUDA, forwards outside prompt prefill of up to ``num_slots`` rows
        of that many tokens replay CUDA graphs (engine/graphs.py); 0 = always eager."""
        model_type = model.config.model_type
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"model type {model_type!r} is not supported; supported: "
                + ", ".join(SUPPORTED_MODEL_TYPES)
            )
        self.model = model
        self.body = model.base_model
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise UnsupportedArchitectureError(f"model type {model_type!r} has no LM head")
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.capacity = capacity
        self.max_position = max_context(model)
        self.cache = SlotKVCache(num_slots, capacity, self.device)
        # Our own forward where the model family and dtype allow (same weights, less glue).
        self.fused = FusedDecoder.build(model) if fused else None
        self.mask_min = torch.finfo(self.dtype).min
        # transformers renamed the forward's cache argument (past_key_values -> cache; the old
        # name warns, and goes in 5.40): pass it under the name this version's forward takes.
        parameters = inspect.signature(self.body.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        # Attention for prompt prefill when it should differ from decoding's (see Engine).
        self.prefill_attention: str | None = None
        self.graphs: ForwardGraphs | None = None
        # One token through the trash slot allocates every layer's buffers at their real shapes.
        self.forward(RaggedBatch([[0]], [num_slots], [0], [1]), output="none")
        if graph_width > 0 and self.device.type == "cuda":
            self.graphs = ForwardGraphs(self, num_slots, graph_width)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    def synchronize(self) -> None:
        """Waits until the device has run everything queued (for timing: CUDA is async)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _device_ints(self, values: list[int]) -> torch.Tensor:
        return to_device(values, self.device, torch.long)

    def prefill(self, batch: RaggedBatch, output: str = "none") -> torch.Tensor | None:
        """A forward over prompt tokens, with ``prefill_attention`` when one is set."""
        decode_attention = self.model.config._attn_implementation
        with prompt_gemm():
            if self.prefill_attention is None or self.prefill_attention == decode_attention:
                return self.forward(batch, output)
            self.model.set_attn_implementation(self.prefill_attention)
            try:
                return self.forward(batch, output)
            finally:
                self.model.set_attn_implementation(decode_attention)

    def _packs(self, batch: RaggedBatch, width: int) -> bool:
        """Whether to run a ragged decode/verify batch one token per row. Padding a short row
        to the longest costs its padded tokens in every matrix product (8 rows where one
        verifies 9 tokens would run 72); the fused forward treats each token alone, so one row
        per token gives bit-identical outputs at the cost of the real tokens only. Prompts keep
        their rows: their GEMM and attention want long ones."""
        return (
            self.fused is not None
            and width > 1
            and sum(batch.num_new) < len(batch.slots) * width
            and not in_prompt_gemm()
        )

    @torch.inference_mode()
    def forward(self, batch: RaggedBatch, output: str = "last") -> torch.Tensor | None:
        """Runs the batch and returns, by ``output``: "last" logits [B, V] at each row's last real
        token, "all" logits [B, T, V], "hidden" states [B, T, H], or "none".
        """
        rows = len(batch.slots)
        if isinstance(batch.tokens, torch.Tensor):
            input_ids = batch.tokens
            width = input_ids.shape[1]
        else:
            width = max(len(t) for t in batch.tokens)
            padded = [t + [0] * (width - len(t)) for t in batch.tokens]
            input_ids = self._device_ints(padded).view(rows, width)
        num_new = self._device_ints(batch.num_new)
        if self._packs(batch, width):
            real = torch.arange(width, device=self.device)[None, :] < num_new[:, None]
            tokens = RaggedBatch(
                input_ids[real].view(-1, 1),
                [s for s, n in zip(batch.slots, batch.num_new, strict=True) for _ in range(n)],
                [s + i for s, n in zip(batch.starts, batch.num_new, strict=True) for i in range(n)],
                [1] * sum(batch.num_new),
            )
            packed = self._hidden(tokens.tokens, tokens, 1)[:, 0]
            # The LM head too sees real tokens only: it is the largest matrix product.
            if output == "all":
                packed_logits = self.lm_head(packed).float()
                logits = packed_logits.new_zeros((rows, width, packed_logits.shape[-1]))
                logits[real] = packed_logits
                return logits
            if output == "last":
                return self.lm_head(packed[torch.cumsum(num_new, 0) - 1]).float()
            hidden = packed.new_zeros((rows, width, packed.shape[-1]))
            hidden[real] = packed
        else:
            hidden = self._hidden(input_ids, batch, width, kv_only=output == "none")
        if output == "none":
            return None
        assert hidden is not None
        if output == "all":
            return self.lm_head(hidden).float()
        if output == "hidden":
            return hidden
        picked = hidden[torch.arange(rows, device=self.device), num_new - 1]
        return self.lm_head(picked).float()

    def _hidden(
        self, input_ids: torch.Tensor, batch: RaggedBatch, width: int, kv_only: bool = False
    ) -> torch.Tensor | None:
        """The final hidden states [B, T, H] of ``input_ids`` [B, T], K/V written to the slots
        (with ``kv_only`` only the K/V are sure to be computed: None may come back)."""
        rows = len(batch.slots)
        # Prompts stay eager: ``prefill`` runs its forwards inside ``prompt_gemm``.
        if self.graphs is not None and self.graphs.fits(rows, width) and not in_prompt_gemm():
            hidden = self.graphs.hidden(input_ids, batch)
            if hidden is not None:
                return hidden
        read_len = max(s + n for s, n in zip(batch.starts, batch.num_new, strict=True))
        contiguous = None
        if batch.slots == list(range(batch.slots[0], batch.slots[0] + rows)):
            contiguous = batch.slots[0]
        return self.planned_hidden(
            input_ids,
            self._device_ints(batch.slots),
            self._device_ints(batch.starts),
            self._device_ints(batch.num_new),
            read_len,
            contiguous,
            kv_only,
        )

    def planned_hidden(
        self,
        input_ids: torch.Tensor,
        slots: torch.Tensor,
        starts: torch.Tensor,
        num_new: torch.Tensor,
        read_len: int,
        contiguous: int | None = None,
        kv_only: bool = False,
    ) -> torch.Tensor | None:
        """``_hidden`` from device tensors alone (per row: slot, first position, real tokens),
        attending over the first ``read_len`` positions of each slot, the rows' slots
        consecutive from ``contiguous`` when it is set. No host value is read, so a CUDA graph
        can capture it (engine/graphs.py)."""
        rows, width = input_ids.shape
        offsets = torch.arange(width, device=self.device)
        real = offsets[None, :] < num_new[:, None]  # [B, T]
        positions = starts[:, None] + offsets[None, :]
        write_slot = torch.where(real, slots[:, None], self.cache.trash_slot)
        write_pos = torch.where(real, positions, offsets[None, :].expand(rows, width))
        # Padded queries reuse their row's last real position so learned position tables are
        # never indexed past the end; their outputs are discarded anyway.
        last_pos = starts + num_new - 1
        position_ids = torch.minimum(positions, last_pos[:, None])
        keys = torch.arange(read_len, device=self.device)
        visible = keys[None, None, :] <= positions[:, :, None]  # [B, T, K]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~visible, self.mask_min)
        self.cache.plan(write_slot, write_pos, slots, read_len, contiguous)
        if self.fused is not None:
            return self.fused(input_ids, mask[:, None], position_ids, self.cache, kv_only)
        return self.body(
            input_ids=input_ids,
            attention_mask=mask[:, None],
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_argument: self.cache},
        ).last_hidden_state
