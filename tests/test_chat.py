import io
import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from sftkit import chat as sc
from sftkit import evaluate as se
from sftkit import inference as si
from sftkit.chat import chat_repl, infer, merge
from sftkit.errors import CheckpointError
from sftkit.evaluate import evaluate_generation
from sftkit.inference import load_for_inference
from sftkit.prompts import prompt_ids, prompt_text
from sftkit.config import InferConfig, MergeConfig
from sftkit.data.formats import Message
from sftkit.generation import GenerationConfig, generate_stream
from sftkit.lora import LoRAConfig, inject_lora, save_adapter
from sftkit.model import load_model, load_tokenizer
from sftkit_cli.use import chat, evaluate

CALL = '{"api_name": "weather", "parameters": {"city": "Paris"}}'
RESULT = '{"result": "sunny"}'
VALIDATION = [
    [Message("user", "What is the weather in Paris?"), Message("tool_call", CALL), Message("tool", RESULT),
     Message("assistant", "It is sunny in Paris.")],
    [Message("user", "hello"), Message("assistant", "Hello! How can I help?")],
    [Message("system", "Answer briefly."), Message("user", "Translate hello"), Message("assistant", "你好")],
]
GREEDY = GenerationConfig(max_new_tokens=6)


def make_run(root, base_dir, **run_args) -> str:
    """A training run folder as train.py writes it: sft_args.json, best, val_dataset.jsonl and a LoRA checkpoint
    whose B matrices are random, so the adapter changes the outputs."""
    run = os.path.join(root, "run")
    model = load_model(base_dir, dtype="fp32")
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0)
    inject_lora(model, lora)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    checkpoint = os.path.join(run, "checkpoint-2")
    save_adapter(model, lora, checkpoint, base_model_name_or_path=base_dir)
    load_tokenizer(base_dir).save_pretrained(checkpoint)
    args = {"model": None, "model_dir": base_dir, "sft_type": "lora", "template": "chatml", "system": None,
            "dtype": "fp32", "max_length": 512, "quantization_bit": None, **run_args}
    with open(os.path.join(run, "sft_args.json"), "w") as handle:
        json.dump(args, handle)
    with open(os.path.join(run, "best"), "w") as handle:
        handle.write("checkpoint-2")
    with open(os.path.join(run, "val_dataset.jsonl"), "w") as handle:
        for conversation in VALIDATION:
            handle.write(json.dumps({"messages": [{"role": m.role, "content": m.content} for m in conversation]}) + "\n")
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    return make_run(str(tmp_path_factory.mktemp("runs")), tiny_model_dir)


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_for_inference(run_dir)


def reply(loaded, messages):
    model, tokenizer, settings = loaded
    ids = prompt_ids(messages, tokenizer, settings.template, settings.system)
    return "".join(generate_stream(model, tokenizer, ids, GREEDY))


# --- loading ------------------------------------------------------------------------------------------------


def test_run_folder_loads_its_best_checkpoint_with_the_run_settings(run_dir, loaded):
    model, _, settings = loaded
    assert settings.ckpt_dir == os.path.join(run_dir, "checkpoint-2")
    assert (settings.template, settings.system, settings.dtype, settings.max_length) == ("chatml", None, "fp32", 512)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_checkpoint_without_run_args_is_refused(tmp_path):
    os.makedirs(tmp_path / "checkpoint-1")
    with pytest.raises(CheckpointError, match="no sft_args.json"):
        load_for_inference(str(tmp_path / "checkpoint-1"))


def test_nothing_given_loads_the_embedded_default(monkeypatch, tiny_model_dir):
    asked = []
    monkeypatch.setattr(si, "resolve_model_dir", lambda model: asked.append(model) or tiny_model_dir)
    _, _, settings = load_for_inference()
    assert asked == [None] and settings.template == "auto" and settings.ckpt_dir is None


# --- chat ---------------------------------------------------------------------------------------------------


def test_chat_over_a_pipe_streams_replies_and_clear_forgets(run_dir, loaded):
    result = CliRunner().invoke(chat, ["--ckpt_dir", run_dir, "--max_new_tokens", "6"], input="hello\nclear\nhi\nexit\n")
    assert result.exit_code == 0, result.output
    first = reply(loaded, [Message("user", "hello")])
    second = reply(loaded, [Message("user", "hi")])  # no history: clear came between
    assert result.stdout == f"{first}\n{second}\n"


