"""Token-by-token generation with the KV cache, written out instead of calling `model.generate`.

One decoding loop serves streaming (one row) and batches (left-padded rows); text is released only once it
is stable: complete UTF-8 characters that cannot be the start of a stop string.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from . import vlm
from .architecture import call, is_remote_code
from .data.templates import pattern_text

REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick each next token; do_sample=False is greedy and ignores the sampling knobs."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        problems = generation_problems(self)
        if problems:
            raise ValueError("invalid GenerationConfig: " + "; ".join(problems))


def generation_problems(options) -> list[str]:
    """Every bad generation value of a GenerationConfig or any command config carrying the same fields."""
    problems = []
    if options.max_new_tokens is None or options.max_new_tokens <= 0:
        problems.append(f"max_new_tokens must be > 0, got {options.max_new_tokens}")
    if options.temperature <= 0:
        problems.append(f"temperature must be > 0 (use do_sample false for greedy), got {options.temperature}")
    if options.top_k is not None and options.top_k < 0:
        problems.append(f"top_k must be >= 0 (0 or none: off), got {options.top_k}")
    if not 0 < options.top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {options.top_p}")
    if options.repetition_penalty <= 0:
        problems.append(f"repetition_penalty must be > 0, got {options.repetition_penalty}")
    return problems


def generation_config(options) -> GenerationConfig:
    """A GenerationConfig from any object with the same field names (ChatConfig, InferConfig, EvalConfig)."""
    return GenerationConfig(**{item.name: getattr(options, item.name) for item in fields(GenerationConfig)})


def stop_criteria(tokenizer, template) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(stop strings, stop token ids) for a template: its suffix and stop words end a reply.

    One that is a single token stops on that id (exact, and cheaper); longer ones are matched as text, and
    also stop on their id where the vocabulary has them as one token a tokenizer does not parse out of text
    (ChatGLM's <|user|>). The tokenizer's EOS always stops, so it is not listed.
    """
    eos = tokenizer.eos_token or ""
    suffix = pattern_text(template.suffix, tokenizer)
    words = {suffix.replace("{{EOS}}", eos).strip(), *template.stop_words} - {"", eos}
    strings, ids = [], []
    for word in sorted(words):
        encoded = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(encoded) == 1:
            ids.append(encoded[0])
            continue
        strings.append(word)
        vocabulary_id = tokenizer.convert_tokens_to_ids(word)
        if isinstance(vocabulary_id, int) and vocabulary_id != tokenizer.unk_token_id:
            ids.append(vocabulary_id)
    return tuple(strings), tuple(ids)


def generate_stream(model, tokenizer, input_ids, config: GenerationConfig, stop_strings=(), stop_token_ids=(),
                    *, stop_after=(), constraint=None, images: dict | None = None) -> Iterator[str]:
    """Yield the reply to one prompt piece by piece as it becomes stable.

    Stops at EOS or a stop token (not shown), at a stop string (not shown), or after a `stop_after` string
    (shown: e.g. the marker that closes a tool call, which belongs to the reply). `constraint` (one row of
    constrained.CallConstraint) masks the logits of tool calls; `images` are the prompt's image inputs
    (sftkit.prompts.prompt_inputs).
    """
    stops = stop_token_set(model, tokenizer, stop_token_ids)
    reply = ReplyText(tokenizer, stop_strings, stop_after)
    padded = left_pad([list(input_ids)], pad_token_id(tokenizer), model.device)
    for tokens in _token_steps(model, *padded, config, constraint, image_inputs([images], padded[0].shape[1], model.device)):
        token = int(tokens[0])
        if token in stops:
            break
        piece = reply.push(token)
        if piece:
            yield piece
        if reply.stopped:
            return
    rest = reply.finish()
    if rest:
        yield rest


