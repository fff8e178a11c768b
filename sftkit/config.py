"""One frozen dataclass per command, and the loading that fills it: defaults < config file < flags.

Each field carries its help text and its ms-swift spellings in metadata; unknown keys are errors
with a close-match hint, and validation reports every problem at once.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import ClassVar

from .backend import SCHEDULES
from .deepspeed import QUANTIZED_ZERO3, deepspeed_stage
from .data.loading import STRATEGIES
from .data.pipeline import TRAIN_ON, TRUNCATION_SIDES
from .errors import SftkitError
from .fused import UPDATE_DTYPES
from .fsdp import parse_strategy
from .hub import STRATEGIES as HUB_STRATEGIES
from .metrics import AGENT_METRICS, GENERATION_METRICS, GENERATION_MODES, TEXT_METRICS
from .model import DTYPE_CHOICES, HUBS
from .paths import bundled
from .preference import DEFAULT_BETA, DPO_LOSS_TYPES, RLHF_TYPES, PreferenceSettings
from .quant import BITS, COMPUTE_DTYPES, OPTIMIZER_ALIASES, OPTIMIZERS, QUANT_TYPES

SFT_TYPES = ("lora", "full")
TUNER_BACKENDS = ("peft", "swift")
DDP_BACKENDS = ("nccl", "gloo", "mpi")
NO_LIMIT = {-1: None}
# ms-swift's check_dataset_strategy values: none (no check: a bad row stops the run) and discard (drop it).
SEED_STRATEGIES = {"none": "error", "discard": "skip"}
LOSS_SCALE_PRESETS = {"agent": {"tool_call": 2.0, "assistant": 1.0}}
CONSTRAINED_HELP = ("in agent mode (chat --agent, infer, eval --metrics agent, deploy requests with tools but not on "
                    "vllm), a tool call may only name a tool the conversation offers, with that tool's parameter names "
                    "and value types (false: free, to compare)")
SCORED_HELP = ("with constrained tool calls and several tools offered, write the best call to each tool and keep the "
               "one the model finds likeliest as a whole (false: the tool is picked token by token)")
GROUNDED_HELP = ("with constrained tool calls, a date parameter may only take a day the user's turns name (relative "
                 "days read against the system prompt's 'Today is YYYY-MM-DD') and a string parameter only a run of "
                 "their words, where they name any (true: for tools whose values are copied from the request)")
TRUE = ("true", "1", "yes", "on")
FALSE = ("false", "0", "no", "off")


class ConfigError(SftkitError, ValueError):
    """Every problem with a config, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def option(default, help: str, *, aliases: tuple[str, ...] = (), choices: tuple | None = None,
           value_aliases: dict | None = None):
    """A config field with its help text, extra CLI spellings and allowed values; value_aliases maps a value as
    ms-swift's scripts write it to sftkit's (max_length -1 -> None)."""
    factory = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(metadata={"help": help, "aliases": aliases, "choices": choices, "value_aliases": value_aliases or {}},
                 **factory)


@dataclass(frozen=True)
class DataOptions:
    """The fields every command that turns rows into examples shares (not a command itself)."""

    dataset: tuple[str, ...] = option((), "data: files, registered names, NAME=PATH (a registered name's preprocessing on a "
                                          "local copy), hf::ID or ms::ID (default: the bundled example)",
                                      aliases=("custom_train_dataset_path",))
    template: str | None = option(None, "chat template name, or 'auto' for the tokenizer's own chat_template "
                                        "(default: the model type's template, else auto)", aliases=("template_type",))
    system: str | None = option(None, "system prompt for rows that have none (default: the template's)")
    max_length: int | None = option(2048, "truncate examples to this many tokens (-1 or none: no limit)",
                                    value_aliases=NO_LIMIT)
    truncation_side: str = option("right", "which end truncation cuts", choices=TRUNCATION_SIDES)
    train_on: str = option("assistant", "which tokens train", choices=TRAIN_ON)
    check_dataset_strategy: str = option("error", "what a bad row does (ms-swift's none: error, discard: skip)",
                                         choices=STRATEGIES, value_aliases=SEED_STRATEGIES)

    def datasets(self) -> tuple[str, ...]:
        return self.dataset or (bundled("chat.jsonl"),)


@dataclass(frozen=True)
class PreviewConfig(DataOptions):
    """sftkit preview: show how rows become tokens and which of them train."""

    tokenizer: str | None = option(None, "tokenizer directory or hub id (default: the embedded SmolLM2-135M-Instruct)",
                                   aliases=("model", "model_id_or_path"))
    num_examples: int = option(2, "how many examples to print", aliases=("show_dataset_sample",))
    color: bool | None = option(None, "mark trainable tokens with color (default: when printing to a terminal)")

    def problems(self) -> list[str]:
        return [p for p in [_positive("num_examples", self.num_examples, zero_ok=True),
                            _positive("max_length", self.max_length), _template_problem(self.template)] if p]


