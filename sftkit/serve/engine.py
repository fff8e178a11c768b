"""Continuous batching: requests join and leave the running batch between decoding steps.

One thread owns the model. Each step drops finished or abandoned rows, prefills the requests that
arrived (left-padded together), merges their KV cache into the running batch's, and decodes one token
for every row. Token choice (next_tokens) and stop handling (ReplyText) are generation.py's, so a
request gets the same reply alone or in a batch, and the same as `sftkit chat`.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..generation import (GenerationConfig, ReplyText, cache_argument, evaluating, fork_rows, image_inputs, left_pad,
                          next_tokens, pad_token_id, prompt_positions, stop_token_set)

log = logging.getLogger("sftkit.serve")

RECENT_STEPS = 4096
KVLayers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each [batch, heads, length, dim]


@dataclass(frozen=True)
class EngineRequest:
    """One generation: the prompt's token ids, how to pick tokens, where to stop, which adapter (None: the base),
    the constraint on its tool calls (constrained.CallConstraint for this one row, or None) and the prompt's image
    inputs (prompts.prompt_inputs; None without images)."""

    prompt_ids: tuple[int, ...]
    config: GenerationConfig
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    stop_after: tuple[str, ...] = ()
    adapter: str | None = None
    constraint: object = None
    images: dict | None = None


@dataclass(frozen=True)
class Event:
    """What a request hears: text pieces, the last one with a finish reason ("stop" or "length") or an error."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class QueueFull(RuntimeError):
    """More requests wait for a batch slot than the engine queues."""


class Sequence:
    """A request inside the engine: its reply so far and where its row stands."""

    def __init__(self, request: EngineRequest, emit: Callable[[Event], None], tokenizer, stops: set[int]):
        self.request, self.config, self._emit = request, request.config, emit
        self.reply = ReplyText(tokenizer, request.stop_strings, request.stop_after)
        self.stops = stops | set(request.stop_token_ids)
        self.generated, self.last_token, self.position = 0, 0, len(request.prompt_ids)
        self.seen: torch.Tensor | None = None  # [vocab] tokens of the prompt and reply, for the repetition penalty
        self.generator: torch.Generator | None = None
        self.cancelled = self.finished = False

    def cancel(self) -> None:
        """The client is gone: the engine drops the row at its next step (nothing happens once finished)."""
        self.cancelled = True

    def deliver(self, event: Event) -> None:
        self.finished = self.finished or event.final
        try:
            self._emit(event)
        except RuntimeError:  # the listener's event loop has closed: nobody waits for this row any more
            self.cancelled = True

    def advance(self, token: int) -> None:
        """Take the token just generated: deliver the text it completes, and finish on a stop or at max tokens."""
        self.generated += 1
        self.last_token = token
        if token in self.stops:
            text, reason = self.reply.finish(), "stop"
        else:
            text = self.reply.push(token)
            reason = "stop" if self.reply.done else None
        if reason is None and self.generated >= self.config.max_new_tokens:
            text, reason = text + self.reply.finish(), "length"
        if text or reason:
            self.deliver(Event(text=text, finish_reason=reason, completion_tokens=self.generated))


class Listener:
    """A submitted request's events, delivered into the submitter's event loop; close() frees its row early."""

    def __init__(self, submit: Callable[[EngineRequest, Callable[[Event], None]], Sequence], request: EngineRequest):
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.sequence = submit(request, lambda event: loop.call_soon_threadsafe(self._events.put_nowait, event))
        self._done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        event = await self._events.get()
        self._done = event.final
        return event

    def close(self) -> None:
        self.sequence.cancel()


