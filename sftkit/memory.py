"""How much memory a micro-batch needs, what to recompute when it does not fit, and what to tell a user who ran out.

The estimate counts the tensors autograd keeps for backward, per token and decoder layer, from the model config
(measured against saved-tensor hooks in the tests), plus the loss's float32 logits, the weights and the optimizer.
When it exceeds the budget (--max_memory), activation checkpointing recomputes the cheapest parts that make it fit:
the MLP or the attention block of some layers, or whole layers, whichever costs the fewest recomputed FLOPs.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import re
from dataclasses import dataclass

import torch

from .errors import SftkitError

PARTS = ("mlp", "attention", "layer")
_ATTENTION_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")
_UNITS = {"b": 1, "kb": 2**10, "kib": 2**10, "mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30, "tb": 2**40, "tib": 2**40}
_HEADROOM = 0.9  # of the device's memory, for what the estimate does not count (allocator slack, the runtime)
GiB = 2**30


def parse_memory(text: str | None) -> int | str | None:
    """'24GB' / '900MB' / '1.5GiB' -> bytes (GB meaning 2^30); 'auto' stays 'auto'; None or 'none' -> None."""
    if text is None or str(text).strip().lower() == "none":
        return None
    value = str(text).strip().lower()
    if value == "auto":
        return "auto"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    if not match or match.group(2) not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"max_memory must be a size such as 24GB or 900MB, 'auto' or 'none', got '{text}'")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


@dataclass(frozen=True)
class ModelShape:
    """What the activation estimate needs from a decoder-only config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "ModelShape | None":
        """The shape under transformers' names or the remote-code ones (ChatGLM's num_layers, ...); None if unknown."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers, hidden, heads, vocab = (_first(config, *names) for names in (
            ("num_hidden_layers", "num_layers", "n_layer"), ("hidden_size", "n_embd"),
            ("num_attention_heads", "n_head"), ("vocab_size", "padded_vocab_size")))
        if not (layers and hidden and heads and vocab):
            return None
        # Mixture-of-experts: each token goes through its top-k experts (and a shared one where there is one).
        intermediate = _first(config, "intermediate_size", "ffn_hidden_size", "n_inner") or 4 * hidden
        if getattr(config, "num_experts_per_tok", None) and getattr(config, "moe_intermediate_size", None):
            intermediate = config.moe_intermediate_size * config.num_experts_per_tok + (
                getattr(config, "shared_expert_intermediate_size", None) or 0)
        return cls(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads,
                   kv_heads=_first(config, "num_key_value_heads", "multi_query_group_num") or heads,
                   head_dim=_first(config, "head_dim", "kv_channels") or hidden // heads, vocab=vocab)


def _first(config, *names):
    """The first of these config attributes that is set."""
    return next((value for name in names if (value := getattr(config, name, None))), None)


@dataclass(frozen=True)
class Estimate:
    """Bytes autograd keeps for one micro-batch: per decoder layer by part, the loss logits, the layer input."""

    norms: int
    attention: int
    mlp: int
    layer_input: int
    logits: int
    logits_chunk: int
    layers: int
    flops_attention: float  # forward FLOPs per micro-batch of one layer's part: the price of recomputing it
    flops_mlp: float

    @property
    def per_layer(self) -> int:
        return self.norms + self.attention + self.mlp

    def saving(self, part: str) -> int:
        """What checkpointing `part` of one layer frees: all it saves but its input, which the checkpoint keeps."""
        kept = {"mlp": self.mlp, "attention": self.attention, "layer": self.per_layer}[part]
        return kept - self.layer_input

    def recompute_flops(self, part: str) -> float:
        return {"mlp": self.flops_mlp, "attention": self.flops_attention, "layer": self.flops_mlp + self.flops_attention}[part]

    def activations(self, plan: "CheckpointPlan") -> int:
        """Saved tensors plus the transient of backward: one layer's activations (recomputed or not) and two logits chunks."""
        saved = self.layers * self.per_layer - (plan.layers * self.saving(plan.part) if plan.part else 0)
        return saved + self.logits + self.per_layer + 2 * self.logits_chunk


