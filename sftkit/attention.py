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

import functools
import inspect
from dataclasses import dataclass

import torch

VARLEN = "sftkit_varlen"
DOCUMENTS = "packed_documents"  # the keyword that carries a packed batch's documents down to every attention call
INSTALLED = f"attention: {VARLEN} (causal kernel for padded batches, per document for packed rows)"


@dataclass(frozen=True)
class Documents:
    """Where the documents of a packed batch lie: `boundaries` over the flattened batch (rows one after another),
    the cu_seqlens of varlen kernels, every row end among them. On the training device; the host-side spans are
    read only by the per-document fallback."""

    boundaries: torch.Tensor
    rows: int
    width: int
    flash: bool = False  # torch's varlen flash kernel runs where the boundaries are (decided outside compiled code)

    @property
    def one_per_row(self) -> bool:
        return self.boundaries.numel() - 1 == self.rows  # a shape: known without asking the device

    @property
    def spans(self) -> tuple[tuple[int, int, int], ...]:
        """(row, start, end) of every document, end exclusive, in row order (empty ones, padding for static shapes, left out)."""
        edges = self.boundaries.tolist()
        return tuple((begin // self.width, begin % self.width, end - begin // self.width * self.width)
                     for begin, end in zip(edges, edges[1:]) if end > begin)


def find_documents(position_ids: torch.Tensor) -> Documents:
    """A document starts wherever the position does not follow the previous one (transformers' own rule)."""
    positions = position_ids.detach().cpu()
    starts = torch.ones(positions.shape, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    rows, width = positions.shape
    flat = starts.flatten().nonzero().flatten().tolist() + [rows * width]
    return documents_of(torch.tensor(flat, dtype=torch.int32, device=position_ids.device), rows, width)


def documents_of(boundaries: torch.Tensor, rows: int, width: int) -> Documents:
    return Documents(boundaries, rows=rows, width=width, flash=flash_ready(boundaries.device))


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
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)


def decoder_inputs(model, batch: dict) -> dict:
    """The decoder's inputs for a collated training batch. With varlen attention installed, a right-padded batch
    goes without its mask (causal attention is then exact for every real token) and packed rows carry their
    documents (from the collated document_boundaries when there, else found in position_ids); anything else goes
    as collated, to transformers' masks."""
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    if not uses_varlen(model):
        return inputs
    mask, positions = inputs.get("attention_mask"), inputs.get("position_ids")
    if positions is not None and mask is None:
        rows, width = positions.shape
        boundaries = batch.get("document_boundaries")
        documents = documents_of(boundaries, rows, width) if boundaries is not None else find_documents(positions)
        if not documents.one_per_row:
            inputs[DOCUMENTS] = documents
        # transformers reads packing from position_ids only when no mask is given; a mask marked as all ones keeps
        # it from building the dense block mask the documents make unnecessary, and from reading the mask's values.
        inputs["attention_mask"] = no_padding_mask(positions)
    elif mask is not None and positions is None and is_right_padded(mask):
        del inputs["attention_mask"]
    return inputs


def no_padding_mask(like: torch.Tensor) -> torch.Tensor:
    """An all-ones padding mask that says so: the mask function below skips it without reading it."""
    mask = torch.ones(like.shape, dtype=torch.bool, device=like.device)
    mask.sftkit_no_padding = True
    return mask


def varlen_mask(*args, attention_mask=None, **kwargs):
    """transformers' SDPA mask, told that a marked all-ones mask means no padding (its own check reads the values,
    a wait on the device for every forward)."""
    from transformers.masking_utils import sdpa_mask

    if getattr(attention_mask, "sftkit_no_padding", False):
        attention_mask = None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def is_right_padded(mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (a left-padded row would let real tokens see its pads under a causal mask)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention signature: query (B, H, T, D), key/value (B, KV, T, D) -> ((B, T, H, D), None).

    Under torch.compile the flash path traces (it reads only tensors and the documents' `flash` flag); the
    per-document loop runs eagerly, since its Python spans would make every batch a new graph.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    documents = kwargs.pop(DOCUMENTS, None)
    if documents is None or documents.one_per_row:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[2] != key.shape[2]:
        raise ValueError("packed documents go with training forwards only (no KV cache)")
    if attention_mask is None and documents.flash and _kernel_applies(query, dropout, kwargs):
        return _flash_varlen(_VARLEN_KERNEL, query, key, value, documents, scaling, kwargs.get("sliding_window")), None
    return _per_document(module, query, key, value, attention_mask, documents, dropout, scaling, kwargs), None


@torch.compiler.disable
def _per_document(module, query, key, value, attention_mask, documents: Documents, dropout, scaling, kwargs):
    """One causal SDPA call per document; a mask that is still there (a sliding window shorter than the row) is cut to it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows = [[] for _ in range(documents.rows)]
    for row, start, end in documents.spans:
        mask = None if attention_mask is None else attention_mask[row:row + 1, :, start:end, start:end]
        output, _ = sdpa_attention_forward(module, query[row:row + 1, :, start:end], key[row:row + 1, :, start:end],
                                           value[row:row + 1, :, start:end], mask, dropout=dropout, scaling=scaling, **kwargs)
        rows[row].append(output)
    return torch.cat([torch.cat(parts, dim=1) for parts in rows], dim=0)


def _load_varlen_kernel():
    try:
        from torch.nn.attention.varlen import varlen_attn  # torch >= 2.10
    except ImportError:
        return None
    return varlen_attn if "enable_gqa" in inspect.signature(varlen_attn).parameters else None


_VARLEN_KERNEL = _load_varlen_kernel()


@functools.cache
def flash_ready(device: torch.device) -> bool:
    """torch's varlen flash kernel is there and runs on this device: CUDA from Ampere on."""
    return _VARLEN_KERNEL is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _kernel_applies(query, dropout: float, kwargs: dict) -> bool:
    """What the kernel cannot do: single precision, dropout, soft-capping."""
    return query.dtype in (torch.float16, torch.bfloat16) and not dropout and not kwargs.get("softcap")


def _varlen_kernel(query, dropout: float, kwargs: dict):
    """torch's varlen flash kernel where it runs for this query, else None."""
    return _VARLEN_KERNEL if flash_ready(query.device) and _kernel_applies(query, dropout, kwargs) else None


def _flash_varlen(kernel, query, key, value, documents: Documents, scaling, sliding_window):
    """The kernel over the flattened batch; the row width bounds every document (no host-side longest needed)."""
    batch, heads, width, head_dim = query.shape
    flat = [tensor.transpose(1, 2).reshape(batch * width, tensor.shape[1], head_dim) for tensor in (query, key, value)]
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # (-1, 0): causal
    boundaries = documents.boundaries.to(query.device)
    output = kernel(*flat, boundaries, boundaries, width, width, scale=scaling, window_size=window,
                    enable_gqa=heads != key.shape[1])
    return output.reshape(batch, width, heads, head_dim)
