"""What the training loop optimises, as one value chosen in setup like the backend: SFT or a preference loss.

The loop calls only the Objective's functions: build the examples, draw rows and collate them, count what a
window holds (with the loss's normaliser under `unit`), the loss of a micro-batch, the logged means of its
metrics, and evaluation. SFT normalises by the trainable tokens of the whole window on every rank, so 4 x 1
and 1 x 4 accumulation give one gradient. Preference losses normalise by the pairs of the window (KTO: its
labelled examples) on every rank: each pair weighs the same whatever its length, as in the papers, where
the loss is the mean over pairs.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from functools import partial
from typing import Callable

import torch

from . import distributed, evaluate, memory
from .config import RLHFConfig
from .attention import uses_varlen
from .data.pipeline import collate, collate_flat, collate_packed, collate_preference, pack, trainable_tokens
from .data.prepare import tokenize_preference_data
from .data.vision import collate_images
from .errors import TrainingError
from .lora import adapters_disabled
from .loss import SFT_LOSS, sequence_log_probs, without_metrics
from .preference import PreferenceSettings, preference_losses, summarise
from .window import window_counts

SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


@dataclass(frozen=True)
class Objective:
    """How rows become examples and batches, what each micro-batch minimises, and what evaluation reports."""

    unit: str  # the window-count key that normalises the loss
    rows: Callable  # (config, examples, say, processor) -> (rows batches are drawn from, collate(rows, pad_id), lengths)
    sequences: Callable  # row -> the sequences it puts in a micro-batch (a preference pair: two), for memory planning
    counts: Callable  # (shards, collated shards, world) -> what a window holds on all ranks, the normaliser under `unit`
    loss: Callable  # (model, batch) -> (summed loss, normaliser, metric totals {name: (sum, count)})
    summarise: Callable  # a window's metric totals -> the logged means
    evaluate: Callable  # (model, tokenizer, config, examples, *, device, autocast, world, lockstep, processor) -> record
    score: Callable = lambda examples, tokenizer, say=print: examples  # examples with what the loss needs precomputed
    held_bytes: int = 0  # weights kept beside the model (a frozen reference), for memory planning


def tokenizer_for(config):
    """How the run's rows become examples (before any weights load): prepare_data's tokenize, None for SFT."""
    return tokenize_preference_data if isinstance(config, RLHFConfig) else None


def build_objective(config, model, *, device, autocast, world: distributed.World, loss_fn=None) -> Objective:
    """The preference objective for an RLHFConfig, SFT otherwise; loss_fn(model, batch) -> (summed loss,
    normaliser) replaces the objective's loss."""
    if isinstance(config, RLHFConfig):
        objective = preference_objective(config, model, device=device, autocast=autocast, world=world)
    else:
        objective = sft_objective(varlen=uses_varlen(model))
    return replace(objective, loss=partial(without_metrics, loss_fn)) if loss_fn else objective


# --- supervised fine-tuning ---------------------------------------------------------------------------------------


def sft_objective(varlen: bool = False) -> Objective:
    """varlen: the model runs sftkit's varlen attention, so --padding_free batches keep attention per example."""
    return Objective(unit="trainable_tokens", rows=partial(training_rows, varlen=varlen), sequences=lambda row: [row],
                     counts=window_counts,
                     loss=SFT_LOSS, summarise=lambda totals: {}, evaluate=validation_metrics)


def validation_metrics(*args, **kwargs) -> dict:
    return evaluate.validation_metrics(*args, **kwargs)  # looked up at call time, so it can be replaced


