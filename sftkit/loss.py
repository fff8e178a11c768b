"""The training loss as a sum over trainable tokens, computed without materialising full-vocabulary logits.

Logits exist only at positions whose next token trains, a chunk at a time, in float32: the memory of
sequence x vocabulary logits is what dominates small-model fine-tuning. That needs the decoder stack and
the head apart (sftkit.architecture finds them, whatever the family); a model where they cannot be found
trains on its own full logits instead, still cast to float32 a chunk at a time.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from .architecture import batch_first, call, decoder_stack, output_head
from .attention import decoder_inputs
from .data.pipeline import IGNORE_INDEX, IMAGE_KEYS
from .errors import TrainingError
from .fused import chunk_loss_and_grad, linear_cross_entropy


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1: targets are labels shifted left, the last position ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def loss_sum(model, batch: dict, chunk_size: int = 1024, fused: bool = False,
             chunk_kernel=chunk_loss_and_grad) -> tuple[torch.Tensor, int]:
    """(sum of per-token cross-entropy (times loss_weights when given), number of trainable tokens).

    fused: the head and the loss as fused.linear_cross_entropy when gradients are wanted (no logits kept for
    backward), each chunk's loss and logit gradient by chunk_kernel; heads that transform their logits
    (soft-capping, scaling), models whose head cannot be split off and plain forwards take the eager path.
    """
    hidden, head = hidden_and_head(model, batch)
    hidden, targets, weights = trainable_rows(hidden, batch)
    if fused and head is not None and torch.is_grad_enabled() and hidden.requires_grad and _plain_head(model, head):
        return linear_cross_entropy(hidden, head.weight, targets, weights, chunk_size, chunk_kernel), targets.shape[0]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        part = hidden[start:start + chunk_size]
        logits = (part if head is None else _final_logits(model, head(part))).float()
        losses = F.cross_entropy(logits, targets[start:start + chunk_size], reduction="none")
        if weights is not None:
            losses = losses * weights[start:start + chunk_size]
        total = total + losses.sum()
    return total, targets.shape[0]


def trainable_rows(hidden: torch.Tensor, batch: dict):
    """(hidden states, targets, weights or None) of the positions whose next token trains.

    With the batch's trainable_positions (counted on the host when collated) they are gathered by index; else
    a boolean mask selects them, whose size only the device knows (a wait for it).
    """
    # With model parallel the hidden states end on the last device, the labels start on the first.
    targets = shifted_targets(batch["labels"]).to(hidden.device)
    weights = shifted_weights(batch).to(hidden.device) if "loss_weights" in batch else None
    positions = batch["trainable_positions"].to(hidden.device) if "trainable_positions" in batch else None
    selected = targets != IGNORE_INDEX if positions is None else None

    def pick(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[selected] if positions is None else tensor.flatten(0, 1).index_select(0, positions)

    return pick(hidden), pick(targets), None if weights is None else pick(weights)


def trainable_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the positions whose next token trains: the host-side twin of trainable_rows' mask."""
    return (shifted_targets(labels).flatten() != IGNORE_INDEX).nonzero().flatten()


def _plain_head(model, head) -> bool:
    """A bias-free linear head with nothing applied after it (what linear_cross_entropy computes)."""
    config = model.config
    return (isinstance(head, torch.nn.Linear) and head.bias is None and not getattr(config, "final_logit_softcapping", None)
            and not getattr(config, "logit_scale", None))


def sequence_log_probs(model, batch: dict, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's summed log-probability of its target tokens, each row's number of target tokens), with logits
    only at target positions, a chunk at a time: what preference losses compare."""
    targets = shifted_targets(batch["labels"])
    selected = targets != IGNORE_INDEX
    hidden, head = hidden_and_head(model, batch)
    selected, targets = selected.to(hidden.device), targets.to(hidden.device)
    rows = torch.arange(selected.shape[0], device=hidden.device)[:, None].expand_as(selected)[selected]
    hidden, targets = hidden[selected], targets[selected]
    sums = hidden.new_zeros(selected.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        part = hidden[start:start + chunk_size]
        logits = (part if head is None else _final_logits(model, head(part))).float()
        token_log_probs = -F.cross_entropy(logits, targets[start:start + chunk_size], reduction="none")
        sums = sums.index_add(0, rows[start:start + chunk_size], token_log_probs)
    return sums, selected.sum(dim=1)


def shifted_weights(batch: dict) -> torch.Tensor:
    return F.pad(batch["loss_weights"][:, 1:], (0, 1), value=0.0)


def hidden_and_head(model, batch: dict):
    """(the decoder stack's last hidden states, the output head) of a batch, batch-first; for a model whose head
    cannot be split off, (its own logits, None)."""
    head = output_head(model)
    hidden = backbone_hidden(model, batch) if head is not None else None
    if hidden is None or hidden.shape[-1] != getattr(head, "in_features", None):
        return _model_logits(model, batch), None
    return hidden, head


def without_metrics(loss_fn, model, batch: dict):
    """A (summed loss, normaliser) loss as a training objective's loss, which also reports metric totals (none)."""
    summed, normaliser = loss_fn(model, batch)
    return summed, normaliser, {}


SFT_LOSS = partial(without_metrics, loss_sum)  # the supervised objective's loss, which the speed levers may fuse


def backbone_hidden(model, batch: dict) -> torch.Tensor | None:
    """Last hidden states of the decoder stack (the model without its output head), batch-first; None when the
    model has no separate stack or its layout cannot be told. A vision-language model's base merges the image
    features into the text embeddings from the batch's IMAGE_KEYS."""
    backbone = decoder_stack(model)
    if backbone is None:
        return None
    images = {key: batch[key] for key in IMAGE_KEYS if key in batch}
    output = call(backbone, **decoder_inputs(model, batch), **images, use_cache=False)
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    return batch_first(model, hidden, batch["input_ids"])


def _model_logits(model, batch: dict) -> torch.Tensor:
    """The model's own [batch, sequence, vocabulary] logits, for a model whose stack and head cannot be split."""
    output = call(model, **decoder_inputs(model, batch), use_cache=False)
    logits = output.logits if hasattr(output, "logits") else output[0]
    ordered = batch_first(model, logits, batch["input_ids"], logits=True)
    if ordered is None:
        raise TrainingError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for input ids of "
                            f"shape {tuple(batch['input_ids'].shape)}: sftkit cannot tell which axis is the sequence")
    return ordered


def _final_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """Apply what some heads add after the projection (Gemma's soft-capping, logit scaling)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model.config, "logit_scale", None)
    return logits * scale if scale else logits