@dataclass(frozen=True)
class CheckpointPlan:
    """Recompute `part` ('mlp', 'attention' or 'layer') of the first `layers` decoder layers; part None: nothing."""

    part: str | None = None
    layers: int = 0

    def describe(self, total_layers: int) -> str:
        if not self.part:
            return "no activation checkpointing"
        what = "whole layers" if self.part == "layer" else f"the {self.part} block"
        return f"checkpointing {what} in {self.layers} of {total_layers} layers"


def estimate_activations(shape: ModelShape, tokens: int, trainable_tokens: int, *, element_bytes: int = 4,
                         lora_rank: int = 0, lora_dropout: bool = False, full: bool = False, attention: str = "sdpa",
                         sequence: int | None = None, loss_chunk: int = 1024, fused_loss: bool = False) -> Estimate:
    """Bytes kept for backward by a micro-batch of `tokens` (padding included), `trainable_tokens` of them in the loss.

    Every linear layer is assumed trained or adapted (all-linear LoRA, or `full` fine-tuning, which also trains the
    norms and the head), so fewer LoRA targets make this an upper bound. `attention` is the implementation: 'sdpa'
    (with a mask it repeats the key/value heads), 'varlen' (no mask, no repeat) or 'eager' (the B x H x T x T
    probabilities). Norms run in float32 under autocast; the loss's logits are float32, and with `fused_loss` none
    are kept: only the gradient of the trainable hidden states is.
    """
    h, i, heads, kv, d, r = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim, lora_rank
    sequence = sequence or tokens
    # Per token, in elements: the inputs of the linears that train (one copy shared by q, k, v and one by gate, up),
    # SDPA's q, k, v, output and log-sum-exp, the MLP's gate, up, activation and product, the adapters' A outputs.
    attention_elements = h + 2 * heads * d + 2 * kv * d + heads + 4 * r
    if attention in ("sdpa", "eager") and kv < heads:
        attention_elements += 2 * (heads - kv) * d  # repeat_kv: masked SDPA and eager get every head's keys and values
    if attention == "eager":
        attention_elements += heads * sequence
    mlp_elements = h + 4 * i + 3 * r
    attention_bytes, mlp_bytes = attention_elements * element_bytes, mlp_elements * element_bytes
    if lora_dropout:  # each adapter keeps its dropped input and the one-byte mask
        attention_bytes += (3 * h + heads * d) * (element_bytes + 1)
        mlp_bytes += (2 * h + i) * (element_bytes + 1)
    norm_bytes = (2 * h + 2) * 4 + (2 * h * 4 if full else 0)  # input and 1/rms; trained weights keep the output too
    chunk = min(trainable_tokens, loss_chunk)
    flops_attention = 2 * tokens * (2 * h * heads * d + 2 * h * kv * d) + 2 * tokens * sequence * heads * d
    return Estimate(norms=tokens * norm_bytes, attention=tokens * attention_bytes, mlp=tokens * mlp_bytes,
                    layer_input=tokens * h * element_bytes,
                    logits=trainable_tokens * (h * element_bytes if fused_loss else
                                               shape.vocab * 4 + (h * element_bytes if full else 0)),
                    logits_chunk=chunk * shape.vocab * 4, layers=shape.layers, flops_attention=float(flops_attention),
                    flops_mlp=float(2 * tokens * 3 * h * i))


def choose_plan(estimate: Estimate, fixed: int, budget: int | None, parts: tuple[str, ...] = PARTS) -> CheckpointPlan:
    """The plan that fits `budget` with the fewest recomputed FLOPs: nothing when it fits as is, else the fewest
    layers of one part; whole layers everywhere when nothing fits (the caller says it does not)."""
    plan = CheckpointPlan()
    if budget is None or fixed + estimate.activations(plan) <= budget:
        return plan
    excess = fixed + estimate.activations(plan) - budget
    options = []
    for part in parts:
        saving = estimate.saving(part)
        needed = math.ceil(excess / saving) if saving > 0 else estimate.layers + 1
        if needed <= estimate.layers:
            options.append((needed * estimate.recompute_flops(part), CheckpointPlan(part, needed)))
    return min(options, key=lambda option: option[0])[1] if options else CheckpointPlan("layer", estimate.layers)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of the decoder: transformers marks them, else the longest ModuleList."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if layers:
        return layers
    lists = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def part_of(layer: torch.nn.Module, part: str) -> torch.nn.Module | None:
    if part == "layer":
        return layer
    names = _ATTENTION_NAMES if part == "attention" else _MLP_NAMES
    return next((getattr(layer, name) for name in names if isinstance(getattr(layer, name, None), torch.nn.Module)), None)


