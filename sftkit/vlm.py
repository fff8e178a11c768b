"""The model side of vision-language models: which modules see images, keeping them frozen, and the rotary
positions of a prompt with images.

A vision-language model here is one whose language model (`get_decoder()`) is not its whole base model: the
base's other children are the vision tower and the projector that feeds it into the text embeddings.
"""
from __future__ import annotations

import torch


def is_vision_language(model) -> bool:
    base = getattr(model, model.base_model_prefix, None)
    return getattr(model.config, "vision_config", None) is not None and base is not None and model.get_decoder() is not base


def vision_modules(model) -> tuple[str, ...]:
    """Dotted names of the vision tower and projector (Qwen2-VL: model.visual), () for a text model."""
    if not is_vision_language(model):
        return ()
    prefix = model.base_model_prefix
    decoder = model.get_decoder()
    return tuple(f"{prefix}.{name}" for name, module in getattr(model, prefix).named_children() if module is not decoder)


def frozen_vision(model, freeze_vit: bool) -> tuple[str, ...]:
    """The modules training leaves alone: the vision tower and projector with --freeze_vit true, else none."""
    return vision_modules(model) if freeze_vit else ()


def freeze(model, names: tuple[str, ...]) -> None:
    for name in names:
        model.get_submodule(name).requires_grad_(False)


def rope_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: dict) -> torch.Tensor | None:
    """The [3, batch, length] rotary positions (time, height, width) of left-padded prompts with images, as the
    Qwen2-VL family computes them; None for a model whose positions do not depend on its images."""
    base = getattr(model, model.base_model_prefix)
    if not hasattr(base, "get_rope_index"):
        return None
    positions, _ = base.get_rope_index(input_ids=input_ids, mm_token_type_ids=images["mm_token_type_ids"],
                                       image_grid_thw=images["image_grid_thw"], attention_mask=attention_mask)
    return positions
