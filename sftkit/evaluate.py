"""Evaluation: validation loss and generation metrics, the same for `sftkit train` and `sftkit eval`.

Distributed, each rank evaluates a shard and the results are gathered. Under a lockstep backend (ZeRO-3,
where every forward needs every rank) the ranks also run the same forwards: a rank out of examples runs a
throwaway one weighted 0, and generation goes on until every rank has finished.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from . import distributed
from .constrained import tool_call_guide
from .data.formats import Message
from .attention import uses_varlen
from .data.pipeline import collate, collate_flat
from .data.vision import collate_images
from .data.templates import get_template
from .generation import GenerationConfig, generate_batch, generation_config, stop_criteria
from .inference import dataset_conversations, load_for_inference, output_path
from .loss import loss_sum
from .metrics import GENERATION_MODES, agent_metrics, call_errors, error_counts, rouge_l, text_metrics
from .prompts import prompt_inputs, prompt_text, reply_messages, response_text, split_last_turn, tool_call_end
from .tools import conversation_tools

WORST_SHOWN = 5


@dataclass(frozen=True)
class Lockstep:
    """Keeps every rank's forwards in step: batch counts and generation lengths are agreed across ranks."""

    world: distributed.World

    def batches(self, count: int) -> int:
        return distributed.max_int(count, self.world)

    def all_done(self, done: bool) -> bool:
        return distributed.all_true(done, self.world)


def validation_metrics(model, tokenizer, config, examples: list[dict], *, device, autocast,
                       world: distributed.World = distributed.World(), lockstep: bool = False, processor=None) -> dict:
    """Validation loss and perplexity; with generation (config.generates), the metrics of `sftkit eval` on the
    same split, as eval_<name>. `processor` takes a vision-language model's images."""
    metrics = evaluate_loss(model, examples, config.eval_batch_size, tokenizer.pad_token_id, device, autocast, world,
                            lockstep, processor)
    return {**metrics, **generation_metrics(model, tokenizer, config, examples, autocast=autocast, world=world,
                                            lockstep=lockstep, processor=processor)} if config.generates else metrics


