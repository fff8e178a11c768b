"""Use a trained model: chat with it, answer a dataset with it, merge its adapter into its base.

Prompts are rendered with render() + encode() exactly as training built them (sftkit.prompts), and models
are loaded by sftkit.inference, so chat, infer, eval and merge see the same model the same way.
"""
from __future__ import annotations

import json
import os
import shutil
import sys

from .constrained import tool_call_guide
from .data.formats import IMAGE_TAG, Message
from .data.images import image_size, resolve_image
from .data.templates import get_template
from .evaluate import Throughput, generate_all
from .generation import GenerationConfig, generate_stream, generation_config, stop_criteria
from .checkpoint import check_files
from .errors import CheckpointError, SftkitError
from .inference import (base_model_dir, checkpoint_folder, dataset_conversations, is_adapter, load_for_inference,
                        output_path, require_full_weights, stored_dtype)
from .lora import load_adapter, unload_lora
from .model import DTYPES, copy_processor_files, load_model, load_tokenizer
from .prompts import prompt_inputs, prompt_text, reply_messages, response_text, split_last_turn, tool_call_end
from .run import read_run_args


# --- chat ---------------------------------------------------------------------------------------------------

IMAGE_COMMAND = "/image "


def chat_repl(model, tokenizer, template, system, gen_config: GenerationConfig, input=None, output=None,
              agent: bool = False, stream: bool = True, constrained: bool = True, processor=None, images=(),
              scored: bool = True, grounded: bool = False) -> list[Message]:
    """Multi-turn chat over text streams; returns the history when the input ends or says exit/quit.

    `clear` forgets the history. From a pipe, every line is one message and every reply one block on the
    output, with no prompt markers in between. In agent mode a reply that closes a tool call waits for
    the tool's result (the next line), which goes in as a tool message before the model continues the turn,
    and (with `constrained`) each call is restricted to the tools the system prompt offers (`scored`: the
    likeliest whole call among them, sftkit.constrained; `grounded`: values kept to what the conversation names).
    `/image PATH` adds an image to the next message (a vision-language model's `processor` takes it); `images` go
    with the first message.
    """
    input, output = input or sys.stdin, output or sys.stdout
    interactive = bool(getattr(input, "isatty", lambda: False)())
    template = get_template(template)
    stop_strings, stop_ids = stop_criteria(tokenizer, template)
    call_end = tool_call_end(template) if agent else ""
    stop_after = (call_end,) if call_end else ()
    guide = tool_call_guide(tokenizer, template, scored, grounded) if agent and constrained else None
    history: list[Message] = []
    pending = [_checked_image(image, processor) for image in images]
    while True:
        line = _read_line(input, output, "<<< " if interactive else "")
        if line is None or line.strip() in ("exit", "quit"):
            return history
        if line.strip() == "clear":
            history, pending = [], []
            if interactive:
                output.write("(history cleared)\n")
            continue
        if line.startswith(IMAGE_COMMAND):
            _add_image(line[len(IMAGE_COMMAND):].strip(), pending, processor, output, interactive)
            continue
        if not line.strip():
            continue
        turn, pending = [Message("user", IMAGE_TAG * len(pending) + line, tuple(pending))], []
        while True:
            ids, image_inputs = prompt_inputs(history + turn, tokenizer, template, system, processor)
            constraint = guide.for_conversations([history + turn], system) if guide else None
            pieces = generate_stream(model, tokenizer, ids, gen_config, stop_strings, stop_ids, stop_after=stop_after,
                                     constraint=constraint, images=image_inputs)
            text = _show(pieces, output, stream)
            turn += reply_messages(text)
            if not (call_end and text.endswith(call_end)):
                break
            result = _read_line(input, output, "tool result> " if interactive else "")
            if result is None:
                break
            turn.append(Message("tool", result))
            _show([template.tool_result.replace("{{CONTENT}}", result)], output, stream)
        if turn[-1].role == "user":
            turn.append(Message("assistant", ""))  # the model ended at once; keep the history alternating
        output.write("\n")
        output.flush()
        history += turn


def _add_image(reference: str, pending: list[str], processor, output, interactive: bool) -> None:
    """`/image PATH`: the image joins the next message, or the user is told why it cannot."""
    try:
        pending.append(_checked_image(reference, processor))
    except SftkitError as error:
        output.write(f"(no image added: {error})\n")
    else:
        if interactive:
            output.write(f"(image {len(pending)} goes with your next message)\n")


