"""Where a causal LM keeps its decoder stack and its output head, and which way its hidden states are laid out.

transformers' own models are batch-first, with the head at get_output_embeddings(). Remote-code families differ:
ChatGLM2/3 return sequence-first hidden states and keep the head at transformer.output_layer, which
get_output_embeddings() does not report. These lookups find both without knowing the family.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

# Leaf names of output heads, for a model whose get_output_embeddings() says nothing.
HEAD_NAMES = ("lm_head", "output_layer", "embed_out")
# config.model_type of remote-code families whose hidden states are [sequence, batch, hidden] (ChatGLM2/3):
# needed only when a batch is square and the shape cannot tell.
SEQUENCE_FIRST = ("chatglm",)


def is_transformers_native(model: nn.Module) -> bool:
    """A class transformers ships (batch-first, standard cache and kwargs), not one loaded from a repository's code."""
    return type(model).__module__.startswith("transformers.")


def is_remote_code(model: nn.Module) -> bool:
    """A class transformers loaded from a repository's own Python code (trust_remote_code)."""
    return type(model).__module__.startswith("transformers_modules.")


def output_head(model: nn.Module) -> nn.Module | None:
    """The vocabulary projection: get_output_embeddings(), else the one projection onto the vocabulary (a known head
    name breaks a tie); None when there is no such single module."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module):
        return head
    vocabulary = vocabulary_size(model)
    found = {name: module for name, module in model.named_modules()
             if vocabulary and getattr(module, "out_features", None) == vocabulary and hasattr(module, "in_features")}
    # The lora_B inside a LoRA-wrapped head projects onto the vocabulary too: keep the outermost module.
    outer = {name: module for name, module in found.items() if not any(name.startswith(other + ".") for other in found)}
    named = [module for name, module in outer.items() if name.rpartition(".")[2] in HEAD_NAMES]
    if len(named) == 1:
        return named[0]
    return next(iter(outer.values())) if len(outer) == 1 else None


def vocabulary_size(model: nn.Module) -> int | None:
    """Rows of the input embeddings, else the config's (padded) vocabulary size."""
    try:
        embeddings = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # Baichuan-13B's remote code raises here
        embeddings = None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.num_embeddings
    config = getattr(model, "config", None)
    return getattr(config, "padded_vocab_size", None) or getattr(config, "vocab_size", None)


def decoder_stack(model: nn.Module) -> nn.Module | None:
    """The model without its head (model.model, model.transformer, ...), as base_model_prefix names it."""
    backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


def call(module: nn.Module, **inputs):
    """module(**inputs) without the keywords its forward does not take (old remote code has no **kwargs)."""
    parameters = inspect.signature(module.forward).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        inputs = {key: value for key, value in inputs.items() if key in parameters}
    return module(**inputs)


def batch_first(model: nn.Module, states: torch.Tensor, input_ids: torch.Tensor, *, logits: bool = False
                ) -> torch.Tensor | None:
    """[batch, sequence, ...] from a model's hidden states (or its logits); None when the layout cannot be told.

    The shape tells unless the batch is square. Then transformers' own models and every model's logits (the
    convention each causal LM's forward keeps, ChatGLM's too) are batch-first, SEQUENCE_FIRST hidden states are
    not, and anything else is unknown.
    """
    batch, length = input_ids.shape[:2]
    if states.dim() != 3:
        return None
    if is_transformers_native(model):
        return states
    if batch == length:
        if logits:
            return states
        sequence_first = getattr(getattr(model, "config", None), "model_type", None) in SEQUENCE_FIRST
        return states.transpose(0, 1) if sequence_first else None
    if tuple(states.shape[:2]) == (length, batch):
        return states.transpose(0, 1)
    return states if tuple(states.shape[:2]) == (batch, length) else None