def test_agent_chat_inserts_the_tool_result_and_continues(monkeypatch, tokenizer):
    prompts = []

    def scripted(model, tokenizer, ids, config, stop_strings=(), stop_token_ids=(), *, stop_after=(), constraint=None,
                 images=None):
        prompts.append(tokenizer.decode(ids))
        assert stop_after == ("<|endofthink|>",)
        yield from (["<|startofthink|>", CALL, "<|endofthink|>"] if len(prompts) == 1 else ["It is ", "sunny."])

    monkeypatch.setattr(sc, "generate_stream", scripted)
    output = io.StringIO()
    history = chat_repl(None, tokenizer, "chatml", None, GREEDY, input=io.StringIO(f"weather?\n{RESULT}\nexit\n"),
                        output=output, agent=True)
    assert history == [Message("user", "weather?"), Message("tool_call", CALL), Message("tool", RESULT),
                       Message("assistant", "It is sunny.")]
    assert output.getvalue() == (f"<|startofthink|>{CALL}<|endofthink|>\n\n<|startofexec|>{RESULT}<|endofexec|>\n"
                                 "It is sunny.\n")
    # The model continues the same turn: no end glue after the result, no new answer opener.
    assert prompts[1] == (f"<|im_start|>user\nweather?<|im_end|>\n<|im_start|>assistant\n"
                          f"<|startofthink|>{CALL}<|endofthink|>\n\n<|startofexec|>{RESULT}<|endofexec|>\n")


def test_agent_chat_constrains_calls_to_the_system_prompt_tools(monkeypatch, tokenizer):
    seen = []

    def scripted(model, tokenizer, ids, config, stop_strings=(), stop_token_ids=(), *, stop_after=(), constraint=None,
                 images=None):
        seen.append(constraint)
        yield "ok"

    monkeypatch.setattr(sc, "generate_stream", scripted)
    system = 'Tools:\n1. {"name": "weather", "parameters": [{"name": "city", "required": true}]}'
    for agent, constrained in [(True, True), (True, False), (False, True)]:
        chat_repl(None, tokenizer, "chatml", system, GREEDY, input=io.StringIO("hi\n"), output=io.StringIO(),
                  agent=agent, constrained=constrained)
    assert seen[0] is not None and seen[0].grammars[0] is not None
    assert seen[1:] == [None, None]  # switched off, or not in agent mode


# --- infer and eval -----------------------------------------------------------------------------------------


def test_infer_writes_one_line_per_row(run_dir, tmp_path):
    printed = []
    output = str(tmp_path / "out" / "infer.jsonl")
    rows = infer(InferConfig(ckpt_dir=run_dir, max_new_tokens=4, batch_size=2, show_dataset_sample=1, output=output),
                 echo=printed.append)
    with open(output) as handle:
        lines = [json.loads(line) for line in handle]
    assert lines == rows and len(lines) == len(VALIDATION)
    assert all(set(line) == {"prompt", "reference", "prediction"} for line in lines)
    assert lines[1]["reference"] == "Hello! How can I help?" and lines[1]["prompt"].endswith("<|im_start|>assistant\n")
    assert len(printed) == 2  # one sample, then where the file went


