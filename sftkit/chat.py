"""Use a trained model: load a checkpoint, chat with it, run it over a dataset, score it, merge its adapter.

Prompts are rendered with render() + encode() exactly as training built them, so the model sees at
inference the ids it was trained on.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from .checkpoint import resolve_checkpoint
from .constrained import tool_call_guide
from .data.formats import Message, split_agent_text
from .data.pipeline import encode
from .data.templates import Template, get_template, render
from .generation import GenerationConfig, generate_batch, generate_stream, generation_config, stop_criteria
from .lora import CONFIG_NAME, load_adapter, unload_lora
from .metrics import agent_metrics, call_errors, error_counts, rouge_l, text_metrics
from .model import DTYPES, load_model, load_tokenizer, resolve_model_dir
from .quant import QuantizationOptions
from .tools import conversation_tools

ARGS_FILE = "sft_args.json"
VAL_DATASET = "val_dataset.jsonl"
MODES = ("rouge", "agent")
WORST_SHOWN = 5


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked, with what to do instead."""


@dataclass(frozen=True)
class InferenceSettings:
    """How a loaded model is prompted: the run's template and system prompt unless overridden."""

    template: str
    system: str | None
    dtype: str
    max_length: int | None
    model_dir: str
    ckpt_dir: str | None = None


def read_run_args(ckpt_dir: str) -> dict:
    """The sft_args.json of the run a checkpoint-<step> folder belongs to (it lives in the folder's parent)."""
    run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    path = os.path.join(run_dir, ARGS_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"no {ARGS_FILE} in {run_dir}: --ckpt_dir must be a checkpoint-<step> folder inside a training run "
            "(or the run folder itself); for a plain model folder use --model"
        )
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_for_inference(ckpt_dir: str | None = None, model: str | None = None, *, template: str | None = None,
                       system: str | None = None, dtype: str | None = None, device=None):
    """(model, tokenizer, InferenceSettings) for a training checkpoint, a plain model, or neither.

    A LoRA checkpoint is loaded onto its run's base model (`model` overrides that base); a full one is the
    model. With neither, the embedded default SmolLM2-135M-Instruct is loaded with its own chat template,
    so `sftkit chat` works out of the box. Explicit template/system/dtype win over the run's.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    args, checkpoint = {}, None
    if ckpt_dir is not None:
        checkpoint = _checkpoint_folder(ckpt_dir)
        args = read_run_args(checkpoint)
    settings_dtype = dtype or args.get("dtype") or "auto"
    adapter = checkpoint is not None and is_adapter(checkpoint)
    if checkpoint is not None and not adapter:
        if model is not None:
            raise CheckpointError(f"{checkpoint} holds full weights; --model only names the base of a LoRA checkpoint")
        model_dir = checkpoint
    elif model is not None or checkpoint is None:
        model_dir = resolve_model_dir(model)
    else:
        model_dir = base_model_dir(args)
    # A QLoRA run's adapter is used on the base quantized the same way, as it was trained.
    quantization = QuantizationOptions(
        bits=args.get("quantization_bit") or None, bnb_4bit_quant_type=args.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=args.get("bnb_4bit_use_double_quant", True),
        bnb_4bit_compute_dtype=args.get("bnb_4bit_comp_dtype", "auto")) if adapter else None
    loaded = load_model(model_dir, dtype=settings_dtype, device=device, quantization=quantization)
    if adapter:
        load_adapter(loaded, checkpoint)
    loaded.eval().requires_grad_(False)
    settings = InferenceSettings(
        template=template or args.get("template") or "auto",
        system=system if system is not None else args.get("system"),
        dtype=settings_dtype,
        max_length=args.get("max_length"),
        model_dir=model_dir,
        ckpt_dir=checkpoint,
    )
    return loaded, load_tokenizer(model_dir), settings


def _checkpoint_folder(ckpt_dir: str) -> str:
    """A checkpoint-<step> folder as given, or a run folder's best checkpoint (else its latest)."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"--ckpt_dir {ckpt_dir!r} is not a folder")
    try:
        return resolve_checkpoint(ckpt_dir, "best")
    except FileNotFoundError:
        if os.path.isfile(os.path.join(ckpt_dir, ARGS_FILE)):
            raise CheckpointError(f"the run folder {ckpt_dir} holds no checkpoint yet") from None
        # A folder of another name (e.g. a merged copy) is used as is; read_run_args then checks its parent.
        return ckpt_dir


