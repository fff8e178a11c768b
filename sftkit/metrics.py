"""Metrics for generated replies: ROUGE-L and BLEU-4 that work on Chinese, and tool-call accuracy for agents.

Pure functions over strings: no model, no I/O. Texts are compared as `metric_tokens`, so the same tokens
feed ROUGE and BLEU.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Collection, Mapping, Sequence

GENERATION_MODES = ("rouge", "agent")
TEXT_METRICS = ("rouge-l", "bleu-4")
AGENT_METRICS = ("tool_name_acc", "args_exact_match", "args_f1", "answer_rouge_l")
GENERATION_METRICS = TEXT_METRICS + AGENT_METRICS

THINK_START = "<|startofthink|>"
THINK_END = "<|endofthink|>"
EXEC_END = "<|endofexec|>"

# Scripts written without spaces between words, so each character is one token. CJK punctuation
# (、。「」・…) lies outside these ranges and is dropped like ASCII punctuation.
_CJK = (
    "\u1100-\u11ff"  # Hangul Jamo
    "\u3005\u3007"  # 々 (iteration mark) and 〇, letters inside the CJK punctuation block
    "\u3041-\u3096\u309d-\u309f"  # Hiragana
    "\u30a1-\u30fa\u30fc-\u30ff"  # Katakana, without its punctuation ゠ and ・
    "\u3130-\u318f"  # Hangul compatibility Jamo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf\u4e00-\u9fff"  # Han: extension A and unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # Han compatibility ideographs
    "\U00020000-\U0003134f"  # Han extensions B to G
)
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")
_FENCE = re.compile(r"```[A-Za-z]*(.*?)```", re.DOTALL)
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def metric_tokens(text: str) -> list[str]:
    """Lowercased words plus single CJK characters, punctuation dropped.

    rouge-score's default tokenizer keeps only [a-z0-9], which scores every Chinese pair 0. NFKC first folds
    full-width letters and digits (ＧＰＴ４) into their ASCII forms so both spellings match.
    """
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Bit-parallel LCS (Allison & Dix 1986; Hyyro 2004): one big-int step per token of `b`.

    A Python double loop is too slow for long character-tokenised Chinese answers.
    """
    positions: dict[str, int] = {}
    for index, token in enumerate(a):
        positions[token] = positions.get(token, 0) | 1 << index
    all_ones = (1 << len(a)) - 1
    row = all_ones
    for token in b:
        matches = row & positions.get(token, 0)
        row = ((row + matches) | (row - matches)) & all_ones
    # Each bit of `row` cleared along the way is one position of `a` used by the LCS.
    return len(a) - row.bit_count()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure, as rouge-score's rougeL computes it but over `metric_tokens`.

    Two texts without tokens are identical and score 1.0 (rouge-score gives 0); one empty side scores 0.0.
    """
    predicted, expected = metric_tokens(prediction), metric_tokens(reference)
    if not predicted or not expected:
        return float(not predicted and not expected)
    # F = 2PR / (P + R) with P = lcs / |pred| and R = lcs / |ref| simplifies to this.
    return 2 * _lcs_length(predicted, expected) / (len(predicted) + len(expected))


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    """A corpus score over mismatched or empty lists would hide a bug in the caller."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        raise ValueError("no predictions to score")


def corpus_rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean sentence ROUGE-L, the aggregate rouge-score reports."""
    _check_pairs(preds, refs)
    return sum(rouge_l(pred, ref) for pred, ref in zip(preds, refs)) / len(preds)


def _ngram_counts(
    predicted: Sequence[str], expected: Sequence[str]
) -> tuple[list[int], list[int]]:
    """Clipped n-gram matches and predicted n-grams for n = 1..4, the counts BLEU's precisions divide."""
    matched, total = [], []
    for n in range(1, 5):
        predicted_ngrams = Counter(zip(*(predicted[i:] for i in range(n))))
        expected_ngrams = Counter(zip(*(expected[i:] for i in range(n))))
        matched.append(sum((predicted_ngrams & expected_ngrams).values()))
        total.append(sum(predicted_ngrams.values()))
    return matched, total