@dataclass(frozen=True)
class TrainConfig(DataOptions):
    """sftkit train: fine-tune a causal LM with LoRA or full parameters (ms-swift sft spellings accepted)."""

    command: ClassVar[str] = "train"  # the CLI command that runs (and resumes) this config
    # model and data
    model: str | None = option(None, "local model dir or hub id (default: the embedded SmolLM2-135M-Instruct)",
                               aliases=("model_id_or_path",))
    model_type: str | None = option(None, "a registered model type (sftkit list models); not together with --model")
    trust_remote_code: bool = option(False, "allow models whose repository ships Python code")
    use_flash_attn: bool | None = option(None, "flash-attention 2 when installed and on CUDA (default: when usable), else SDPA")
    hub: str = option("modelscope", "where hub ids download from", choices=tuple(HUBS))
    model_revision: str | None = option(None, "hub revision of the model")
    model_cache_dir: str | None = option(None, "where hub downloads go")
    val_dataset: tuple[str, ...] = option((), "validation data (default: dataset_test_ratio of the training data)",
                                          aliases=("custom_val_dataset_path",))
    dataset_test_ratio: float = option(0.01, "share of the training data held out for validation when no val_dataset")
    train_dataset_sample: int = option(-1, "use this many training rows after the split (-1: all)")
    dataset_seed: int | None = option(None, "seed of the validation split and of row sampling (default: seed)")
    loss_scale: str | None = option(None, "per-segment loss weights: 'agent' (tool calls 2, answers 1) or JSON such as "
                                          "'{\"tool_call\": 2, \"assistant\": 1}'; tool results always weigh 0")
    # method
    sft_type: str = option("lora", "LoRA adapters or all parameters", choices=SFT_TYPES)
    tuner_backend: str = option("peft", "ms-swift's choice of LoRA code; sftkit has one, which writes peft-format "
                                        "adapters, so both train the same", choices=TUNER_BACKENDS)
    lora_rank: int = option(8, "LoRA rank r")
    lora_alpha: float = option(32, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = option(0.05, "dropout on the LoRA input", aliases=("lora_dropout_p",))
    lora_target_modules: tuple[str, ...] = option(("all-linear",), "module names, a regex, all-linear (ALL), "
                                                                   "or DEFAULT (the model type's own targets)")
    use_rslora: bool = option(False, "scale by alpha / sqrt(r)")
    freeze_vit: bool = option(True, "vision-language models: keep the vision tower and projector frozen (no LoRA on them, "
                                    "not trained in full fine-tuning); false trains them too")
    quantization_bit: int = option(0, "load the base in 4 or 8 bits through bitsandbytes (QLoRA); 0: off", choices=(0,) + BITS)
    bnb_4bit_quant_type: str = option("nf4", "4-bit data type", choices=QUANT_TYPES)
    bnb_4bit_use_double_quant: bool = option(True, "quantize the 4-bit scales too")
    bnb_4bit_comp_dtype: str = option("auto", "4-bit compute dtype (auto: the training dtype)",
                                      choices=("auto",) + tuple(COMPUTE_DTYPES))
    optim: str = option("adamw", "optimizer: torch AdamW or bitsandbytes 8-bit AdamW",
                        choices=OPTIMIZERS + tuple(OPTIMIZER_ALIASES))
    deepspeed: str | None = option(None, "DeepSpeed config: zero2, zero3, zero2_offload, zero3_offload or a JSON path")
    ddp_backend: str | None = option(None, "process-group backend under torchrun (default: nccl on CUDA, gloo on CPU)",
                                     choices=DDP_BACKENDS)
    fsdp: str | None = option(None, "shard parameters, gradients and optimizer state over the ranks with PyTorch FSDP2, "
                                    "one unit per decoder layer: full_shard, or shard_grad_op (layers stay gathered until "
                                    "backward), plus offload for CPU memory; ms-swift's 'full_shard auto_wrap' works")
    dataset_cache: bool = option(True, "reuse tokenized data from the sftkit cache when data, template and tokenizer are unchanged")
    packing: bool = option(False, "pack examples into rows of max_length tokens with no padding (attention stays per example)")
    group_by_length: bool = option(False, "batch examples of similar length together (less padding; the alternative to packing)")
    max_forward_tokens: int = option(-1, "split each micro-batch into forward passes of whole examples holding at most this "
                                         "many tokens, the gradient unchanged (on CPU smaller activations run faster and "
                                         "lighter); -1: 1024 on CPU in one process, no split elsewhere; 0: never")
    padding_free: bool = option(True, "run each micro-batch as its examples one after another in a single row, with no "
                                      "padding (same batches, same loss; attention stays per example); needs varlen "
                                      "attention, else rows are padded to the batch's longest")
    # optimisation
    batch_size: int = option(1, "examples per micro-batch", aliases=("per_device_train_batch_size",))
    eval_batch_size: int = option(1, "examples per evaluation batch", aliases=("per_device_eval_batch_size",))
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    num_train_epochs: float = option(1, "passes over the training data")
    max_steps: int = option(-1, "stop after this many optimizer steps (-1: from the epochs)")
    learning_rate: float | None = option(None, "peak learning rate (default: 1e-4 for lora, 2e-5 for full)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    lr_scheduler_type: str = option("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup_ratio: float = option(0.05, "share of the steps spent warming up linearly")
    dtype: str = option("auto", "auto (fp32 on CPU, bf16 on capable GPUs), bf16, fp16 or fp32", aliases=("torch_dtype",),
                        choices=DTYPE_CHOICES)
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    max_memory: str | None = option("auto", "memory budget such as 24GB: when the estimated peak of a micro-batch exceeds it, "
                                            "recompute the cheapest layer parts (MLP, attention or whole layers) that make "
                                            "it fit (auto: the device's memory; none: never)")
    varlen_attention: bool = option(True, "attention without a T x T mask: padded batches run the causal kernel, packed "
                                          "rows attend within each document (false: transformers' masked SDPA)")
    fused_lora: bool | None = option(None, "run each LoRA layer as one fused autograd function: fewer kernels, its input "
                                           "saved once (default: on CUDA; LoRA on quantized bases stays eager)")
    lora_update_dtype: str = option("compute", "dtype of the fused LoRA update: compute (bf16 under autocast; the float32 "
                                               "adapters are the master copies) or fp32 (float32 accumulation)",
                                    choices=UPDATE_DTYPES)
    fused_loss: bool | None = option(None, "head and cross-entropy with the gradient computed chunk by chunk in forward, "
                                           "so no logits are kept for backward (default: on CUDA)")
    torch_compile: bool = option(False, "compile one decoder layer and reuse it for every layer (dynamic shapes, widths "
                                        "padded to a multiple of 64); the first steps pay the compile")
    cuda_graphs: bool = option(False, "with torch_compile: static shapes (every batch max_length wide, documents padded "
                                      "to a fixed count) replayed as CUDA graphs")
    seed: int = option(42, "seed for data order, splits and initialisation")
    device: str | None = option(None, "cpu, cuda or cuda:N (default: cuda when available)")
    devices: tuple[str, ...] = option((), "spread the model's layers over these devices, e.g. cpu,cuda:0 "
                                          "(pipeline-style model parallel; with several ranks each takes its share of the GPUs)")
    # evaluation, checkpoints, logs
    eval_steps: int = option(50, "evaluate every this many optimizer steps")
    metric_for_best_model: str = option("loss", "what picks the best checkpoint: loss, ppl, or a generation metric "
                                                "(rouge-l, bleu-4, tool_name_acc, args_exact_match, args_f1, answer_rouge_l)",
                                        choices=("loss", "ppl") + GENERATION_METRICS)
    metric_rule_for_best_model: str | None = option(None, "min or max (default: min for loss/ppl, max otherwise)",
                                                    choices=("min", "max"))
    predict_with_generate: bool = option(False, "also evaluate by generating answers (ROUGE-L/BLEU-4, or agent metrics)")
    eval_generation_mode: str = option("rouge", "generation evaluation: rouge (text) or agent (tool calls)", choices=GENERATION_MODES)
    eval_generation_limit: int = option(50, "validation conversations to generate for at each evaluation")
    eval_max_new_tokens: int = option(256, "longest generated answer during evaluation")
    constrained_tool_calls: bool = option(True, CONSTRAINED_HELP + " (with eval_generation_mode agent)")
    score_tool_calls: bool = option(True, SCORED_HELP)
    ground_tool_values: bool = option(False, GROUNDED_HELP)
    save_steps: int | None = option(None, "save every this many steps (default: eval_steps)")
    save_total_limit: int = option(2, "keep at most this many checkpoints besides the best")
    only_save_model: bool = option(False, "checkpoints hold only weights (no optimizer state: cannot resume)")
    logging_steps: int = option(5, "log every this many steps")
    dataloader_num_workers: int = option(0, "worker processes that collate batches")
    output_dir: str = option("output", "where runs are written")
    add_output_dir_suffix: bool = option(True, "write into <output_dir>/<model_type>/v<N>-<timestamp>/")
    resume_from_checkpoint: str | None = option(None, "a checkpoint-<step> folder (or run folder) to continue from")
    ignore_args_mismatch: bool = option(False, "resume even though options that define the run (data, seed, batch size, "
                                               "learning rate, ...) differ from the checkpoint's (recorded in the run folder)")
    trust_checkpoint: bool = option(False, "resume DeepSpeed state that this user's sftkit did not sign: DeepSpeed "
                                           "unpickles it, which can run code, so only for checkpoints you trust")
    logging_dir: str | None = option(None, "TensorBoard folder (default: <run dir>/runs)")
    push_to_hub: bool = option(False, "upload checkpoints / the final model to the ModelScope hub")
    hub_model_id: str | None = option(None, "ModelScope repository to push to, e.g. me/my-model")
    hub_private_repo: bool = option(False, "create the hub repository as private")
    push_hub_strategy: str = option("push_best", "what to push when", choices=HUB_STRATEGIES)
    hub_token: str | None = option(None, "ModelScope token (default: $MODELSCOPE_API_TOKEN)")

    def run_arguments(self, model_dir: str) -> dict:
        """What the run folder's sft_args.json records: the resolved config, the base folder, no secrets."""
        return {**config_dict(self), "model_dir": os.path.abspath(model_dir), "learning_rate": self.lr, "hub_token": None}

    def problems(self) -> list[str]:
        checks = [_positive(name, getattr(self, name)) for name in
                  ("lora_rank", "batch_size", "eval_batch_size", "gradient_accumulation_steps", "eval_steps",
                   "logging_steps", "max_length", "save_steps")]
        checks += [_positive("num_train_epochs", self.num_train_epochs), _positive("lora_alpha", self.lora_alpha),
                   _template_problem(self.template), _device_problem(self.device),
                   _positive("save_total_limit", self.save_total_limit, zero_ok=True),
                   _positive("dataloader_num_workers", self.dataloader_num_workers, zero_ok=True)]
        if not 0 <= self.dataset_test_ratio < 1:
            checks.append(f"dataset_test_ratio must be in [0, 1), got {self.dataset_test_ratio}")
        if not 0 <= self.warmup_ratio < 1:
            checks.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            checks.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            checks.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            checks.append(f"max_steps must be > 0 or -1, got {self.max_steps}")
        if self.max_forward_tokens < -1:
            checks.append(f"max_forward_tokens must be > 0, 0 (never split) or -1 (auto), got {self.max_forward_tokens}")
        if self.max_forward_tokens > 0 and (self.deepspeed or self.fsdp):
            checks.append("max_forward_tokens does not combine with deepspeed or fsdp: their engines gather and count per "
                          "forward pass, so every rank must run the same number")
        try:
            loss_scale_weights(self.loss_scale)
        except ValueError as error:
            checks.append(str(error))
        from .memory import parse_memory

        try:
            parse_memory(self.max_memory)
        except ValueError as error:
            checks.append(str(error))
        if self.sft_type == "full" and self.quantization_bit:
            checks.append("quantization_bit needs sft_type lora: 4/8-bit weights cannot be trained, only adapters on them")
        if self.deepspeed and (self.fused_lora or self.fused_loss):
            checks.append("fused_lora and fused_loss do not combine with deepspeed: ZeRO-3 gathers a weight only around "
                          "its module's own forward, and the fused paths read weights outside it")
        if self.cuda_graphs and not self.torch_compile:
            checks.append("cuda_graphs needs torch_compile true: the graphs are captured by the compiled layers")
        checks += self.fsdp_problems()
        if self.deepspeed and self.devices:
            checks.append("deepspeed and model parallel (--devices) do not combine: DeepSpeed shards the model itself")
        if self.deepspeed and self.quantization_bit and deepspeed_stage(self.deepspeed) >= 3:
            checks.append(QUANTIZED_ZERO3)
        if self.model and self.model_type:
            checks.append("give --model_type or --model (--model_id_or_path), not both: a model type names its own weights")
        if self.push_to_hub and not self.hub_model_id:
            checks.append("push_to_hub needs hub_model_id")
        if self.metric_for_best_model in AGENT_METRICS and self.eval_generation_mode != "agent":
            checks.append(f"metric_for_best_model {self.metric_for_best_model} needs eval_generation_mode agent")
        if self.metric_for_best_model in TEXT_METRICS and self.eval_generation_mode != "rouge":
            checks.append(f"metric_for_best_model {self.metric_for_best_model} needs eval_generation_mode rouge")
        return [check for check in checks if check]

    def fsdp_problems(self) -> list[str]:
        if not self.fsdp:
            return []
        try:
            parse_strategy(self.fsdp)
        except ValueError as error:
            return [str(error)]
        clashes = {"deepspeed": "DeepSpeed shards the model itself", "devices": "--devices places whole layers, FSDP shards them",
                   "quantization_bit": "4/8-bit weights are not sharded (use DDP for QLoRA)"}
        problems = [f"fsdp and {name} do not combine: {why}" for name, why in clashes.items() if getattr(self, name)]
        if OPTIMIZER_ALIASES.get(self.optim, self.optim) != "adamw":
            problems.append("fsdp steps torch's AdamW on the shards: use --optim adamw")
        if self.dtype == "fp16":
            problems.append("fsdp trains in bf16 or fp32 (fp16 would need a loss scaler agreeing across shards)")
        return problems

    @property
    def generates(self) -> bool:
        """Whether evaluation generates answers (asked for, or needed by the best-model metric)."""
        return self.predict_with_generate or self.metric_for_best_model in GENERATION_METRICS

    @property
    def best_is_max(self) -> bool:
        rule = self.metric_rule_for_best_model or ("min" if self.metric_for_best_model in ("loss", "ppl") else "max")
        return rule == "max"

    @property
    def lr(self) -> float:
        return self.learning_rate or (1e-4 if self.sft_type == "lora" else 2e-5)

    @property
    def data_seed(self) -> int:
        """The seed of the validation split and row sampling."""
        return self.seed if self.dataset_seed is None else self.dataset_seed



PREFERENCE_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen")
# Which preference methods each method-specific option applies to; set for another one, it is an error.
PREFERENCE_OPTIONS = {"loss_type": ("dpo",), "rpo_alpha": ("dpo",), "cpo_alpha": ("cpo", "simpo"), "simpo_gamma": ("simpo",),
                      "label_smoothing": ("dpo", "cpo", "simpo"), "desirable_weight": ("kto",),
                      "undesirable_weight": ("kto",), "precompute_ref_log_probs": ("dpo", "kto")}


@dataclass(frozen=True)
class RLHFConfig(TrainConfig):
    """sftkit rlhf: preference training (DPO, ORPO, SimPO, CPO, KTO) in the loop of sftkit train, with all its options."""

    command: ClassVar[str] = "rlhf"

    rlhf_type: str = option("dpo", "dpo (with a reference), or the reference-free orpo, simpo, cpo; kto for labelled "
                                   "single answers", choices=RLHF_TYPES)
    beta: float | None = option(None, "the loss's beta: DPO/KTO's KL strength, ORPO's lambda, SimPO/CPO's reward scale "
                                      "(default: 2.0 for simpo, 0.1 otherwise)")
    loss_type: str = option("sigmoid", "DPO's loss: sigmoid, ipo, hinge or robust", choices=DPO_LOSS_TYPES)
    label_smoothing: float = option(0.0, "assumed share of pairs with flipped labels (dpo sigmoid/robust, cpo, simpo)")
    rpo_alpha: float = option(0.0, "weight of the chosen answer's per-token NLL added to DPO (RPO); 0: off")
    cpo_alpha: float = option(1.0, "weight of the chosen answer's per-token NLL in CPO and SimPO (0: pure SimPO)")
    simpo_gamma: float = option(1.0, "SimPO's target reward margin gamma")
    desirable_weight: float = option(1.0, "KTO's weight of desirable answers (lambda_D)")
    undesirable_weight: float = option(1.0, "KTO's weight of undesirable answers (lambda_U)")
    precompute_ref_log_probs: bool = option(False, "score every example with the reference once before training instead of "
                                                   "in every step (dpo, kto)")
    train_on: str = option("last", "preference losses score the last answer turn", choices=("last",))
    metric_for_best_model: str = option("loss", "what picks the best checkpoint: loss, rewards/accuracies, rewards/margins, "
                                                "rewards/chosen, or a generation metric against the chosen answer",
                                        choices=("loss",) + PREFERENCE_METRICS + GENERATION_METRICS)

    def problems(self) -> list[str]:
        checks = super().problems()
        defaults = {item.name: item.default for item in dataclasses.fields(RLHFConfig)}
        for name, methods in PREFERENCE_OPTIONS.items():
            if getattr(self, name) != defaults[name] and self.rlhf_type not in methods:
                checks.append(f"{name} applies to rlhf_type {' and '.join(methods)}, not {self.rlhf_type}")
        if self.rlhf_type == "dpo" and self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            checks.append(f"label_smoothing applies to the sigmoid and robust DPO losses, not {self.loss_type}")
        if not 0 <= self.label_smoothing < 0.5:
            checks.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.beta is not None and self.beta <= 0:
            checks.append(f"beta must be > 0, got {self.beta}")
        checks += [f"{name} must be >= 0, got {getattr(self, name)}" for name in
                   ("rpo_alpha", "cpo_alpha", "desirable_weight", "undesirable_weight") if getattr(self, name) < 0]
        if self.packing:
            checks.append("packing does not apply to preference training: a pair's two answers are scored side by side")
        if self.rlhf_type == "kto" and self.max_forward_tokens > 0:
            checks.append("max_forward_tokens does not apply to kto: its KL baseline is taken over each micro-batch, "
                          "which a split would change")
        if self.loss_scale:
            checks.append("loss_scale does not apply to preference training: the losses compare whole answers")
        if self.rlhf_type == "kto" and self.generates:
            checks.append("generation metrics need a chosen answer as reference; KTO rows may hold an undesirable one")
        return checks

    def preference_settings(self) -> PreferenceSettings:
        return PreferenceSettings(rlhf_type=self.rlhf_type, beta=self.resolved_beta, loss_type=self.loss_type,
                                  label_smoothing=self.label_smoothing, rpo_alpha=self.rpo_alpha, cpo_alpha=self.cpo_alpha,
                                  simpo_gamma=self.simpo_gamma, desirable_weight=self.desirable_weight,
                                  undesirable_weight=self.undesirable_weight)

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA[self.rlhf_type]

    def run_arguments(self, model_dir: str) -> dict:
        return {**super().run_arguments(model_dir), "beta": self.resolved_beta}


def loss_scale_weights(value: str | None) -> dict[str, float] | None:
    """--loss_scale -> weights by segment role; None when unset. Tool results are never weighted in."""
    if value is None:
        return None
    if value in LOSS_SCALE_PRESETS:
        return dict(LOSS_SCALE_PRESETS[value])
    try:
        weights = json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f"loss_scale must be {' or '.join(LOSS_SCALE_PRESETS)} or a JSON object, got '{value}'") from None
    if not isinstance(weights, dict) or not set(weights) <= {"assistant", "tool_call"} or \
            not all(isinstance(w, (int, float)) and w >= 0 for w in weights.values()):
        raise ValueError(f"loss_scale keys must be assistant and/or tool_call with weights >= 0, got '{value}'")
    return {role: float(weight) for role, weight in weights.items()}


def _positive(name: str, value, zero_ok: bool = False) -> str | None:
    if value is None or value > 0 or (zero_ok and value == 0):
        return None
    return f"{name} must be {'>= 0' if zero_ok else '> 0'}, got {value}"


def _template_problem(name: str | None) -> str | None:
    from .data.templates import TEMPLATES

    if name in (None, "auto") or name in TEMPLATES:
        return None
    close = difflib.get_close_matches(name, TEMPLATES, n=3)
    return f"template '{name}' is unknown" + (f"; did you mean {', '.join(close)}?" if close else " (sftkit list templates)")


def _device_problem(device: str | None) -> str | None:
    import torch

    try:
        torch.device(device or "cpu")
    except RuntimeError:
        return f"device must be cpu, cuda or cuda:N, got '{device}'"
    return None


def config_fields(cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls))