def available_parts(model) -> tuple[str, ...]:
    """The parts every decoder layer has (a layer without a recognisable MLP still checkpoints whole)."""
    layers = decoder_layers(model)
    return tuple(part for part in PARTS if layers and all(part_of(layer, part) is not None for layer in layers))


def apply_plan(model, plan: CheckpointPlan) -> list[str]:
    """Make the planned modules recompute their forward in backward (non-reentrant, so adapters in a frozen base
    get gradients and dropout replays its masks); returns their names. Without gradients they run as usual."""
    if not plan.part:
        return []
    names = {module: name for name, module in model.named_modules()}
    wrapped = []
    for layer in decoder_layers(model)[:plan.layers]:
        module = part_of(layer, plan.part)
        module.forward = _checkpointed(module, module.forward)
        wrapped.append(names[module])
    return wrapped


def _checkpointed(module: torch.nn.Module, forward):
    from torch.utils.checkpoint import checkpoint

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def weight_bytes(model) -> int:
    """Weights and buffers as they are."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def fixed_bytes(model, optimizer_bytes_per_parameter: int = 12) -> int:
    """Weights and buffers, plus each trainable parameter's float32 gradient and two AdamW moments."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return weight_bytes(model) + trainable * optimizer_bytes_per_parameter


def device_budget(device: torch.device, processes: int = 1) -> int:
    """'auto': most of the GPU's memory; on CPU, most of what this process holds (the model is loaded by now)
    plus its share of what the machine has free, `processes` ranks sharing it."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * _HEADROOM)
    return int((available_ram() / max(processes, 1) + resident_bytes()) * _HEADROOM)


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def limit_heap_fragmentation(threshold: int = 2**20) -> bool:
    """CPU training: serve every allocation of `threshold` bytes or more with its own mmap, returned on free.

    glibc raises its mmap threshold up to 32 MB as large blocks are freed, after which activation-sized tensors
    live in the heap and fragment it: measured on SmolLM2-135M, the process's resident memory per layer of
    activations doubled. Fixing the threshold (what MALLOC_MMAP_THRESHOLD_ does) stops that. A threshold the
    user set in the environment wins; returns whether it was set here.
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(libc.mallopt(-3, threshold))  # -3: M_MMAP_THRESHOLD


