"""The web UI without a browser: forms generated from the configs, the training job, the views, a chat turn."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time

import pytest
from click.testing import CliRunner

from sftkit.config import ChatConfig, ConfigError, EvalConfig, PreviewConfig, TrainConfig, WebUIConfig, build_config
from sftkit.data.formats import Message
from sftkit.generation import GenerationConfig
from sftkit.webui import forms, jobs, turns, views
from sftkit_cli.main import main

CALL = '{"api_name": "weather", "parameters": {"city": "Paris"}}'
GREEDY = GenerationConfig(max_new_tokens=8)


# --- sftkit web-ui ------------------------------------------------------------------------------------------


@pytest.fixture
def launched(monkeypatch):
    """Run `sftkit web-ui` up to the launch, recording the config it would serve."""
    pytest.importorskip("gradio", reason="the webui extra (gradio) is not installed")
    import sftkit.webui.app as app

    calls = []
    monkeypatch.setattr(app, "launch", calls.append)
    return calls


def test_web_ui_listens_on_localhost_by_default_and_warns_without_auth_elsewhere(launched):
    quiet = CliRunner().invoke(main, ["web-ui"])
    assert quiet.exit_code == 0 and "warning" not in quiet.output
    assert launched[0] == WebUIConfig(host="127.0.0.1", port=7860, auth=None) and launched[0].loopback

    exposed = CliRunner().invoke(main, ["web-ui", "--host", "0.0.0.0", "--port", "8000"])
    assert exposed.exit_code == 0 and "warning: listening on 0.0.0.0 without --auth" in exposed.output
    guarded = CliRunner().invoke(main, ["web-ui", "--host", "0.0.0.0", "--auth", "ann:secret"])
    assert guarded.exit_code == 0 and "warning" not in guarded.output
    assert launched[-1].credentials == ("ann", "secret") and not launched[-1].loopback


def test_web_ui_rejects_bad_auth_and_port():
    result = CliRunner().invoke(main, ["web-ui", "--auth", "nopassword", "--port", "70000"])
    assert result.exit_code == 2
    assert "auth must be user:password" in result.output and "port must be in 1..65535" in result.output


# --- forms ----------------------------------------------------------------------------------------------------


def test_every_train_option_has_exactly_one_section():
    names = [name for group in forms.TRAIN_GROUPS.values() for name in group]
    fields = {item.name for item in dataclasses.fields(TrainConfig)}
    assert len(names) == len(set(names)) and set(names) <= fields
    grouped = forms.group_specs(forms.field_specs(TrainConfig), forms.TRAIN_GROUPS)
    assert "other" not in grouped, f"TrainConfig fields without a section: {[s.name for s in grouped.get('other', [])]}"
    assert list(grouped) == ["model", "data", "LoRA / quantization", "schedule", "evaluation / saving", "distributed"]


def test_widgets_follow_the_field_types_choices_and_help():
    specs = {spec.name: spec for spec in forms.field_specs(TrainConfig, {"output_dir": "runs"})}
    assert specs["quantization_bit"].kind == "choice" and specs["quantization_bit"].choices == ("0", "4", "8")
    assert specs["use_flash_attn"].choices == ("", "true", "false")  # bool | None: unset means "let sftkit decide"
    assert specs["metric_rule_for_best_model"].choices == ("", "min", "max")
    assert (specs["lora_rank"].kind, specs["lora_rank"].value) == ("int", 8)
    assert (specs["warmup_ratio"].kind, specs["packing"].kind) == ("float", "bool")
    assert specs["learning_rate"].kind == "text" and specs["learning_rate"].optional and specs["learning_rate"].value == ""
    assert specs["lora_target_modules"].value == "all-linear" and specs["output_dir"].value == "runs"
    assert specs["lora_rank"].help == "LoRA rank r"


def test_only_changed_values_become_flags(tmp_path):
    values = {spec.name: spec.value for spec in forms.field_specs(TrainConfig)}
    values.update(lora_rank=16.0, packing=True, learning_rate=" 5e-4 ", system="", quantization_bit="0",
                  model_cache_dir="~/models")
    assert forms.overrides(TrainConfig, values) == {"lora_rank": 16, "packing": True, "learning_rate": "5e-4",
                                                    "model_cache_dir": os.path.expanduser("~/models")}


def test_the_command_shown_builds_the_same_config_as_the_form(monkeypatch, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"query": "q", "response": "r"}\n')
    values = {spec.name: spec.value for spec in forms.field_specs(TrainConfig)}
    values.update(dataset=f"{data},{data}", lora_rank=4, packing=True, learning_rate="5e-4", use_flash_attn="false",
                  lora_target_modules="q_proj,v_proj", system="You are terse.", output_dir=str(tmp_path / "out"))
    config, changed = forms.parse_form(TrainConfig, values)
    command = forms.cli_command("train", changed)
    assert command.startswith("sftkit train --") and "--use_flash_attn false" in command

    import importlib

    received = []
    monkeypatch.setattr(importlib.import_module("sftkit.train"), "train", received.append)
    result = CliRunner().invoke(main, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert received == [config]
    assert config.lora_target_modules == ("q_proj", "v_proj") and config.use_flash_attn is False


def test_a_hub_token_never_shows_in_the_command():
    changed = {"push_to_hub": True, "hub_model_id": "me/model", "hub_token": "s3cret"}
    assert forms.cli_command("train", changed) == "sftkit train --push_to_hub true --hub_model_id me/model --hub_token '***'"
    assert forms.cli_args(changed)[-1] == "s3cret"


def test_every_bad_value_and_missing_path_is_reported_at_once(tmp_path):
    values = {spec.name: spec.value for spec in forms.field_specs(TrainConfig)}
    values.update(lora_rank=0, dataset=str(tmp_path / "missing.jsonl"), resume_from_checkpoint=str(tmp_path / "nope"),
                  model="./not-here", warmup_ratio=2.0)
    with pytest.raises(ConfigError) as caught:
        forms.parse_form(TrainConfig, values)
    text = "\n".join(caught.value.problems)
    for expected in ("lora_rank must be > 0", "warmup_ratio must be in [0, 1)",
                     f"dataset: '{tmp_path / 'missing.jsonl'}' does not exist",
                     f"resume_from_checkpoint: '{tmp_path / 'nope'}' does not exist", "model: './not-here' does not exist"):
        assert expected in text


def test_path_checks_leave_hub_ids_and_dataset_names_to_the_loaders(tmp_path, tiny_model_dir):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert forms.path_problems({"model": "Qwen/Qwen2.5-0.5B-Instruct", "dataset": "alpaca-en,hf::org/set,ms::org/set",
                                "deepspeed": "zero2", "model_cache_dir": str(tmp_path / "new" / "cache"),
                                "tokenizer": tiny_model_dir}) == []
    assert forms.path_problems({"model": str(not_a_model)}) == [
        f"model: '{not_a_model}' holds neither config.json nor tokenizer_config.json: not a transformers model folder"]
    assert forms.path_problems({"ckpt_dir": str(a_file)}) == [f"ckpt_dir: '{a_file}' is a file; a folder is expected"]
    assert forms.path_problems({"output_dir": str(a_file)}) == [f"output_dir: '{a_file}' is a file; a folder is expected"]
    assert forms.path_problems({"deepspeed": "my_ds.json"}) == ["deepspeed: 'my_ds.json' does not exist"]
    assert forms.path_problems({"output": str(tmp_path)}) == [f"output: '{tmp_path}' is a folder; a file is expected"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes every file, so permissions cannot be tested")
def test_unreadable_and_unwritable_paths_are_reported(tmp_path):
    locked = tmp_path / "locked.jsonl"
    locked.write_text("{}\n")
    locked.chmod(0)
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o500)
    assert forms.path_problems({"dataset": str(locked), "output_dir": str(closed / "out")}) == [
        f"dataset: '{locked}' is not readable", f"output_dir: '{closed}' is not writable"]


def test_chat_eval_and_preview_forms_build_their_configs(tmp_path, tiny_model_dir):
    def values(cls, **changed):
        return {**{spec.name: spec.value for spec in forms.field_specs(cls)}, **changed}

    chat, _ = forms.parse_form(ChatConfig, values(ChatConfig, model=tiny_model_dir, do_sample=True, top_k="5", seed="3"))
    assert (chat.model, chat.do_sample, chat.top_k, chat.seed) == (tiny_model_dir, True, 5, 3)
    evaluation, changed = forms.parse_form(EvalConfig, values(EvalConfig, ckpt_dir=None, limit="4", metrics="agent"))
    assert (evaluation.limit, evaluation.metrics, changed) == (4, "agent", {"limit": "4", "metrics": "agent"})
    preview, _ = forms.parse_form(PreviewConfig, values(PreviewConfig, tokenizer=tiny_model_dir, max_length="none"))
    assert preview.max_length is None
    with pytest.raises(ConfigError, match="ckpt_dir: '.*missing' does not exist"):
        forms.parse_form(EvalConfig, values(EvalConfig, ckpt_dir=str(tmp_path / "missing")))


# --- the training job -----------------------------------------------------------------------------------------


def test_log_tail_shows_the_last_state_of_redrawn_lines():
    log = "[sftkit] start\ntrain:  10%|█ | 1/10\rtrain:  20%|██ | 2/10\r\ndone\n\nError: bad thing\n"
    assert jobs.log_tail(log) == "[sftkit] start\ntrain:  20%|██ | 2/10\ndone\nError: bad thing"
    assert jobs.log_tail(log, lines=2) == "done\nError: bad thing"
    assert jobs.error_line(log) == "Error: bad thing" and jobs.error_line("all good") is None


def test_progress_and_eta_come_from_the_records_of_the_current_process():
    def step(number, elapsed):
        return {"step": number, "loss": 1.0 / number, "trainable_tokens_per_s": 100.0 + number, "total_steps": 10,
                "elapsed_s": elapsed}

    assert jobs.progress([]) is None and jobs.progress([{"step": 2, "eval_loss": 1.0}]) is None
    state = jobs.progress([step(1, 2.0), step(2, 4.0), {"step": 2, "eval_loss": 0.4}])
    assert state == {"step": 2, "total_steps": 10, "loss": 0.5, "tokens_per_s": 102.0, "eta_s": 16.0}
    # Resumed from step 2: the new process's clock starts again, so its pace is (6 - 2 steps) / 2 s.
    resumed = jobs.progress([step(1, 2.0), step(2, 4.0), step(4, 1.0), step(6, 2.0)])
    assert resumed["eta_s"] == pytest.approx(4 * 0.5)
    assert jobs.progress_text(state) == "step 2/10 · loss 0.5000 · 102 trainable tokens/s · ETA 00:00:16"
    assert jobs.last_evaluation([step(1, 1.0), {"step": 2, "eval_loss": 0.4, "eval_ppl": 1.49}]) == \
        "step 2: eval_loss 0.4000 · eval_ppl 1.4900"


def test_runs_are_listed_with_their_best_and_latest_checkpoints(tmp_path):
    for name, best, latest in (("v0-1", "checkpoint-4", "checkpoint-6"), ("v1-2", "checkpoint-2", "checkpoint-2")):
        run = tmp_path / "tiny" / name
        for checkpoint in {best, latest}:
            (run / checkpoint).mkdir(parents=True)
        (run / "sft_args.json").write_text("{}")
        (run / "best").write_text(best)
        (run / "latest").write_text(latest)
        time.sleep(0.01)
    os.utime(tmp_path / "tiny" / "v1-2", (time.time() + 5, time.time() + 5))
    assert jobs.checkpoint_choices(str(tmp_path)) == [
        ("tiny/v1-2 · best (checkpoint-2)", str(tmp_path / "tiny" / "v1-2" / "checkpoint-2")),
        ("tiny/v0-1 · best (checkpoint-4)", str(tmp_path / "tiny" / "v0-1" / "checkpoint-4")),
        ("tiny/v0-1 · latest (checkpoint-6)", str(tmp_path / "tiny" / "v0-1" / "checkpoint-6")),
    ]
    assert jobs.checkpoint_choices(str(tmp_path / "nothing-here")) == []


@pytest.mark.slow
def test_stop_sends_sigterm_and_the_run_saves_a_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"query": f"What is {i}?", "response": f"It is {i}."}) + "\n" for i in range(8)))
    changed = {"model": tiny_model_dir, "dataset": str(data), "template": "chatml", "max_steps": 100000,
               "logging_steps": 1, "eval_steps": 100000, "output_dir": str(tmp_path / "out"), "dataset_test_ratio": 0}
    monkeypatch.setenv("SFTKIT_CACHE", str(tmp_path / "cache"))  # the child's tokenized-data cache
    job = jobs.TrainJob(forms.cli_args(changed), str(tmp_path / "logs"), forms.cli_command("train", changed))
    try:
        deadline = time.time() + 120
        while not jobs.progress(jobs.read_records(jobs.run_folder(job.log_text()))):
            assert job.running and time.time() < deadline, job.log_text()[-2000:]
            time.sleep(0.2)
        assert job.status() == "running"
        job.stop()
        assert job.wait(60) == 143, job.log_text()[-2000:]  # saved, then the exit code of a stop by SIGTERM
    finally:
        if job.running:
            job.process.kill()
    run_dir = jobs.run_folder(job.log_text())
    assert job.status() == "stopped (checkpoint saved)" and "stopped by SIGTERM; checkpoint saved" in job.log_text()
    from sftkit.run import pointer

    assert os.path.isfile(os.path.join(pointer(run_dir, "latest"), "adapter_model.safetensors"))


# --- views and a chat turn ------------------------------------------------------------------------------------


def test_tool_calls_and_results_are_separate_formatted_blocks():
    shown = views.chat_messages([Message("user", "Weather in Paris?"), Message("tool_call", f"```JSON\n{CALL}\n```"),
                                 Message("tool", '{"result": "sunny"}'), Message("assistant", "Sunny."),
                                 Message("user", "Thanks"), Message("assistant", "")])
    assert shown == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "metadata": {"title": "🔧 tool call"},
         "content": '```json\n{\n  "api_name": "weather",\n  "parameters": {\n    "city": "Paris"\n  }\n}\n```'},
        {"role": "assistant", "metadata": {"title": "📎 tool result"}, "content": '```json\n{\n  "result": "sunny"\n}\n```'},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]
    assert views.chat_messages([Message("tool", "not json")])[0]["content"] == "```\nnot json\n```"


def test_examples_sort_by_score_and_trained_tokens_are_labelled():
    report = {"metrics": {"rouge_l": 0.5, "bleu4": 0.25}, "counts": {"examples": 3},
              "examples": [{"index": i, "rouge_l": score, "prompt": f"p{i}", "reference": f"r{i}", "prediction": f"x{i}"}
                           for i, score in enumerate([0.5, 0.1, 0.9])]}
    assert views.metric_rows(report) == [["rouge_l", 0.5], ["bleu4", 0.25], ["examples", 3]]
    assert [row[0] for row in views.example_rows(report)] == [1, 0, 2]
    assert [row[0] for row in views.example_rows(report, best_first=True)] == [2, 0, 1]
    spans = views.highlighted([[("Q: hi\nA: ", False), ("hello", True)], [("x", False)]])
    assert spans == [("── example 0 ──\n", None), ("Q: hi\nA: ", None), ("hello", views.TRAINED),
                     ("\n\n── example 1 ──\n", None), ("x", None)]


def test_length_histogram_counts_every_example():
    figure = views.length_figure([10, 10, 12, 40, 41, 90])
    assert sum(patch.get_height() for patch in figure.axes[0].patches) == 6


def test_the_evaluation_report_holds_every_example_with_its_score(tiny_model_dir):
    from sftkit.evaluate import WORST_SHOWN, evaluate_generation
    from sftkit.model import load_model, load_tokenizer

    conversations = [[Message("user", f"What is {i} plus {i}?"), Message("assistant", f"It is {2 * i}.")] for i in range(7)]
    report = evaluate_generation(load_model(tiny_model_dir, dtype="fp32"), load_tokenizer(tiny_model_dir), "chatml",
                                 conversations, gen_config=GenerationConfig(max_new_tokens=4), batch_size=4)
    assert [row["index"] for row in report["examples"]] == list(range(7))
    assert {"prompt", "reference", "prediction", "rouge_l"} <= report["examples"][0].keys()
    assert report["examples"][3]["reference"] == "It is 6."
    assert report["worst"] == sorted(report["examples"], key=lambda row: row["rouge_l"])[:WORST_SHOWN]


def test_an_agent_turn_waits_for_the_tool_result_then_finishes(monkeypatch, tiny_model_dir):
    from sftkit.model import load_model, load_tokenizer

    scripted = iter([["<|startofthink|>```JSON\n", CALL, "\n```<|endofthink|>"], ["It is ", "sunny."]])
    prompts, constraints = [], []

    class Guide:  # stands for sftkit.constrained.ToolCallGuide: one constraint per generation, from the conversation
        def for_conversations(self, conversations, system):
            return ("constraint for", len(conversations[0]))

    def fake_stream(model, tokenizer, ids, config, stop_strings, stop_ids, *, stop_after=(), constraint=None):
        prompts.append(tokenizer.decode(ids))
        constraints.append(constraint)
        assert stop_after == ("<|endofthink|>",)
        yield from next(scripted)

    monkeypatch.setattr(turns, "generate_stream", fake_stream)
    model, tokenizer = load_model(tiny_model_dir, dtype="fp32"), load_tokenizer(tiny_model_dir)
    steps = list(turns.stream_turn(model, tokenizer, "chatml", None, [], "Weather in Paris?", GREEDY, agent=True,
                                   guide=Guide()))
    assert len(steps) == 4 and not any(waiting for _, waiting in steps[:-1])  # three pieces streamed, then the turn
    history, waiting = steps[-1]
    assert waiting and [m.role for m in history] == ["user", "tool_call"]
    history, waiting = list(turns.stream_turn(model, tokenizer, "chatml", None, history, '{"result": "sunny"}',
                                              GREEDY, agent=True, tool_result=True, guide=Guide()))[-1]
    assert not waiting and [m.role for m in history] == ["user", "tool_call", "tool", "assistant"]
    assert history[-1].content == "It is sunny." and '{"result": "sunny"}' in prompts[-1]
    assert constraints == [("constraint for", 1), ("constraint for", 3)]  # built for each generation's conversation


def test_a_turn_streams_a_real_model_reply(tiny_model_dir):
    from sftkit.model import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_model_dir, dtype="fp32"), load_tokenizer(tiny_model_dir)
    steps = list(turns.stream_turn(model, tokenizer, "chatml", None, [], "hello", GenerationConfig(max_new_tokens=16)))
    history, waiting = steps[-1]
    assert not waiting and [m.role for m in history] == ["user", "assistant"] and len(steps) > 2


# --- the page -------------------------------------------------------------------------------------------------


def test_every_option_has_one_field_on_the_page_and_ids_are_unique(tmp_path):
    pytest.importorskip("gradio", reason="the webui extra (gradio) is not installed")
    from sftkit.webui.app import build_app

    demo, _ = build_app(build_config(WebUIConfig, None, {"output_dir": str(tmp_path)}))
    ids = [block.elem_id for block in demo.blocks.values() if getattr(block, "elem_id", None)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
    for prefix, cls, skipped in (("train", TrainConfig, set()), ("chat", ChatConfig, {"stream"}),
                                 ("eval", EvalConfig, set()), ("data", PreviewConfig, {"color"})):
        assert {f"{prefix}-{item.name}" for item in dataclasses.fields(cls) if item.name not in skipped} <= set(ids)


def test_failures_show_as_messages_never_tracebacks(capsys):
    pytest.importorskip("gradio", reason="the webui extra (gradio) is not installed")
    from sftkit.data.errors import DataError
    from sftkit.webui.app import failure

    assert failure(ConfigError(["lora_rank must be > 0", "dataset: 'x.jsonl' does not exist"])) == \
        "**Please fix:**\n- lora_rank must be > 0\n- dataset: 'x.jsonl' does not exist"
    assert failure(DataError("data.jsonl:3, field 'messages': empty")) == "**Error:** data.jsonl:3, field 'messages': empty"
    try:
        raise RuntimeError("boom")
    except RuntimeError as error:
        shown = failure(error)
    assert shown.startswith("**Unexpected error** (RuntimeError): boom") and "Traceback" not in shown
    assert "Traceback" in capsys.readouterr().err  # the details go to the web-ui terminal