def spellings(cls) -> dict[str, str]:
    """Every accepted key spelling (underscores, dashes, ms-swift aliases) -> field name."""
    names = {}
    for item in config_fields(cls):
        for spelling in (item.name,) + tuple(item.metadata.get("aliases", ())):
            names[spelling] = item.name
            names[spelling.replace("_", "-")] = item.name
    return names


def read_config_file(path: str) -> dict:
    """A flat mapping from a .yaml/.yml/.json file."""
    if not os.path.isfile(path):
        raise ConfigError([f"config file '{path}' does not exist"])
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
    except Exception as error:  # yaml and json raise different types; both mean a broken file
        raise ConfigError([f"config file '{path}' does not parse: {error}"]) from None
    if not isinstance(values, dict):
        raise ConfigError([f"config file '{path}' must hold a mapping of option names to values"])
    return values


def build_config(cls, file: str | None = None, overrides: dict | None = None):
    """defaults < file < overrides; every unknown key and bad value reported together."""
    names, problems, values = spellings(cls), [], {}
    sources = ([(read_config_file(file), f"config file '{file}'")] if file else []) + [(overrides or {}, "flags")]
    for mapping, origin in sources:
        for key, value in mapping.items():
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                problems.append(f"unknown option '{key}' in {origin}" + (f"; did you mean '{close[0]}'?" if close else ""))
                continue
            values[names[key]] = value
    hints = typing.get_type_hints(cls)
    by_name = {item.name: item for item in config_fields(cls)}
    converted = {}
    for name, value in values.items():
        try:
            converted[name] = coerce(value, hints[name])
        except ValueError as error:
            problems.append(f"{name}: {error}")
            continue
        converted[name] = _unalias(converted[name], by_name[name].metadata.get("value_aliases") or {})
        choices = by_name[name].metadata.get("choices")
        if choices and converted[name] not in choices and converted[name] is not None:
            problems.append(f"{name} must be one of {', '.join(map(str, choices))}, got '{converted.pop(name)}'")
    # Build with the values that did convert, so semantic problems are reported alongside the rest.
    config = cls(**converted)
    problems += config.problems()
    if problems:
        raise ConfigError(problems)
    return config


