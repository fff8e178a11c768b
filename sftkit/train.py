"""train(config): fine-tune a causal LM in one plain torch loop that reads top to bottom.

Setup (processes, model, objective, data, run folder, backend), then one loop over optimizer steps with an
inner loop over the micro-batches of the accumulation window, then the end of the run. The loss of a window is
the sum of the micro-batch losses divided by the objective's normaliser for the whole window on every rank
(SFT: trainable tokens, so 4 x 1 and 1 x 4 give one gradient; preference losses: pairs). What is optimised
(the objective: SFT or a preference loss) and which backend runs the step (one process, DDP, DeepSpeed) are
values built once; the loop knows neither.
"""
from __future__ import annotations

import math
import os
import random
import signal
import time
from dataclasses import replace
from functools import partial
from typing import Callable

import numpy as np
import torch

from . import distributed, evaluate, memory, run
from .attention import use_varlen_attention
from .backend import build_backend
from .checkpoint import (TrainState, mark_best, prune, read_train_state, require_resumable, resolve_checkpoint,
                         restore_rng_states, save, write_weights)
from .config import TrainConfig
from .data.sampler import batch_positions, rank_shard
from .errors import TrainingError
from .hub import HubError, maybe_push, push_to_hub
from .logs import RunLog, plot_losses
from .lora import LoRAConfig, count_parameters, inject_lora, lora_state_dict
from .model import attn_implementation, load_model_and_tokenizer, resolve_dtype
from .objective import build_objective
from .placement import place
from .quant import QuantizationOptions, is_quantized
from .registry import EMBEDDED_MODEL_TYPE, MODELS, infer_model_type, resolve_lora_targets


