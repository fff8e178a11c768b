"""Several LoRA adapters on one base model at once: every row of a batch uses its own adapter, or none.

Before each forward pass the engine tells AdapterRows which rows use which adapter; each adapted layer
adds only those rows' updates, so requests for different adapters share a batch and the base weights
are loaded once. Adapters are read in peft's format (ours or peft's): the tensors in the file name the
layers they adapt.
"""
from __future__ import annotations

import itertools
import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..lora import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, LoRAConfig, LoRALinear, LoRAQuantLinear, is_adaptable
from ..quant import is_quantized_linear

LoRAWeights = tuple[torch.Tensor, torch.Tensor, float]  # lora_A [r, in], lora_B [out, r], scaling


class AdapterRows:
    """Which rows of the coming forward pass use which adapter; shared by every MultiLoRALinear of a model."""

    def __init__(self):
        self.groups: list[tuple[str, torch.Tensor | None]] = []  # (adapter, its row indices; None: every row)

    def assign(self, adapters: list[str | None], device) -> None:
        """One adapter name (None: the base model) per row."""
        distinct = set(adapters)
        if len(distinct) == 1:
            self.groups = [(adapters[0], None)] if adapters[0] is not None else []
            return
        self.groups = [(name, torch.tensor([row for row, used in enumerate(adapters) if used == name], device=device))
                       for name in sorted(distinct - {None})]


class MultiLoRALinear(nn.Module):
    """A base linear (plain or quantized) plus any number of named LoRA updates, each applied to its rows only."""

    def __init__(self, base_layer: nn.Module, rows: AdapterRows):
        super().__init__()
        self.base_layer, self.rows = base_layer, rows
        self.adapters: dict[str, LoRAWeights] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        for name, index in self.rows.groups:
            if name not in self.adapters:
                continue
            lora_A, lora_B, scaling = self.adapters[name]
            rows = x if index is None else x.index_select(0, index)
            # As LoRALinear computes it: in the adapter's dtype, added in the base output's.
            update = (F.linear(F.linear(rows.to(lora_A.dtype), lora_A), lora_B) * scaling).to(result.dtype)
            result = result + update if index is None else result.index_add(0, index, update)
        return result


def read_adapter(folder: str) -> tuple[LoRAConfig, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """An adapter folder's config and its (lora_A, lora_B) weights by layer name."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ValueError(f"{folder} is not a LoRA adapter: it has no {name}")
    with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as handle:
        config = LoRAConfig.from_peft_dict(json.load(handle))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(os.path.join(folder, WEIGHTS_NAME)).items():
        layer, dot, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or not dot or part not in ("A.weight", "B.weight"):
            raise ValueError(f"{folder}: unexpected tensor {key} in a LoRA adapter")
        layers.setdefault(layer, {})[part[0]] = tensor
    incomplete = sorted(layer for layer, parts in layers.items() if len(parts) != 2)
    if incomplete or not layers:
        raise ValueError(f"{folder}: LoRA layers need both lora_A and lora_B; incomplete: {incomplete[:5] or 'all'}")
    return config, {layer: (parts["A"], parts["B"]) for layer, parts in layers.items()}


def serve_adapters(model: nn.Module, adapters: dict[str, str], loaded_as: str | None = None) -> AdapterRows:
    """Make the model serve several adapters: the LoRA layers it already has (as `loaded_as`) and each folder by name.

    Every adapter is read and checked against the model before any layer is replaced, so a bad one
    leaves the model as it was.
    """
    loaded = {name: layer for name, layer in model.named_modules() if isinstance(layer, LoRALinear)}
    if loaded and loaded_as is None:
        raise ValueError("the model already carries a LoRA adapter: name it (loaded_as) to serve it")
    weights: dict[str, dict[str, LoRAWeights]] = {}
    if loaded:
        weights[loaded_as] = {name: (layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
                              for name, layer in loaded.items()}
    for adapter, folder in adapters.items():
        if adapter in weights:
            raise ValueError(f"adapter name {adapter!r} is used twice")
        config, tensors = read_adapter(folder)
        weights[adapter] = {layer: (*_checked(model, folder, layer, config.r, pair), config.scaling)
                            for layer, pair in tensors.items()}
    rows = AdapterRows()
    wrapped = {}
    for layer in sorted({layer for per_layer in weights.values() for layer in per_layer}):
        module = model.get_submodule(layer)
        wrapped[layer] = MultiLoRALinear(_base_of(module), rows)
    for adapter, per_layer in weights.items():
        for layer, (lora_A, lora_B, scaling) in per_layer.items():
            device, dtype = _placement(wrapped[layer].base_layer)
            wrapped[layer].adapters[adapter] = (lora_A.detach().to(device, dtype), lora_B.detach().to(device, dtype),
                                                scaling)
    for layer, module in wrapped.items():
        parent, _, leaf = layer.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module)
    return rows


def _checked(model: nn.Module, folder: str, layer: str, r: int, pair) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair, once the layer exists, can carry LoRA, and has the shapes the file claims."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"{folder}: the model has no layer {layer}: the adapter belongs to another base model") from None
    if not (isinstance(module, LoRALinear) or is_adaptable(module)):
        raise ValueError(f"{folder}: {layer} is a {type(module).__name__}, which LoRA cannot adapt")
    lora_A, lora_B = pair
    expected = ((r, module.in_features), (module.out_features, r))
    if (tuple(lora_A.shape), tuple(lora_B.shape)) != expected:
        raise ValueError(f"{folder}: {layer} has lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}, "
                         f"expected {expected[0]} and {expected[1]} (r={r}): the adapter belongs to another base model")
    return lora_A, lora_B


def _base_of(module: nn.Module) -> nn.Module:
    """The plain (or quantized) linear under a LoRA layer, or the module itself."""
    if isinstance(module, LoRAQuantLinear):
        return module.base_layer
    if isinstance(module, LoRALinear):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        linear.weight, linear.bias = module.weight, module.bias
        return linear
    return module


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where an adapter of this layer lives, as LoRALinear places it: the base's dtype, float32 on a quantized base."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()))
    floating = tensor.dtype.is_floating_point and not is_quantized_linear(module)
    return tensor.device, tensor.dtype if floating else torch.float32