def _unalias(value, aliases: dict):
    """A value as ms-swift spells it, in sftkit's terms (unhashable values have no alias)."""
    try:
        return aliases.get(value, value)
    except TypeError:
        return value


def coerce(value, kind):
    """Turn a file or command-line value into the field's type (strings from the CLI, anything from files)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, next(arg for arg in args if arg is not type(None)))
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in TRUE + FALSE:
            return str(value).lower() in TRUE
        raise ValueError(f"expected true or false, got '{value}'")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got '{value}'") from None
        if kind is int:
            if not number.is_integer():
                raise ValueError(f"expected an integer, got '{value}'")
            return int(number)
        return number
    if origin is tuple:
        items = [value] if isinstance(value, str) else list(value)
        parts = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
        return tuple(coerce(part, args[0]) for part in parts)
    if origin is dict or kind is dict:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            raise ValueError(f"expected a JSON object, got '{value}'") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"expected a JSON object, got '{value}'")
        return parsed
    return value if isinstance(value, str) else str(value)


def config_dict(config) -> dict:
    """The resolved config as plain JSON-able data (written into the run directory)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in dataclasses.asdict(config).items()}


@dataclass(frozen=True)
class GenerateOptions:
    """The fields every command that generates shares: which model, how to prompt it, how to pick tokens.

    Not a command: ChatConfig, InferConfig and EvalConfig extend it, each staying one flat dataclass.
    """

    ckpt_dir: str | None = option(None, "a checkpoint-<step> folder of a training run, or the run folder (its best checkpoint)")
    model: str | None = option(None, "model dir or hub id; with --ckpt_dir, the base a LoRA checkpoint goes on "
                               "(default: the run's base, else the embedded SmolLM2-135M-Instruct)",
                               aliases=("model_id_or_path",))
    template: str | None = option(None, "chat template name or 'auto' (default: the run's, else 'auto')",
                                  aliases=("template_type",))
    system: str | None = option(None, "system prompt (default: the run's, else the template's)")
    dtype: str | None = option(None, "auto, bf16, fp16 or fp32 (default: the run's, else auto)", aliases=("torch_dtype",),
                               choices=DTYPE_CHOICES)
    trust_remote_code: bool = option(False, "allow a model whose repository ships Python code (a run trained with "
                                            "--trust_remote_code true allows its base already)")
    max_new_tokens: int = option(512, "most tokens generated per reply")
    do_sample: bool = option(False, "sample the next token instead of taking the most likely one")
    temperature: float = option(1.0, "sampling temperature (with do_sample)")
    top_k: int | None = option(None, "sample among the k most likely tokens (none or 0: all)")
    top_p: float = option(1.0, "sample among the fewest tokens holding this much probability")
    repetition_penalty: float = option(1.0, "scale down tokens already in the prompt or reply (1: off)")
    seed: int | None = option(None, "seed for sampling, so a sampled run can be repeated")
    constrained_tool_calls: bool = option(True, CONSTRAINED_HELP)
    score_tool_calls: bool = option(True, SCORED_HELP)
    ground_tool_values: bool = option(False, GROUNDED_HELP)
    trust_remote_code: bool = option(False, "allow a base model whose repository ships Python code")

    def problems(self) -> list[str]:
        from .generation import generation_problems

        return generation_problems(self) + [p for p in [_template_problem(self.template)] if p]