def training_rows(config, examples: list[dict], say=print, processor=None, varlen: bool = False):
    """The rows batches are drawn from, how to collate them and, with --group_by_length, their lengths: the
    examples (a vision-language model's with their pixels made per batch; text ones, with --padding_free and
    varlen attention, collated into one row per micro-batch), or with --packing rows that hold several examples
    each."""
    if processor is not None and config.packing:
        raise TrainingError("--packing is refused for vision-language models: packed rows carry 1-D positions that "
                            "restart per example, but the Qwen2-VL family gives image tokens 3-D (time, height, width) "
                            "rotary positions, which the model computes per sequence, so packed images would be seen at "
                            "other positions than in inference. Use --group_by_length true to cut padding instead.")
    if not config.packing:
        return examples, example_collate(config, say, processor, varlen), row_lengths(config, examples, lambda row: [row])
    rows = pack(examples, config.max_length or 2048)
    say(f"[sftkit] packed {len(examples)} examples into {len(rows)} rows of at most {config.max_length or 2048} tokens")
    return rows, collate_packed, row_lengths(config, rows, lambda row: [row])


def example_collate(config, say=print, processor=None, varlen: bool = False):
    """How a micro-batch of examples becomes tensors: padding-free when asked and the attention keeps it exact
    and cheap (varlen: per example; transformers' own SDPA would build a dense mask over the whole row)."""
    if processor is not None:
        return partial(collate_images, processor=processor)
    if config.padding_free and varlen:
        say("[sftkit] padding-free batches: each micro-batch's examples in one row, attention per example "
            "(--padding_free false pads rows to the longest)")
        return collate_flat
    if config.padding_free:
        say("[sftkit] padded batches: padding-free needs varlen attention, which this model's attention is not")
    return collate


def row_lengths(config, rows: list[dict], sequences) -> list[int] | None:
    """Each row's longest sequence, which --group_by_length batches by; None without it."""
    if not config.group_by_length:
        return None
    return [max(len(sequence["input_ids"]) for sequence in sequences(row)) for row in rows]


# --- preference training ------------------------------------------------------------------------------------------


def preference_objective(config: RLHFConfig, model, *, device, autocast, world: distributed.World) -> Objective:
    """DPO, ORPO, SimPO, CPO or KTO. The reference is the model with its LoRA adapters off, a frozen copy made
    now (full fine-tuning), or scores computed once before training (--precompute_ref_log_probs)."""
    settings = config.preference_settings()
    frozen = None
    if settings.needs_reference and config.sft_type == "full" and not config.precompute_ref_log_probs:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
    loss = partial(preference_loss, settings=settings, frozen=frozen)
    precompute = partial(reference_log_probs, model) if config.precompute_ref_log_probs else None
    unit, scored = ("pairs", 2) if settings.paired else ("examples", 1)
    return Objective(
        unit=unit,
        score=partial(scored_examples, config=config, reference=precompute, device=device, autocast=autocast,
                      world=world) if precompute else Objective.score,
        rows=lambda config, examples, say=print, processor=None: (examples, collate_preference,
                                                                  row_lengths(config, examples, pair_sequences)),
        sequences=pair_sequences,
        counts=partial(preference_counts, unit=unit, scored=scored),
        loss=loss, summarise=summarise, evaluate=partial(preference_evaluation, loss=loss),
        held_bytes=memory.weight_bytes(frozen) if frozen is not None else 0)


def pair_sequences(example: dict) -> list[dict]:
    return example["sequences"]


def preference_loss(model, batch: dict, *, settings: PreferenceSettings, frozen=None):
    """(summed per-pair loss, pairs, metric totals) of a batch from collate_preference."""
    if settings.paired:
        log_probs, tokens = sequence_log_probs(model, batch)
    else:  # KTO's mismatched sequences only estimate the KL baseline, which is not differentiated
        half = batch["input_ids"].shape[0] // 2
        log_probs, tokens = sequence_log_probs(model, sequence_rows(batch, 0, half))
        with torch.no_grad():
            mismatched, mismatched_tokens = sequence_log_probs(model, sequence_rows(batch, half, None))
        log_probs, tokens = torch.cat([log_probs, mismatched]), torch.cat([tokens, mismatched_tokens])
    reference = None
    if settings.needs_reference:
        reference = batch["ref_log_probs"] if "ref_log_probs" in batch else reference_log_probs(model, batch, frozen)
    losses, totals = preference_losses(settings, log_probs, tokens, reference, batch.get("desirable"))
    return losses.sum(), losses.shape[0], totals