def is_adapter(checkpoint: str) -> bool:
    """Whether a checkpoint holds a LoRA adapter (else full weights): the files decide, so a merged copy loads too."""
    return os.path.isfile(os.path.join(checkpoint, CONFIG_NAME))


def base_model_dir(args: dict) -> str:
    """The run's base model folder; where it has moved, resolve what the user passed to training again."""
    recorded = args.get("model_dir")
    if recorded and os.path.isfile(os.path.join(recorded, "config.json")):
        return recorded
    return resolve_model_dir(args.get("model"))


# --- prompts ------------------------------------------------------------------------------------------------


def prompt_segments(messages: list[Message], tokenizer, template: "str | Template", system: str | None = None):
    """render() for generation: ends with the answer opener, or, after a tool result, where the answer goes on.

    render() closes a conversation that ends with a tool result with the template's end glue; the model
    never saw that glue mid-turn in training, so it is dropped.
    """
    template = get_template(template)
    segments = render(messages, template, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                      system=system, tokenizer=tokenizer)
    if messages[-1].role == "tool" and not template.use_tokenizer_template and segments and segments[-1][1] is None:
        segments = segments[:-1]
    return segments


def prompt_ids(messages: list[Message], tokenizer, template: "str | Template", system: str | None = None) -> list[int]:
    return encode(prompt_segments(messages, tokenizer, template, system), tokenizer).input_ids


def prompt_text(messages: list[Message], tokenizer, template: "str | Template", system: str | None = None) -> str:
    return "".join(text for text, _ in prompt_segments(messages, tokenizer, template, system))


def response_text(messages: list[Message], template: "str | Template") -> str:
    """An answer turn as one string with calls and results in the template's markers, as metrics parse it."""
    template = get_template(template)
    parts = []
    for message in messages:
        if message.role == "tool_call":
            parts.append(template.tool_call.replace("{{CONTENT}}", message.content))
        elif message.role == "tool":
            parts.append(template.tool_result.replace("{{CONTENT}}", message.content))
        else:
            parts.append(message.content)
    return "".join(parts)


def reply_messages(text: str) -> list[Message]:
    """Generated text as the turn's messages (text and tool calls), so the next prompt renders it as training did."""
    try:
        return split_agent_text(text)
    except ValueError:  # an unbalanced marker: keep the text as the model wrote it
        return [Message("assistant", text)] if text else []


def split_last_turn(conversation: list[Message]) -> tuple[list[Message], list[Message]]:
    """(the prompt: everything up to the last user message, the reference: the answer turn after it)."""
    last_user = max((i for i, message in enumerate(conversation) if message.role == "user"), default=None)
    if last_user is None or last_user == len(conversation) - 1:
        raise ValueError("the conversation has no answer after its last user message to compare with")
    return conversation[: last_user + 1], conversation[last_user + 1:]


def tool_call_end(template: "str | Template") -> str:
    """The marker that closes a tool call (<|endofthink|>): there the model waits for the tool's result."""
    return get_template(template).tool_call.partition("{{CONTENT}}")[2]


# --- chat ---------------------------------------------------------------------------------------------------


def chat_repl(model, tokenizer, template, system, gen_config: GenerationConfig, input=None, output=None,
              agent: bool = False, stream: bool = True, constrained: bool = True) -> list[Message]:
    """Multi-turn chat over text streams; returns the history when the input ends or says exit/quit.

    `clear` forgets the history. From a pipe, every line is one message and every reply one block on the
    output, with no prompt markers in between. In agent mode a reply that closes a tool call waits for
    the tool's result (the next line), which goes in as a tool message before the model continues the turn,
    and (with `constrained`) each call is restricted to the tools the system prompt offers.
    """
    input, output = input or sys.stdin, output or sys.stdout
    interactive = bool(getattr(input, "isatty", lambda: False)())
    template = get_template(template)
    stop_strings, stop_ids = stop_criteria(tokenizer, template)
    call_end = tool_call_end(template) if agent else ""
    stop_after = (call_end,) if call_end else ()
    guide = tool_call_guide(tokenizer, template) if agent and constrained else None
    history: list[Message] = []
    while True:
        line = _read_line(input, output, "<<< " if interactive else "")
        if line is None or line.strip() in ("exit", "quit"):
            return history
        if line.strip() == "clear":
            history = []
            if interactive:
                output.write("(history cleared)\n")
            continue
        if not line.strip():
            continue
        turn = [Message("user", line)]
        while True:
            ids = prompt_ids(history + turn, tokenizer, template, system)
            constraint = guide.for_conversations([history + turn], system) if guide else None
            pieces = generate_stream(model, tokenizer, ids, gen_config, stop_strings, stop_ids, stop_after=stop_after,
                                     constraint=constraint)
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


