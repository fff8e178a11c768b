"""train(config): fine-tune a causal LM in one plain torch loop that reads top to bottom.

Setup (model, data, run folder, optimizer), then one loop over optimizer steps with an inner loop
over the micro-batches of the accumulation window. The loss of a window is the sum of per-token
losses divided by the trainable tokens of the whole window, so 4 x 1 and 1 x 4 give one gradient.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import time
from dataclasses import replace
import numpy as np
import torch
from safetensors.torch import load_file

from . import deepspeed, distributed, memory
from .attention import use_varlen_attention
from .checkpoint import TrainState, begin_checkpoint, finish_checkpoint, mark_best, pointer, prune, resolve_checkpoint
from .config import TrainConfig, config_dict, loss_scale_weights
from .data import cache as dataset_cache
from .data.loading import load_conversations, split_and_sample
from .data.pipeline import IGNORE_INDEX, build_examples, collate, collate_packed, length_grouped_order, pack
from .logs import RunLog, plot_losses
from .lora import LoRAConfig, count_parameters, inject_lora, lora_state_dict, save_adapter
from .loss import loss_sum
from .hub import HubError, maybe_push, push_to_hub
from .model import load_model_and_tokenizer, resolve_dtype
from .placement import place
from .quant import QuantizationOptions, is_quantized, make_optimizer
from .registry import (EMBEDDED_MODEL_TYPE, MODELS, attn_implementation, get_model_tokenizer, infer_model_type,
                       resolve_lora_targets)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the last good checkpoint."""