@torch.no_grad()
def reference_log_probs(model, batch: dict, frozen=None) -> torch.Tensor:
    """Each sequence's log-probability under the reference: the frozen copy, else the model with its LoRA
    adapters switched off (the base it started from), in eval mode."""
    if frozen is not None:
        return sequence_log_probs(frozen, batch)[0]
    with adapters_disabled(model), evaluating(model):
        return sequence_log_probs(model, batch)[0]


@contextlib.contextmanager
def evaluating(model):
    """model.eval() inside, its previous mode after."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def sequence_rows(batch: dict, start: int, end: int | None) -> dict:
    return {key: value[start:end] for key, value in batch.items() if key in SEQUENCE_KEYS}


def scored_examples(pair: tuple[list[dict], list[dict]], tokenizer, say=print, *, config, reference, device, autocast,
                    world: distributed.World) -> tuple[list[dict], list[dict]]:
    """(training, validation) examples each carrying its sequences' reference log-probs, scored once now."""
    train_examples, val_examples = pair
    say(f"[sftkit] scoring {len(train_examples) + len(val_examples)} examples with the reference model once")
    score = partial(with_reference_log_probs, reference=reference, pad_id=tokenizer.pad_token_id,
                    batch_size=config.eval_batch_size, device=device, autocast=autocast, world=world)
    return score(train_examples), score(val_examples)


def with_reference_log_probs(examples: list[dict], *, reference, pad_id: int, batch_size: int, device, autocast,
                             world: distributed.World) -> list[dict]:
    """The examples with "ref_log_probs" (one per sequence); each rank scores its share, all ranks get all."""
    mine = list(range(world.rank, len(examples), world.size))
    scores = []
    for start in range(0, len(mine), batch_size):
        part = [examples[index] for index in mine[start:start + batch_size]]
        batch = {key: value.to(device) for key, value in collate_preference(part, pad_id).items()}
        with autocast:
            values = reference(batch).tolist()
        scores += [[values[i], values[len(part) + i]] for i in range(len(part))]
    scored = dict(pair for shard in distributed.gather(list(zip(mine, scores)), world) for pair in shard)
    return [{**example, "ref_log_probs": scored[index]} for index, example in enumerate(examples)]


def preference_counts(shards, collated: list[dict], world: distributed.World, *, unit: str, scored: int) -> dict:
    """A window's pairs (KTO: examples), the trainable tokens of the sequences that get gradients, tokens and
    batch positions as collated, on all ranks."""
    counts = [0, 0, 0, 0]
    for (shard, weight), batch in zip(shards, collated):
        if not weight:
            continue
        counts[0] += len(shard)
        counts[1] += sum(trainable_tokens(example["sequences"][i]) for example in shard for i in range(scored))
        counts[2] += sum(len(sequence["input_ids"]) for example in shard for sequence in example["sequences"])
        counts[3] += batch["input_ids"].numel()
    totals = distributed.sum_floats(counts, world)
    return dict(zip((unit, "trainable_tokens", "tokens", "batch_positions"), map(int, totals)))


def preference_evaluation(model, tokenizer, config, examples: list[dict], *, loss, device, autocast,
                          world: distributed.World = distributed.World(), lockstep: bool = False, processor=None) -> dict:
    """eval_loss and eval_<metric> means over the validation pairs; with generation, the metrics of answers
    generated for their prompts against the chosen answers."""
    total, normaliser, totals = evaluate.loss_totals(loss, collate_preference, model, examples, config.eval_batch_size,
                                                     tokenizer.pad_token_id, device, autocast, world, lockstep)
    metrics = {"eval_loss": round(total / max(normaliser, 1), 6),
               **{f"eval_{name}": value for name, value in summarise(totals).items()}}
    if config.generates:
        metrics.update(evaluate.generation_metrics(model, tokenizer, config, examples, autocast=autocast, world=world,
                                                   lockstep=lockstep))
    return metrics