def _bleu(matched: Sequence[int], total: Sequence[int], pred_length: int, ref_length: int) -> float:
    """BLEU-4 from n-gram counts with nltk's SmoothingFunction().method1 and brevity penalty."""
    if pred_length == 0:
        return float(ref_length == 0)
    if matched[0] == 0:
        return 0.0
    # method1: an order without matches counts 0.1 of a match; nltk also divides by at least 1 n-gram.
    log_precision = sum(math.log((hits or 0.1) / max(1, count)) for hits, count in zip(matched, total))
    brevity = min(1.0, math.exp(1 - ref_length / pred_length))
    return brevity * math.exp(log_precision / 4)


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 over `metric_tokens`, equal to nltk's sentence_bleu with method1 smoothing.

    Like nltk, identical texts shorter than 4 tokens score below 1 (smoothed empty orders); two texts
    without tokens score 1.0 (nltk gives 0).
    """
    predicted, expected = metric_tokens(prediction), metric_tokens(reference)
    return _bleu(*_ngram_counts(predicted, expected), len(predicted), len(expected))


def corpus_bleu4(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4: n-gram counts and lengths summed over pairs before dividing, like nltk's corpus_bleu.

    One difference: a sentence shorter than n adds no n-gram to the denominator, where nltk adds 1.
    """
    _check_pairs(preds, refs)
    matched, total, pred_length, ref_length = [0] * 4, [0] * 4, 0, 0
    for pred, ref in zip(preds, refs):
        predicted, expected = metric_tokens(pred), metric_tokens(ref)
        pair_matched, pair_total = _ngram_counts(predicted, expected)
        matched = [a + b for a, b in zip(matched, pair_matched)]
        total = [a + b for a, b in zip(total, pair_total)]
        pred_length += len(predicted)
        ref_length += len(expected)
    return _bleu(matched, total, pred_length, ref_length)