# --- generation over datasets -------------------------------------------------------------------------------


def generate_all(model, tokenizer, prompts: list[list[int]], gen_config: GenerationConfig, stops, batch_size: int = 8,
                 stop_after=(), guide=None, tools=None) -> list[str]:
    """generate_batch over any number of prompts, batch_size at a time; with a guide, prompt i's calls use tools[i]."""
    stop_strings, stop_ids = stops
    replies = []
    for start in range(0, len(prompts), batch_size):
        constraint = guide.constraint(tools[start:start + batch_size]) if guide is not None else None
        replies += generate_batch(model, tokenizer, prompts[start:start + batch_size], gen_config, stop_strings,
                                  stop_ids, stop_after=stop_after, constraint=constraint)
    return replies


def agent_replies(model, tokenizer, template, cases, gen_config: GenerationConfig, *, system=None, batch_size=8,
                  constrained: bool = True):
    """Answer each (prompt, reference turn) as a user of the agent would see it; returns (replies, results inserted).

    Generate until a tool call closes or the turn ends; after a call, insert the reference turn's next tool
    result and continue. Each continuation uses up one reference result, so an example generates at most
    (its reference results + 1) times. A reply holds its calls, the inserted results and the final answer.
    With `constrained`, calls are restricted to the tools each conversation offers.
    """
    template = get_template(template)
    stops, call_end = stop_criteria(tokenizer, template), tool_call_end(template)
    guide = tool_call_guide(tokenizer, template) if constrained else None
    tools = [conversation_tools(prompt, system) for prompt, _ in cases]
    results = [[message for message in reference if message.role == "tool"] for _, reference in cases]
    turns: list[list[Message]] = [[] for _ in cases]
    replies, used = [""] * len(cases), [0] * len(cases)
    active = list(range(len(cases)))
    while active:
        prompts = [prompt_ids(cases[i][0] + turns[i], tokenizer, template, system) for i in active]
        outputs = generate_all(model, tokenizer, prompts, gen_config, stops, batch_size, stop_after=(call_end,),
                               guide=guide, tools=[tools[i] for i in active])
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
                        batch_size: int = 8, constrained_tool_calls: bool = True) -> dict:
    """Generate an answer to each conversation's last user turn and score it against the reference answer.

    rouge: one generation, ROUGE-L and BLEU-4 over the whole answer. agent: calls (constrained to the offered
    tools unless constrained_tool_calls is false), inserted reference results and the final answer
    (agent_replies), scored with agent_metrics, plus each call error by kind with the worst examples of each.
    The report holds the metrics, counts, unparsed calls and the worst examples by ROUGE-L.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    template = get_template(template)
    cases = [split_last_turn(conversation) for conversation in conversations[:limit]]
    if not cases:
        raise ValueError("no conversations to evaluate")
    references = [response_text(reference, template) for _, reference in cases]
    inserted = 0
    if mode == "rouge":
        prompts = [prompt_ids(prompt, tokenizer, template, system) for prompt, _ in cases]
        predictions = generate_all(model, tokenizer, prompts, gen_config, stop_criteria(tokenizer, template), batch_size)
        metrics, unparsed = text_metrics(predictions, references), []
    else:
        predictions, inserted = agent_replies(model, tokenizer, template, cases, gen_config, system=system,
                                              batch_size=batch_size, constrained=constrained_tool_calls)
        metrics = agent_metrics([{"prediction": p, "reference": r} for p, r in zip(predictions, references)])
        unparsed = metrics.pop("unparsed")
    scores = [rouge_l(prediction, reference) for prediction, reference in zip(predictions, references)]
    worst = sorted(range(len(cases)), key=lambda i: scores[i])[:WORST_SHOWN]
    agent_part = {}
    if mode == "agent":
        offered = [{tool.name for tool in conversation_tools(prompt, system)} or None for prompt, _ in cases]
        errors = [call_errors(p, r, names) for p, r, names in zip(predictions, references, offered)]
        agent_part = {"constrained_tool_calls": constrained_tool_calls,
                      "errors": {"counts": error_counts(errors),
                                 "worst": _worst_by_kind(errors, scores, cases, predictions, references, tokenizer,
                                                         template, system)}}
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
        "worst": [{"index": i, "rouge_l": scores[i], "prompt": prompt_text(cases[i][0], tokenizer, template, system),
                   "reference": references[i], "prediction": predictions[i]} for i in worst],
    }


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


# --- commands -----------------------------------------------------------------------------------------------


def _load(config):
    return load_for_inference(config.ckpt_dir, config.model, template=config.template, system=config.system,
                              dtype=config.dtype)


def _conversations(config, settings: InferenceSettings) -> tuple[list[list[Message]], list[str]]:
    """The config's datasets, else the validation split the run saved."""
    from .data.loading import load_conversations

    specs = list(config.dataset)
    if not specs and settings.ckpt_dir is not None:
        saved = os.path.join(os.path.dirname(os.path.abspath(settings.ckpt_dir)), VAL_DATASET)
        specs = [saved] if os.path.isfile(saved) else []
    if not specs:
        raise CheckpointError("no data: pass --dataset (the run saved no val_dataset.jsonl)"
                              if settings.ckpt_dir else "no data: pass --dataset")
    conversations, _ = load_conversations(specs, strategy=config.check_dataset_strategy)
    return conversations, specs


