"""One accumulation window: its micro-batches drawn and collated, counted on the host, run forward and backward,
and read back from the device once.

The loss of a window is the sum of per-token losses divided by the trainable tokens of the whole window on
every rank, so 4 x 1 and 1 x 4 give one gradient. Every count the loop needs is taken from the collated rows
on the host; the only read from the device is the window's loss and gradient norm, together, before the
optimizer step (which is then skipped when the loss is not finite).
"""
from __future__ import annotations

import queue
import threading

import torch

from . import distributed
from .data.pipeline import trainable_tokens
from .data.sampler import batch_positions, rank_shard


def window_source(examples: list[dict], collate_fn, pad_id: int, config, state, world: distributed.World,
                  prefetch: bool = False):
    """The windows from the run's data position on: calling the result gives the next one, as
    ([(epoch, batch index, indices)], [(shard, weight)], [collated shard]); with prefetch, collated ahead in a
    thread. Close it at the end."""
    lengths = [len(example["input_ids"]) for example in examples] if config.group_by_length else None
    batches = batch_positions(len(examples), config.batch_size * world.size, config.seed, state.epoch, state.batches_in_epoch,
                              lengths)

    def next_window():
        window = [next(batches) for _ in range(config.gradient_accumulation_steps)]
        shards = [rank_shard([examples[i] for i in indices], world.rank, config.batch_size) for _, _, indices in window]
        return window, shards, [collate_fn(shard, pad_id) for shard, _ in shards]

    return Prefetcher(next_window) if prefetch else Inline(next_window)


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


def accumulate(backend, shards, collated: list[dict], device, autocast, window_tokens: int, world: distributed.World,
               non_blocking: bool = False) -> torch.Tensor:
    """Forward and backward every micro-batch of one window; gradients sum to those of the window's token mean.
    Returns the window's summed loss, on the device (not read here).

    DDP averages gradients over ranks, hence the world-size factor; only the last micro-batch all-reduces.
    """
    window_loss = torch.zeros((), dtype=torch.float32, device=device)
    for index, ((_, weight), batch) in enumerate(zip(shards, collated)):
        batch = {key: value.to(device, non_blocking=non_blocking) for key, value in batch.items()}
        with backend.no_sync(index == len(shards) - 1), autocast:
            summed, _ = backend.forward(batch)
            summed = summed * weight
        backend.backward(summed * world.size / max(window_tokens, 1))
        window_loss += summed.detach().float().to(device)
    return window_loss


def settle(window_loss: torch.Tensor, grad_norm, window_tokens: int, world: distributed.World) -> tuple[float, float]:
    """(the window's token-mean loss over every rank, the gradient norm): the window's one read from the device."""
    values = torch.stack([window_loss.float(), torch.as_tensor(grad_norm, dtype=torch.float32, device=window_loss.device)])
    loss, norm = values.tolist()
    return distributed.sum_floats([loss], world)[0] / max(window_tokens, 1), norm


def window_counts(shards, world: distributed.World) -> dict:
    """What one window holds on all ranks, counted on the host: trainable tokens (the loss's denominator),
    tokens, padded batch positions, rows and examples (packed rows hold several)."""
    counts = [0, 0, 0, 0, 0]
    for shard, weight in shards:
        if not weight:
            continue
        width = max(len(e["input_ids"]) for e in shard)
        counts[0] += sum(trainable_tokens(e) for e in shard)
        counts[1] += sum(len(e["input_ids"]) for e in shard)
        counts[2] += width * len(shard)
        counts[3] += len(shard)
        counts[4] += sum(e["position_ids"].count(0) if "position_ids" in e else 1 for e in shard)
    totals = distributed.sum_floats(counts, world)
    return dict(zip(("trainable_tokens", "tokens", "batch_positions", "rows", "examples"), map(int, totals)))
