"""Which examples each optimizer step sees: seeded per-epoch orders that a resume can pick up mid-epoch, and
each rank's share of a global batch."""
from __future__ import annotations

import torch

from .pipeline import length_grouped_order


def batch_positions(size: int, batch_size: int, seed: int, epoch: int = 0, start: int = 0, lengths: list[int] | None = None):
    """Endless (epoch, batch index, example indices): each epoch a fresh seeded permutation (grouped by
    length when `lengths` is given). Starting at (epoch, start) reproduces exactly the batches a run
    that never stopped would see.
    """
    while True:
        if lengths is not None:
            order = length_grouped_order(lengths, batch_size, seed + epoch)
        else:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches = [order[i:i + batch_size] for i in range(0, size, batch_size)]
        for index in range(start, len(batches)):
            yield epoch, index, batches[index]
        epoch, start = epoch + 1, 0


def rank_shard(examples: list[dict], rank: int, batch_size: int) -> tuple[list[dict], float]:
    """This rank's slice of a global micro-batch, and its weight: a rank left without examples at the end
    of an epoch still runs one (weighted 0) so every rank joins the gradient all-reduce."""
    shard = examples[rank * batch_size:(rank + 1) * batch_size]
    return (shard, 1.0) if shard else (examples[:1], 0.0)