def prepare_memory(model, config, device: torch.device, examples: list[dict], say=print, processes: int = 1,
                   fused_loss: bool = False, sequences=lambda example: [example], padding_free: bool = False,
                   forward_tokens: int | None = None, held_bytes: int = 0) -> int:
    """Before the first step: on CPU tune the allocator, print the estimated peak of a micro-batch and, when it
    exceeds --max_memory, checkpoint what makes it fit. Returns the estimated peak in bytes.

    sequences(example) are the rows an example puts in a micro-batch (a preference pair: its two answers);
    padding_free: a micro-batch is its rows without pads (at most the longest rows together), else batch x longest;
    forward_tokens: a padding-free or packed micro-batch runs in forward passes of whole rows of at most that many
    tokens together (or one longer row); held_bytes: weights the objective keeps beside the model (a frozen
    reference copy)."""
    from .attention import VARLEN

    shape = ModelShape.from_config(model.config)
    if shape is None:
        say(f"[sftkit] no memory estimate: {type(model.config).__name__} does not name its layers and sizes as "
            "transformers' models do")
        return 0
    rows = [sequence for example in examples for sequence in sequences(example)]
    lengths = sorted(len(row["input_ids"]) for row in rows)
    trainable = sorted(sum(label != -100 for label in row["labels"][1:]) for row in rows)
    longest = lengths[-1]
    half = config.dtype in ("bf16", "fp16") or (config.dtype == "auto" and device.type == "cuda")
    implementation = model.config._attn_implementation
    batch = min(config.batch_size * len(rows) // len(examples), len(rows))
    tokens, most_trainable = (sum(lengths[-batch:]), sum(trainable[-batch:])) if padding_free else \
        (batch * longest, batch * trainable[-1])
    split = (padding_free or config.packing) and forward_tokens and tokens > max(forward_tokens, longest)
    if split:
        tokens = max(forward_tokens, longest)
        most_trainable = min(most_trainable, tokens)
    estimate = estimate_activations(
        shape, tokens, most_trainable, element_bytes=2 if half else 4,
        lora_rank=config.lora_rank if config.sft_type == "lora" else 0,
        lora_dropout=config.sft_type == "lora" and config.lora_dropout > 0, full=config.sft_type == "full",
        attention="varlen" if implementation in (VARLEN, "flash_attention_2", "flash_attention_3") else implementation,
        sequence=longest, fused_loss=fused_loss)
    fixed = fixed_bytes(model) + held_bytes
    if device.type == "cpu" and limit_heap_fragmentation():
        say("[sftkit] CPU allocator: tensors of 1 MB or more get their own memory mapping (less heap fragmentation)")
    budget = parse_memory(config.max_memory)
    budget = device_budget(device, processes) if budget == "auto" else budget
    plan = CheckpointPlan("layer", shape.layers) if config.gradient_checkpointing else \
        choose_plan(estimate, fixed, budget, available_parts(model))
    peak = fixed + estimate.activations(plan)
    batch_shape = f"{batch} rows in forward passes of at most {tokens} tokens, no padding" if split else \
        f"{tokens} tokens ({batch} rows, no padding)" if padding_free else f"{batch} x {longest} tokens"
    say(f"[sftkit] estimated peak memory per micro-batch of {batch_shape}: {size(peak)} (activations "
        f"{size(estimate.activations(CheckpointPlan()))} without checkpointing, loss logits {size(estimate.logits)} of them; "
        f"weights, gradients and optimizer {size(fixed)}" + (f", the frozen reference {size(held_bytes)} of them" if held_bytes
                                                              else "") + ")" + (f"; budget {size(budget)}" if budget else ""))
    if plan.part and not config.gradient_checkpointing:
        extra = plan.layers * estimate.recompute_flops(plan.part) / (3 * shape.layers * (estimate.flops_attention + estimate.flops_mlp))
        apply_plan(model, plan)
        say(f"[sftkit] to fit the budget: {plan.describe(shape.layers)} (about +{100 * extra:.0f}% compute)")
    if budget and peak > budget:
        say(f"[sftkit] warning: the estimate exceeds the budget even so; {advice(config)}")
    return peak


def size(count: int) -> str:
    return f"{count / GiB:.2f} GB" if count >= GiB / 10 else f"{count / 2**20:.1f} MB"


class NotEnoughMemory(SftkitError, RuntimeError):
    """Training ran out of memory; the message says which options lower the need."""


def advice(config) -> str:
    return (f"lower --batch_size (now {config.batch_size}) or --max_length (now {config.max_length}), "
            "turn on --gradient_checkpointing true (or set --max_memory to the memory you have, so sftkit "
            "recomputes only what it must), or use --packing true with a smaller --batch_size (no padding)")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA/XPU OOM, Python's MemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and ("can't allocate memory" in str(error) or "out of memory" in str(error).lower())


def explain_out_of_memory(train):
    """Turn an out-of-memory error inside train(config) into NotEnoughMemory, whose message says what to change."""

    @functools.wraps(train)
    def run(config, *args, **kwargs):
        try:
            return train(config, *args, **kwargs)
        except Exception as error:
            if isinstance(error, NotEnoughMemory) or not is_out_of_memory(error):
                raise
            what = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise NotEnoughMemory(f"out of memory ({what}): {advice(config)}") from error
    return run