@memory.explain_out_of_memory  # an out-of-memory error names the options that lower the need
def train(config: TrainConfig, *, loss_fn=None, on_record: Callable[[dict], None] = lambda record: None) -> str:
    """Train as `config` says (TrainConfig: SFT, RLHFConfig: preference); returns the best (else last) checkpoint.

    loss_fn(model, batch) -> (summed loss, normaliser) replaces the objective's loss; on_record(record) sees the
    start ({step, total_steps, run_dir, estimated_peak_mb}), each step's record and each evaluation.
    """
    # --- Setup. One rank per process (torchrun), each owning one device or, for pipeline-style model
    # parallel, a group of devices its layers are spread over.
    world = distributed.init("cuda" if (config.device or "cuda").startswith("cuda") and torch.cuda.is_available() else "cpu")
    devices = rank_devices(config, world)
    device = torch.device(devices[0])
    compute_dtype = resolve_dtype(config.dtype, device)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    resume = resolve_checkpoint(config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    say = print if world.is_main else (lambda *args, **kwargs: None)
    seed_everything(config.seed)
    model, tokenizer, model_dir, config, lora_config = setup_model(config, devices, say)
    objective = build_objective(config, model, device=device, autocast=autocast, world=world, loss_fn=loss_fn)

    # Data, tokenized once up front (every rank tokenizes the same data and takes its own slices).
    train_examples, val_examples = objective.examples(config, tokenizer, say)
    train_examples, collate_train, lengths = objective.rows(config, train_examples, say)
    peak = memory.prepare_memory(model, config, device, train_examples, say, processes=world.size if device.type == "cpu" else 1,
                                 sequences=objective.sequences)
    global_batch = config.batch_size * world.size
    batches_per_epoch = math.ceil(len(train_examples) / global_batch)
    total_steps = config.max_steps if config.max_steps > 0 else \
        math.ceil(math.ceil(batches_per_epoch / config.gradient_accumulation_steps) * config.num_train_epochs)

    # Run folder (a resumed run writes on into the folder of its checkpoint; rank 0 writes shared files), the
    # backend that runs each step, and the state a resume restores.
    run_dir = open_run_dir(config, model_dir, resume, val_examples, world)
    log = RunLog(run_dir, config.logging_dir, enabled=world.is_main)
    backend = build_backend(config, model, world=world, devices=devices, compute_dtype=compute_dtype,
                            total_steps=total_steps, loss_fn=objective.loss)
    state = TrainState()
    if resume:
        state = restore(resume, backend, world.rank)
        say(f"[sftkit] resumed from {resume} at step {state.step}")
    batches = batch_positions(len(train_examples), global_batch, config.seed, state.epoch, state.batches_in_epoch, lengths)

    write_checkpoint_weights = partial(write_weights, model=model, tokenizer=tokenizer, lora_config=lora_config,
                                       model_dir=model_dir, state=state)
    say(f"[sftkit] {len(train_examples)} training / {len(val_examples)} validation examples, "
        f"{total_steps} steps, world size {world.size}, run folder {run_dir}")
    started = time.time()
    progress = _progress(total_steps, state.step, enabled=world.is_main)
    on_record({"step": state.step, "total_steps": total_steps, "run_dir": run_dir, "estimated_peak_mb": round(peak / 2**20, 1)})
    with StopOnSignal() as stop:
        # --- The loop: one optimizer step per iteration.
        while state.step < total_steps:
            window_started = time.time()
            window = [next(batches) for _ in range(config.gradient_accumulation_steps)]
            shards = [rank_shard([train_examples[i] for i in indices], world.rank, config.batch_size) for _, _, indices in window]
            counts = objective.counts(shards, world)
            model.train()
            window_loss, window_metrics = accumulate(backend, shards, collate_train, tokenizer.pad_token_id, device,
                                                     autocast, counts[objective.unit], world)
            mean_loss = window_loss / max(counts[objective.unit], 1)
            if not math.isfinite(mean_loss):
                last = run.pointer(run_dir, run.LATEST)
                raise TrainingError(f"loss is {mean_loss} at step {state.step + 1}; stopped without updating the weights. "
                                    f"Last good checkpoint: {last or 'none yet'}. Try a lower learning rate or fp32.")
            learning_rate = backend.learning_rate
            grad_norm = backend.step()

            state.step += 1
            state.epoch, state.batches_in_epoch = window[-1][0], window[-1][1] + 1
            state.trainable_tokens += counts["trainable_tokens"]
            elapsed = time.time() - window_started
            record = {"step": state.step, "loss": round(mean_loss, 6), "lr": learning_rate, "grad_norm": round(grad_norm, 6),
                      "trainable_tokens_per_s": round(counts["trainable_tokens"] / max(elapsed, 1e-9), 2),
                      "epoch": round(state.epoch + state.batches_in_epoch / batches_per_epoch, 4),
                      **objective.summarise(window_metrics), **counts}
            progress.update(1)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{record['trainable_tokens_per_s']:.0f}")
            if state.step % config.logging_steps == 0 or state.step == total_steps:
                log.write(record)
                state.log_history.append(record)
            on_record(record)

            finished = state.step == total_steps
            stopping = distributed.sum_int(int(stop.requested), world) > 0
            evaluated = None
            if val_examples and (state.step % config.eval_steps == 0 or finished):
                evaluated = {"step": state.step, **objective.evaluate(model, tokenizer, config, val_examples, device=device,
                                                                      autocast=autocast, world=world, lockstep=backend.lockstep)}
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
                    if improved or not val_examples:
                        mark_best(run_dir, checkpoint)
                    prune(run_dir, config.save_total_limit, protect=(run.pointer(run_dir, run.BEST), checkpoint))
                    if config.push_to_hub:
                        maybe_push(config.push_hub_strategy, "save", checkpoint, improved, partial(upload, config, say))
            if stopping:
                progress.close()
                say(f"[sftkit] stopped by signal after step {state.step}; checkpoint saved.\n"
                    f"  resume with: sftkit {config.command} --resume_from_checkpoint {os.path.join(run_dir, f'checkpoint-{state.step}')} "
                    "(and the same options)")
                log.close()
                distributed.shutdown(world)
                return os.path.join(run_dir, f"checkpoint-{state.step}")

    # --- The end: curves, the best checkpoint, what to do next.
    progress.close()
    log.close()
    distributed.barrier(world)
    best = run.pointer(run_dir, run.BEST) or run.pointer(run_dir, run.LATEST)
    if world.is_main:
        report_end(config, state, run_dir, best, time.time() - started, say)
    distributed.shutdown(world)
    return best


def open_run_dir(config: TrainConfig, model_dir: str, resume: str | None, val_examples: list[dict],
                 world: distributed.World) -> str:
    """The run folder: a new one (rank 0 makes it and writes sft_args.json and the validation split), or the
    folder of the checkpoint a resumed run continues."""
    if resume:
        return run.run_dir_of(resume)
    run_dir = None
    if world.is_main:
        name = config.model_type or os.path.basename(os.path.normpath(model_dir)).lower()
        run_dir = run.new_run_dir(config.output_dir, name, config.add_output_dir_suffix)
        run.write_run_files(run_dir, config.run_arguments(model_dir), [e["conversation"] for e in val_examples])
    return distributed.broadcast(run_dir, world)


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


def accumulate(backend, shards, collate_fn, pad_id: int, device, autocast, normaliser: int,
               world: distributed.World) -> tuple[float, dict]:
    """Forward and backward every micro-batch of one window; gradients sum to those of the window's loss divided
    by its normaliser. Returns the window's summed loss and metric totals, summed over ranks.

    DDP averages gradients over ranks, hence the world-size factor; only the last micro-batch all-reduces.
    """
    window_loss, metrics = 0.0, {}
    for index, (shard, weight) in enumerate(shards):
        batch = {key: value.to(device) for key, value in collate_fn(shard, pad_id).items()}
        with backend.no_sync(index == len(shards) - 1), autocast:
            summed, _, parts = backend.forward(batch)
            summed = summed * weight
        backend.backward(summed * world.size / max(normaliser, 1))
        window_loss += summed.item()
        metrics = evaluate.add_totals(metrics, parts, weight)
    names = sorted(metrics)  # every rank reports the same metrics, so one reduction sums them all
    totals = distributed.sum_floats([window_loss] + [value for name in names for value in metrics[name]], world)
    return totals[0], {name: (totals[1 + 2 * i], totals[2 + 2 * i]) for i, name in enumerate(names)}


def setup_model(config: TrainConfig, devices: list[str], say=print):
    """(model ready to train, tokenizer, model_dir, config with model type and template resolved, LoRA config).

    LoRA keeps the frozen base in the compute dtype and its adapters in float32; full fine-tuning keeps
    float32 master weights. Half precision comes from autocast in both.
    """
    attention, why = attn_implementation(config.use_flash_attn)
    say(f"[sftkit] {why}")
    model_type = config.model_type or infer_model_type(config.model) or (None if config.model else EMBEDDED_MODEL_TYPE)
    quantization = QuantizationOptions(bits=config.quantization_bit or None, bnb_4bit_quant_type=config.bnb_4bit_quant_type,
                                       bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
                                       bnb_4bit_compute_dtype=config.bnb_4bit_comp_dtype)
    model, tokenizer, model_dir = load_model_and_tokenizer(
        config.model, model_type=model_type, hub=config.hub, revision=config.model_revision, cache_dir=config.model_cache_dir,
        dtype=config.dtype if config.sft_type == "lora" else "fp32", device="cpu" if len(devices) > 1 else devices[0],
        attn_implementation=attention, trust_remote_code=config.trust_remote_code,
        gradient_checkpointing=config.gradient_checkpointing, quantization=quantization)
    if config.sft_type == "full" and is_quantized(model):
        raise TrainingError(f"{model_dir} is quantized: its weights cannot be trained, only LoRA adapters on them (--sft_type lora)")
    template = config.template or (MODELS[model_type].template if model_type else "auto")
    config = replace(config, model_type=model_type, template=template)
    lora_config = None
    if config.sft_type == "lora":
        lora_config = LoRAConfig(r=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                                 target_modules=resolve_lora_targets(model_type, config.lora_target_modules),
                                 use_rslora=config.use_rslora)
        inject_lora(model, lora_config)
        for parameter in lora_state_dict(model).values():
            parameter.data = parameter.data.float()
    if len(devices) > 1:
        say(f"[sftkit] model parallel over {devices}: {place(model, devices)}")
    trainable, total = count_parameters(model)
    say(f"[sftkit] model {model_dir}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")
    if config.varlen_attention:  # no T x T attention mask in training (before the memory plan, which counts on it)
        say(f"[sftkit] {use_varlen_attention(model)}")
    return model, tokenizer, model_dir, config, lora_config


def restore(checkpoint: str, backend, rank: int) -> TrainState:
    """Weights, optimizer, schedule and this rank's RNG from a checkpoint; returns its TrainState."""
    require_resumable(checkpoint)
    backend.load(checkpoint)
    restore_rng_states(checkpoint, rank)
    return read_train_state(checkpoint)


def rank_devices(config: TrainConfig, world: distributed.World) -> list[str]:
    """This rank's devices: --devices as given (one process), else its share of the visible GPUs, else CPU."""
    if config.devices:
        if world.distributed:
            raise ValueError("--devices places one process's model; with several ranks each takes its share of the GPUs")
        return list(config.devices)
    if config.device and (not config.device.startswith("cuda") or ":" in config.device):
        return [config.device]
    if not torch.cuda.is_available():
        if config.device:
            raise TrainingError(f"device {config.device} asked for, but CUDA is not available")
        return ["cpu"]
    per_rank = torch.cuda.device_count() // world.size
    if per_rank < 1:
        raise TrainingError(f"{world.size} ranks but only {torch.cuda.device_count()} GPUs")
    return [f"cuda:{world.rank * per_rank + i}" for i in range(per_rank)]


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