def text_metrics(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """The text scores an eval run reports."""
    return {"rouge_l": corpus_rouge_l(preds, refs), "bleu4": corpus_bleu4(preds, refs)}


@dataclass(frozen=True)
class ToolCall:
    """A tool call reduced to what scoring compares, whichever JSON spelling it came in."""

    name: str
    arguments: dict


def unfenced(text: str) -> str:
    """The text inside a ```JSON fence (any language tag), or the stripped text when it is not fenced."""
    text = text.strip()
    fenced = _FENCE.fullmatch(text)
    return fenced.group(1) if fenced else text


def parse_call_payload(payload: str) -> ToolCall | None:
    """The call in one think block, or None unless it is a JSON object naming a tool with object arguments.

    Accepts MSAgent-Bench's {"api_name", "parameters"} and OpenAI's {"name", "arguments"}, where arguments
    may be a JSON string; a missing or null argument object means a call without arguments.
    """
    try:
        call = json.loads(unfenced(payload))
        if not isinstance(call, dict):
            return None
        name = call.get("api_name", call.get("name"))
        arguments = call.get("parameters", call.get("arguments"))
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    if not isinstance(name, str) or not name or not isinstance(arguments, (dict, type(None))):
        return None
    return ToolCall(name, arguments or {})


def _think_blocks(text: str) -> list[ToolCall | str]:
    """Every think block in order: its ToolCall, or its raw payload when it does not parse or never closes."""
    blocks: list[ToolCall | str] = []
    for chunk in text.split(THINK_START)[1:]:
        payload, closed, _ = chunk.partition(THINK_END)
        call = parse_call_payload(payload) if closed else None
        blocks.append(call or payload)
    return blocks


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """Calls in an assistant reply, and the raw payloads that failed, so a broken call is never lost."""
    blocks = _think_blocks(text)
    calls = [block for block in blocks if isinstance(block, ToolCall)]
    return calls, [block for block in blocks if isinstance(block, str)]


def split_final_answer(text: str) -> str:
    """The reply after its last tool result or call, whichever ends later: the part a user reads."""
    ends = [text.rfind(marker) + len(marker) for marker in (EXEC_END, THINK_END) if marker in text]
    return text[max(ends, default=0):].strip()


def _normalise(value: Any) -> Any:
    """A hashable form in which "3", 3 and 3.0 are equal and strings ignore surrounding spaces."""
    if isinstance(value, bool):
        return bool, value  # True == Decimal(1) with equal hashes, but true is not 1 for a tool
    if isinstance(value, (int, float)):
        return Decimal(repr(value))
    if isinstance(value, str):
        text = value.strip()
        return Decimal(text) if _NUMBER.fullmatch(text) else text
    if isinstance(value, list):
        return tuple(_normalise(item) for item in value)
    if isinstance(value, dict):
        return _argument_pairs(value)
    return value


def _argument_pairs(arguments: Mapping[str, Any]) -> frozenset:
    """(key, normalised value) pairs: equal sets mean equal arguments, their overlap feeds argument F1."""
    return frozenset((key, _normalise(value)) for key, value in arguments.items())


def _f1(matched: int, predicted: int, expected: int) -> float:
    """F1 = 2TP / (|predicted| + |expected|); nothing predicted and nothing expected is a perfect 1.0."""
    return 1.0 if predicted + expected == 0 else 2 * matched / (predicted + expected)


def score_tool_calls(
    predicted: Sequence[ToolCall | None], reference: Sequence[ToolCall], failed: int = 0
) -> dict[str, Any]:
    """Compare one reply's calls with the reference's, position by position.

    None in `predicted` marks a call that did not parse, in its place; `failed` adds unparsed calls whose
    place is unknown after the parsed ones. Both count as predicted calls that match nothing. Argument
    pairs only match under a matching tool name.
    """
    calls = [*predicted, *[None] * failed]
    name_correct = args_exact = pairs_matched = 0
    for call, expected in zip(calls, reference):
        if call is None or call.name != expected.name:
            continue
        call_pairs, expected_pairs = _argument_pairs(call.arguments), _argument_pairs(expected.arguments)
        name_correct += 1
        args_exact += call_pairs == expected_pairs
        pairs_matched += len(call_pairs & expected_pairs)
    pairs_predicted = sum(len(call.arguments) for call in calls if call is not None)
    pairs_expected = sum(len(call.arguments) for call in reference)
    return {
        "name_correct": name_correct,
        "args_exact": args_exact,
        "args_f1": _f1(pairs_matched, pairs_predicted, pairs_expected),
        "n_ref": len(reference),
        "n_pred": len(calls),
        "arg_pairs_matched": pairs_matched,
        "arg_pairs_pred": pairs_predicted,
        "arg_pairs_ref": pairs_expected,
    }


def _ratio(part: int, whole: int) -> float | None:
    """None when there is nothing to measure, so a missing rate is never mistaken for 0 or 1."""
    return part / whole if whole else None


def agent_metrics(examples: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """Tool-call and final-answer scores over {"prediction", "reference"} assistant replies.

    Rates over calls divide by reference calls and are None without any; a reference whose call does not
    parse raises, since scoring against broken ground truth would mislead.
    """
    if not examples:
        raise ValueError("no examples to score")
    totals: Counter[str] = Counter()
    unparsed: list[dict[str, Any]] = []
    answer_scores: list[float] = []
    no_call_references = no_call_predictions = 0
    for index, example in enumerate(examples):
        reference_calls, reference_failed = parse_tool_calls(example["reference"])
        if reference_failed:
            raise ValueError(f"example {index}: reference call does not parse: {reference_failed[0]!r}")
        blocks = _think_blocks(example["prediction"])
        unparsed += [{"index": index, "payload": block} for block in blocks if isinstance(block, str)]
        predicted = [block if isinstance(block, ToolCall) else None for block in blocks]
        score = score_tool_calls(predicted, reference_calls)
        totals.update({key: value for key, value in score.items() if key != "args_f1"})
        if not reference_calls:
            no_call_references += 1
            no_call_predictions += not blocks
        answer_scores.append(
            rouge_l(split_final_answer(example["prediction"]), split_final_answer(example["reference"]))
        )
    return {
        "tool_name_acc": _ratio(totals["name_correct"], totals["n_ref"]),
        "args_exact_match": _ratio(totals["args_exact"], totals["n_ref"]),
        "args_f1": _f1(totals["arg_pairs_matched"], totals["arg_pairs_pred"], totals["arg_pairs_ref"]),
        "answer_rouge_l": sum(answer_scores) / len(answer_scores),
        "no_call_acc": _ratio(no_call_predictions, no_call_references),
        "n_examples": len(examples),
        "n_ref_calls": totals["n_ref"],
        "n_pred_calls": totals["n_pred"],
        "n_unparsed": len(unparsed),
        "unparsed": unparsed,
    }


# Why a call is wrong, one kind per error. A parsed call naming a tool outside the offered list is unknown_tool
# wherever it stands; wrong_tool is a wrong name when the offered list is not known.
ERROR_KINDS = ("unparsable_call", "unknown_tool", "wrong_offered_tool", "wrong_tool", "missing_parameter",
               "extra_parameter", "wrong_value", "missing_call", "extra_call")


def call_errors(prediction: str, reference: str, offered: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Every error of one reply's calls against the reference's, position by position, as {"kind", "call", "detail"}.

    `offered` holds the tool names the conversation offered (None: unknown). Arguments are compared only under
    the right tool name, with the same normalisation as the scores ("3" == 3).
    """
    expected_calls, _ = parse_tool_calls(reference)
    blocks = _think_blocks(prediction)
    errors = []

    def error(kind: str, position: int, detail: str) -> None:
        errors.append({"kind": kind, "call": position, "detail": detail})

    for position in range(max(len(blocks), len(expected_calls))):
        call = blocks[position] if position < len(blocks) else None
        expected = expected_calls[position] if position < len(expected_calls) else None
        if isinstance(call, str):
            error("unparsable_call", position, call[:200])
        elif call is None:
            error("missing_call", position, f"expected {expected.name}")
        elif offered is not None and call.name not in offered:
            error("unknown_tool", position, f"{call.name} is not offered" + (f" (expected {expected.name})" if expected else ""))
        elif expected is None:
            error("extra_call", position, f"{call.name} where no call was expected")
        elif call.name != expected.name:
            error("wrong_tool" if offered is None else "wrong_offered_tool", position, f"{call.name} for {expected.name}")
        else:
            for key in sorted(expected.arguments.keys() - call.arguments.keys()):
                error("missing_parameter", position, f"{call.name}: {key}")
            for key in sorted(call.arguments.keys() - expected.arguments.keys()):
                error("extra_parameter", position, f"{call.name}: {key}")
            for key in sorted(call.arguments.keys() & expected.arguments.keys()):
                if _normalise(call.arguments[key]) != _normalise(expected.arguments[key]):
                    error("wrong_value", position, f"{call.name}.{key}: {json.dumps(call.arguments[key], ensure_ascii=False)} "
                                                   f"for {json.dumps(expected.arguments[key], ensure_ascii=False)}")
    return errors


def error_counts(errors_by_example: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, int]:
    """How many errors of each kind (every kind listed, zeros included, so reports compare)."""
    counts = Counter(error["kind"] for errors in errors_by_example for error in errors)
    return {kind: counts[kind] for kind in ERROR_KINDS}