class Engine:
    """The batching loop over one model; `submit`, `listen` and `stats` may be called from any thread.

    adapter_rows (multi_lora.AdapterRows) is told each row's adapter before every forward pass.
    """

    def __init__(self, model, tokenizer, *, max_num_seqs: int = 32, max_queue: int = 128, adapter_rows=None):
        self.model, self.tokenizer, self.adapter_rows = model, tokenizer, adapter_rows
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.device = model.device
        self.pad_id = pad_token_id(tokenizer)
        self.eos_ids = stop_token_set(model, tokenizer)
        self.cache_name = cache_argument(model)
        self.decode_steps = 0
        self.batch_sizes: deque[int] = deque(maxlen=RECENT_STEPS)  # rows decoded together at each recent step
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cache = None  # the running rows' DynamicCache
        self._mask: torch.Tensor | None = None  # [rows, length]: 0 where a row is left padding
        self._changed = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- any thread ---------------------------------------------------------------------------------------

    def submit(self, request: EngineRequest, emit: Callable[[Event], None]) -> Sequence:
        """Queue a request; emit receives its events on the engine's thread. QueueFull when the queue is full."""
        if not request.prompt_ids:
            raise ValueError("cannot generate from an empty prompt")
        with self._changed:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for a slot; retry later")
            sequence = Sequence(request, emit, self.tokenizer, self.eos_ids)
            self._waiting.append(sequence)
            self._changed.notify()
        return sequence

    def listen(self, request: EngineRequest) -> "Listener":
        """Submit now (QueueFull is raised here, before any reply is sent) and read the events in this event loop."""
        return Listener(self.submit, request)

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._waiting)}

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="sftkit-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop; requests still inside get an error event (the server waits for them before this)."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()
        for sequence in [*self._running, *self._waiting]:
            sequence.deliver(Event(error="the server shut down before this request finished"))
        self._running, self._waiting = [], deque()

    # --- the engine's thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not (self._stopping or self._waiting or self._running):
                    self._changed.wait()
                if self._stopping:
                    return
            self.step()

    def step(self) -> None:
        """One iteration: drop abandoned rows, prefill and merge the arrivals, decode one token for every row."""
        with self._changed:
            arrivals = []
            while self._waiting and len(self._running) + len(arrivals) < self.max_num_seqs:
                sequence = self._waiting.popleft()
                if not sequence.cancelled:
                    arrivals.append(sequence)
        self._keep([sequence for sequence in self._running if not sequence.cancelled])
        try:
            with evaluating(self.model), torch.no_grad():
                if arrivals:
                    self._prefill(arrivals)
                if self._running:
                    self._decode()
        except Exception as error:  # a failed forward pass must not leave clients waiting forever
            log.exception("generation failed")
            for sequence in [*self._running, *arrivals]:
                if not sequence.finished:
                    sequence.deliver(Event(error=f"generation failed: {type(error).__name__}: {error}"))
            self._keep([])

    def _forward(self, input_ids, attention_mask, position_ids, cache, rows: list[Sequence], images=None) -> torch.Tensor:
        if self.adapter_rows is not None:
            self.adapter_rows.assign([row.request.adapter for row in rows], self.device)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, logits_to_keep=1, **{self.cache_name: cache}, **(images or {}))
        return output.logits[:, -1, :].float()

    def _prefill(self, arrivals: list[Sequence]) -> None:
        """Run the new prompts together (left-padded, positions counting real tokens) and join the batch.

        With images the prompts' positions are the model's own (3-D for the Qwen2-VL family); every token after
        the prompt then takes the same next position in all three, so decoding needs only each row's next one.
        """
        from transformers import DynamicCache

        prompts = [list(sequence.request.prompt_ids) for sequence in arrivals]
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        images = image_inputs([sequence.request.images for sequence in arrivals], ids.shape[1], self.device)
        positions = prompt_positions(self.model, ids, mask, images)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, arrivals, images)
        for row, (sequence, prompt) in enumerate(zip(arrivals, prompts)):
            sequence.position = int(positions[..., row, :].max()) + 1
            _prepare_sampling(sequence, prompt, logits.shape[-1], self.device)
            if sequence.request.constraint is not None:
                sequence.request.constraint.begin(self.model)
        self._take(logits, arrivals, cache, mask)
        if self._running:
            kv, mask = _merged(_kv(self._cache), self._mask, _kv(cache), mask)
            cache = DynamicCache(ddp_cache_data=kv)
        self._running, self._cache, self._mask = self._running + arrivals, cache, mask
        self._keep([sequence for sequence in self._running if not sequence.finished])

    def _decode(self) -> None:
        rows = self._running
        self.decode_steps += 1
        self.batch_sizes.append(len(rows))
        ids = torch.tensor([[row.last_token] for row in rows], device=self.device)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=-1)
        logits = self._forward(ids, self._mask, positions, self._cache, rows)
        for row in rows:
            row.position += 1
        self._take(logits, rows, self._cache, self._mask)
        self._keep([row for row in rows if not row.finished])

    def _take(self, logits: torch.Tensor, rows: list[Sequence], cache, mask: torch.Tensor) -> None:
        """Pick each row's next token with its own sampling options (inside its tool calls, among the tokens its
        constraint allows) and hand it to the row. `cache` and `mask` hold what the rows have read so far."""
        constrained = [index for index, row in enumerate(rows) if row.request.constraint is not None]
        for index in constrained:
            rows[index].request.constraint.restrict(logits[index:index + 1])
        tokens = _sample(logits, rows)
        if constrained:
            positions = torch.tensor([[row.position - 1] for row in rows], device=self.device)
            picked = torch.tensor(tokens, device=self.device)
            for index in constrained:
                fork = functools.partial(self._fork_row, rows[index].request.adapter, cache, mask, positions, picked, index)
                rows[index].request.constraint.advance([tokens[index]], lambda copies, fork=fork: fork(len(copies)))
        for row, token in zip(rows, tokens):
            if row.seen is not None:
                row.seen[token] = True
            row.advance(token)

    def _fork_row(self, adapter: str | None, cache, mask, positions, tokens, index: int, width: int) -> tuple:
        """Row `index` copied `width` times to score a call with (generation.fork_rows), its adapter set for those rows."""
        if self.adapter_rows is not None:
            self.adapter_rows.assign([adapter] * width, self.device)
        return fork_rows(self.model, cache, mask, positions, tokens, [index] * width)

    def _keep(self, rows: list[Sequence]) -> None:
        """Shrink the batch to `rows` (a subset, in order), cutting the padding columns no row needs any more."""
        if len(rows) == len(self._running):
            return
        from transformers import DynamicCache

        if not rows:
            self._running, self._cache, self._mask = [], None, None
            return
        index = torch.tensor([self._running.index(row) for row in rows], device=self.device)
        mask = self._mask.index_select(0, index)
        start = int(mask.any(dim=0).nonzero()[0])
        self._mask = mask[:, start:]
        self._cache = DynamicCache(ddp_cache_data=[
            (keys.index_select(0, index)[:, :, start:], values.index_select(0, index)[:, :, start:])
            for keys, values in _kv(self._cache)])
        self._running = rows


