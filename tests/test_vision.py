"""Vision-language models end to end on a tiny random Qwen2-VL: the loss with images equals transformers', LoRA on the
language model (optionally the vision tower) trains and saves an adapter peft loads, full fine-tuning keeps a frozen
vision tower, generation with images equals transformers' generate, and chat/infer/eval/merge take images."""
from __future__ import annotations

import io
import json
import os

import pytest
import torch
from click.testing import CliRunner

import tiny
from steered import Preferring, Record
from sftkit.chat import chat_repl, infer, merge
from sftkit.config import EvalConfig, InferConfig, MergeConfig, TrainConfig
from sftkit.data.formats import Message, to_messages
from sftkit.data.loading import load_conversations
from sftkit.data.pipeline import build_example
from sftkit.data.templates import render
from sftkit.data.vision import collate_images
from sftkit.errors import TrainingError
from sftkit.evaluate import evaluate_checkpoint
from sftkit.generation import GenerationConfig, generate_batch
from sftkit.inference import load_for_inference
from sftkit.lora import LoRALinear, LoRAQuantLinear, load_adapter
from sftkit.loss import loss_sum
from sftkit.model import load_model, load_processor, load_tokenizer
from sftkit.prompts import prompt_inputs
from sftkit.registry import MODELS, infer_model_type
from sftkit.train import locate_model, setup_model, train
from sftkit_cli.main import main

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:MatMul8bitLt")]
COLOURS = list(tiny.SHAPE_COLORS)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory, pictures):
    """A caption dataset in ms-swift's shape: the colour of the square in each picture, images by relative path."""
    folder = tmp_path_factory.mktemp("image-data")
    for picture in pictures:
        os.link(picture, folder / os.path.basename(picture))
    rows = [{"query": "<image>What colour is the square?", "response": f"It is {COLOURS[i % 3]}.",
             "images": [os.path.basename(pictures[i % 3])]} for i in range(12)]
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(folder / "train.jsonl")


def config(vlm_dir, image_data, tmp_path, **options) -> TrainConfig:
    defaults = dict(model=vlm_dir, dataset=(image_data,), template="qwen", max_steps=6, learning_rate=1e-2, batch_size=2,
                    dataset_test_ratio=0.0, output_dir=str(tmp_path), logging_steps=1, dataset_cache=False, seed=0)
    return TrainConfig(**(defaults | options))


@pytest.fixture(scope="module")
def lora_run(vlm_dir, image_data, tmp_path_factory):
    """A LoRA run with validation (loss and generation with images); returns (best checkpoint, step losses)."""
    losses = []
    best = train(config(vlm_dir, image_data, tmp_path_factory.mktemp("lora-run"), max_steps=8, dataset_test_ratio=0.25,
                        eval_steps=4, predict_with_generate=True, eval_max_new_tokens=4),
                 on_record=lambda record: losses.append(record["loss"]) if "loss" in record else None)
    return best, losses


def image_batch(vlm_dir, vision, pictures):
    tokenizer, processor = vision
    rows = [{"query": "<image>What colour is the square?", "response": "It is red.", "images": [pictures[0]]},
            {"query": "<image> and <image>?", "response": "Green, blue.", "images": pictures[1:]}]
    examples = [build_example(row, tokenizer=tokenizer, template="qwen", processor=processor) for row in rows]
    return collate_images(examples, tokenizer.pad_token_id, processor)


def model_logits(model, batch) -> torch.Tensor:
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        return model.eval()(**{key: batch[key] for key in keys}).logits


# --- the loss --------------------------------------------------------------------------------------------------


def test_loss_with_images_equals_the_models_own_loss(vlm_dir, vision, pictures):
    model = load_model(vlm_dir)
    batch = image_batch(vlm_dir, vision, pictures)
    summed, count = loss_sum(model, batch)
    reference = model(**{key: value for key, value in batch.items()}).loss
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(summed / count, reference, rtol=1e-5, atol=1e-6)
    without_images = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
    assert not torch.isclose(loss_sum(model, without_images)[0] / count, reference)  # the pixels do count


# --- training --------------------------------------------------------------------------------------------------


def test_lora_training_lowers_the_loss_and_saves_an_adapter_peft_loads(lora_run, vlm_dir, vision, pictures):
    from peft import PeftModel

    best, losses = lora_run
    assert losses[-1] < losses[0]
    with open(os.path.join(best, "adapter_config.json")) as handle:
        targets = json.load(handle)["target_modules"]
    assert sorted(targets) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    batch = image_batch(vlm_dir, vision, pictures)
    ours = load_model(vlm_dir)
    load_adapter(ours, best)
    assert not any(".visual." in name for name, module in ours.named_modules() if isinstance(module, LoRALinear))
    theirs = PeftModel.from_pretrained(load_model(vlm_dir), best)
    torch.testing.assert_close(model_logits(ours, batch), model_logits(theirs, batch))
    assert not torch.allclose(model_logits(ours, batch), model_logits(load_model(vlm_dir), batch))
    metrics = [json.loads(line) for line in open(os.path.join(os.path.dirname(best), "metrics.jsonl"))]
    assert any("eval_loss" in record and "eval_rouge_l" in record for record in metrics)


