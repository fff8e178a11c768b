"""The training loss as a sum over trainable tokens, computed without materialising full-vocabulary logits.

Logits exist only at positions whose next token trains, a chunk at a time, in float32: the memory of
sequence x vocabulary logits is what dominates small-model fine-tuning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import decoder_inputs
from .data.pipeline import IGNORE_INDEX


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: targets are labels shifted left, the last position ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def loss_sum(model, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of per-token cross-entropy (times loss_weights when given), number of trainable tokens)."""
    targets = shifted_targets(batch["labels"])
    selected = targets != IGNORE_INDEX
    hidden = backbone_hidden(model, batch)
    # With model parallel the hidden states end on the last device, the labels start on the first.
    selected, targets = selected.to(hidden.device), targets.to(hidden.device)
    hidden, targets = hidden[selected], targets[selected]
    weights = shifted_weights(batch).to(hidden.device)[selected] if "loss_weights" in batch else None
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = _final_logits(model, head(hidden[start:start + chunk_size])).float()
        losses = F.cross_entropy(logits, targets[start:start + chunk_size], reduction="none")
        if weights is not None:
            losses = losses * weights[start:start + chunk_size]
        total = total + losses.sum()
    return total, int(selected.sum())


def sequence_log_probs(model, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's summed log-probability of its target tokens, each row's number of target tokens), with logits
    only at target positions, a chunk at a time: what preference losses compare."""
    targets = shifted_targets(batch["labels"])
    selected = targets != IGNORE_INDEX
    hidden = backbone_hidden(model, batch)
    selected, targets = selected.to(hidden.device), targets.to(hidden.device)
    rows = torch.arange(selected.shape[0], device=hidden.device)[:, None].expand_as(selected)[selected]
    hidden, targets = hidden[selected], targets[selected]
    head = model.get_output_embeddings()
    sums = hidden.new_zeros(selected.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = _final_logits(model, head(hidden[start:start + chunk_size])).float()
        token_log_probs = -F.cross_entropy(logits, targets[start:start + chunk_size], reduction="none")
        sums = sums.index_add(0, rows[start:start + chunk_size], token_log_probs)
    return sums, selected.sum(dim=1)


def shifted_weights(batch: dict) -> torch.Tensor:
    return F.pad(batch["loss_weights"][:, 1:], (0, 1), value=0.0)


def backbone_hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden states of the decoder stack (the model without its output head)."""
    backbone = getattr(model, model.base_model_prefix)
    return backbone(**decoder_inputs(model, batch), use_cache=False).last_hidden_state


def _final_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """Apply what some heads add after the projection (Gemma's soft-capping, logit scaling)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model.config, "logit_scale", None)
    return logits * scale if scale else logits
