"""What makes a training step fast on a GPU: each lever behind its own option, the eager path as the reference.

On a GPU a LoRA step of a small model is bound by launching thousands of small kernels and by the host
waiting for the device, not by arithmetic. The levers, resolved once per run (`Levers`):
  fused_lora     each LoRA layer as one autograd function (fused.lora_linear)             default: on CUDA
  fused_loss     head + cross-entropy with no logits kept for backward (fused.linear_cross_entropy)   on CUDA
  torch_compile  one decoder layer compiled and reused by every layer (regional compilation), dynamic
                 shapes, batch widths padded to a multiple of 64                          default: off
  cuda_graphs    with torch_compile, static shapes only: every batch max_length wide and its document
                 boundaries padded to a fixed count, so each compiled layer replays one CUDA graph
  asynchronous   pinned batches, non-blocking copies, the next window collated in a thread while the
                 device works, fused AdamW, and no host read of a device value inside the window   CUDA only
The CPU keeps the eager paths by default: there the arithmetic is the bound and these levers buy nothing.
One lever is the CPU's own:
  forward_tokens each micro-batch split into forward passes of whole examples of at most 1024 tokens, the
                 gradient unchanged (the loss is normalised per window): activations of a few MB stay in
                 cache and need fresh memory less often (measured: 1024-token passes ran 1.3x the tokens/s of
                 4096-token ones on 2 cores, at less than half the peak)              default: CPU, one process
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from .attention import uses_varlen
from .data.pipeline import collate
from .fused import chunk_loss_and_grad
from .loss import SFT_LOSS, loss_sum, trainable_positions, without_metrics
from .lora import use_fused_lora
from .memory import decoder_layers

WIDTH_MULTIPLE = 64
CPU_FORWARD_TOKENS = 1024


@dataclass(frozen=True)
class Levers:
    """The levers one run uses (see the module docstring); `describe` says which."""

    fused_lora: str | None = None  # the update dtype ("compute" or "fp32"), None: eager LoRA
    fused_loss: bool = False
    compile: bool = False
    cuda_graphs: bool = False
    asynchronous: bool = False
    width_multiple: int | None = None  # batches padded to a multiple of this width (None: to their longest row)
    documents_per_batch: int | None = None  # cuda_graphs: document boundaries padded to this many documents
    forward_tokens: int | None = None  # micro-batches split into forward passes of at most this many tokens

    def describe(self) -> str:
        parts = [f"fused LoRA ({self.fused_lora} update)" if self.fused_lora else "eager LoRA",
                 "fused loss" if self.fused_loss else "chunked loss"]
        if self.compile:
            parts.append("compiled layers" + (" with CUDA graphs (static shapes)" if self.cuda_graphs else ""))
        if self.asynchronous:
            parts.append("asynchronous batches and fused AdamW")
        if self.forward_tokens:
            parts.append(f"forward passes of at most {self.forward_tokens} tokens")
        return "speed: " + ", ".join(parts)


def resolve_levers(config, device: torch.device, rows: list[dict] | None = None, processes: int = 1) -> Levers:
    """The levers for this config on this device; `rows` (the training rows) size the static document count.
    `processes`: the ranks, which would each split their micro-batches differently, so only one splits (an asked
    split with several is refused by preflight); KTO's KL baseline is per micro-batch, so it is never split."""
    cuda = device.type == "cuda"
    splits = device.type == "cpu" and processes == 1 and not (config.deepspeed or config.fsdp) and \
        getattr(config, "rlhf_type", None) != "kto"
    forward_tokens = (CPU_FORWARD_TOKENS if splits else None) if config.max_forward_tokens < 0 else config.max_forward_tokens or None
    # ZeRO-3 gathers a weight only around its module's own forward; the fused paths read weights outside it.
    fusable = cuda and not config.deepspeed
    fused_lora = (fusable if config.fused_lora is None else config.fused_lora) and config.sft_type == "lora"
    static = config.torch_compile and config.cuda_graphs
    documents = None
    if static and config.packing and rows:
        most = max(row["position_ids"].count(0) for row in rows) + 1  # + the padding, a document of its own
        documents = config.batch_size * most
    elif static and config.padding_free:
        documents = config.batch_size + 1  # each example of the flattened row, and its padding
    width = (config.max_length or 2048) if static else WIDTH_MULTIPLE if config.torch_compile else None
    return Levers(fused_lora=config.lora_update_dtype if fused_lora else None,
                  fused_loss=fusable if config.fused_loss is None else config.fused_loss,
                  compile=config.torch_compile, cuda_graphs=static, asynchronous=cuda, width_multiple=width,
                  documents_per_batch=documents, forward_tokens=forward_tokens)