def train_model(settings):
    """The model as train() builds it before the first step."""
    tokenizer, model_dir, settings, _ = locate_model(settings)
    return setup_model(settings, model_dir, tokenizer, ["cpu"], say=lambda *a: None)[0]


def test_freeze_vit_false_puts_adapters_on_the_vision_tower_and_projector(vlm_dir, image_data, tmp_path):
    adapted = {}
    for freeze_vit in (True, False):
        model = train_model(config(vlm_dir, image_data, tmp_path, freeze_vit=freeze_vit))
        adapted[freeze_vit] = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    assert all(name.startswith("model.language_model.") for name in adapted[True])
    assert "model.visual.blocks.0.attn.qkv" in adapted[False] and "model.visual.merger.mlp.0" in adapted[False]
    assert set(adapted[True]) < set(adapted[False])


def test_full_fine_tuning_keeps_a_frozen_vision_tower_and_saves_a_whole_model(vlm_dir, image_data, tmp_path):
    best = train(config(vlm_dir, image_data, tmp_path, sft_type="full", max_steps=2))
    assert os.path.isfile(os.path.join(best, "preprocessor_config.json"))
    base, trained = load_model(vlm_dir).state_dict(), load_model(best).state_dict()
    assert all(torch.equal(base[key], trained[key]) for key in base if key.startswith("model.visual."))
    assert not torch.equal(base["lm_head.weight"], trained["lm_head.weight"])
    model, _, settings = load_for_inference(best, device="cpu")
    assert settings.processor is not None and settings.processor.image_token_id == model.config.image_token_id


def test_packing_is_refused_with_the_reason(vlm_dir, image_data, tmp_path):
    with pytest.raises(TrainingError, match="--packing is refused for vision-language models: .* 3-D"):
        train(config(vlm_dir, image_data, tmp_path, packing=True))


@pytest.mark.skipif(not __import__("importlib").util.find_spec("bitsandbytes"), reason="needs bitsandbytes")
def test_qlora_trains_adapters_on_a_4bit_language_model(vlm_dir, image_data, tmp_path):
    best = train(config(vlm_dir, image_data, tmp_path, quantization_bit=4, max_steps=2))
    model, _, settings = load_for_inference(best, device="cpu")
    quantized = [name for name, module in model.named_modules() if isinstance(module, LoRAQuantLinear)]
    assert quantized and all(name.startswith("model.language_model.") for name in quantized)
    assert settings.processor is not None


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_the_same_path_drives_qwen2_5_vl_and_qwen3_vl(arch, tmp_path, pictures):
    model_dir = tiny.save_tiny_vlm(tmp_path / arch, arch=arch)
    tokenizer = load_tokenizer(model_dir)
    processor = load_processor(model_dir, tokenizer)
    model = load_model(model_dir)
    example = build_example({"query": "<image>colour?", "response": "red", "images": [pictures[1]]}, tokenizer=tokenizer,
                            template="qwen", processor=processor)
    batch = collate_images([example], tokenizer.pad_token_id, processor)
    summed, count = loss_sum(model, batch)
    torch.testing.assert_close(summed / count, model(**batch).loss, rtol=1e-5, atol=1e-6)
    ids, images = prompt_inputs(to_messages({"query": "<image>colour?", "response": "x", "images": [pictures[1]]})[:1],
                                tokenizer, "qwen", processor=processor)
    assert hf_greedy(model, tokenizer, ids, images, 4) == generate_batch(model, tokenizer, [ids], GenerationConfig(max_new_tokens=4),
                                                                          images=[images])[0]


# --- generation and use ------------------------------------------------------------------------------------------