@dataclass(frozen=True)
class ChatConfig(GenerateOptions):
    """sftkit chat: talk to a model, or pipe one message per line through it."""

    agent: bool = option(False, "after a tool call, read the tool's result (next line) and let the model continue")
    images: tuple[str, ...] = option((), "images (paths, URLs or base64) for the first message, e.g. with piped input; "
                                         "in the REPL, '/image PATH' adds one to the next message")
    stream: bool = option(True, "print replies token by token")


@dataclass(frozen=True)
class DatasetGenerateOptions(GenerateOptions):
    """The fields infer and eval share: which rows to answer, how many at once, where the results go."""

    dataset: tuple[str, ...] = option((), "data to answer (default: the run's saved validation split)",
                                      aliases=("val_dataset", "custom_val_dataset_path"))
    max_new_tokens: int = option(256, "most tokens generated per answer (a bound, so one runaway row cannot take minutes)")
    output: str | None = option(None, "where results go (default: <checkpoint>/infer_result.jsonl, or eval_report.json for eval)")
    batch_size: int = option(8, "prompts generated together", aliases=("eval_batch_size", "per_device_eval_batch_size"))
    check_dataset_strategy: str = option("error", "what a bad row does (ms-swift's none: error, discard: skip)",
                                         choices=STRATEGIES, value_aliases=SEED_STRATEGIES)

    def problems(self) -> list[str]:
        return super().problems() + [p for p in [_positive("batch_size", self.batch_size)] if p]