def _checked_image(reference: str, processor) -> str:
    """An image for the next message, resolved and opened now, so a bad path is reported before the model runs."""
    if processor is None:
        raise SftkitError("this model takes no images (a text model, or a vision-language model sftkit does not drive)")
    resolved = resolve_image(reference)
    image_size(resolved)
    return resolved


def _read_line(input, output, marker: str) -> str | None:
    """One line without its newline, or None at the end of the input."""
    if marker:
        output.write(marker)
        output.flush()
    line = input.readline()
    return line.rstrip("\r\n") if line else None


def _show(pieces, output, stream: bool) -> str:
    text = ""
    for piece in pieces:
        text += piece
        if stream:
            output.write(piece)
            output.flush()
    if not stream:
        output.write(text)
    return text


# --- commands ---------------------------------------------------------------------------------------------------


def infer(config, echo=print) -> list[dict]:
    """Generate an answer for every row of an InferConfig's dataset; writes {prompt, reference, prediction} JSONL."""
    model, tokenizer, settings = load_for_inference(config.ckpt_dir, config.model, template=config.template,
                                                    system=config.system, dtype=config.dtype,
                                                    trust_remote_code=config.trust_remote_code)
    conversations, _ = dataset_conversations(config, settings)
    cases = [split_last_turn(conversation) for conversation in conversations]
    prompts = [prompt_inputs(prompt, tokenizer, settings.template, settings.system, settings.processor) for prompt, _ in cases]
    guide = tool_call_guide(tokenizer, settings.template, config.score_tool_calls,
                            config.ground_tool_values) if config.constrained_tool_calls else None
    tools = [guide.tools_for(prompt, settings.system) for prompt, _ in cases] if guide else None
    progress = Throughput(len(prompts), desc="infer")
    predictions = generate_all(model, tokenizer, [ids for ids, _ in prompts], generation_config(config),
                               stop_criteria(tokenizer, get_template(settings.template)), config.batch_size,
                               guide=guide, tools=tools, images=[images for _, images in prompts], progress=progress)
    progress.close()
    rows = [{"prompt": prompt_text(prompt, tokenizer, settings.template, settings.system),
             "reference": response_text(reference, settings.template), "prediction": prediction}
            | ({"images": [image for message in prompt for image in message.images]} if prompt_images else {})
            for (prompt, reference), prediction, (_, prompt_images) in zip(cases, predictions, prompts)]
    path = output_path(config, settings, "infer_result.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    for index, row in enumerate(rows[: config.show_dataset_sample]):
        echo(f"--- {index} ---\n[PROMPT]{row['prompt']}\n[REFERENCE]{row['reference']}\n[PREDICTION]{row['prediction']}")
    echo(f"wrote {len(rows)} predictions to {path}")
    return rows


def merge(config) -> str:
    """Fold a MergeConfig's LoRA checkpoint into its base and save a plain transformers model; returns its folder.

    Merging happens in float32 on the CPU and rounds once to --dtype (auto: the base's dtype). The folder is written under a
    temporary name and renamed, so a crash never leaves a half model.
    """
    checkpoint = checkpoint_folder(config.ckpt_dir)
    check_files(checkpoint, resume=False)
    args = read_run_args(checkpoint)
    if not is_adapter(checkpoint):
        require_full_weights(checkpoint)
        raise CheckpointError(f"{checkpoint} holds full weights (sft_type {args.get('sft_type')}): nothing to merge")
    bits = args.get("quantization_bit")
    if bits in (4, 8) and not config.dequantize:
        raise CheckpointError(
            f"this run trained LoRA on a {bits}-bit quantized base. Merging into quantized weights loses quality "
            "(the update is rounded away), so the base must be reloaded in full precision. Pass --dequantize true "
            "to load the base unquantized and merge; the merged model then differs slightly from the quantized "
            "base + adapter you evaluated."
        )
    output_dir = config.output_dir or os.path.normpath(checkpoint) + "-merged"
    if os.path.exists(output_dir):
        raise CheckpointError(f"{output_dir} already exists: remove it or pass --output_dir")
    model_dir = base_model_dir(args)
    remote = config.trust_remote_code or bool(args.get("trust_remote_code"))  # consent now, or the run's
    model = load_model(model_dir, dtype="fp32", device="cpu", trust_remote_code=remote)
    load_adapter(model, checkpoint)
    unload_lora(model)
    model.to(stored_dtype(model_dir) if config.dtype == "auto" else DTYPES[config.dtype])
    staging = f"{output_dir}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    load_tokenizer(model_dir, trust_remote_code=remote).save_pretrained(staging)
    copy_processor_files(model_dir, staging)
    os.replace(staging, output_dir)
    return output_dir
