"""A trained checkpoint (or a base model) loaded ready to generate, with the run's template and system prompt.

chat, infer, eval, merge and the server all start here, so they prompt the model the way training did.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from .checkpoint import resolve_checkpoint
from .errors import CheckpointError
from .lora import CONFIG_NAME, load_adapter
from .model import DTYPES, load_model_and_tokenizer, resolve_model_dir
from .quant import QuantizationOptions
from .run import ARGS_FILE, BEST, read_run_args, val_file


@dataclass(frozen=True)
class InferenceSettings:
    """How a loaded model is prompted: the run's template and system prompt unless overridden."""

    template: str
    system: str | None
    dtype: str
    max_length: int | None
    model_dir: str
    ckpt_dir: str | None = None


def load_for_inference(ckpt_dir: str | None = None, model: str | None = None, *, template: str | None = None,
                       system: str | None = None, dtype: str | None = None, device=None):
    """(model, tokenizer, InferenceSettings) for a training checkpoint, a plain model, or neither.

    A LoRA checkpoint is loaded onto its run's base model (`model` overrides that base); a full one is the
    model. With neither, the embedded default SmolLM2-135M-Instruct is loaded with its own chat template,
    so `sftkit chat` works out of the box. Explicit template/system/dtype win over the run's.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir, checkpoint, args = model_source(ckpt_dir, model)
    settings_dtype = dtype or args.get("dtype") or "auto"
    adapter = checkpoint is not None and is_adapter(checkpoint)
    # A QLoRA run's adapter is used on the base quantized the same way, as it was trained.
    quantization = QuantizationOptions(
        bits=args.get("quantization_bit") or None, bnb_4bit_quant_type=args.get("bnb_4bit_quant_type", "nf4"),
        bnb_4bit_use_double_quant=args.get("bnb_4bit_use_double_quant", True),
        bnb_4bit_compute_dtype=args.get("bnb_4bit_comp_dtype", "auto")) if adapter else None
    loaded = load_model_and_tokenizer(model_dir, dtype=settings_dtype, device=device, quantization=quantization)
    if adapter:
        load_adapter(loaded.model, checkpoint)
    loaded.model.eval().requires_grad_(False)
    settings = InferenceSettings(
        template=template or args.get("template") or "auto",
        system=system if system is not None else args.get("system"),
        dtype=settings_dtype,
        max_length=args.get("max_length"),
        model_dir=model_dir,
        ckpt_dir=checkpoint,
    )
    return loaded.model, loaded.tokenizer, settings


def model_source(ckpt_dir: str | None, model: str | None) -> tuple[str, str | None, dict]:
    """(the folder whose weights load: a LoRA checkpoint's base or a full model, the checkpoint folder or None,
    the run's arguments): what every inference backend resolves the same way."""
    if ckpt_dir is None:
        return resolve_model_dir(model), None, {}
    checkpoint = checkpoint_folder(ckpt_dir)
    args = read_run_args(checkpoint)
    if not is_adapter(checkpoint):
        if model is not None:
            raise CheckpointError(f"{checkpoint} holds full weights; --model only names the base of a LoRA checkpoint")
        return checkpoint, checkpoint, args
    return (resolve_model_dir(model) if model is not None else base_model_dir(args)), checkpoint, args


def dataset_conversations(config, settings: InferenceSettings) -> tuple[list[list], list[str]]:
    """The rows infer and eval answer: the config's datasets, else the validation split the run saved."""
    from .data.loading import load_conversations

    specs = list(config.dataset)
    if not specs and settings.ckpt_dir is not None:
        saved = val_file(settings.ckpt_dir)
        specs = [saved] if saved else []
    if not specs:
        raise CheckpointError("no data: pass --dataset (the run saved no validation split)"
                              if settings.ckpt_dir else "no data: pass --dataset")
    conversations, _ = load_conversations(specs, strategy=config.check_dataset_strategy)
    return conversations, specs


def output_path(config, settings: InferenceSettings, name: str) -> str:
    """--output, else `name` in the checkpoint folder (else in the current folder)."""
    return config.output or (os.path.join(settings.ckpt_dir, name) if settings.ckpt_dir else name)


def checkpoint_folder(ckpt_dir: str) -> str:
    """A checkpoint-<step> folder as given, or a run folder's best checkpoint (else its latest)."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"--ckpt_dir {ckpt_dir!r} is not a folder")
    try:
        return resolve_checkpoint(ckpt_dir, BEST)
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


def saved_dtype(args: dict, model_dir: str) -> torch.dtype:
    """The dtype the run trained in, else the one the base was stored in."""
    if args.get("dtype") in DTYPES:
        return DTYPES[args["dtype"]]
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        stored = json.load(handle)
    return DTYPES.get(stored.get("dtype") or stored.get("torch_dtype"), torch.float32)
