"""Agent fine-tuning: tool calls train (with their own loss weight), tool results never do; best-by-metric."""
import json
import os
from pathlib import Path

import pytest
import torch

from sftkit.config import TrainConfig
from sftkit.data.loading import read_file
from sftkit.data.pipeline import IGNORE_INDEX, build_example, collate
from sftkit.loss import loss_sum
from sftkit import evaluate
from sftkit.train import best_metric_key, train

ROOT = Path(__file__).resolve().parent.parent
MSAGENT_ROW = {"conversations": [
    {"from": "system", "value": "You can call tools."},
    {"from": "user", "value": "Weather in Paris and Rome?"},
    {"from": "assistant", "value": '<|startofthink|>```JSON\n{"api_name": "weather", "parameters": {"city": "Paris"}}\n```<|endofthink|>\n\n'
                                   '<|startofexec|>```JSON\n{"temp": 18}\n```<|endofexec|>\n'
                                   '<|startofthink|>```JSON\n{"api_name": "weather", "parameters": {"city": "Rome"}}\n```<|endofthink|>\n\n'
                                   '<|startofexec|>```JSON\n{"temp": 25}\n```<|endofexec|>\nParis 18, Rome 25.'}]}
ROLE_ROW = {"tools": [{"name": "weather"}], "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": '{"temp": 18}'},
    {"role": "assistant", "content": "It is 18 in Paris."}]}


def trained_text(example, tokenizer, weight=None):
    keep = [t for t, l, w in zip(example["input_ids"], example["labels"], example.get("loss_weights", example["labels"]))
            if l != IGNORE_INDEX and (weight is None or w == weight)]
    return tokenizer.decode(keep)


@pytest.mark.parametrize("template", ["chatml", "auto"])
def test_msagent_calls_and_answer_train_results_never(template, tokenizer):
    example = build_example(MSAGENT_ROW, tokenizer=tokenizer, template=template, loss_scale={"tool_call": 2.0})
    text = trained_text(example, tokenizer)
    assert '"city": "Paris"' in text and '"city": "Rome"' in text and "Paris 18, Rome 25." in text
    assert '"temp"' not in text and "Weather in" not in text and "You can call tools" not in text
    calls = trained_text(example, tokenizer, weight=2.0)
    assert '"city": "Paris"' in calls and "Paris 18" not in calls
    assert "Paris 18, Rome 25." in trained_text(example, tokenizer, weight=1.0)


def test_role_based_tool_rows_mask_the_same_way(tokenizer):
    example = build_example(ROLE_ROW, tokenizer=tokenizer, template="chatml", loss_scale={"tool_call": 2.0, "assistant": 1.0})
    assert '"name": "weather"' in trained_text(example, tokenizer, weight=2.0)
    assert trained_text(example, tokenizer, weight=1.0) == "It is 18 in Paris.<|im_end|>"
    assert '"temp"' not in trained_text(example, tokenizer)


def tool_call_loss(model, examples, pad_id):
    """Mean loss over tool-call tokens only."""
    only_calls = [{**e, "loss_weights": [1.0 if w == 2.0 else 0.0 for w in e["loss_weights"]]} for e in examples]
    batch = collate(only_calls, pad_id)
    with torch.no_grad():
        summed, _ = loss_sum(model.eval(), batch)
    return float(summed) / float(sum(sum(e["loss_weights"]) for e in only_calls))


@pytest.mark.slow
def test_short_agent_training_lowers_tool_call_loss(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [row.data for row in read_file(str(ROOT / "examples" / "agent" / "train.jsonl"))][:24]
    data = tmp_path / "agent.jsonl"
    data.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n")
    examples = [build_example(row, tokenizer=tokenizer, template="chatml", max_length=768, loss_scale={"tool_call": 2.0}) for row in rows[:8]]
    examples = [e for e in examples if e]
    before = tool_call_loss(AutoModelForCausalLM.from_pretrained(tiny_model_dir), examples, tokenizer.pad_token_id)
    best = train(TrainConfig(model=tiny_model_dir, dataset=(str(data),), template="chatml", loss_scale="agent", max_length=768,
                             max_steps=12, batch_size=4, learning_rate=2e-3, sft_type="full", dataset_test_ratio=0.0,
                             output_dir=str(tmp_path / "out"), add_output_dir_suffix=False, eval_steps=100))
    tuned = AutoModelForCausalLM.from_pretrained(best)
    assert tool_call_loss(tuned, examples, tokenizer.pad_token_id) < 0.85 * before


@pytest.mark.parametrize("metric,rule,scores,best_step", [
    ("tool_name_acc", None, [0.2, 0.9, 0.5], 2),
    ("loss", None, [3.0, 2.0, 2.5], 2),
    ("rouge-l", "min", [0.3, 0.1, 0.2], 2),
    ("args_f1", "max", [0.4, 0.3, 0.6], 3),
])
def test_metric_for_best_model_picks_the_right_checkpoint(metric, rule, scores, best_step, tiny_model_dir, tmp_path, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"query": f"q{i}", "response": f"r{i}"}) for i in range(8)) + "\n")
    key = best_metric_key(TrainConfig(metric_for_best_model=metric,
                                                   eval_generation_mode="agent" if metric in ("tool_name_acc", "args_f1") else "rouge"))
    script = iter(scores)
    monkeypatch.setattr(evaluate, "validation_metrics", lambda *args, **kwargs: {key: next(script)})
    best = train(TrainConfig(model=tiny_model_dir, dataset=(str(data),), template="chatml", max_steps=3, eval_steps=1,
                             dataset_test_ratio=0.25, metric_for_best_model=metric, metric_rule_for_best_model=rule,
                             eval_generation_mode="agent" if metric in ("tool_name_acc", "args_f1") else "rouge",
                             output_dir=str(tmp_path / "out"), add_output_dir_suffix=False, save_total_limit=5))
    assert os.path.basename(best) == f"checkpoint-{best_step}"
    state = json.load(open(os.path.join(best, "trainer_state.json")))
    assert state["best_checkpoint"] == f"checkpoint-{best_step}"


def test_training_evaluation_passes_constrained_tool_calls(monkeypatch):
    import contextlib
    import types

    seen = {}

    def fake_evaluation(model, tokenizer, template, conversations, **options):
        seen.update(options)
        return {"metrics": {"tool_name_acc": 1.0, "unparsed": []}}

    monkeypatch.setattr(evaluate, "evaluate_loss", lambda *args: {"eval_loss": 1.0})
    monkeypatch.setattr(evaluate, "evaluate_generation", fake_evaluation)
    config = TrainConfig(eval_generation_mode="agent", predict_with_generate=True, constrained_tool_calls=False,
                         score_tool_calls=False)
    metrics = evaluate.validation_metrics(None, types.SimpleNamespace(pad_token_id=0), config, [{"conversation": []}], device="cpu",
                                          autocast=contextlib.nullcontext())
    assert seen["constrained_tool_calls"] is False and seen["score_tool_calls"] is False and seen["mode"] == "agent"
    assert metrics == {"eval_loss": 1.0, "eval_tool_name_acc": 1.0}
