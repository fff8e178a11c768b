"""Pipeline-style model parallelism: the decoder layers of one model spread over several devices.

plan_placement() is pure: embeddings go to the first device, the output head (and final norm) to the
last, and the decoder layers in between are cut into contiguous runs of roughly equal parameter count.
place() moves the modules and adds hooks that carry activations across device boundaries.
"""
from __future__ import annotations

import torch
from torch import nn


def plan_placement(layer_sizes: list[int], devices: list[str], first_extra: int = 0, last_extra: int = 0) -> list[str]:
    """The device of each decoder layer, contiguous and balanced by parameter count.

    first_extra/last_extra are the parameters the first/last device already carry (embeddings, head),
    so those devices get fewer layers.
    """
    if not devices:
        raise ValueError("plan_placement needs at least one device")
    if len(devices) == 1:
        return [devices[0]] * len(layer_sizes)
    total = sum(layer_sizes) + first_extra + last_extra
    share = total / len(devices)
    assignment, device_index, load = [], 0, float(first_extra)
    remaining_layers = len(layer_sizes)
    for size in layer_sizes:
        devices_left = len(devices) - device_index - 1
        # Move on when this device is full, but never leave a later device without a layer.
        if devices_left and load > 0 and (load + size / 2 > share or remaining_layers <= devices_left):
            device_index, load = device_index + 1, 0.0
            if device_index == len(devices) - 1:
                load = float(last_extra)
        assignment.append(devices[device_index])
        load += size
        remaining_layers -= 1
    return assignment


def decoder_layers(model) -> nn.ModuleList:
    """The model's list of decoder blocks (model.model.layers for Llama/Qwen/Mistral/Gemma/Phi-3)."""
    backbone = getattr(model, model.base_model_prefix)
    for name in ("layers", "h", "blocks"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} for model parallel placement")


def place(model, devices: list[str]) -> dict[str, str]:
    """Spread `model` over `devices`; returns the module -> device map it applied."""
    layers = decoder_layers(model)
    backbone = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    plan = plan_placement([_size(layer) for layer in layers], devices, _size(embeddings),
                          _size(head) if head is not None and head.weight is not embeddings.weight else 0)
    first, last = devices[0], devices[-1]
    placed = {}
    # Everything not listed below (embeddings, rotary tables) starts on the first device.
    model.to(first)
    for index, (layer, device) in enumerate(zip(layers, plan)):
        layer.to(device)
        layer.register_forward_pre_hook(_to_device_hook(device), with_kwargs=True)
        placed[f"layers.{index}"] = device
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            module.to(last)
            module.register_forward_pre_hook(_to_device_hook(last), with_kwargs=True)
            placed[name] = last
    if head is not None:
        if head.weight is embeddings.weight and first != last:
            raise ValueError("tied input/output embeddings cannot sit on two devices; use one device or untie them")
        head.to(last)
        head.register_forward_pre_hook(_to_device_hook(last), with_kwargs=True)
        placed["lm_head"] = last
    return placed


def _size(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _to_device_hook(device: str):
    target = torch.device(device)

    def hook(module, args, kwargs):
        return _move(args, target), _move(kwargs, target)

    return hook


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_move(item, device) for item in value)
    if isinstance(value, list):
        return [_move(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _move(item, device) for key, item in value.items()}
    return value
