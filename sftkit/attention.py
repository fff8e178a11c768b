"""Attention for training batches without a T x T mask: causal for right-padded batches, per document for packed rows.

A right-padded causal batch needs no padding mask at all: a real token never sees the pads that follow it,
and the loss ignores the pads' own outputs, so the fused causal kernel runs. Packed rows restart their
position_ids at every document; transformers would turn that into a dense block mask, so instead the rows
are split at document boundaries and each document gets causal attention of its own (torch's varlen flash
kernel on CUDA where it runs, else one causal SDPA call per document, which is also the CPU path: torch has
no FlexAttention backward on CPU). Everything that does not pass documents (evaluation with left padding,
generation with a cache) runs exactly as transformers' SDPA.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

VARLEN = "sftkit_varlen"
DOCUMENTS = "packed_documents"  # the keyword that carries a packed batch's documents down to every attention call
INSTALLED = f"attention: {VARLEN} (causal kernel for padded batches, per document for packed rows)"


@dataclass(frozen=True)
class Documents:
    """Where each document of a packed batch lies: (row, start, end) spans, end exclusive, in row order."""

    spans: tuple[tuple[int, int, int], ...]
    rows: int
    width: int

    @property
    def one_per_row(self) -> bool:
        return len(self.spans) == self.rows

    def cumulative_lengths(self, device) -> torch.Tensor:
        """Boundaries over the flattened batch (rows one after another), the cu_seqlens of varlen kernels."""
        ends = [row * self.width + end for row, _, end in self.spans]
        return torch.tensor([0] + ends, dtype=torch.int32, device=device)

    @property
    def longest(self) -> int:
        return max(end - start for _, start, end in self.spans)


def find_documents(position_ids: torch.Tensor) -> Documents:
    """A document starts wherever the position does not follow the previous one (transformers' own rule)."""
    positions = position_ids.detach().cpu()
    starts = torch.ones(positions.shape, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    rows, width = positions.shape
    spans = []
    for row, begin in starts.nonzero().tolist():
        if begin:
            spans[-1] = (row, spans[-1][1], begin)
        spans.append((row, begin, width))
    return Documents(tuple(spans), rows=rows, width=width)


def use_varlen_attention(model) -> str:
    """Swap transformers' SDPA for the document-aware version (same kernels, same masks otherwise); a model
    on another implementation (eager for soft-capping models, flash_attention_2, ...) keeps it. Says what it did."""
    current = model.config._attn_implementation
    if current == VARLEN:
        return INSTALLED
    if current != "sdpa":
        return f"attention: {current} (varlen attention replaces only sdpa)"
    register()
    model.set_attn_implementation(VARLEN)
    return INSTALLED


def uses_varlen(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == VARLEN


def register() -> None:
    """Make VARLEN a name transformers knows: its masks are SDPA's, its attention function is below."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)


def decoder_inputs(model, batch: dict) -> dict:
    """The decoder's inputs for a collated training batch. With varlen attention installed, a right-padded batch
    goes without its mask (causal attention is then exact for every real token) and packed rows carry their
    documents; anything else goes as collated, to transformers' masks."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    if not uses_varlen(model):
        return inputs
    mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
    if positions is not None and mask is None:
        inputs[DOCUMENTS] = find_documents(positions)
        # transformers reads packing from position_ids only when no mask is given; an all-ones mask says
        # "no padding" and keeps it from building the dense block mask the documents make unnecessary.
        inputs["attention_mask"] = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
    elif mask is not None and positions is None and is_right_padded(mask):
        del inputs["attention_mask"]
    return inputs


def is_right_padded(mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (a left-padded row would let real tokens see its pads under a causal mask)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query (B, H, T, D), key/value (B, KV, T, D) -> ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    documents = kwargs.pop(DOCUMENTS, None)
    if documents is None or documents.one_per_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[2] != key.shape[2]:
        raise ValueError("packed documents go with training forwards only (no KV cache)")
    kernel = _varlen_kernel(query, dropout, kwargs)
    if attention_mask is None and kernel is not None:
        return _flash_varlen(kernel, query, key, value, documents, scaling, kwargs.get("sliding_window")), None
    # One call per document; a mask that is still there (a sliding window shorter than the row) is cut to it.
    rows = []
    for row in range(documents.rows):
        parts = []
        for _, start, end in (span for span in documents.spans if span[0] == row):
            mask = None if attention_mask is None else attention_mask[row:row + 1, :, start:end, start:end]
            output, _ = sdpa_attention_forward(module, query[row:row + 1, :, start:end], key[row:row + 1, :, start:end],
                                               value[row:row + 1, :, start:end], mask, dropout=dropout, scaling=scaling,
                                               **kwargs)
            parts.append(output)
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def _varlen_kernel(query, dropout: float, kwargs: dict):
    """torch's varlen flash kernel where it runs: CUDA from Ampere on, half precision, no dropout or soft-capping."""
    if not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16) or dropout or kwargs.get("softcap"):
        return None
    if torch.cuda.get_device_capability(query.device) < (8, 0):
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10
    except ImportError:
        return None
    return varlen_attn if "enable_gqa" in inspect.signature(varlen_attn).parameters else None


def _flash_varlen(kernel, query, key, value, documents: Documents, scaling, sliding_window):
    batch, heads, width, head_dim = query.shape
    boundaries = documents.cumulative_lengths(query.device)
    flat = [tensor.transpose(1, 2).reshape(batch * width, tensor.shape[1], head_dim) for tensor in (query, key, value)]
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # (-1, 0): causal
    output = kernel(*flat, boundaries, boundaries, documents.longest, documents.longest, scale=scaling, window_size=window,
                    enable_gqa=heads != key.shape[1])
    return output.reshape(batch, width, heads, head_dim)