def generation_metrics(model, tokenizer, config, examples: list[dict], *, autocast,
                       world: distributed.World = distributed.World(), lockstep: bool = False, processor=None) -> dict:
    """The metrics of `sftkit eval` on the examples' conversations (answers generated for their last user
    message), as eval_<name>."""
    with torch.no_grad(), autocast:
        report = evaluate_generation(model, tokenizer, config.template, [e["conversation"] for e in examples],
                                     mode=config.eval_generation_mode, system=config.system,
                                     gen_config=GenerationConfig(max_new_tokens=config.eval_max_new_tokens),
                                     limit=config.eval_generation_limit, batch_size=config.eval_batch_size,
                                     world=world, lockstep=lockstep, constrained_tool_calls=config.constrained_tool_calls,
                                     score_tool_calls=config.score_tool_calls,
                                     ground_tool_values=config.ground_tool_values, processor=processor)
    return {f"eval_{key}": value for key, value in report["metrics"].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], batch_size: int, pad_id: int, device, autocast,
                  world: distributed.World = distributed.World(), lockstep: bool = False, processor=None) -> dict:
    """Token-mean loss over the validation set (unweighted, whatever --loss_scale says), and its perplexity."""
    model.eval()
    shard = examples[world.rank::world.size]
    batches = -(-len(shard) // batch_size)
    if lockstep:
        batches = distributed.max_int(batches, world)
    total, tokens = 0.0, 0
    for index in range(batches):
        part = shard[index * batch_size:(index + 1) * batch_size]
        unweighted = [{k: e[k] for k in ("input_ids", "labels", "images", "image_tokens") if k in e} for e in (part or examples[:1])]
        if processor is not None:
            rows = collate_images(unweighted, pad_id, processor)
        else:  # with varlen attention, one row without pads: the same loss as padded rows, for less compute
            rows = (collate_flat if uses_varlen(model) else collate)(unweighted, pad_id)
        batch = {k: v.to(device) for k, v in rows.items()}
        with autocast:
            summed, count = loss_sum(model, batch)
        if part:  # else a throwaway forward, so that every rank joined it
            total, tokens = total + summed.item(), tokens + count
    total, tokens = distributed.sum_floats([total, float(tokens)], world)
    loss = total / max(tokens, 1)
    return {"eval_loss": round(loss, 6), "eval_ppl": round(math.exp(min(loss, 50.0)), 4)}


class Throughput:
    """A progress bar over answered rows with the generated tokens per second (infer and eval), so a slow or
    runaway generation is seen, not waited on."""

    def __init__(self, rows: int | None, desc: str = "generate"):
        from tqdm.auto import tqdm

        self.bar, self.tokens, self.started = tqdm(total=rows, desc=desc, unit="row", dynamic_ncols=True), 0, time.time()

    def add_tokens(self, count: int) -> None:
        self.tokens += count

    def add_rows(self, count: int) -> None:
        self.bar.update(count)
        self.bar.set_postfix(tok_s=f"{self.tokens / max(time.time() - self.started, 1e-9):.1f}")

    def close(self) -> None:
        self.bar.close()


@torch.no_grad()
def loss_totals(loss_fn, collate_fn, model, examples: list[dict], batch_size: int, pad_id: int, device, autocast,
                world: distributed.World = distributed.World(), lockstep: bool = False) -> tuple[float, float, dict]:
    """An objective's loss over the examples on every rank: (summed loss, its normaliser, metric totals
    {name: (sum, count)}), each summed over batches and ranks."""
    model.eval()
    shard = examples[world.rank::world.size]
    batches = -(-len(shard) // batch_size)
    if lockstep:
        batches = distributed.max_int(batches, world)
    total, normaliser, metrics = 0.0, 0.0, {}
    for index in range(batches):
        part = shard[index * batch_size:(index + 1) * batch_size]
        batch = {key: value.to(device) for key, value in collate_fn(part or examples[:1], pad_id).items()}
        with autocast:
            summed, count, parts = loss_fn(model, batch)
        if part:  # else a throwaway forward, so that every rank joined it
            total, normaliser = total + summed.item(), normaliser + float(count)
            metrics = add_totals(metrics, parts)
    totals = [0.0, 0.0, {}]
    for rank_total, rank_normaliser, rank_metrics in distributed.gather((total, normaliser, metrics), world):
        totals = [totals[0] + rank_total, totals[1] + rank_normaliser, add_totals(totals[2], rank_metrics)]
    return tuple(totals)


def add_totals(totals: dict, parts: dict, weight: float = 1.0) -> dict:
    """Metric totals {name: (sum, count)} plus another batch's (tensors or numbers), weighted."""
    added = dict(totals)
    for name, (value, count) in parts.items():
        previous = added.get(name, (0.0, 0.0))
        added[name] = (previous[0] + weight * float(value), previous[1] + weight * float(count))
    return added


def generate_all(model, tokenizer, prompts: list[list[int]], gen_config: GenerationConfig, stops, batch_size: int = 8,
                 stop_after=(), lockstep: Lockstep | None = None, guide=None, tools=None,
                 progress: Throughput | None = None, images: list[dict | None] | None = None) -> list[str]:
    """generate_batch over any number of prompts, batch_size at a time; with a guide, prompt i's calls use tools[i]
    (`images`: each prompt's image inputs)."""
    stop_strings, stop_ids = stops
    count = -(-len(prompts) // batch_size)
    if lockstep:
        count = lockstep.batches(count)
    replies = []
    for index in range(count):
        part = prompts[index * batch_size:(index + 1) * batch_size]
        constraint = guide.constraint(tools[index * batch_size:(index + 1) * batch_size]) if guide and part else None
        outputs = generate_batch(model, tokenizer, part or [[tokenizer.pad_token_id]], gen_config, stop_strings, stop_ids,
                                 stop_after=stop_after, all_done=lockstep.all_done if lockstep else None,
                                 constraint=constraint, on_tokens=progress.add_tokens if progress else None,
                                 images=images[index * batch_size:(index + 1) * batch_size] if images else None)
        replies += outputs if part else []
        if progress:
            progress.add_rows(len(part))
    return replies


def agent_replies(model, tokenizer, template, cases, gen_config: GenerationConfig, *, system=None, batch_size=8,
                  lockstep: Lockstep | None = None, constrained: bool = True, progress: Throughput | None = None,
                  processor=None, scored: bool = True, grounded: bool = False):
    """Answer each (prompt, reference turn) as a user of the agent would see it; returns (replies, results inserted).

    Generate until a tool call closes or the turn ends; after a call, insert the reference turn's next tool
    result and continue. Each continuation uses up one reference result, so an example generates at most
    (its reference results + 1) times. A reply holds its calls, the inserted results and the final answer.
    With `constrained`, calls are restricted to the tools each conversation offers, and `scored` picks the likeliest
    whole call among them (never in lockstep: its extra forwards would be one rank's only); `grounded` narrows their
    values to what the conversation so far names.
    """
    template = get_template(template)
    stops, call_end = stop_criteria(tokenizer, template), tool_call_end(template)
    guide = tool_call_guide(tokenizer, template, scored and lockstep is None, grounded) if constrained else None
    results = [[message for message in reference if message.role == "tool"] for _, reference in cases]
    turns: list[list[Message]] = [[] for _ in cases]
    replies, used = [""] * len(cases), [0] * len(cases)
    active = list(range(len(cases)))
    while (lockstep.batches(len(active)) if lockstep else len(active)) > 0:
        prompts = [prompt_inputs(cases[i][0] + turns[i], tokenizer, template, system, processor) for i in active]
        outputs = generate_all(model, tokenizer, [ids for ids, _ in prompts], gen_config, stops, batch_size,
                               stop_after=(call_end,), lockstep=lockstep, guide=guide,
                               tools=[guide.tools_for(cases[i][0] + turns[i], system) for i in active] if guide else None,
                               progress=progress, images=[images for _, images in prompts])
        waiting = []
        for index, text in zip(active, outputs):
            replies[index] += text
            turns[index] = turns[index] + reply_messages(text)
            if call_end and text.endswith(call_end) and used[index] < len(results[index]):
                result = results[index][used[index]]
                used[index] += 1
                turns[index] = turns[index] + [result]
                replies[index] += template.tool_result.replace("{{CONTENT}}", result.content)
                waiting.append(index)
        active = waiting
    return replies, sum(used)


def evaluate_generation(model, tokenizer, template, conversations: list[list[Message]], *, mode: str = "rouge",
                        gen_config: GenerationConfig, system: str | None = None, limit: int | None = None,
                        batch_size: int = 8, world: distributed.World = distributed.World(),
                        lockstep: bool = False, constrained_tool_calls: bool = True, progress: bool = False,
                        processor=None, score_tool_calls: bool = True, ground_tool_values: bool = False) -> dict:
    """Generate an answer to each conversation's last user turn and score it against the reference answer.

    rouge: one generation, ROUGE-L and BLEU-4 over the whole answer. agent: calls (constrained to the offered
    tools unless constrained_tool_calls is false, the likeliest whole call unless score_tool_calls is false, values
    narrowed to what the conversation names with ground_tool_values),
    inserted reference results and the final answer (agent_replies), scored with agent_metrics, plus each call
    error by kind with the worst examples of each.
    The report holds the metrics, counts, unparsed calls, the worst examples by ROUGE-L and every example with
    its ROUGE-L.
    """
    if mode not in GENERATION_MODES:
        raise ValueError(f"mode must be one of {GENERATION_MODES}, got {mode!r}")
    template = get_template(template)
    cases = [split_last_turn(conversation) for conversation in conversations[:limit]]
    if not cases:
        raise ValueError("no conversations to evaluate")
    references = [response_text(reference, template) for _, reference in cases]
    predictions, inserted = _predictions(model, tokenizer, template, cases, mode, gen_config, system, batch_size,
                                         world, lockstep, constrained_tool_calls, progress, processor,
                                         (score_tool_calls, ground_tool_values))
    if mode == "rouge":
        metrics, unparsed = text_metrics(predictions, references), []
    else:
        metrics = agent_metrics([{"prediction": p, "reference": r} for p, r in zip(predictions, references)])
        unparsed = metrics.pop("unparsed")
    scores = [rouge_l(prediction, reference) for prediction, reference in zip(predictions, references)]
    rows = [{"index": i, "rouge_l": scores[i], "prompt": prompt_text(cases[i][0], tokenizer, template, system),
             "reference": references[i], "prediction": predictions[i]} for i in range(len(cases))]
    agent_part = {}
    if mode == "agent":
        agent_part = {"constrained_tool_calls": constrained_tool_calls,
                      "score_tool_calls": constrained_tool_calls and score_tool_calls and not lockstep,
                      "ground_tool_values": constrained_tool_calls and ground_tool_values,
                      "errors": _call_errors(cases, predictions, references, scores, tokenizer, template, system)}
    return {
        "mode": mode,
        **agent_part,
        "metrics": metrics,
        "counts": {
            "examples": len(cases),
            "reference_tool_calls": sum(m.role == "tool_call" for _, reference in cases for m in reference),
            "tool_results_inserted": inserted,
            "empty_predictions": sum(not prediction.strip() for prediction in predictions),
        },
        "unparsed_calls": unparsed,
        "worst": sorted(rows, key=lambda row: row["rouge_l"])[:WORST_SHOWN],
        "examples": rows,
    }


def _predictions(model, tokenizer, template, cases, mode, gen_config, system, batch_size, world, lockstep,
                 constrained, progress, processor, calls: tuple[bool, bool]) -> tuple[list[str], int]:
    """Every case's generated answer (each rank generates its share; all ranks get all), and the tool results inserted
    (`calls`: whether calls are scored, and grounded)."""
    mine = list(range(world.rank, len(cases), world.size))
    sync = Lockstep(world) if lockstep else None
    inserted = 0
    # An agent's rows may generate several times (after each tool result), so its bar counts generations.
    bar = Throughput(len(mine) if mode == "rouge" else None) if progress else None
    if mode == "rouge":
        prompts = [prompt_inputs(cases[i][0], tokenizer, template, system, processor) for i in mine]
        outputs = generate_all(model, tokenizer, [ids for ids, _ in prompts], gen_config, stop_criteria(tokenizer, template),
                               batch_size, lockstep=sync, progress=bar, images=[images for _, images in prompts])
    else:
        outputs, inserted = agent_replies(model, tokenizer, template, [cases[i] for i in mine], gen_config,
                                          system=system, batch_size=batch_size, lockstep=sync, constrained=constrained,
                                          progress=bar, processor=processor, scored=calls[0], grounded=calls[1])
    if bar:
        bar.close()
    predictions = [""] * len(cases)
    for shard in distributed.gather(list(zip(mine, outputs)), world):
        for index, text in shard:
            predictions[index] = text
    return predictions, distributed.sum_int(inserted, world)


def _call_errors(cases, predictions, references, scores, tokenizer, template, system) -> dict:
    """Each call error by kind against the tools each conversation offered, and the worst examples of each kind."""
    offered = [{tool.name for tool in conversation_tools(prompt, system)} or None for prompt, _ in cases]
    errors = [call_errors(p, r, names) for p, r, names in zip(predictions, references, offered)]
    return {"counts": error_counts(errors),
            "worst": _worst_by_kind(errors, scores, cases, predictions, references, tokenizer, template, system)}


def _worst_by_kind(errors, scores, cases, predictions, references, tokenizer, template, system) -> dict:
    """For each error kind, the examples that have it, most errors first (then lowest ROUGE-L), WORST_SHOWN of them."""
    worst = {}
    for kind in error_counts(errors):
        having = [i for i, found in enumerate(errors) if any(error["kind"] == kind for error in found)]
        having.sort(key=lambda i: (-len(errors[i]), scores[i]))
        worst[kind] = [{"index": i, "errors": [error for error in errors[i] if error["kind"] == kind],
                        "prompt": prompt_text(cases[i][0], tokenizer, template, system), "reference": references[i],
                        "prediction": predictions[i]} for i in having[:WORST_SHOWN]]
    return worst


def evaluate_checkpoint(config) -> dict:
    """`sftkit eval`: score an EvalConfig's model on its dataset; writes the JSON report and returns it."""
    model, tokenizer, settings = load_for_inference(config.ckpt_dir, config.model, template=config.template,
                                                    system=config.system, dtype=config.dtype,
                                                    trust_remote_code=config.trust_remote_code)
    conversations, specs = dataset_conversations(config, settings)
    report = evaluate_generation(model, tokenizer, settings.template, conversations, mode=config.metrics,
                                 gen_config=generation_config(config), system=settings.system, limit=config.limit,
                                 batch_size=config.batch_size, constrained_tool_calls=config.constrained_tool_calls,
                                 score_tool_calls=config.score_tool_calls, ground_tool_values=config.ground_tool_values,
                                 progress=True, processor=settings.processor)
    report = {"ckpt_dir": settings.ckpt_dir, "model_dir": settings.model_dir, "dataset": specs, **report}
    path = output_path(config, settings, "eval_report.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, ensure_ascii=False)
    return {**report, "output": path}