def test_infer_constrains_rows_that_offer_tools(run_dir, tmp_path, monkeypatch):
    seen = []

    def scripted(model, tokenizer, batch, config, stop_strings=(), stop_token_ids=(), *, stop_after=(), all_done=None,
                 constraint=None, on_tokens=None, images=None):
        seen.append(constraint)
        return ["ok"] * len(batch)

    monkeypatch.setattr(se, "generate_batch", scripted)
    data = tmp_path / "tools.jsonl"
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    data.write_text(json.dumps({"tools": tools, "messages": [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": "x"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    for constrained, scored in ((True, True), (True, False), (False, True)):
        infer(InferConfig(ckpt_dir=run_dir, dataset=(str(data),), output=str(tmp_path / "out.jsonl"),
                          constrained_tool_calls=constrained, score_tool_calls=scored), echo=lambda _: None)
    assert [tool.name for tool in seen[0].tools[0]] == ["weather"] and seen[0].grammars[1] is None
    assert seen[0].guide.scored is True and seen[1].guide.scored is False and seen[2] is None


def test_eval_cli_agent_report(run_dir, tmp_path):
    output = tmp_path / "report.json"
    result = CliRunner().invoke(evaluate, ["--ckpt_dir", run_dir, "--metrics", "agent", "--max_new_tokens", "8",
                                           "--batch_size", "2", "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "tool_name_acc" in result.stdout and f"report: {output}" in result.stdout
    report = json.loads(output.read_text())
    assert report["mode"] == "agent" and report["dataset"][0].endswith("val_dataset.jsonl")
    assert report["counts"]["examples"] == 3 and report["counts"]["reference_tool_calls"] == 1
    assert report["metrics"]["n_examples"] == 3 and isinstance(report["unparsed_calls"], list)
    assert len(report["worst"]) == 3 and {"prompt", "reference", "prediction", "rouge_l"} <= set(report["worst"][0])
    assert report["constrained_tool_calls"] is True and report["score_tool_calls"] is True
    assert "errors.unknown_tool" in result.stdout
    assert set(report["errors"]["counts"]) == set(report["errors"]["worst"])
    result = CliRunner().invoke(evaluate, ["--ckpt_dir", run_dir, "--metrics", "agent", "--max_new_tokens", "8",
                                           "--output", str(output), "--constrained_tool_calls", "false"])
    assert result.exit_code == 0, result.output
    report = json.loads(output.read_text())
    assert report["constrained_tool_calls"] is False and report["score_tool_calls"] is False


def test_eval_rouge_mode_scores_references(loaded):
    model, tokenizer, settings = loaded
    report = evaluate_generation(model, tokenizer, settings.template, VALIDATION, mode="rouge", gen_config=GREEDY, limit=2)
    assert set(report["metrics"]) == {"rouge_l", "bleu4"} and report["counts"]["examples"] == 2
    assert report["worst"][0]["reference"] in (f"<|startofthink|>{CALL}<|endofthink|>\n\n<|startofexec|>{RESULT}"
                                               "<|endofexec|>\nIt is sunny in Paris.", "Hello! How can I help?")


def test_agent_procedure_inserts_reference_results_and_continues(monkeypatch, tokenizer):
    """Scripted model outputs keyed by (query, tool results already in the prompt) check every step exactly."""
    conversations = [
        [Message("user", "weather twice"), Message("tool_call", CALL), Message("tool", "r1"),
         Message("tool_call", CALL), Message("tool", "r2"), Message("assistant", "Both sunny.")],
        [Message("user", "say hi"), Message("assistant", "hi")],
        [Message("user", "call anyway"), Message("assistant", "no call needed")],
    ]
    script = {
        ("weather twice", 0): f"<|startofthink|>{CALL}<|endofthink|>",
        ("weather twice", 1): "Checking more.<|startofthink|>not json<|endofthink|>",
        ("weather twice", 2): "Both sunny.",
        ("say hi", 0): "hi",
        ("call anyway", 0): '<|startofthink|>{"api_name": "x", "parameters": {}}<|endofthink|>',
    }
    prompts = []

    def scripted(model, tokenizer, batch, config, stop_strings=(), stop_token_ids=(), *, stop_after=(), all_done=None, constraint=None, on_tokens=None, images=None):
        texts = [tokenizer.decode(ids) for ids in batch]
        prompts.extend(texts)
        return [script[(text.split("user\n")[1].split("<|im_end|>")[0], text.count("<|startofexec|>"))] for text in texts]

    monkeypatch.setattr(se, "generate_batch", scripted)
    report = evaluate_generation(None, tokenizer, "chatml", conversations, mode="agent", gen_config=GREEDY)
    assert len(prompts) == 5  # 3 + 1 + 1: each continuation follows one inserted result
    assert prompts[3] == (f"<|im_start|>user\nweather twice<|im_end|>\n<|im_start|>assistant\n"
                          f"<|startofthink|>{CALL}<|endofthink|>\n\n<|startofexec|>r1<|endofexec|>\n")
    first = next(item for item in report["worst"] if item["index"] == 0)
    assert first["prediction"] == (f"<|startofthink|>{CALL}<|endofthink|>\n\n<|startofexec|>r1<|endofexec|>\n"
                                   "Checking more.<|startofthink|>not json<|endofthink|>\n\n<|startofexec|>r2<|endofexec|>\n"
                                   "Both sunny.")
    assert report["counts"]["tool_results_inserted"] == 2
    assert report["unparsed_calls"] == [{"index": 0, "payload": "not json"}]
    assert report["metrics"]["tool_name_acc"] == 0.5 and report["metrics"]["n_pred_calls"] == 3
    assert report["metrics"]["no_call_acc"] == 0.5  # "say hi" made no call, "call anyway" made one


# --- merge --------------------------------------------------------------------------------------------------


def test_merged_model_loads_in_plain_transformers_with_equal_logits(run_dir, loaded, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    output_dir = merge(MergeConfig(ckpt_dir=run_dir))
    assert output_dir == os.path.join(run_dir, "checkpoint-2-merged")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(output_dir))
    merged = AutoModelForCausalLM.from_pretrained(output_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    ids = torch.tensor([prompt_ids([Message("user", "hello")], loaded[1], "chatml")])
    with torch.no_grad():
        expected = loaded[0](ids).logits
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)  # the adapter matters
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-5, rtol=1e-5)
    # A merged copy beside the checkpoints loads as full weights with the run's settings.
    model, _, settings = load_for_inference(output_dir)
    assert settings.template == "chatml" and not any("lora" in name for name, _ in model.named_parameters())


def test_quantized_run_merge_is_refused_unless_dequantized(tmp_path, tiny_model_dir):
    run = make_run(str(tmp_path), tiny_model_dir, quantization_bit=4)
    with pytest.raises(CheckpointError, match="4-bit quantized base.*--dequantize true"):
        merge(MergeConfig(ckpt_dir=run))
    output_dir = merge(MergeConfig(ckpt_dir=run, output_dir=str(tmp_path / "merged"), dequantize=True))
    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
    shutil.rmtree(output_dir)


def test_prompt_text_matches_prompt_ids(tokenizer):
    messages = [Message("user", "hello")]
    assert tokenizer.decode(prompt_ids(messages, tokenizer, "chatml")) == prompt_text(messages, tokenizer, "chatml")


# --- merge dtype, progress, remote code -----------------------------------------------------------------------------


def test_merge_keeps_the_base_dtype_unless_told(run_dir, tmp_path, tiny_model_dir):
    """A bf16 base merges into bf16 (not a float32 copy twice its size); --dtype chooses another."""
    from safetensors.torch import load_file

    base = tmp_path / "bf16-base"
    load_model(tiny_model_dir, dtype="fp32").to(torch.bfloat16).save_pretrained(base)
    load_tokenizer(tiny_model_dir).save_pretrained(base)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    args = json.load(open(run / "sft_args.json"))
    json.dump({**args, "model_dir": str(base), "dtype": "auto"}, open(run / "sft_args.json", "w"))
    for dtype, expected in (("auto", torch.bfloat16), ("fp32", torch.float32), ("fp16", torch.float16)):
        merged = merge(MergeConfig(ckpt_dir=str(run), output_dir=str(tmp_path / f"merged-{dtype}"), dtype=dtype))
        assert {t.dtype for t in load_file(os.path.join(merged, "model.safetensors")).values()} == {expected}


def test_infer_shows_progress_with_tokens_per_second_within_a_bounded_default(run_dir, tmp_path):
    from sftkit.config import ChatConfig, EvalConfig
    from sftkit_cli.main import main

    assert InferConfig().max_new_tokens == EvalConfig().max_new_tokens == 256 and ChatConfig().max_new_tokens == 512
    result = CliRunner().invoke(main, ["infer", "--ckpt_dir", run_dir, "--output", str(tmp_path / "out.jsonl"),
                                       "--max_new_tokens", "3", "--show_dataset_sample", "0"])
    assert result.exit_code == 0 and "infer: 100%" in result.output and "tok_s=" in result.output, result.output


@pytest.mark.parametrize("command", ["chat", "infer", "eval", "merge"])
def test_commands_pass_trust_remote_code_to_the_loader(command, run_dir, tmp_path, tiny_model_dir):
    """A base that ships its own code is refused with the flag to pass; the flag is then taken (the refusal goes)."""
    from sftkit_cli.main import main

    base = tmp_path / "remote-base"
    shutil.copytree(tiny_model_dir, base)
    config = json.load(open(base / "config.json"))
    json.dump({**config, "model_type": "my-own-model", "auto_map": {"AutoConfig": "my_code.MyConfig"}},
              open(base / "config.json", "w"))
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    json.dump({**json.load(open(run / "sft_args.json")), "model_dir": str(base)}, open(run / "sft_args.json", "w"))
    args = [command, "--ckpt_dir", str(run)] + (["--output", str(tmp_path / "out")] if command in ("infer", "eval") else
                                                 ["--output_dir", str(tmp_path / "merged")] if command == "merge" else [])
    refused = CliRunner().invoke(main, args, input="")
    assert refused.exit_code == 1 and "--trust_remote_code true" in refused.output, refused.output
    trusted = CliRunner().invoke(main, args + ["--trust_remote_code", "true"], input="")
    assert "--trust_remote_code true" not in trusted.output
