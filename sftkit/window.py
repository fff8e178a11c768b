"""One accumulation window: its micro-batches drawn and collated, counted on the host, run forward and backward,
and read back from the device once.

The loss of a window is the sum of its micro-batch losses divided by the objective's normaliser for the whole
window on every rank (SFT: trainable tokens, so 4 x 1 and 1 x 4 give one gradient). Every count the loop needs
is taken from the collated rows on the host; the only read from the device is the window's loss, gradient norm
and metric totals, together, before the optimizer step (which is then skipped when the loss is not finite).
"""
from __future__ import annotations

import queue
import threading
from functools import partial

import torch

from . import distributed
from .data.pipeline import trainable_tokens
from .data.sampler import batch_positions, rank_shard


def window_source(examples: list[dict], collate_fn, pad_id: int, config, state, world: distributed.World,
                  prefetch: bool = False, lengths: list[int] | None = None, forward_tokens: int | None = None,
                  sequences=lambda row: [row]):
    """The windows from the run's data position on: calling the result gives the next one, as
    ([(epoch, batch index, indices)], [(shard, weight)], [collated shard]); with prefetch, collated ahead in a
    thread. `lengths` (--group_by_length) batch rows of similar length together; `forward_tokens` splits each
    micro-batch into shards of at most that many tokens (a row's: those of its sequences(row)). Close it at the end."""
    batches = batch_positions(len(examples), config.batch_size * world.size, config.seed, state.epoch, state.batches_in_epoch,
                              lengths)

    def next_window():
        window = [next(batches) for _ in range(config.gradient_accumulation_steps)]
        shards = [rank_shard([examples[i] for i in indices], world.rank, config.batch_size) for _, _, indices in window]
        if forward_tokens:
            shards = split_shards(shards, forward_tokens, lambda row: sum(len(part["input_ids"]) for part in sequences(row)))
        return window, shards, [collate_fn(shard, pad_id) for shard, _ in shards]

    return Prefetcher(next_window) if prefetch else Inline(next_window)


def split_shards(shards: list[tuple[list[dict], float]], most: int, row_tokens) -> list[tuple[list[dict], float]]:
    """Each micro-batch as consecutive pieces of whole rows holding at most `most` tokens (a longer row alone),
    with its weight. The window's gradient is unchanged: accumulate sums the pieces' losses over one normaliser."""
    pieces = []
    for shard, weight in shards:
        piece, tokens = [], 0
        for row in shard:
            length = row_tokens(row)
            if piece and tokens + length > most:
                pieces.append((piece, weight))
                piece, tokens = [], 0
            piece.append(row)
            tokens += length
        pieces.append((piece, weight))
    return pieces


class Inline:
    """A producer called in the loop's own thread (the Prefetcher's interface)."""

    def __init__(self, produce):
        self.produce = produce

    def __call__(self):
        return self.produce()

    def close(self) -> None:
        pass


class Prefetcher:
    """Runs `produce()` ahead in a daemon thread, `depth` results at most, so the next window is collated while
    the device works on this one; an error in the thread is raised where the result is taken."""

    _FAILED = object()

    def __init__(self, produce, depth: int = 2):
        self._produce, self._results, self._stopped = produce, queue.Queue(maxsize=depth), threading.Event()
        self._thread = threading.Thread(target=self._run, name="sftkit-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                result = self._produce()
            except BaseException as error:  # handed to the consumer, which raises it
                self._put((self._FAILED, error))
                return
            self._put(result)

    def _put(self, item) -> None:
        while not self._stopped.is_set():
            try:
                self._results.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __call__(self):
        item = self._results.get()
        if isinstance(item, tuple) and len(item) == 2 and item[0] is self._FAILED:
            raise item[1]
        return item

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)


def accumulate(backend, shards, collated: list[dict], device, autocast, normaliser: int, world: distributed.World,
               non_blocking: bool = False) -> tuple[torch.Tensor, dict]:
    """Forward and backward every micro-batch of one window; gradients sum to those of the window's loss divided
    by its normaliser. Returns the window's summed loss and metric totals {name: (sum, count)}, on the device (not
    read here).

    DDP averages gradients over ranks, hence the world-size factor; only the last micro-batch all-reduces.
    """
    window_loss, metrics = torch.zeros((), dtype=torch.float32, device=device), {}
    for index, ((_, weight), batch) in enumerate(zip(shards, collated)):
        batch = {key: value.to(device, non_blocking=non_blocking) for key, value in batch.items()}
        with backend.no_sync(index == len(shards) - 1), autocast:
            summed, _, parts = backend.forward(batch)
            summed = summed * weight
        backend.backward(summed * world.size / max(normaliser, 1))
        window_loss += summed.detach().float().to(device)
        for name, (value, count) in parts.items():
            total, counted = metrics.get(name, (0.0, 0.0))
            metrics[name] = (total + weight * value.detach().float() if torch.is_tensor(value) else total + weight * value,
                             counted + weight * float(count))
    return window_loss, metrics


def settle(window_loss: torch.Tensor, grad_norm, metrics: dict, normaliser: int,
           world: distributed.World) -> tuple[float, float, dict]:
    """(the window's loss over every rank divided by its normaliser, the gradient norm, the metric totals summed
    over ranks): the window's one read from the device."""
    names = sorted(metrics)  # every rank reports the same metrics, so one reduction sums them all
    as_tensor = partial(torch.as_tensor, dtype=torch.float32, device=window_loss.device)
    values = torch.stack([window_loss.float(), as_tensor(grad_norm)] + [as_tensor(metrics[name][0]) for name in names])
    loss, norm, *sums = values.tolist()
    totals = distributed.sum_floats([loss] + sums + [metrics[name][1] for name in names], world)
    return (totals[0] / max(normaliser, 1), norm,
            {name: (totals[1 + i], totals[1 + len(names) + i]) for i, name in enumerate(names)})


def window_counts(shards, collated: list[dict], world: distributed.World) -> dict:
    """What one window holds on all ranks, counted on the host: trainable tokens (the loss's denominator),
    tokens, batch positions as collated (padding included), rows and examples (packed rows hold several)."""
    counts = [0, 0, 0, 0, 0]
    for (shard, weight), batch in zip(shards, collated):
        if not weight:
            continue
        counts[0] += sum(trainable_tokens(e) for e in shard)
        counts[1] += sum(len(e["input_ids"]) for e in shard)
        counts[2] += batch["input_ids"].numel()
        counts[3] += len(shard)
        counts[4] += sum(e["position_ids"].count(0) if "position_ids" in e else 1 for e in shard)
    totals = distributed.sum_floats(counts, world)
    return dict(zip(("trainable_tokens", "tokens", "batch_positions", "rows", "examples"), map(int, totals)))