def _output_path(config, settings: InferenceSettings, name: str) -> str:
    return config.output or (os.path.join(settings.ckpt_dir, name) if settings.ckpt_dir else name)


def infer(config, echo=print) -> list[dict]:
    """Generate an answer for every row of an InferConfig's dataset; writes {prompt, reference, prediction} JSONL."""
    model, tokenizer, settings = _load(config)
    conversations, _ = _conversations(config, settings)
    cases = [split_last_turn(conversation) for conversation in conversations]
    prompts = [prompt_ids(prompt, tokenizer, settings.template, settings.system) for prompt, _ in cases]
    guide = tool_call_guide(tokenizer, settings.template) if config.constrained_tool_calls else None
    tools = [conversation_tools(prompt, settings.system) for prompt, _ in cases]
    predictions = generate_all(model, tokenizer, prompts, generation_config(config),
                               stop_criteria(tokenizer, get_template(settings.template)), config.batch_size,
                               guide=guide, tools=tools)
    rows = [{"prompt": prompt_text(prompt, tokenizer, settings.template, settings.system),
             "reference": response_text(reference, settings.template), "prediction": prediction}
            for (prompt, reference), prediction in zip(cases, predictions)]
    path = _output_path(config, settings, "infer_result.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    for index, row in enumerate(rows[: config.show_dataset_sample]):
        echo(f"--- {index} ---\n[PROMPT]{row['prompt']}\n[REFERENCE]{row['reference']}\n[PREDICTION]{row['prediction']}")
    echo(f"wrote {len(rows)} predictions to {path}")
    return rows


def evaluate(config) -> dict:
    """Score an EvalConfig's model on its dataset; writes the JSON report to config.output and returns it."""
    model, tokenizer, settings = _load(config)
    conversations, specs = _conversations(config, settings)
    report = evaluate_generation(model, tokenizer, settings.template, conversations, mode=config.metrics,
                                 gen_config=generation_config(config), system=settings.system, limit=config.limit,
                                 batch_size=config.batch_size, constrained_tool_calls=config.constrained_tool_calls)
    report = {"ckpt_dir": settings.ckpt_dir, "model_dir": settings.model_dir, "dataset": specs, **report}
    path = _output_path(config, settings, "eval_report.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, ensure_ascii=False)
    return {**report, "output": path}


def merge(config) -> str:
    """Fold a MergeConfig's LoRA checkpoint into its base and save a plain transformers model; returns its folder.

    Merging happens in float32 on the CPU and rounds once to the run's dtype. The folder is written under a
    temporary name and renamed, so a crash never leaves a half model.
    """
    checkpoint = _checkpoint_folder(config.ckpt_dir)
    args = read_run_args(checkpoint)
    if not is_adapter(checkpoint):
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
    model = load_model(model_dir, dtype="fp32", device="cpu")
    load_adapter(model, checkpoint)
    unload_lora(model)
    model.to(_saved_dtype(args, model_dir))
    staging = f"{output_dir}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    load_tokenizer(model_dir).save_pretrained(staging)
    os.replace(staging, output_dir)
    return output_dir


def _saved_dtype(args: dict, model_dir: str) -> torch.dtype:
    """The dtype the run trained in, else the one the base was stored in."""
    if args.get("dtype") in DTYPES:
        return DTYPES[args["dtype"]]
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        stored = json.load(handle)
    return DTYPES.get(stored.get("dtype") or stored.get("torch_dtype"), torch.float32)