def hf_greedy(model, tokenizer, ids, images, max_new_tokens) -> str:
    """transformers' own generate (the reference), cut at EOS, decoded."""
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values": torch.from_numpy(images["pixel_values"]),
              "image_grid_thw": torch.from_numpy(images["image_grid_thw"]),
              "mm_token_type_ids": torch.tensor([images["mm_token_type_ids"]])}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)[0, len(ids):].tolist()
    return tokenizer.decode(output[:output.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in output else output)


def test_batched_generation_with_images_equals_transformers_generate(vlm_dir, vision, pictures):
    tokenizer, processor = vision
    model = load_model(vlm_dir).eval()
    prompts = [prompt_inputs(to_messages({"query": query, "response": "x", "images": images})[:1], tokenizer, "qwen",
                             processor=processor)
               for query, images in [("<image>What colour is the square here?", [pictures[0]]),
                                     ("<image><image>Both?", pictures[1:]), ("No image at all.", [])]]
    ours = generate_batch(model, tokenizer, [ids for ids, _ in prompts], GenerationConfig(max_new_tokens=8),
                          images=[images for _, images in prompts])
    reference = [hf_greedy(model, tokenizer, ids, images, 8) for ids, images in prompts[:2]]
    assert ours[:2] == reference and all(ours)
    assert prompts[2][1] is None


def image_and_text_prompts(vision, picture):
    """(ids, images) of a prompt with one image, and of a longer one without."""
    tokenizer, processor = vision
    return [prompt_inputs(to_messages({"query": query, "response": "x", "images": images})[:1], tokenizer, "qwen",
                          processor=processor)
            for query, images in [("<image>What colour is the square?", [picture]),
                                  ("No image at all in this one, only a question that is longer than the other.", [])]]


def test_a_forked_row_with_an_image_goes_on_as_the_row_alone_would(vlm_dir, vision, pictures):
    """Scored tool calls fork a row's KV cache; with images its positions are the model's own [3, batch, length]
    ones, taken at the row's place in the batch."""
    from sftkit.generation import left_pad, _token_steps, image_inputs

    tokenizer, _ = vision
    model = load_model(vlm_dir).eval()
    (image_ids, images), (text_ids, _) = image_and_text_prompts(vision, pictures[1])
    batch, going_on, alone = Record(forks=[1, 1]), Record(), Record()
    padded = left_pad([text_ids, image_ids], tokenizer.pad_token_id, model.device)
    list(_token_steps(model, *padded, GenerationConfig(max_new_tokens=2), batch,
                      image_inputs([None, images], padded[0].shape[1], model.device)))
    list(_token_steps(model, *batch.forked[:2], GenerationConfig(max_new_tokens=4), going_on, start=batch.forked[2]))
    single = left_pad([image_ids], tokenizer.pad_token_id, model.device)
    list(_token_steps(model, *single, GenerationConfig(max_new_tokens=6), alone,
                      image_inputs([images], single[0].shape[1], model.device)))
    for step, logits in enumerate(going_on.logits):
        assert torch.allclose(logits, alone.logits[step + 2].expand_as(logits), atol=1e-4), step


def test_tool_calls_on_a_prompt_with_an_image_are_scored_as_whole_calls(vlm_dir, vision, pictures):
    from sftkit.constrained import ToolCallGuide
    from sftkit.tools import offered_tools

    tokenizer, _ = vision
    model = load_model(vlm_dir).eval()
    system = "Tools:\n" + "\n".join(f"{i}. " + json.dumps({"name": name, "parameters": params}) for i, (name, params) in enumerate(
        [("weather", [{"name": "city", "enum": ["Paris", "Oslo"], "required": True}]),
         ("book_table", [{"name": "people", "type": "integer", "minimum": 1, "maximum": 9, "required": True}])], 1))
    opener, closer = "<|startofthink|>", "<|endofthink|>"
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    liked = ids('{"api_name": "weather", "parameters": {"city": "Oslo"}}' + closer)
    pushed = Preferring(model, ids(opener), liked, ids('{"api_name": "book_table", "parameters": {"people": 2}}' + closer))
    pushed.model, pushed.base_model_prefix = model.model, "model"  # the model's own 3-D positions
    (image_ids, images), _ = image_and_text_prompts(vision, pictures[0])
    texts = {scored: generate_batch(pushed, tokenizer, [image_ids], GenerationConfig(max_new_tokens=60), stop_after=(closer,),
                                    images=[images], constraint=ToolCallGuide(tokenizer, "qwen", scored).constraint([offered_tools(system)]))[0]
             for scored in (False, True)}
    assert texts[False].startswith(opener + '{"api_name": "book_table"')
    assert texts[True] == opener + tokenizer.decode(liked)


def test_chat_takes_images_from_the_repl_and_from_the_command_line(vlm_dir, vision, pictures, tokenizer, tiny_model_dir):
    model_tokenizer, processor = vision
    model = load_model(vlm_dir).eval()
    output = io.StringIO()
    history = chat_repl(model, model_tokenizer, "qwen", None, GenerationConfig(max_new_tokens=4),
                        input=io.StringIO(f"/image nowhere.png\n/image {pictures[0]}\nWhat colour?\nAnd now?\n"),
                        output=output, processor=processor)
    assert "(no image added: no such image file 'nowhere.png'" in output.getvalue()
    assert history[0].content == "<image>What colour?" and history[0].images == (pictures[0],)
    assert history[2].images == () and len(history) == 4
    ids, images = prompt_inputs(history[:1], model_tokenizer, "qwen", processor=processor)
    assert history[1].content == hf_greedy(model, model_tokenizer, ids, images, 4)
    piped = CliRunner().invoke(main, ["chat", "--model", vlm_dir, "--template", "qwen", "--max_new_tokens", "4",
                                      "--images", pictures[0]], input="What colour?\n")
    assert piped.exit_code == 0, piped.output
    assert piped.stdout.strip() == history[1].content.strip()
    refused = CliRunner().invoke(main, ["chat", "--model", tiny_model_dir, "--images", pictures[0]], input="hi\n")
    assert refused.exit_code == 1 and "this model takes no images" in refused.output


def test_infer_eval_and_merge_on_an_image_dataset(lora_run, vlm_dir, vision, image_data, pictures, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    best, _ = lora_run
    rows = infer(InferConfig(ckpt_dir=best, dataset=(image_data,), max_new_tokens=4, output=str(tmp_path / "infer.jsonl")),
                 echo=lambda *a: None)
    assert len(rows) == 12 and rows[0]["images"] == [os.path.join(os.path.dirname(image_data), os.path.basename(pictures[0]))]
    report = evaluate_checkpoint(EvalConfig(ckpt_dir=best, max_new_tokens=4, output=str(tmp_path / "eval.json")))
    assert report["counts"]["examples"] == 3 and "rouge_l" in report["metrics"]
    merged = merge(MergeConfig(ckpt_dir=best, output_dir=str(tmp_path / "merged")))
    plain = AutoModelForImageTextToText.from_pretrained(merged)
    assert AutoImageProcessor.from_pretrained(merged).to_dict() == vision[1].image_processor.to_dict()
    adapted = load_model(vlm_dir)
    load_adapter(adapted, best)
    batch = image_batch(vlm_dir, vision, pictures)
    torch.testing.assert_close(model_logits(plain, batch), model_logits(adapted, batch), rtol=1e-4, atol=1e-5)


def test_the_qwen2_vl_family_is_registered_and_qwen_vl_v1_keeps_its_status():
    for model_type, template in [("qwen2-vl-2b-instruct", "qwen"), ("qwen2.5-vl-7b-instruct", "qwen"),
                                 ("qwen3-vl-4b-instruct", "chatml")]:
        assert MODELS[model_type].template == template and not MODELS[model_type].trust_remote_code
    assert MODELS["qwen2-vl-7b-instruct"].hf_model_id == "Qwen/Qwen2-VL-7B-Instruct"
    assert infer_model_type("/models/Qwen2-VL-2B-Instruct") is None  # not a folder here: matched by id only
    assert infer_model_type("Qwen/Qwen2.5-VL-3B-Instruct") == "qwen2.5-vl-3b-instruct"
    assert MODELS["qwen-vl-chat"].trust_remote_code


def test_preview_shows_each_image_as_its_tokens(vlm_dir, image_data):
    result = CliRunner().invoke(main, ["preview", "--tokenizer", vlm_dir, "--dataset", image_data, "--template", "qwen",
                                       "--num_examples", "1", "--color", "false"])
    assert result.exit_code == 0, result.output
    assert "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>What colour is the square?" in result.stdout
    assert "[[It is red.<|im_end|>]]" in result.stdout


def test_the_shapes_example_writes_deterministic_rows_and_a_model_that_takes_them(tmp_path):
    import subprocess
    import sys

    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "vision")
    for out in ("a", "b"):
        subprocess.run([sys.executable, os.path.join(example, "make_dataset.py"), "--train", "30", "--test", "6",
                        "--out", str(tmp_path / out)], check=True, capture_output=True)
    rows = (tmp_path / "a" / "train.jsonl").read_text()
    assert rows == (tmp_path / "b" / "train.jsonl").read_text()
    assert (tmp_path / "a" / "images" / "train-00000.png").read_bytes() == (tmp_path / "b" / "images" / "train-00000.png").read_bytes()
    conversations, _ = load_conversations([str(tmp_path / "a" / "train.jsonl")])
    assert len({conversation[-1].content for conversation in conversations}) == 30  # every caption once
    subprocess.run([sys.executable, os.path.join(example, "make_model.py"), "--out", str(tmp_path / "model")], check=True,
                   capture_output=True)
    tokenizer = load_tokenizer(str(tmp_path / "model"))
    processor = load_processor(str(tmp_path / "model"), tokenizer)
    example_row = build_example(conversations[0], tokenizer=tokenizer, template="qwen", processor=processor)
    assert example_row["image_tokens"] == [16]
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == \
        "".join(text for text, _ in render([Message("user", "hi")], "qwen"))