def apply_levers(model, levers: Levers, backend: str = "inductor") -> None:
    """Switch the model's layers to the fused and compiled paths the levers ask for (after LoRA and attention)."""
    if levers.fused_lora:
        use_fused_lora(model, levers.fused_lora)
    if levers.compile:
        compile_regions(model, cuda_graphs=levers.cuda_graphs, backend=backend)


def compile_regions(model, *, cuda_graphs: bool = False, backend: str = "inductor") -> int:
    """Compile every decoder layer in place; they share one compiled graph (dynamo treats the parameters as
    inputs), so the cost is one layer's compile, not the model's. Returns how many layers.

    Shapes are dynamic, so new widths and document counts do not recompile; with CUDA graphs they are static
    (the collated batches make them so) and each distinct shape is captured once.
    """
    if cuda_graphs:
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraph_skip_dynamic_graphs = True  # graphs whose shapes still vary run without
    layers = decoder_layers(model)
    if hasattr(model, "enable_input_require_grads"):
        # The first layer's input would be the only one without requires_grad: a second graph for one layer.
        model.enable_input_require_grads()
    for layer in layers:
        layer.compile(backend=backend, dynamic=not cuda_graphs, mode="reduce-overhead" if cuda_graphs else None)
    return len(layers)


def training_loss(loss_fn, levers: Levers, backend: str = "inductor"):
    """The objective's loss the backend runs: SFT's with the fused head when asked (its elementwise part compiled
    with the layers); any other as given."""
    if not (levers.fused_loss and loss_fn is SFT_LOSS):
        return loss_fn
    kernel = torch.compile(chunk_loss_and_grad, dynamic=True, backend=backend) if levers.compile else chunk_loss_and_grad
    return partial(without_metrics, partial(loss_sum, fused=True, chunk_kernel=kernel))


def training_collate(collate_fn, levers: Levers, model):
    """collate_fn as training calls it: widths padded as the levers say, the trainable positions counted on the
    host, no padding mask where the attention needs none (varlen), and pinned memory for asynchronous copies."""

    def collate_for_training(rows: list[dict], pad_id: int) -> dict:
        if collate_fn is collate:
            batch = collate(rows, pad_id, pad_to_multiple_of=levers.width_multiple, attention_mask=not uses_varlen(model))
        elif levers.width_multiple:
            batch = collate_fn(rows, pad_id, pad_to_multiple_of=levers.width_multiple)
        else:
            batch = collate_fn(rows, pad_id)
        batch["trainable_positions"] = trainable_positions(batch["labels"])
        if levers.documents_per_batch and "document_boundaries" in batch:
            batch["document_boundaries"] = pad_boundaries(batch["document_boundaries"], levers.documents_per_batch)
        return {key: value.pin_memory() for key, value in batch.items()} if levers.asynchronous else batch

    return collate_for_training


def pad_boundaries(boundaries: torch.Tensor, documents: int) -> torch.Tensor:
    """Document boundaries with empty documents appended, so every batch has the same number (static shapes)."""
    missing = documents + 1 - boundaries.numel()
    if missing < 0:
        raise ValueError(f"{boundaries.numel() - 1} documents in a batch sized for {documents}")
    return torch.cat([boundaries, boundaries[-1:].expand(missing)])