@memory.explain_out_of_memory  # issue 21: an out-of-memory error names the options that lower the need
def train(config: TrainConfig) -> str:
    """Fine-tune as `config` says; returns the best checkpoint folder (the last one without evaluation)."""
    # Processes and devices: one rank per process (torchrun), each owning one device or, for
    # pipeline-style model parallel, a group of devices its layers are spread over.
    world = distributed.init("cuda" if (config.device or "cuda").startswith("cuda") and torch.cuda.is_available() else "cpu")
    devices = rank_devices(config, world)
    device = torch.device(devices[0])
    compute_dtype = resolve_dtype(config.dtype, device)
    resume = resolve_checkpoint(config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    say = print if world.is_main else (lambda *args, **kwargs: None)
    seed_everything(config.seed)

    # Model. LoRA keeps the frozen base in the compute dtype and its adapters in float32; full
    # fine-tuning keeps float32 master weights. Half precision comes from autocast in both.
    load_dtype = config.dtype if config.sft_type == "lora" else "fp32"
    model, tokenizer, model_dir, model_type = load_base(config, load_dtype, "cpu" if len(devices) > 1 else device, say)
    if config.sft_type == "full" and is_quantized(model):
        raise TrainingError(f"{model_dir} is quantized: its weights cannot be trained, only LoRA adapters on them (--sft_type lora)")
    config = replace(config, model_type=model_type, template=resolve_template(config, model_type))
    lora_config = None
    if config.sft_type == "lora":
        targets = resolve_lora_targets(model_type, config.lora_target_modules)
        lora_config = LoRAConfig(r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                 target_modules=targets, use_rslora=config.use_rslora)
        inject_lora(model, lora_config)
        for parameter in lora_state_dict(model).values():
            parameter.data = parameter.data.float()
    if len(devices) > 1:
        say(f"[sftkit] model parallel over {devices}: {place(model, devices)}")
    trainable, total = count_parameters(model)
    say(f"[sftkit] model {model_dir}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    if config.varlen_attention:  # issue 21: no T x T attention mask in training
        say(f"[sftkit] {use_varlen_attention(model)}")

    # Data, tokenized once up front (every rank tokenizes the same data and takes its own slices).
    train_examples, val_examples = prepare_data(config, tokenizer, say)
    collate_train = collate
    if config.packing:
        unpacked = len(train_examples)
        train_examples, collate_train = pack(train_examples, config.max_length or 2048), collate_packed
        say(f"[sftkit] packed {unpacked} examples into {len(train_examples)} rows of at most {config.max_length or 2048} tokens")
    # issue 21: print the estimated peak of a micro-batch; checkpoint what --max_memory needs
    memory.prepare_memory(model, config, device, train_examples, say, processes=world.size if device.type == "cpu" else 1)
    global_batch = config.batch_size * world.size
    batches_per_epoch = math.ceil(len(train_examples) / global_batch)
    steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(steps_per_epoch * config.num_train_epochs)
    save_steps = config.save_steps or config.eval_steps

    # Run folder: a resumed run writes on into the folder of its checkpoint. Rank 0 writes shared files.
    run_dir = os.path.dirname(os.path.abspath(resume)) if resume else distributed.broadcast(
        make_run_dir(config, model_dir) if world.is_main else None, world)
    if world.is_main:
        write_run_files(run_dir, config, model_dir, val_examples)
    log = RunLog(run_dir, config.logging_dir, enabled=world.is_main)

    # Optimizer, schedule, and the state a resume restores.
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config.optim, parameters, config.lr, betas=(config.adam_beta1, config.adam_beta2),
                               weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_scheduler_type, round(config.warmup_ratio * total_steps), total_steps))
    ds_config = None
    if config.deepspeed:
        ds_config = deepspeed.fill_config(config.deepspeed, micro_batch=config.batch_size, world_size=world.size,
                                          accumulation=config.gradient_accumulation_steps, max_grad_norm=config.max_grad_norm,
                                          compute_dtype=compute_dtype, hidden_size=getattr(model.config, "hidden_size", None))
    # DeepSpeed scales fp16 losses itself; otherwise a GradScaler does.
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 and not ds_config else None

    # The backend, chosen once: one process, DDP (its gradient all-reduce rides on the loss module's
    # backward), or the DeepSpeed engine. The loop below only calls forward / backward / step.
    forward, engine = LossModule(model), None
    if ds_config:
        forward = engine = deepspeed.initialize(forward, optimizer, ds_config)
    elif world.distributed:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" and len(devices) == 1 else None)

    def backward(loss: torch.Tensor) -> None:
        if engine:
            engine.backward(loss, scale_wrt_gas=False)
            engine.step()  # DeepSpeed steps (and clips) only at the end of its accumulation window
        else:
            (scaler.scale(loss) if scaler else loss).backward()

    def optimizer_step() -> float:
        """Clip, step, schedule, clear; returns the gradient norm before clipping."""
        if engine:
            scheduler.step()
            return float(engine.get_global_grad_norm() or 0.0)
        if scaler:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm or float("inf"))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm)

    state = TrainState()
    if resume:
        state = restore(resume, model, optimizer, scheduler, scaler, sft_type=config.sft_type, rank=world.rank, engine=engine)
        say(f"[sftkit] resumed from {resume} at step {state.step}")
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    lengths = [len(example["input_ids"]) for example in train_examples] if config.group_by_length else None
    batches = batch_positions(len(train_examples), global_batch, config.seed, state.epoch, state.batches_in_epoch, lengths)
    pad_id = tokenizer.pad_token_id

    def upload(folder: str, path_in_repo: str) -> None:
        try:
            push_to_hub(folder, config.hub_model_id, path_in_repo, token=config.hub_token, private=config.hub_private_repo)
        except HubError as error:  # a network blip must not end a long run
            say(f"[sftkit] warning: push to {config.hub_model_id} failed: {error}")

    def save(step: int) -> str:
        """Every rank joins (RNG gather, DeepSpeed state, ZeRO-3 gather); rank 0 writes the rest and renames."""
        rngs = distributed.gather(rng_states(), world)
        folder = distributed.broadcast(begin_checkpoint(run_dir, step) if world.is_main else None, world)
        if engine and not config.only_save_model:
            deepspeed.save(engine, folder)
        with deepspeed.gathered(model, ds_config) if ds_config else contextlib.nullcontext():
            if world.is_main:
                write_checkpoint(folder, model, tokenizer, lora_config, model_dir, state,
                                 None if config.only_save_model else (optimizer, scheduler, scaler, rngs), own_optimizer=not engine)
        distributed.barrier(world)
        checkpoint = finish_checkpoint(run_dir, step) if world.is_main else os.path.join(run_dir, f"checkpoint-{step}")
        distributed.barrier(world)
        return checkpoint

    say(f"[sftkit] {len(train_examples)} training / {len(val_examples)} validation examples, "
        f"{total_steps} steps, world size {world.size}, run folder {run_dir}")
    started = time.time()
    progress = _progress(total_steps, state.step, enabled=world.is_main)
    with StopOnSignal() as stop:
        while state.step < total_steps:
            window_started = time.time()
            # One optimizer step: accumulate the window's gradients, normalised by the trainable tokens
            # of the whole window on all ranks (DDP averages gradients, hence the world-size factor).
            window = [next(batches) for _ in range(config.gradient_accumulation_steps)]
            shards = [rank_shard([train_examples[i] for i in indices], world.rank, config.batch_size) for _, _, indices in window]
            window_tokens = distributed.sum_int(sum(trainable_tokens(e) for shard, weight in shards if weight for e in shard), world)
            model.train()
            window_loss = 0.0
            for index, (shard, weight) in enumerate(shards):
                batch = {k: v.to(device) for k, v in collate_train(shard, pad_id).items()}
                syncing = index == len(shards) - 1 or not world.distributed or engine is not None
                with (contextlib.nullcontext() if syncing else forward.no_sync()), autocast:
                    summed, _ = forward(batch)
                    summed = summed * weight
                backward(summed * world.size / max(window_tokens, 1))
                window_loss += summed.item()
            mean_loss = distributed.sum_floats([window_loss], world)[0] / max(window_tokens, 1)
            if not math.isfinite(mean_loss):
                last = pointer(run_dir, "latest")
                raise TrainingError(f"loss is {mean_loss} at step {state.step + 1}; stopped without updating the weights. "
                                    f"Last good checkpoint: {last or 'none yet'}. Try a lower learning rate or fp32.")
            learning_rate = scheduler.get_last_lr()[0]
            grad_norm = optimizer_step()

            state.step += 1
            state.epoch, state.batches_in_epoch = window[-1][0], window[-1][1] + 1
            state.trainable_tokens += window_tokens
            elapsed = time.time() - window_started
            record = {"step": state.step, "loss": round(mean_loss, 6), "lr": learning_rate,
                      "grad_norm": round(float(grad_norm), 6), "trainable_tokens_per_s": round(window_tokens / max(elapsed, 1e-9), 2),
                      "epoch": round(state.epoch + state.batches_in_epoch / batches_per_epoch, 4)}
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['trainable_tokens_per_s']:.0f}")
            if state.step % config.logging_steps == 0 or state.step == total_steps:
                log.write(record)
                state.log_history.append(record)

            finished = state.step == total_steps
            stopping = distributed.sum_int(int(stop.requested), world) > 0
            evaluated = None
            if val_examples and (state.step % config.eval_steps == 0 or finished):
                evaluated = evaluate(model, tokenizer, config, val_examples, device, autocast, world)
                log.write({"step": state.step, **evaluated})
                state.log_history.append({"step": state.step, **evaluated})
                if world.is_main:
                    progress.write(f"[sftkit] step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluated.items()))
            if state.step % save_steps == 0 or finished or stopping or evaluated:
                score = evaluated.get(best_metric_key(config)) if evaluated else None
                improved = score is not None and (state.best_metric is None or
                                                  (score > state.best_metric if config.best_is_max else score < state.best_metric))
                if improved:
                    state.best_metric = score
                    state.best_checkpoint = f"checkpoint-{state.step}"
                checkpoint = save(state.step)
                if world.is_main:
                    if improved or not val_examples:
                        mark_best(run_dir, checkpoint)
                    prune(run_dir, config.save_total_limit, protect=(pointer(run_dir, "best"), checkpoint))
                    if config.push_to_hub:
                        maybe_push(config.push_hub_strategy, "save", checkpoint, improved, upload)
            if stopping:
                progress.close()
                say(f"[sftkit] stopped by signal after step {state.step}; checkpoint saved.\n"
                    f"  resume with: sftkit train --resume_from_checkpoint {os.path.join(run_dir, f'checkpoint-{state.step}')} "
                    "(and the same options)")
                log.close()
                distributed.shutdown(world)
                return os.path.join(run_dir, f"checkpoint-{state.step}")
    progress.close()
    log.close()
    distributed.barrier(world)
    best = pointer(run_dir, "best") or pointer(run_dir, "latest")
    if world.is_main:
        plot = plot_losses(run_dir)
        wall = time.time() - started
        best_score = f"{state.best_metric:.4f}" if state.best_metric is not None else "n/a"
        say(f"[sftkit] done: best checkpoint {best} ({best_metric_key(config)} {best_score}), wall time {wall:.1f}s, "
            f"{state.trainable_tokens / max(wall, 1e-9):.1f} trainable tokens/s" + (f", curves {plot}" if plot else ""))
        say(f"[sftkit] chat with it: sftkit chat --ckpt_dir {best}")
        if config.push_to_hub:
            maybe_push(config.push_hub_strategy, "end", best, False, upload)
    distributed.shutdown(world)
    return best


class LossModule(torch.nn.Module):
    """The model with its loss as forward, so DDP's hooks wrap exactly what training runs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: dict):
        return loss_sum(self.model, batch)


def rank_devices(config: TrainConfig, world: distributed.World) -> list[str]:
    """This rank's devices: --devices as given (one process), else its share of the visible GPUs, else CPU."""
    if config.devices:
        if world.distributed:
            raise ValueError("--devices places one process's model; with several ranks each takes its share of the GPUs")
        return list(config.devices)
    if config.device and not config.device.startswith("cuda"):
        return [config.device]
    if config.device and ":" in config.device:
        return [config.device]
    if not torch.cuda.is_available():
        if config.device:
            raise ValueError(f"device {config.device} asked for, but CUDA is not available")
        return ["cpu"]
    per_rank = torch.cuda.device_count() // world.size
    if per_rank < 1:
        raise ValueError(f"{world.size} ranks but only {torch.cuda.device_count()} GPUs")
    return [f"cuda:{world.rank * per_rank + i}" for i in range(per_rank)]


def rank_shard(examples: list[dict], rank: int, batch_size: int) -> tuple[list[dict], float]:
    """This rank's slice of a global micro-batch, and its weight: a rank left without examples at the end
    of an epoch still runs one (weighted 0) so every rank joins the gradient all-reduce."""
    shard = examples[rank * batch_size:(rank + 1) * batch_size]
    return (shard, 1.0) if shard else (examples[:1], 0.0)


def load_base(config: TrainConfig, dtype: str, device, say=print):
    """(model, tokenizer, model_dir, model_type): a registered model type through the registry, anything
    else (a local folder or hub id sftkit does not know) through the plain loader."""
    attention, why = attn_implementation(config.use_flash_attn)
    say(f"[sftkit] {why}")
    model_type = config.model_type or infer_model_type(config.model) or (None if config.model else EMBEDDED_MODEL_TYPE)
    loading = dict(device=device, attn_implementation=attention, gradient_checkpointing=config.gradient_checkpointing,
                   quantization=QuantizationOptions(bits=config.quantization_bit or None, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
                                                    bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
                                                    bnb_4bit_compute_dtype=config.bnb_4bit_comp_dtype))
    if model_type is None:
        model, tokenizer, model_dir = load_model_and_tokenizer(
            config.model, hub=config.hub, revision=config.model_revision, cache_dir=config.model_cache_dir, dtype=dtype,
            trust_remote_code=config.trust_remote_code, **loading)
        return model, tokenizer, model_dir, None
    local = config.model if config.model and os.path.isdir(config.model) else None
    model, tokenizer = get_model_tokenizer(
        model_type, dtype, loading, hub=config.hub, model_dir=local, revision=config.model_revision,
        cache_dir=config.model_cache_dir, trust_remote_code=config.trust_remote_code)
    return model, tokenizer, model.name_or_path, model_type


def resolve_template(config: TrainConfig, model_type: str | None) -> str:
    """--template as given, else the model type's registered template, else the tokenizer's own ('auto')."""
    if config.template:
        return config.template
    return MODELS[model_type].template if model_type else "auto"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_data(config: TrainConfig, tokenizer, say=print) -> tuple[list[dict], list[dict]]:
    """Load, split, sample and tokenize (or read all that from the dataset cache); prints what was
    skipped or dropped, and why."""
    fields = ("dataset_test_ratio", "train_dataset_sample", "system", "max_length", "truncation_side",
              "check_dataset_strategy", "train_on", "loss_scale", "seed")
    key = dataset_cache.dataset_key(list(config.datasets()) + list(config.val_dataset), config.template, tokenizer,
                                    {name: getattr(config, name) for name in fields} | {"val": list(config.val_dataset)}) \
        if config.dataset_cache else None
    cached = dataset_cache.load(key) if key else None
    if cached is not None:
        say(f"[sftkit] tokenized data from the cache: {dataset_cache.cache_path(key)}")
        return cached
    examples = _tokenize_data(config, tokenizer, say)
    if key:
        say(f"[sftkit] tokenized data cached in {dataset_cache.store(key, examples)}")
    return examples


def _tokenize_data(config: TrainConfig, tokenizer, say) -> tuple[list[dict], list[dict]]:
    conversations, report = load_conversations(list(config.datasets()), strategy=config.check_dataset_strategy)
    if config.val_dataset:
        validation, val_report = load_conversations(list(config.val_dataset), strategy=config.check_dataset_strategy)
        train_rows, _ = split_and_sample(conversations, test_ratio=0.0, sample=config.train_dataset_sample, seed=config.seed)
        say(f"[sftkit] validation data: {val_report.summary()}")
    else:
        train_rows, validation = split_and_sample(conversations, test_ratio=config.dataset_test_ratio,
                                                  sample=config.train_dataset_sample, seed=config.seed)
    say(f"[sftkit] training data: {report.summary()}")
    options = dict(tokenizer=tokenizer, template=config.template, max_length=config.max_length,
                   truncation_side=config.truncation_side, train_on=config.train_on, system=config.system,
                   loss_scale=loss_scale_weights(config.loss_scale))
    train_examples, dropped = build_examples(train_rows, **options)
    val_examples, val_dropped = build_examples(validation, **options)
    if dropped or val_dropped:
        say(f"[sftkit] dropped {dropped} training and {val_dropped} validation examples: "
              f"nothing trainable left after truncation to {config.max_length} tokens")
    if not train_examples:
        raise ValueError("no training examples left: check the dataset, max_length and check_dataset_strategy")
    return train_examples, val_examples


def trainable_tokens(example: dict) -> int:
    """Tokens whose label is a target after the shift (the first position predicts nothing)."""
    return sum(label != IGNORE_INDEX for label in example["labels"][1:])


def batch_positions(size: int, batch_size: int, seed: int, epoch: int = 0, start: int = 0, lengths: list[int] | None = None):
    """Endless (epoch, batch index, example indices): each epoch a fresh seeded permutation (grouped by
    length when `lengths` is given). Starting at (epoch, start) reproduces exactly the batches a run
    that never stopped would see.
    """
    while True:
        if lengths is not None:
            order = length_grouped_order(lengths, batch_size, seed + epoch)
        else:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        batches = [order[i:i + batch_size] for i in range(0, size, batch_size)]
        for index in range(start, len(batches)):
            yield epoch, index, batches[index]
        epoch, start = epoch + 1, 0


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak rate: linear warmup, then cosine / linear decay to zero, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def best_metric_key(config: TrainConfig) -> str:
    """The evaluation record key that --metric_for_best_model names."""
    return "eval_" + {"rouge-l": "rouge_l", "bleu-4": "bleu4"}.get(config.metric_for_best_model, config.metric_for_best_model)


def evaluate(model, tokenizer, config: TrainConfig, examples: list[dict], device, autocast,
             world: distributed.World = distributed.World()) -> dict:
    """Validation loss and perplexity (each rank a share, summed); with generation, the metrics of
    `sftkit eval` on the same split, computed by rank 0 and sent to all."""
    metrics = evaluate_loss(model, examples[world.rank::world.size], config.eval_batch_size, tokenizer.pad_token_id,
                            device, autocast, world)
    if config.generates:
        return distributed.broadcast(_with_generation(metrics, model, tokenizer, config, examples, autocast)
                                     if world.is_main else None, world)
    return metrics


def _with_generation(metrics: dict, model, tokenizer, config: TrainConfig, examples: list[dict], autocast) -> dict:
    from .chat import evaluate_generation
    from .generation import GenerationConfig

    with torch.no_grad(), autocast:
        report = evaluate_generation(model, tokenizer, config.template, [e["conversation"] for e in examples],
                                     mode=config.eval_generation_mode, system=config.system,
                                     gen_config=GenerationConfig(max_new_tokens=config.eval_max_new_tokens),
                                     limit=config.eval_generation_limit, batch_size=config.eval_batch_size)
    return {**metrics, **{f"eval_{key}": value for key, value in report["metrics"].items()
                          if isinstance(value, (int, float)) and not isinstance(value, bool)}}


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], batch_size: int, pad_id: int, device, autocast,
                  world: distributed.World = distributed.World()) -> dict:
    """Token-mean loss over the validation set (unweighted, whatever --loss_scale says), and its perplexity."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        unweighted = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[start:start + batch_size]]
        batch = {k: v.to(device) for k, v in collate(unweighted, pad_id).items()}
        with autocast:
            summed, count = loss_sum(model, batch)
        total, tokens = total + summed.item(), tokens + count
    total, tokens = distributed.sum_floats([total, float(tokens)], world)
    loss = total / max(tokens, 1)
    return {"eval_loss": round(loss, 6), "eval_ppl": round(math.exp(min(loss, 50.0)), 4)}


def make_run_dir(config: TrainConfig, model_dir: str) -> str:
    """<output_dir>/<model_type>/v<N>-<timestamp>/ as ms-swift lays it out, or output_dir itself."""
    if not config.add_output_dir_suffix:
        os.makedirs(config.output_dir, exist_ok=True)
        return os.path.abspath(config.output_dir)
    model_type = config.model_type or os.path.basename(os.path.normpath(config.model)).lower()
    parent = os.path.join(config.output_dir, model_type)
    os.makedirs(parent, exist_ok=True)
    versions = [int(m.group(1)) for name in os.listdir(parent) if (m := re.match(r"v(\d+)-", name))]
    run_dir = os.path.join(parent, f"v{max(versions, default=-1) + 1}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(run_dir)
    return os.path.abspath(run_dir)


def write_run_files(run_dir: str, config: TrainConfig, model_dir: str, val_examples: list[dict]) -> None:
    """sft_args.json (the resolved config, read back by chat/infer/merge) and the validation split."""
    arguments = {**config_dict(config), "model_dir": os.path.abspath(model_dir), "learning_rate": config.lr,
                 "hub_token": None}
    with open(os.path.join(run_dir, "sft_args.json"), "w", encoding="utf-8") as handle:
        json.dump(arguments, handle, indent=2, ensure_ascii=False)
    with open(os.path.join(run_dir, "val_dataset.jsonl"), "w", encoding="utf-8") as handle:
        for example in val_examples:
            messages = [{"role": m.role, "content": m.content} for m in example["conversation"]]
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def write_checkpoint(folder: str, model, tokenizer, lora_config, model_dir: str, state: TrainState, optimizer_state,
                     own_optimizer: bool = True) -> None:
    """Weights (peft adapter or safetensors), tokenizer, trainer_state.json and, to resume, optimizer (unless
    DeepSpeed keeps it), schedule and RNG."""
    if lora_config is not None:
        save_adapter(model, lora_config, folder, base_model_name_or_path=os.path.abspath(model_dir))
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "trainer_state.json"), "w", encoding="utf-8") as handle:
        handle.write(state.to_json())
    if optimizer_state is None:
        return
    optimizer, scheduler, scaler, rngs = optimizer_state
    if own_optimizer:
        torch.save(optimizer.state_dict(), os.path.join(folder, "optimizer.pt"))
    torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "rng": rngs}, os.path.join(folder, "training_state.pt"))


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore(checkpoint: str, model, optimizer, scheduler, scaler, *, sft_type: str, rank: int = 0, engine=None) -> TrainState:
    """Load weights, optimizer, scheduler, scaler and this rank's RNG from a checkpoint; returns its TrainState."""
    if not os.path.isfile(os.path.join(checkpoint, "training_state.pt")):
        raise FileNotFoundError(f"{checkpoint} holds no optimizer state (saved with only_save_model): it cannot be resumed")
    if engine is not None:
        deepspeed.load(engine, checkpoint)
    elif not os.path.isfile(os.path.join(checkpoint, "optimizer.pt")):
        raise FileNotFoundError(f"{checkpoint} was saved by a DeepSpeed run: resume it with the same --deepspeed config")
    elif sft_type == "lora":
        load_lora_weights(model, checkpoint)
    else:
        from transformers import AutoModelForCausalLM

        saved = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        model.load_state_dict(saved.state_dict())
    if engine is None:
        optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), weights_only=False))
    extra = torch.load(os.path.join(checkpoint, "training_state.pt"), weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    if scaler and extra["scaler"]:
        scaler.load_state_dict(extra["scaler"])
    rngs = extra["rng"]
    if rank >= len(rngs):
        raise ValueError(f"{checkpoint} was saved by {len(rngs)} ranks; resume it with the same number of processes")
    random.setstate(rngs[rank]["python"])
    np.random.set_state(rngs[rank]["numpy"])
    torch.set_rng_state(rngs[rank]["torch"])
    if rngs[rank]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rngs[rank]["cuda"])
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as handle:
        return TrainState.from_json(handle.read())


def load_lora_weights(model, checkpoint: str) -> None:
    """Copy a saved adapter into an already injected model, strictly (names and shapes must match)."""
    tensors = {key.removeprefix("base_model.model."): value for key, value in
               load_file(os.path.join(checkpoint, "adapter_model.safetensors")).items()}
    current = lora_state_dict(model)
    if tensors.keys() != current.keys():
        missing, unexpected = sorted(current.keys() - tensors.keys()), sorted(tensors.keys() - current.keys())
        raise ValueError(f"{checkpoint} does not fit this model's LoRA layers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for key, parameter in current.items():
            parameter.copy_(tensors[key])


class StopOnSignal:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second one aborts."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n[sftkit] {signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(send it again to abort without saving)")

    def __enter__(self):
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._previous = {}
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _progress(total: int, done: int, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True, disable=not enabled)

