"""train(config): fine-tune a causal LM in one plain torch loop that reads top to bottom.

Setup (processes, data, model, objective, run folder, backend), then one loop over optimizer steps with an
inner loop over the micro-batches of the accumulation window, then the end of the run. The loss of a window is
the sum of the micro-batch losses divided by the objective's normaliser for the whole window on every rank
(SFT: trainable tokens, so 4 x 1 and 1 x 4 give one gradient; preference losses: pairs). What is optimised
(the objective: SFT or a preference loss) and which backend runs the step (one process, DDP, DeepSpeed, FSDP2)
are values built once; the loop knows neither.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import replace
from functools import partial
from typing import Callable

import numpy as np
import torch

from . import distributed, memory, preflight, run, speed, vlm
from .attention import use_varlen_attention
from .backend import build_backend
from .checkpoint import (TrainState, mark_best, prune, read_train_state, require_shared, restore_rng_states, save,
                         write_weights)
from .config import TrainConfig
from .data.pipeline import collate_flat
from .data.prepare import prepare_data
from .data.templates import get_template
from .errors import OptionError, TrainingError, TrainingStopped
from .hub import HubError, maybe_push, push_to_hub
from .logs import RunLog, plot_losses
from .lora import LoRAConfig, count_parameters, exact_targets, inject_lora, lora_state_dict
from .model import attn_implementation, load_model_and_tokenizer, load_processor, resolve_dtype
from .placement import place
from .quant import QuantizationOptions, is_quantized
from .registry import EMBEDDED_MODEL_TYPE, get_model_info, infer_model_type, resolve_lora_targets
from .signals import StopOnSignal
from .objective import build_objective, tokenizer_for
from .window import accumulate, settle, window_source


@memory.explain_out_of_memory  # an out-of-memory error names the options that lower the need
def train(config: TrainConfig, *, loss_fn=None, on_record: Callable[[dict], None] = lambda record: None) -> str:
    """Train as `config` says (TrainConfig: SFT, RLHFConfig: preference); returns the best (else last) checkpoint.

    loss_fn(model, batch) -> (summed loss, normaliser) replaces the objective's loss; on_record(record) sees the
    start ({step, total_steps, run_dir, estimated_peak_mb}), each step's record and each evaluation.
    """
    # --- Setup. One rank per process (torchrun), each owning one device or, for pipeline-style model
    # parallel, a group of devices its layers are spread over.
    world = distributed.init("cuda" if (config.device or "cuda").startswith("cuda") and torch.cuda.is_available() else "cpu",
                             config.ddp_backend)
    devices = rank_devices(config, world)
    device = torch.device(devices[0])
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device: this rank's own
    compute_dtype = resolve_dtype(config.dtype, device)
    say = print if world.is_main else (lambda *args, **kwargs: None)
    # Everything that can be wrong is checked before the weights load (preflight.py), the data included: it is
    # tokenized once up front (every rank tokenizes the same data and takes its own slices).
    resume = preflight.check_setup(config, world, say)
    tokenizer, model_dir, config, processor = locate_model(config)
    train_examples, val_examples = prepare_data(config, tokenizer, say, world, processor, tokenize=tokenizer_for(config))
    differences = preflight.check_model(config, model_dir, resume)
    seed_everything(config.seed)
    model, lora_config = setup_model(config, model_dir, tokenizer, devices, say)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    objective = build_objective(config, model, device=device, autocast=autocast, world=world, loss_fn=loss_fn)
    train_examples, val_examples = objective.score((train_examples, val_examples), tokenizer, say)
    train_examples, collate_train, lengths = objective.rows(config, train_examples, say, processor)
    levers, peak = prepare_step(model, config, device, train_examples, world, say, objective.sequences,
                                padding_free=collate_train is collate_flat, held_bytes=objective.held_bytes)
    batches_per_epoch, total_steps = run_length(config, len(train_examples), world.size)

    # Run folder (a resumed run writes on into the folder of its checkpoint; rank 0 writes shared files), the
    # backend that runs each step, and the state a resume restores.
    run_dir = open_run_dir(config, model_dir, resume, val_examples, world, differences)
    log = RunLog(run_dir, config.logging_dir, enabled=world.is_main)
    backend = build_backend(config, model, world=world, devices=devices, compute_dtype=compute_dtype, total_steps=total_steps,
                            loss_fn=speed.training_loss(objective.loss, levers), fused_optimizer=levers.asynchronous)
    state = TrainState()
    if resume:
        state = restore(resume, backend, world.rank)
        say(f"[sftkit] resumed from {resume} at step {state.step}")
    next_window = window_source(train_examples, speed.training_collate(collate_train, levers, model), tokenizer.pad_token_id,
                                config, state, world, prefetch=levers.asynchronous, lengths=lengths,
                                forward_tokens=levers.forward_tokens, sequences=objective.sequences)

    write_checkpoint_weights = partial(write_weights, model=model, tokenizer=tokenizer, lora_config=lora_config,
                                       model_dir=model_dir, state=state)
    say(f"[sftkit] {len(train_examples)} training / {len(val_examples)} validation examples, "
        f"{total_steps} steps, world size {world.size}, run folder {run_dir}")
    started = time.time()
    progress = _progress(total_steps, state.step, enabled=world.is_main)
    on_record({"step": state.step, "total_steps": total_steps, "run_dir": run_dir, "estimated_peak_mb": round(peak / 2**20, 1)})
    with StopOnSignal() as stop, contextlib.closing(next_window):
        # --- The loop: one optimizer step per iteration.
        while state.step < total_steps:
            window_started = time.time()
            window, shards, collated = next_window()
            counts = objective.counts(shards, collated, world)
            model.train()
            window_loss, window_metrics = accumulate(backend, shards, collated, device, autocast, counts[objective.unit],
                                                     world, non_blocking=levers.asynchronous)
            mean_loss, grad_norm, totals = settle(window_loss, backend.clip_gradients(), window_metrics,
                                                  counts[objective.unit], world)
            check_finite(mean_loss, state.step + 1, run_dir)
            learning_rate = backend.learning_rate
            backend.step()

            state.step += 1
            state.epoch, state.batches_in_epoch = window[-1][0], window[-1][1] + 1
            state.trainable_tokens += counts["trainable_tokens"]
            elapsed = time.time() - window_started
            record = {"step": state.step, "loss": round(mean_loss, 6), "lr": learning_rate, "grad_norm": round(grad_norm, 6),
                      "trainable_tokens_per_s": round(counts["trainable_tokens"] / max(elapsed, 1e-9), 2),
                      "epoch": round(state.epoch + state.batches_in_epoch / batches_per_epoch, 4),
                      **objective.summarise(totals), **counts,
                      # What a watcher needs for progress and ETA (this process's wall time: it restarts on resume).
                      "total_steps": total_steps, "elapsed_s": round(time.time() - started, 3)}
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{record['trainable_tokens_per_s']:.0f}")
            if state.step % config.logging_steps == 0 or state.step == total_steps:
                log.write(record)
                state.log_history.append(record)
            on_record(record)

            finished = state.step == total_steps
            stopping = distributed.max_int(stop.signal_number, world)  # the signal one rank got, else 0
            evaluated = None
            if val_examples and (state.step % config.eval_steps == 0 or finished):
                evaluated = {"step": state.step, **objective.evaluate(model, tokenizer, config, val_examples, device=device,
                                                                      autocast=autocast, world=world,
                                                                      lockstep=backend.lockstep, processor=processor)}
                log.write(evaluated)
                state.log_history.append(evaluated)
                if world.is_main:
                    progress.write(f"[sftkit] step {state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluated.items() if k != "step"))
                on_record(evaluated)
            if state.step % (config.save_steps or config.eval_steps) == 0 or finished or stopping or evaluated:
                improved = track_best(state, config, evaluated)
                checkpoint = save(run_dir, state.step, world=world, backend=backend, write_weights=write_checkpoint_weights,
                                  resumable=not config.only_save_model)
                if world.is_main:
                    after_save(config, run_dir, checkpoint, improved, bool(val_examples), say)
            if stopping:  # saved above; a stopped run is not a finished one, so it ends in an error (exit 130/143)
                progress.close()
                log.close()
                distributed.shutdown(world)
                stopped = TrainingStopped(stopping, checkpoint, config.command)
                distributed.report_stop(stopped.exit_code)
                raise stopped

    # --- The end: curves, the best checkpoint, what to do next.
    progress.close()
    log.close()
    distributed.barrier(world)
    best = run.pointer(run_dir, run.BEST) or run.pointer(run_dir, run.LATEST)
    if world.is_main:
        report_end(config, state, run_dir, best, time.time() - started, say)
    distributed.shutdown(world)
    return best


def prepare_step(model, config: TrainConfig, device: torch.device, examples: list[dict], world: distributed.World, say=print,
                 sequences=lambda row: [row], padding_free: bool = False, held_bytes: int = 0):
    """Before the first step: the speed levers for this device, the memory plan, then the levers applied (compiled
    layers include the plan's checkpoints). Returns (levers, estimated peak bytes)."""
    levers = speed.resolve_levers(config, device, examples if config.packing else None, processes=world.size)
    peak = memory.prepare_memory(model, config, device, examples, say, processes=world.size if device.type == "cpu" else 1,
                                 fused_loss=levers.fused_loss, sequences=sequences, padding_free=padding_free,
                                 forward_tokens=levers.forward_tokens, held_bytes=held_bytes)
    speed.apply_levers(model, levers)
    say(f"[sftkit] {levers.describe()}")
    return levers, peak


def run_length(config: TrainConfig, examples: int, world_size: int) -> tuple[int, int]:
    """(global batches per epoch, optimizer steps of the run: --max_steps, else the epochs' windows)."""
    batches_per_epoch = math.ceil(examples / (config.batch_size * world_size))
    windows = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
    return batches_per_epoch, config.max_steps if config.max_steps > 0 else math.ceil(windows * config.num_train_epochs)


def check_finite(mean_loss: float, step: int, run_dir: str) -> None:
    """A NaN or inf loss stops the run before the weights change, naming the last good checkpoint."""
    if not math.isfinite(mean_loss):
        last = run.pointer(run_dir, run.LATEST)
        raise TrainingError(f"loss is {mean_loss} at step {step}; stopped without updating the weights. "
                            f"Last good checkpoint: {last or 'none yet'}. Try a lower learning rate or fp32.")


def after_save(config: TrainConfig, run_dir: str, checkpoint: str, improved: bool, evaluates: bool, say=print) -> None:
    """Rank 0, once a checkpoint is in place: move `best` (to the newest when nothing is evaluated), prune old
    checkpoints, push to the hub."""
    if improved or not evaluates:
        mark_best(run_dir, checkpoint)
    prune(run_dir, config.save_total_limit, protect=(run.pointer(run_dir, run.BEST), checkpoint))
    if config.push_to_hub:
        maybe_push(config.push_hub_strategy, "save", checkpoint, improved, partial(upload, config, say))


def open_run_dir(config: TrainConfig, model_dir: str, resume: str | None, val_examples: list[dict],
                 world: distributed.World, differences: list[str]) -> str:
    """The run folder: a new one (rank 0 makes it and writes sft_args.json and the validation split), or the
    folder of the checkpoint a resumed run continues: there rank 0 removes what a killed save left, drops the
    metrics logged after the checkpoint (they are logged again) and records this resume's options. Every rank, on every
    node, must see it."""
    run_dir = None
    if resume:
        run_dir = run.run_dir_of(resume)
        if world.is_main:
            step = read_train_state(resume).step
            leftovers, dropped = run.remove_leftovers(run_dir), run.trim_metrics(run_dir, step)
            run.record_resume(run_dir, resume, step, config.run_arguments(model_dir), differences)
            if leftovers or dropped:
                print(f"[sftkit] removed {', '.join(leftovers) or 'nothing'} left by an interrupted save; dropped "
                      f"{dropped} metrics records after step {step}")
        distributed.barrier(world)
        return run_dir
    if world.is_main:
        name = config.model_type or os.path.basename(os.path.normpath(model_dir)).lower()
        run_dir = run.new_run_dir(config.output_dir, name, config.add_output_dir_suffix)
        run.write_run_files(run_dir, config.run_arguments(model_dir), [e["conversation"] for e in val_examples])
    run_dir = distributed.broadcast(run_dir, world)
    require_shared(run_dir, world)
    return run_dir


def track_best(state: TrainState, config: TrainConfig, evaluated: dict | None) -> bool:
    """Whether this evaluation beats the best so far by --metric_for_best_model (and remember it if so)."""
    score = evaluated.get(best_metric_key(config)) if evaluated else None
    improved = score is not None and (state.best_metric is None or
                                      (score > state.best_metric if config.best_is_max else score < state.best_metric))
    if improved:
        state.best_metric, state.best_checkpoint = score, f"checkpoint-{state.step}"
    return improved


def report_end(config: TrainConfig, state: TrainState, run_dir: str, best: str | None, wall: float, say=print) -> None:
    """The loss curves, the best checkpoint and how to use it; the final push to the hub."""
    plot = plot_losses(run_dir)
    best_score = f"{state.best_metric:.4f}" if state.best_metric is not None else "n/a"
    say(f"[sftkit] done: best checkpoint {best} ({best_metric_key(config)} {best_score}), wall time {wall:.1f}s, "
        f"{state.trainable_tokens / max(wall, 1e-9):.1f} trainable tokens/s" + (f", curves {plot}" if plot else ""))
    say(f"[sftkit] chat with it: sftkit chat --ckpt_dir {best}")
    if config.push_to_hub:
        maybe_push(config.push_hub_strategy, "end", best, False, partial(upload, config, say))


def locate_model(config: TrainConfig):
    """(tokenizer, model folder, config with model type and template resolved, a vision-language model's image
    processor or None): all but the weights, which load only once the data and options have been checked. An
    unknown template fails here."""
    model_type = config.model_type or infer_model_type(config.model) or (None if config.model else EMBEDDED_MODEL_TYPE)
    _, tokenizer, model_dir = load_model_and_tokenizer(
        config.model, model_type=model_type, hub=config.hub, revision=config.model_revision,
        cache_dir=config.model_cache_dir, dtype=model_dtype(config), trust_remote_code=config.trust_remote_code,
        with_model=False)
    template = config.template or (get_model_info(model_type).template if model_type else "auto")
    get_template(template)
    return tokenizer, model_dir, replace(config, model_type=model_type, template=template), load_processor(model_dir, tokenizer)


def model_dtype(config: TrainConfig) -> str:
    return config.dtype if config.sft_type == "lora" else "fp32"


def setup_model(config: TrainConfig, model_dir: str, tokenizer, devices: list[str], say=print):
    """(model ready to train, LoRA config), loaded from the folder locate_model found.

    LoRA keeps the frozen base in the compute dtype and its adapters in float32; full fine-tuning keeps
    float32 master weights. Half precision comes from autocast in both. --freeze_vit keeps a vision-language
    model's vision tower and projector out of both.
    """
    attention, why = attn_implementation(config.use_flash_attn)
    say(f"[sftkit] {why}")
    quantization = QuantizationOptions(bits=config.quantization_bit or None, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
                                       bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
                                       bnb_4bit_compute_dtype=config.bnb_4bit_comp_dtype)
    model = load_model_and_tokenizer(
        model_dir, model_type=config.model_type, dtype=model_dtype(config),
        device="cpu" if len(devices) > 1 or config.fsdp else devices[0], attn_implementation=attention, trust_remote_code=config.trust_remote_code, tokenizer=tokenizer,
        gradient_checkpointing=config.gradient_checkpointing, quantization=quantization).model
    if config.sft_type == "full" and is_quantized(model):
        raise TrainingError(f"{model_dir} is quantized: its weights cannot be trained, only LoRA adapters on them (--sft_type lora)")
    frozen = vlm.frozen_vision(model, config.freeze_vit)
    lora_config = None
    if config.sft_type == "lora":
        lora_config = LoRAConfig(r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                 target_modules=resolve_lora_targets(config.model_type, config.lora_target_modules),
                                 use_rslora=config.use_rslora)
        adapted = inject_lora(model, lora_config, exclude=frozen)
        if frozen:  # the saved adapter must name only the layers it adapts
            lora_config = replace(lora_config, target_modules=exact_targets(model, adapted))
        for parameter in lora_state_dict(model).values():
            parameter.data = parameter.data.float()
    vlm.freeze(model, frozen)
    if frozen:
        say(f"[sftkit] vision tower and projector frozen ({', '.join(frozen)}); --freeze_vit false trains them too")
    if len(devices) > 1:
        say(f"[sftkit] model parallel over {devices}: {place(model, devices)}")
    trainable, total = count_parameters(model)
    say(f"[sftkit] model {model_dir}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    if config.varlen_attention:  # no T x T attention mask in training (before the memory plan, which counts on it)
        say(f"[sftkit] {use_varlen_attention(model)}")
    return model, lora_config


def restore(checkpoint: str, backend, rank: int) -> TrainState:
    """Weights, optimizer, schedule and this rank's RNG from a checkpoint (checked by preflight); its TrainState."""
    backend.load(checkpoint)
    restore_rng_states(checkpoint, rank)
    return read_train_state(checkpoint)


def rank_devices(config: TrainConfig, world: distributed.World) -> list[str]:
    """This rank's devices: --devices as given (one process), else its share of this node's visible GPUs (the
    only one visible when a launcher gives each rank its own), else CPU."""
    asked = list(config.devices) or ([config.device] if config.device else [])
    missing = [name for name in asked if name.startswith("cuda") and not torch.cuda.is_available()]
    if missing:
        raise OptionError("devices" if config.devices else "device",
                          f"{missing[0]} asked for, but CUDA is not available on this machine (use cpu)")
    if config.devices:
        if world.distributed:
            raise OptionError("devices", "places one process's model; with several ranks each takes its share of the GPUs")
        return list(config.devices)
    if config.device and (not config.device.startswith("cuda") or ":" in config.device):
        return [config.device]
    if not torch.cuda.is_available():
        return ["cpu"]
    visible = torch.cuda.device_count()
    per_rank = visible // world.local_size
    if per_rank < 1 and visible == 1:
        return ["cuda:0"]
    if per_rank < 1:
        raise TrainingError(f"{world.local_size} ranks on this node but only {visible} GPUs")
    return [f"cuda:{world.local_rank * per_rank + i}" for i in range(per_rank)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def best_metric_key(config: TrainConfig) -> str:
    """The evaluation record key that --metric_for_best_model names."""
    return "eval_" + {"rouge-l": "rouge_l", "bleu-4": "bleu4"}.get(config.metric_for_best_model, config.metric_for_best_model)


def upload(config: TrainConfig, say, folder: str, path_in_repo: str) -> None:
    try:
        push_to_hub(folder, config.hub_model_id, path_in_repo, token=config.hub_token, private=config.hub_private_repo)
    except HubError as error:  # a network blip must not end a long run
        say(f"[sftkit] warning: push to {config.hub_model_id} failed: {error}")


def _progress(total: int, done: int, enabled: bool = True):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True, disable=not enabled)