@dataclass(frozen=True)
class InferConfig(DatasetGenerateOptions):
    """sftkit infer: answer every row of a dataset and write {prompt, reference, prediction} lines."""

    show_dataset_sample: int = option(10, "how many results to print")

    def problems(self) -> list[str]:
        return super().problems() + [p for p in [_positive("show_dataset_sample", self.show_dataset_sample, zero_ok=True)] if p]


@dataclass(frozen=True)
class EvalConfig(DatasetGenerateOptions):
    """sftkit eval: generate answers and score them (ROUGE-L/BLEU-4, or tool calls for agents)."""

    metrics: str = option("rouge", "rouge: ROUGE-L and BLEU-4; agent: tool calls with results inserted, and the answer",
                          choices=GENERATION_MODES)
    limit: int | None = option(None, "score only the first N rows", aliases=("val_dataset_sample",))

    def problems(self) -> list[str]:
        return super().problems() + [p for p in [_positive("limit", self.limit)] if p]


@dataclass(frozen=True)
class MergeConfig:
    """sftkit merge: fold a LoRA checkpoint into its base and save a plain transformers model."""

    ckpt_dir: str | None = option(None, "the checkpoint-<step> folder (or run folder: its best) whose adapter to merge")
    output_dir: str | None = option(None, "where the merged model goes (default: <ckpt_dir>-merged)")
    dequantize: bool = option(False, "for a QLoRA run: reload the quantized base in full precision and merge")
    dtype: str = option("auto", "dtype of the merged weights (auto: the base model's own dtype)", aliases=("torch_dtype",),
                        choices=DTYPE_CHOICES)
    trust_remote_code: bool = option(False, "allow a base model whose repository ships Python code")

    def problems(self) -> list[str]:
        return [] if self.ckpt_dir else ["ckpt_dir is required: the checkpoint whose LoRA adapter to merge"]


