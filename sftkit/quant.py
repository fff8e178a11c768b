"""Quantized bases for QLoRA (bitsandbytes 4/8-bit, pre-quantized GPTQ checkpoints) and the 8-bit AdamW optimizer.

bitsandbytes, gptqmodel and optimum are optional and imported only when asked for.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIMIZERS = ("adamw", "adamw_8bit")
# transformers' TrainingArguments.optim names, which ms-swift passes through.
OPTIMIZER_ALIASES = {"adamw_torch": "adamw", "adamw_bnb_8bit": "adamw_8bit"}
BNB_HINT = "pip install 'sftkit[quant]' (or just: pip install bitsandbytes)"
GPTQ_HINT = "pip install 'sftkit[quant]' (or just: pip install gptqmodel optimum)"
# bitsandbytes.nn classes (and their subclasses LinearNF4, LinearFP4, ...) whose packed weight only their forward reads.
_BNB_LINEARS = ("Linear4bit", "Linear8bitLt")


class QuantizationError(RuntimeError):
    """A quantization feature that is missing a package or hardware, or cannot apply to the model."""


@dataclass(frozen=True)
class QuantizationOptions:
    """Quantize a full-precision base with bitsandbytes while loading it (QLoRA); ms-swift's option names.

    bits: None or 0 (ms-swift's quantization_bit default) loads unquantized, 4 or 8 quantize the linears.
    bnb_4bit_compute_dtype: dtype the 4-bit matmuls run in; "auto" follows the model's load dtype.
    """

    bits: int | None = None
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: str = "auto"

    def __post_init__(self):
        if self.bits == 0:
            object.__setattr__(self, "bits", None)
        problems = []
        if self.bits is not None and (isinstance(self.bits, bool) or self.bits not in BITS):
            problems.append(f"bits (quantization_bit) must be 0, 4 or 8, got {self.bits!r}")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            problems.append(
                f"bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.bnb_4bit_quant_type!r}"
            )
        if self.bnb_4bit_compute_dtype != "auto" and self.bnb_4bit_compute_dtype not in COMPUTE_DTYPES:
            problems.append(
                f"bnb_4bit_compute_dtype must be auto, {', '.join(COMPUTE_DTYPES)}, got {self.bnb_4bit_compute_dtype!r}"
            )
        if problems:
            raise ValueError("invalid QuantizationOptions: " + "; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.bits is not None


def bnb_config(options: QuantizationOptions, compute_dtype: torch.dtype):
    """The transformers BitsAndBytesConfig for these options; `compute_dtype` is what "auto" stands for."""
    from transformers import BitsAndBytesConfig

    if options.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if options.bits != 4:
        raise ValueError(f"bnb_config needs bits 4 or 8, got {options.bits!r}")
    if options.bnb_4bit_compute_dtype != "auto":
        compute_dtype = COMPUTE_DTYPES[options.bnb_4bit_compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=options.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def checkpoint_quant_method(model_dir: str) -> str | None:
    """quantization_config.quant_method in config.json ("gptq", "awq", ...); None for a full-precision checkpoint."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as file:
        quantization_config = json.load(file).get("quantization_config") or {}
    method = quantization_config.get("quant_method")
    return str(method).lower() if method else None


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(f"quantization_bit and adamw_8bit need bitsandbytes: {BNB_HINT}")


def require_gptq() -> None:
    """transformers runs GPTQ checkpoints through optimum + gptqmodel (auto-gptq fails to import on transformers 5)."""
    missing = [name for name in ("gptqmodel", "optimum") if importlib.util.find_spec(name) is None]
    if missing:
        needs = " and ".join(missing)
        raise QuantizationError(f"this checkpoint is GPTQ-quantized and loading it needs {needs}: {GPTQ_HINT}")


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear whose weight is packed (bitsandbytes 4/8-bit, GPTQ and other `qweight` kernels), recognised by
    class name and buffers so that neither package has to be imported to ask."""
    if any(cls.__name__ in _BNB_LINEARS and cls.__module__.startswith("bitsandbytes") for cls in type(module).__mro__):
        return True
    return (
        isinstance(getattr(module, "qweight", None), torch.Tensor)
        and isinstance(getattr(module, "in_features", None), int)
        and isinstance(getattr(module, "out_features", None), int)
    )


def is_quantized(model: nn.Module) -> bool:
    """True when some weights are quantized: those cannot be trained, only adapters on top of them."""
    return getattr(model, "hf_quantizer", None) is not None or any(is_quantized_linear(m) for m in model.modules())


def prepare_for_kbit_training(model: nn.Module, *, gradient_checkpointing: bool = False) -> None:
    """What peft's prepare_model_for_kbit_training does that matters, without peft.

    Freeze the base; for bitsandbytes, hold every half-precision parameter that is not packed (norms, embeddings,
    head) in float32, for stable norms and a float32 residual stream (GPTQ kernels want their half dtype, so peft
    and we leave GPTQ alone); with checkpointing, make the embeddings' output require grad, which reentrant
    checkpointing needs to send gradients back to adapters inside a block whose inputs are otherwise all frozen.
    """
    model.requires_grad_(False)
    if _is_bitsandbytes(model):
        for param in model.parameters():
            # Params4bit may store packed 4-bit data as bf16/fp16 (bnb_4bit_quant_storage): never cast those.
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.float()
    if gradient_checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _is_bitsandbytes(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def make_optimizer(
    name: str,
    params,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 0.0,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' AdamW8bit, which stores both moments in 8 bits (blockwise) to save 3/4 of their memory.

    AdamW8bit keeps 32-bit moments for tensors under 4096 elements, where 8 bits would save little and cost accuracy.
    fused: torch's one-kernel AdamW (the same update; one launch instead of one per tensor and operation).
    """
    name = OPTIMIZER_ALIASES.get(name, name)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)
    if name != "adamw_8bit":
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")
    require_bitsandbytes()
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