def generate_batch(model, tokenizer, batch_input_ids, config: GenerationConfig, stop_strings=(), stop_token_ids=(),
                   *, stop_after=(), all_done=None, constraint=None, on_tokens=None,
                   images: list[dict | None] | None = None) -> list[str]:
    """The replies to several prompts at once (left-padded); each row stops on its own, as generate_stream would.

    all_done(finished here) -> finished everywhere: ranks that must run the same forwards (ZeRO-3) go on
    until every rank has finished. `constraint` (constrained.CallConstraint, one state per row) masks the
    logits of tool calls; `images` holds each prompt's image inputs (or None). on_tokens(n), if given, hears how many
    tokens each step generated.
    """
    if not batch_input_ids:
        return []
    stops = stop_token_set(model, tokenizer, stop_token_ids)
    replies = [ReplyText(tokenizer, stop_strings, stop_after) for _ in batch_input_ids]
    padded = left_pad([list(ids) for ids in batch_input_ids], pad_token_id(tokenizer), model.device)
    for tokens in _token_steps(model, *padded, config, constraint, image_inputs(images or [], padded[0].shape[1], model.device)):
        if on_tokens is not None:
            on_tokens(sum(not reply.done for reply in replies))
        for row, (reply, token) in enumerate(zip(replies, tokens.tolist())):
            if reply.done:
                continue
            if token in stops:
                reply.finish()
            else:
                reply.push(token)
            if reply.done and constraint is not None:
                constraint.drop(row)
        if (all_done or bool)(all(reply.done for reply in replies)):
            break
    for reply in replies:
        reply.finish()  # out of tokens: release what was held back
    return [reply.text for reply in replies]


def visible_end(text: str, stop_strings=(), stop_after=()) -> tuple[int, bool]:
    """How much of `text` may be shown, and whether a stop string has ended it.

    Without a hit, a tail that could still grow into a stop string is held back, so a stop string is
    never half shown.
    """
    hits = [(text.find(word), word) for word in (*stop_strings, *stop_after) if word and word in text]
    if hits:
        position, word = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
        return (position + len(word) if word in stop_after else position), True
    held = max((size for word in (*stop_strings, *stop_after) for size in range(1, len(word))
                if text.endswith(word[:size])), default=0)
    return len(text) - held, False


class ReplyText:
    """One reply's text as its tokens arrive: what may be shown so far, and whether a stop string ended it.

    The one place where stop strings are applied, for every generation loop (stream, batch, the server's engine).
    """

    def __init__(self, tokenizer, stop_strings=(), stop_after=()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_strings, self.stop_after = tuple(stop_strings), tuple(stop_after)
        self.text, self.shown, self.stopped, self.done = "", 0, False, False

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the newly visible text (a stop string cuts it and ends the reply)."""
        self.text += self.decoder.push(token_id)
        end, self.stopped = visible_end(self.text, self.stop_strings, self.stop_after)
        if self.stopped:
            self.text, self.done = self.text[:end], True
        piece, self.shown = self.text[self.shown:end], max(self.shown, end)
        return piece

    def finish(self) -> str:
        """End the reply (EOS, a stop token or out of tokens): whatever was held back is released.

        A held-back partial stop string is plain text after all, and an unfinished UTF-8 character decodes as
        tokenizer.decode would. After a stop string there is nothing more.
        """
        if not self.done:
            self.text += self.decoder.flush()
            self.done = True
        piece, self.shown = self.text[self.shown:], len(self.text)
        return piece


class IncrementalDecoder:
    """Decode a growing list of token ids into text pieces, releasing only whole characters.

    Byte-level BPE splits a character (most CJK ones) across tokens, and SentencePiece drops a leading space
    when decoding from the middle: so each piece is the difference between two decodes of the same window.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix_offset, self.read_offset = tokenizer, [], 0, 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character shows as the replacement character)."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def stop_token_set(model, tokenizer, stop_token_ids=()) -> set[int]:
    """The caller's stop tokens plus every EOS the tokenizer or the model's generation config names (Llama 3 has several)."""
    ids = set(stop_token_ids)
    for eos in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids |= {eos} if isinstance(eos, int) else set(eos or ())
    return ids


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad or eos token to pad a batch with")
    return pad


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded so every row's next token lands in the last column."""
    if any(not row for row in rows):
        raise ValueError("cannot generate from an empty prompt")
    longest = max(len(row) for row in rows)
    ids = [[pad_id] * (longest - len(row)) + row for row in rows]
    mask = [[0] * (longest - len(row)) + [1] * len(row) for row in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


@contextlib.contextmanager
def evaluating(model):
    """Dropout off while generating, and the caller's mode restored after: training generates mid-run."""
    training = getattr(model, "training", False)
    if training:
        model.eval()
    try:
        yield
    finally:
        if training:
            model.train()


def image_inputs(images: list[dict | None], width: int, device) -> dict | None:
    """The image inputs of left-padded prompts as one batch: every image's patches and grid in row order, and
    mm_token_type_ids padded on the left like the ids. None when no prompt has images."""
    present = [one for one in images if one is not None]
    if not present:
        return None
    types = [list(one["mm_token_type_ids"]) if one is not None else [] for one in images]
    return {"pixel_values": torch.from_numpy(np.concatenate([one["pixel_values"] for one in present])).to(device),
            "image_grid_thw": torch.from_numpy(np.concatenate([one["image_grid_thw"] for one in present])).to(device),
            "mm_token_type_ids": torch.tensor([[0] * (width - len(row)) + row for row in types], device=device)}


def prompt_positions(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     images: dict | None = None) -> torch.Tensor:
    """The positions of left-padded prompts: counting real tokens only, or with images the model's own (3-D for the
    Qwen2-VL family)."""
    model_positions = None if images is None else vlm.rope_positions(model, input_ids, attention_mask, images)
    return (attention_mask.cumsum(-1) - 1).clamp(min=0) if model_positions is None else model_positions


@torch.no_grad()
def _token_steps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
                 constraint=None, images: dict | None = None, start: tuple | None = None):
    """Yield the next token of every row, max_new_tokens times; the caller stops early by not asking for more.

    Positions count real tokens only, so a left-padded row sees the same positions as when it runs alone; with
    images, the first forward takes them and the positions are the model's own (3-D for the Qwen2-VL family).
    A `constraint` hears the model first (to score calls with), masks each row's logits before the pick (repetition
    penalty and sampling then see only allowed tokens) and reads the picked tokens after it, with a way to `fork`
    a row. `start` = (cache, positions) goes on from a fork: the cache holds what came before input_ids.
    """
    from transformers import DynamicCache

    # Remote code (ChatGLM, Qwen v1) keeps its own cache format: it makes one when given none, and gives it back.
    # transformers' own models fill a DynamicCache in place.
    remote = is_remote_code(model)
    cache = None if remote else DynamicCache(config=model.config)
    cache_name = cache_argument(model)
    if start is not None:
        cache, positions = start
    else:
        positions = prompt_positions(model, input_ids, attention_mask, images)
    seen = None  # [batch, vocab] tokens already in each row, for the repetition penalty
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    step_ids = input_ids
    if constraint is not None:
        constraint.begin(model)
    with evaluating(model):
        for step in range(config.max_new_tokens):
            if step:
                step_ids = tokens[:, None]
                positions = positions[..., -1:] + 1
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(tokens), 1))], dim=-1)
                if seen is not None:
                    seen[torch.arange(len(tokens), device=tokens.device), tokens] = True
            output = call(model, input_ids=step_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{cache_name: cache}, **(images if images and not step else {}))
            if remote:
                cache = output.past_key_values
            logits = output.logits[:, -1, :].float()
            if constraint is not None:
                logits = constraint.restrict(logits)
            if config.repetition_penalty != 1.0 and seen is None:
                seen = _seen_tokens(input_ids, attention_mask, logits.shape[-1])
            tokens = next_tokens(logits, config, seen, generator)
            if constraint is not None:
                fork = None if remote else functools.partial(fork_rows, model, cache, attention_mask, positions, tokens)
                constraint.advance(tokens.tolist(), fork)
            yield tokens