INFER_BACKENDS = ("pt", "vllm")
TOOLS_PROMPTS = ("sftkit", "none")


@dataclass(frozen=True)
class DeployConfig(GenerateOptions):
    """sftkit deploy: serve a model over the OpenAI API (chat with tool calls, completions, several LoRA adapters).

    The generation fields are the defaults for requests that do not set them (max_new_tokens: max_tokens).
    """

    adapters: tuple[str, ...] = option((), "more LoRA adapters on the same base, each name=DIR (a checkpoint, run or adapter "
                                           "folder); a request picks one by its model name", aliases=("lora_modules",))
    served_model_name: str | None = option(None, "the model name clients ask for (default: the checkpoint's or model's folder name)")
    host: str = option("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = option(8000, "port to listen on (0: a free port, printed at start)")
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1 requests (default: no key)")
    tools_prompt: str = option("sftkit", "how a request's tools enter the prompt: sftkit (the system-prompt text `tools` "
                                         "training rows get) or none (left out: the system prompt describes them, as in "
                                         "MSAgent data); generated calls are parsed either way", choices=TOOLS_PROMPTS)
    infer_backend: str = option("pt", "pt: the built-in batching engine (CPU or GPU); vllm: vLLM (needs vllm and a GPU)",
                                choices=INFER_BACKENDS)
    max_num_seqs: int = option(32, "most requests generated together", aliases=("max_batch_size",))
    max_queue: int = option(128, "requests waiting for a batch slot; beyond it new requests get 429")
    max_model_len: int | None = option(None, "longest prompt + reply in tokens (default: the model's max_position_embeddings)")
    shutdown_timeout: int = option(30, "seconds SIGTERM waits for requests in flight before it closes them")

    def problems(self) -> list[str]:
        checks = [_positive("max_num_seqs", self.max_num_seqs), _positive("max_queue", self.max_queue),
                  _positive("max_model_len", self.max_model_len), _positive("shutdown_timeout", self.shutdown_timeout, zero_ok=True)]
        if not 0 <= self.port <= 65535:
            checks.append(f"port must be in 0..65535, got {self.port}")
        seen = {self.served_model_name}
        for item in self.adapters:
            name, equals, folder = (part.strip() for part in item.partition("="))
            if not equals or not name or not folder:
                checks.append(f"adapters takes name=DIR, got '{item}'")
            elif name in seen:
                checks.append(f"adapters: the name '{name}' is used twice")
            seen.add(name)
        return super().problems() + [check for check in checks if check]

    def adapter_dirs(self) -> dict[str, str]:
        """--adapters as {name: folder} (validated by problems())."""
        return {name.strip(): folder.strip() for name, _, folder in (item.partition("=") for item in self.adapters)}


@dataclass(frozen=True)
class WebUIConfig:
    """sftkit web-ui: train, watch, chat, evaluate and preview data from a browser."""

    host: str = option("127.0.0.1", "address to listen on; anything but loopback exposes training and your files to the network",
                       aliases=("server_name",))
    port: int = option(7860, "port to listen on", aliases=("server_port",))
    auth: str | None = option(None, "user:password that the page asks for (needed before listening beyond this machine)")
    output_dir: str = option("output", "where the Train tab writes runs and the Chat and Evaluate tabs look for them")

    def problems(self) -> list[str]:
        checks = []
        if not 0 < self.port < 65536:
            checks.append(f"port must be in 1..65535, got {self.port}")
        if self.auth is not None and not all(self.auth.partition(":")[::2]):
            checks.append("auth must be user:password, both non-empty")
        return checks

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.auth is None:
            return None
        user, _, password = self.auth.partition(":")
        return user, password

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
