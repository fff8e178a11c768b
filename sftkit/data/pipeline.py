"""encode -> mask -> truncate -> collate, and build_example composing them (build_preference_example for
preference rows). Pure functions, in pipeline order."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from bisect import bisect_left, insort

import numpy as np

from .errors import DataError
from .formats import IMAGE_TAG, Message, to_messages
from .preference_formats import PreferenceRow, to_preference
from .templates import Segment, Template, TokenText, get_template, render

TRAIN_ON = ("assistant", "last", "all")
TRUNCATION_SIDES = ("right", "left")
TRAINABLE_ROLES = ("assistant", "tool_call")
IMAGE_ROLE = "image"  # the tokens an image becomes: never trained
IGNORE_INDEX = -100
NOTHING_TO_LEARN = "nothing trainable left after truncation"
CUT_IMAGE = "truncation would cut inside an image's tokens"
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


@dataclass(frozen=True)
class Encoded:
    """Token ids and, per token, the role of the segment it came from."""

    input_ids: list[int]
    roles: list[str | None]


def encode(segments: list[Segment], tokenizer) -> Encoded:
    """Tokenize the joined text once and give each token the role of the segment holding its last character.

    Encoding the joined text (not segment by segment) keeps the ids identical to what the model sees
    at inference, whatever the tokenizer does at boundaries (merges, SentencePiece's leading space).
    Token segments (TokenText) go in as their ids, and the text between them is tokenized on its own; a
    Python tokenizer, which gives no character offsets, tokenizes segment by segment (as ms-swift and the
    remote code of the models that ship one build their prompts).
    """
    return encode_batch([segments], tokenizer)[0]


def encode_batch(batch: list[list[Segment]], tokenizer) -> list[Encoded]:
    """encode() for many conversations in one tokenizer call, which the Rust tokenizer spreads over the cores."""
    fast = getattr(tokenizer, "is_fast", False)
    if not fast or any(isinstance(text, TokenText) for segments in batch for text, _ in segments):
        return [_encode_pieces(segments, tokenizer, fast) for segments in batch]
    texts = ["".join(text for text, _ in segments) for segments in batch]
    encodings = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [_with_roles(segments, ids, offsets)
            for segments, ids, offsets in zip(batch, encodings["input_ids"], encodings["offset_mapping"])]


def _encode_pieces(segments: list[Segment], tokenizer, fast: bool) -> Encoded:
    """Token segments as their ids; each run of text between them as one tokenizer call (fast), or each segment."""
    ids, roles, run = [], [], []

    def flush():
        if fast and run:
            text = "".join(text for text, _ in run)
            encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            part = _with_roles(run, encoding["input_ids"], encoding["offset_mapping"])
            ids.extend(part.input_ids)
            roles.extend(part.roles)
        for text, role in ([] if fast else run):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            roles.extend([role] * len(piece))
        run.clear()

    for text, role in segments:
        if isinstance(text, TokenText):
            flush()
            piece = text.tokens.ids(tokenizer)
            ids.extend(piece)
            roles.extend([role] * len(piece))
        else:
            run.append((text, role))
    flush()
    return Encoded(ids, roles)


def _with_roles(segments: list[Segment], ids: list[int], offsets) -> Encoded:
    ends = np.cumsum([len(text) for text, _ in segments])
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    last_char = np.maximum(spans[:, 1], spans[:, 0] + 1) - 1
    index = np.minimum(np.searchsorted(ends, last_char, side="right"), len(segments) - 1)
    return Encoded(list(ids), [segments[i][1] for i in index.tolist()])


def with_placeholders(messages: list[Message], placeholder: str) -> list[Message]:
    """Each <image> tag of a message with images as the model's placeholder text (one image token, framed)."""
    return [replace(m, content=m.content.replace(IMAGE_TAG, placeholder)) if m.images else m for m in messages]


def expand_images(encoded: Encoded, token_counts: list[int], image_token_id: int) -> Encoded:
    """Each image token becomes its image's run of tokens (role "image"), as many as the vision encoder
    yields features for that image; the model puts those features there."""
    found = [index for index, token in enumerate(encoded.input_ids) if token == image_token_id]
    if len(found) != len(token_counts):
        raise DataError(f"the prompt holds {len(found)} image tokens for {len(token_counts)} images "
                        "(does the text itself contain the model's image token?)")
    ids, roles, start = [], [], 0
    for position, count in zip(found, token_counts):
        ids += encoded.input_ids[start:position] + [image_token_id] * count
        roles += encoded.roles[start:position] + [IMAGE_ROLE] * count
        start = position + 1
    return Encoded(ids + encoded.input_ids[start:], roles + encoded.roles[start:])


def mask(encoded: Encoded, train_on: str = "assistant") -> list[int]:
    """Labels: the token id where the model must learn, IGNORE_INDEX elsewhere.

    "assistant" trains every answer and tool call, "last" only those after the final user turn,
    "all" every token. Tool results and image tokens never train, whatever train_on says.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got '{train_on}'")
    roles = encoded.roles
    if train_on == "all":
        keep = [role not in ("tool", IMAGE_ROLE) for role in roles]
    else:
        keep = [role in TRAINABLE_ROLES for role in roles]
        if train_on == "last":
            first = max((index for index, role in enumerate(roles) if role == "user"), default=-1) + 1
            keep[:first] = [False] * first
    return [token if kept else IGNORE_INDEX for token, kept in zip(encoded.input_ids, keep)]


def loss_weights(encoded: Encoded, labels: list[int], scale: dict[str, float]) -> list[float]:
    """Per-token loss weights by segment role (e.g. tool_call 2.0, assistant 1.0); untrained tokens weigh 0."""
    return [0.0 if label == IGNORE_INDEX else float(scale.get(role or "", 1.0)) for label, role in zip(labels, encoded.roles)]


def truncate(input_ids: list[int], labels: list[int], max_length: int | None, side: str = "right"):
    """Cut to max_length tokens from the chosen side; None when no trainable token survives."""
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation side must be 'right' or 'left', got '{side}'")
    if max_length is not None and len(input_ids) > max_length:
        kept = slice(0, max_length) if side == "right" else slice(len(input_ids) - max_length, None)
        input_ids, labels = input_ids[kept], labels[kept]
    # The first label is never a target: position t predicts token t+1.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return input_ids, labels


def surviving_images(token_counts: list[int], roles: list[str | None], kept: range) -> list[int] | None:
    """The indices of the images whose tokens all lie in the kept positions; None when the cut goes through one."""
    image_positions = [index for index, role in enumerate(roles) if role == IMAGE_ROLE]
    survivors, offset = [], 0
    for image, count in enumerate(token_counts):
        first, last = image_positions[offset], image_positions[offset + count - 1]
        offset += count
        if kept.start <= first and last < kept.stop:
            survivors.append(image)
        elif last >= kept.start and first < kept.stop:
            return None
    return survivors


def trainable_tokens(example: dict) -> int:
    """Tokens whose label is a target after the shift (the first position predicts nothing)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def example_weights(example: dict) -> list[float]:
    """Per-token loss weights; an example without --loss_scale weights counts each target once, as unweighted."""
    if "loss_weights" in example:
        return list(example["loss_weights"])
    return [float(label != IGNORE_INDEX) for label in example["labels"]]


def collate(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None,
            attention_mask: bool = True) -> dict:
    """Right-pad a batch to its longest example (optionally up to a multiple of N) into tensors.

    attention_mask=False leaves the mask out: right padding needs none under causal attention (a real token never
    sees the pads after it), and a mask the attention would have to inspect costs a device-to-host wait.
    """
    import torch

    longest = pad_width(max(len(example["input_ids"]) for example in examples), pad_to_multiple_of)
    batch = {"input_ids": [], "labels": [], "attention_mask": []}
    has_weights = any("loss_weights" in example for example in examples)
    if has_weights:
        batch["loss_weights"] = []
    for example in examples:
        padding = longest - len(example["input_ids"])
        batch["input_ids"].append(list(example["input_ids"]) + [pad_token_id] * padding)
        batch["labels"].append(list(example["labels"]) + [IGNORE_INDEX] * padding)
        batch["attention_mask"].append([1] * len(example["input_ids"]) + [0] * padding)
        if has_weights:
            batch["loss_weights"].append(example_weights(example) + [0.0] * padding)
    if not attention_mask:
        del batch["attention_mask"]
    tensors = {key: torch.tensor(value, dtype=torch.float32 if key == "loss_weights" else torch.long) for key, value in batch.items()}
    return {**tensors, **image_batch(examples, longest)}


def image_batch(examples: list[dict], longest: int) -> dict:
    """The images of a batch for the model's forward: every image's patches in one tensor, their (t, h, w) grids
    in the same order, and mm_token_type_ids (1 at image tokens) padded like the ids. Empty without images."""
    import torch

    with_images = [example for example in examples if "pixel_values" in example]
    if not with_images:
        return {}
    types = [list(example.get("mm_token_type_ids") or [0] * len(example["input_ids"])) for example in examples]
    return {"pixel_values": torch.from_numpy(np.concatenate([e["pixel_values"] for e in with_images])).float(),
            "image_grid_thw": torch.from_numpy(np.concatenate([e["image_grid_thw"] for e in with_images])).long(),
            "mm_token_type_ids": torch.tensor([row + [0] * (longest - len(row)) for row in types], dtype=torch.long)}


def pad_width(longest: int, multiple: int | None) -> int:
    """The batch width: the longest row, rounded up to a multiple (few distinct shapes for compiled code)."""
    return -(-longest // multiple) * multiple if multiple else longest


def build_example(
    record: "dict | list[Message]",
    *,
    tokenizer,
    template: "str | Template",
    max_length: int | None = None,
    train_on: str = "assistant",
    truncation_side: str = "right",
    system: str | None = None,
    schema: str | None = None,
    loss_scale: dict[str, float] | None = None,
    processor=None,
) -> dict | None:
    """One raw row (or canonical conversation) -> {"input_ids", "labels"[, "loss_weights"][, "images",
    "image_tokens"]}, or None when truncation leaves nothing to learn or would cut an image (the caller counts those).

    `processor` (a VisionProcessor) is needed when the conversation has images.
    """
    messages = record if isinstance(record, list) else to_messages(record, schema)
    encoded = encode(_segments(messages, tokenizer, template, system, processor), tokenizer)
    example = _finish(encoded, messages, processor, train_on, max_length, truncation_side, loss_scale)
    return example if isinstance(example, dict) else None


def build_examples(conversations: list[list[Message]], *, tokenizer, template: "str | Template", max_length: int | None = None,
                   train_on: str = "assistant", truncation_side: str = "right", system: str | None = None,
                   loss_scale: dict[str, float] | None = None, processor=None, chunk: int = 1024) -> tuple[list[dict], Counter]:
    """build_example over a dataset, tokenizing `chunk` conversations per call: the kept examples, each with
    its "conversation" (for generation and reports), and how many were dropped, by reason."""
    kept, dropped = [], Counter()
    for start in range(0, len(conversations), chunk):
        part = conversations[start:start + chunk]
        encoded = encode_batch([_segments(messages, tokenizer, template, system, processor) for messages in part], tokenizer)
        for conversation, one in zip(part, encoded):
            example = _finish(one, conversation, processor, train_on, max_length, truncation_side, loss_scale)
            if isinstance(example, dict):
                kept.append({**example, "conversation": conversation})
            else:
                dropped[example] += 1
    return kept, dropped


def _segments(messages: list[Message], tokenizer, template, system: str | None, processor=None) -> list[Segment]:
    if any(message.images for message in messages):
        if processor is None:
            raise DataError("the data has images but the model takes none: it is a text model, or a vision-language "
                            "model sftkit's image pipeline does not drive (it drives the Qwen2-VL family)")
        messages = with_placeholders(messages, processor.placeholder)
    return render(messages, get_template(template), bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                  system=system, tokenizer=tokenizer)


def _finish(encoded: Encoded, messages: list[Message], processor, train_on: str, max_length: int | None, side: str,
            loss_scale: dict | None) -> dict | str:
    """expand images -> mask -> (weights) -> truncate for one encoded conversation; a drop reason when nothing is left."""
    images = [reference for message in messages for reference in message.images]
    token_counts = [processor.tokens_for(reference) for reference in images]
    if images:
        encoded = expand_images(encoded, token_counts, processor.image_token_id)
    labels = mask(encoded, train_on)
    if not loss_scale and not images:
        kept = truncate(encoded.input_ids, labels, max_length, side)
        return NOTHING_TO_LEARN if kept is None else {"input_ids": kept[0], "labels": kept[1]}
    weights = loss_weights(encoded, labels, loss_scale) if loss_scale else None
    kept = truncate(list(range(len(labels))), labels, max_length, side)
    if kept is None:
        return NOTHING_TO_LEARN
    positions, labels = kept
    example = {"input_ids": [encoded.input_ids[i] for i in positions], "labels": labels}
    if weights is not None:
        example["loss_weights"] = [weights[i] for i in positions]
    if images:
        survivors = surviving_images(token_counts, encoded.roles, range(positions[0], positions[-1] + 1))
        if survivors is None:
            return CUT_IMAGE
        example["images"] = [images[i] for i in survivors]
        example["image_tokens"] = [token_counts[i] for i in survivors]
    return example


def build_preference_example(record: "dict | PreferenceRow", *, tokenizer, template: "str | Template",
                             max_length: int | None = None, truncation_side: str = "right", system: str | None = None,
                             mismatched: list[Message] | None = None) -> dict | None:
    """One preference row -> {"sequences": [chosen, rejected], "conversation"}, each sequence {"input_ids", "labels"}
    with only its completion trainable (the answer after the last user message, as train_on="last").

    A KTO row holds one completion: give `mismatched`, another row's completion, which is scored after this
    prompt to estimate KTO's KL term; the result is {"sequences": [completion, mismatched], "desirable", ...}.
    None when truncation leaves a completion with nothing to score (the caller counts those).
    """
    row = record if isinstance(record, PreferenceRow) else to_preference(record, paired=mismatched is None)
    conversations = _preference_conversations(row, mismatched)
    encoded = encode_batch([_segments(conversation, tokenizer, template, system) for conversation in conversations], tokenizer)
    return _finish_preference(row, conversations, encoded, max_length, truncation_side)


def build_preference_examples(rows: list[PreferenceRow], *, tokenizer, template: "str | Template", max_length: int | None = None,
                              truncation_side: str = "right", system: str | None = None, unpaired: bool = False,
                              chunk: int = 512) -> tuple[list[dict], int]:
    """build_preference_example over a dataset: the kept examples and how many truncation dropped.

    unpaired (KTO): a pair becomes a desirable and an undesirable example, and example i is scored against
    the completion of example i + 1 (cyclically) for the KL term, as TRL builds its KL dataset.
    """
    if unpaired:
        rows = [single for row in rows for single in _unpaired(row)]
        mismatched = [_completions(rows[(index + 1) % len(rows)])[0] for index in range(len(rows))]
    else:
        mismatched = [None] * len(rows)
    kept = []
    for start in range(0, len(rows), chunk):
        part = list(zip(rows[start:start + chunk], mismatched[start:start + chunk]))
        conversations = [_preference_conversations(row, other) for row, other in part]
        encoded = encode_batch([_segments(conversation, tokenizer, template, system)
                                for pair in conversations for conversation in pair], tokenizer)
        for index, ((row, _), pair) in enumerate(zip(part, conversations)):
            example = _finish_preference(row, pair, encoded[2 * index:2 * index + 2], max_length, truncation_side)
            if example is not None:
                kept.append(example)
    return kept, len(rows) - len(kept)


def _unpaired(row: PreferenceRow) -> list[PreferenceRow]:
    if not row.paired:
        return [row]
    return [PreferenceRow(row.prompt, chosen=row.chosen), PreferenceRow(row.prompt, rejected=row.rejected)]


def _completions(row: PreferenceRow) -> list[list[Message]]:
    return [completion for completion in (row.chosen, row.rejected) if completion is not None]


def _preference_conversations(row: PreferenceRow, mismatched: list[Message] | None) -> list[list[Message]]:
    if mismatched is None:
        if not row.paired:
            raise ValueError("a row with one completion (KTO) needs a mismatched completion for its KL term")
        return [row.prompt + row.chosen, row.prompt + row.rejected]
    if row.paired:
        raise ValueError("a mismatched completion is for a KTO row with one completion: split pairs first")
    return [row.prompt + _completions(row)[0], row.prompt + mismatched]


def _finish_preference(row: PreferenceRow, conversations: list[list[Message]], encoded: list[Encoded],
                       max_length: int | None, side: str) -> dict | None:
    sequences = []
    for one in encoded:
        kept = truncate(one.input_ids, mask(one, "last"), max_length, side)
        if kept is None:
            return None
        sequences.append({"input_ids": kept[0], "labels": kept[1]})
    example = {"sequences": sequences, "conversation": conversations[0]}
    if not row.paired:
        example["desirable"] = row.chosen is not None
    return example


def collate_preference(examples: list[dict], pad_token_id: int) -> dict:
    """Preference examples -> one batch of 2B rows: every example's first sequence, then every second one, so a
    single forward scores chosen and rejected (KTO: completion and mismatched) together."""
    import torch

    sequences = [example["sequences"][i] for i in (0, 1) for example in examples]
    batch = collate(sequences, pad_token_id)
    if "ref_log_probs" in examples[0]:
        batch["ref_log_probs"] = torch.tensor([example["ref_log_probs"][i] for i in (0, 1) for example in examples],
                                              dtype=torch.float32)
    if "desirable" in examples[0]:
        batch["desirable"] = torch.tensor([example["desirable"] for example in examples], dtype=torch.bool)
    return batch


def pack(examples: list[dict], capacity: int) -> list[dict]:
    """Best-fit-decreasing packing of examples into rows of at most `capacity` tokens, without padding.

    Each row carries position_ids that restart at every example, which transformers turns into a
    block-causal mask: attention never crosses examples. The first label of every example is
    ignored so that no position learns to predict the next example.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), kept sorted
    for index in order:
        length = len(examples[index]["input_ids"])
        if length > capacity:
            raise ValueError(f"example of {length} tokens does not fit a packed row of {capacity}: truncate first")
        slot = bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([index])
            insort(free, (capacity - length, len(rows) - 1))
        else:
            room, row = free.pop(slot)
            rows[row].append(index)
            insort(free, (room - length, row))
    return [_packed_row([examples[i] for i in sorted(row)]) for row in rows]


def _packed_row(parts: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "position_ids": []}
    weighted = any("loss_weights" in part for part in parts)
    if weighted:
        row["loss_weights"] = []
    for part in parts:
        row["input_ids"] += part["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(part["labels"][1:])
        row["position_ids"] += list(range(len(part["input_ids"])))
        if weighted:
            row["loss_weights"] += [0.0] + example_weights(part)[1:]
    return row


def collate_packed(rows: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Packed rows -> tensors; the padding is one more sequence (positions restart) that nothing attends to or learns.

    document_boundaries are where each document (and each row's padding) starts and ends over the flattened batch
    (varlen kernels' cu_seqlens), counted here on the host so the device never has to be asked.
    """
    import torch

    longest = pad_width(max(len(row["input_ids"]) for row in rows), pad_to_multiple_of)
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    weighted = any("loss_weights" in row for row in rows)
    if weighted:
        batch["loss_weights"] = []
    boundaries = [0]
    for index, row in enumerate(rows):
        padding = longest - len(row["input_ids"])
        batch["input_ids"].append(row["input_ids"] + [pad_token_id] * padding)
        batch["labels"].append(row["labels"] + [IGNORE_INDEX] * padding)
        batch["position_ids"].append(row["position_ids"] + list(range(padding)))
        boundaries += [index * longest + start for start, position in enumerate(row["position_ids"]) if position == 0 and start]
        boundaries += [index * longest + len(row["input_ids"])] + ([(index + 1) * longest] if padding else [])
        if weighted:
            batch["loss_weights"].append(example_weights(row) + [0.0] * padding)
    tensors = {key: torch.tensor(value, dtype=torch.float32 if key == "loss_weights" else torch.long) for key, value in batch.items()}
    tensors["document_boundaries"] = torch.tensor(boundaries, dtype=torch.int32)
    return tensors


def collate_flat(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """A micro-batch without padding (ms-swift's padding_free): its examples one after another in one packed row.

    The batch and its targets are collate's (an example's first label is never a target there either), so the
    loss is the padded batch's, without the compute and activations of the pads.
    """
    return collate_packed([_packed_row(examples)], pad_token_id, pad_to_multiple_of)


def length_grouped_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A shuffled order in which each batch holds examples of similar length (less padding), batches shuffled."""
    import random

    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    # Sort within mega-batches of 50 batches, as HF's LengthGroupedSampler does, so epochs still differ.
    mega = batch_size * 50
    grouped = []
    for start in range(0, len(order), mega):
        grouped += sorted(order[start:start + mega], key=lambda i: -lengths[i])
    batches = [grouped[i:i + batch_size] for i in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return [index for batch in batches for index in batch]