def fork_rows(model, cache, attention_mask: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
          rows: list[int]) -> tuple:
    """These rows (one repeated as often as it is listed), each with its just-picked token, as a batch that
    _token_steps can go on from (input ids, attention mask, start): their KV cache is copied, not recomputed.
    Positions are [batch, length], or [3, batch, length] for a prompt with images in the Qwen2-VL family."""
    from transformers import DynamicCache

    index = torch.tensor(rows, device=attention_mask.device)
    copied = DynamicCache([(keys[index], values[index]) if keys is not None else (None, None) for keys, values, *_ in cache],
                          config=model.config)
    mask = torch.cat([attention_mask[index], attention_mask.new_ones((len(rows), 1))], dim=-1)
    return tokens[index][:, None], mask, (copied, positions.index_select(-2, index)[..., -1:] + 1)


def cache_argument(model) -> str:
    """The name the model's forward takes the KV cache under: `cache` from transformers 5.24 on (which warns on
    every call given the old name), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _seen_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, vocab] True where a row's prompt holds the token; padding does not count."""
    seen = torch.zeros((input_ids.shape[0], vocab_size), dtype=torch.bool, device=input_ids.device)
    rows, columns = attention_mask.nonzero(as_tuple=True)
    seen[rows, input_ids[rows, columns]] = True
    return seen


def next_tokens(logits: torch.Tensor, config: GenerationConfig, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from [batch, vocab] logits: repetition penalty, then temperature, top-k, top-p (HF's order)."""
    if seen is not None:
        penalised = torch.where(logits < 0, logits * config.repetition_penalty, logits / config.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not config.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the best one always stays.
        before = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1)
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(1, order, before >= config.top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