def _prepare_sampling(sequence: Sequence, prompt: list[int], vocab_size: int, device) -> None:
    config = sequence.config
    if config.repetition_penalty != 1.0:
        sequence.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        sequence.seen[torch.tensor(prompt, device=device)] = True
    if config.do_sample and config.seed is not None:
        sequence.generator = torch.Generator(device=device).manual_seed(config.seed)


def _sample(logits: torch.Tensor, rows: list[Sequence]) -> list[int]:
    """next_tokens per group of rows sharing sampling options; a seeded row draws alone from its own generator."""
    groups: dict[object, list[int]] = {}
    for index, row in enumerate(rows):
        config = row.config
        key = index if row.generator is not None else (config.do_sample, config.repetition_penalty) + (
            (config.temperature, config.top_k, config.top_p) if config.do_sample else ())
        groups.setdefault(key, []).append(index)
    tokens = [0] * len(rows)
    for indices in groups.values():
        first = rows[indices[0]]
        index = torch.tensor(indices, device=logits.device)
        seen = torch.stack([rows[i].seen for i in indices]) if first.seen is not None else None
        for position, token in zip(indices, next_tokens(logits[index], first.config, seen, first.generator).tolist()):
            tokens[position] = token
    return tokens


def _kv(cache) -> KVLayers:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _merged(kv: KVLayers, mask: torch.Tensor, new_kv: KVLayers, new_mask: torch.Tensor) -> tuple[KVLayers, torch.Tensor]:
    """Both batches' caches and masks as one: the shorter side is left-padded, so every row ends in the last column."""
    length = max(mask.shape[1], new_mask.shape[1])

    def widen(tensor: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = length - tensor.shape[-dim_from_end]
        return F.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else tensor

    merged_kv = [(torch.cat([widen(k, 2), widen(nk, 2)]), torch.cat([widen(v, 2), widen(nv, 2)]))
                 for (k, v), (nk, nv) in zip(kv, new_kv)]
    return merged_kv, torch.cat([widen(mask, 1), widen(new_mask, 1)])
