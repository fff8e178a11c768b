"""How an optimizer step runs, as one value the loop calls: a single process, DDP, DeepSpeed or FSDP2.

The loop only ever calls forward / backward / step (and no_sync, full_weights, save, load); which backend
it is, is decided once in `build_backend`. Every backend shares sftkit's optimizer, schedule and the
objective's loss, so they train the same model from the same data.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

from . import deepspeed, distributed
from .checkpoint import DEEPSPEED_FOLDER, FSDP_FOLDER, OPTIMIZER_FILE, load_schedule, load_tensors, load_weights, save_schedule
from .errors import CheckpointError, TrainingError
from .loss import loss_sum
from .quant import is_quantized, make_optimizer

SCHEDULES = ("cosine", "linear", "constant")


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak rate: linear warmup, then cosine / linear decay to zero, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"lr_scheduler_type must be one of {', '.join(SCHEDULES)}, got '{kind}'")

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


class LossModule(torch.nn.Module):
    """The model with its loss as forward, so DDP's and DeepSpeed's hooks wrap exactly what training runs."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def build_backend(config, model, *, world: distributed.World, devices: list[str], compute_dtype: torch.dtype,
                  total_steps: int, loss_fn=loss_sum, fused_optimizer: bool = False):
    """The one setup branch: the backend that runs the steps, with the optimizer and schedule of the trainable
    parameters (for FSDP made after sharding, on the shards)."""
    module = LossModule(model, loss_fn)
    if config.fsdp:
        from . import fsdp

        module = fsdp.shard(module, strategy=fsdp.parse_strategy(config.fsdp), world_size=world.size,
                            device=torch.device(devices[0]), compute_dtype=compute_dtype)
        return fsdp.FSDPBackend(module, *optimizer_and_schedule(config, model, total_steps),
                                max_grad_norm=config.max_grad_norm, world=world)
    optimizer, scheduler = optimizer_and_schedule(config, model, total_steps,
                                                  fused=fused_optimizer and not config.deepspeed and len(devices) == 1)
    if config.deepspeed:
        if is_quantized(model) and deepspeed.deepspeed_stage(config.deepspeed) >= 3:
            raise TrainingError(deepspeed.QUANTIZED_ZERO3)
        ds_config = deepspeed.fill_config(config.deepspeed, micro_batch=config.batch_size, world_size=world.size,
                                          accumulation=config.gradient_accumulation_steps,
                                          max_grad_norm=config.max_grad_norm, compute_dtype=compute_dtype,
                                          hidden_size=getattr(model.config, "hidden_size", None))
        return deepspeed.DeepSpeedBackend(module, optimizer, scheduler, ds_config, world)
    device = torch.device(devices[0])
    if world.distributed:
        one_gpu = device.type == "cuda" and len(devices) == 1
        module = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if one_gpu else None)
    # fp16 needs loss scaling; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None
    return TorchBackend(module, model, optimizer, scheduler, scaler, max_grad_norm=config.max_grad_norm, world=world)


def optimizer_and_schedule(config, model, total_steps: int, fused: bool = False):
    """sftkit's optimizer over the trainable parameters (fused: torch's one-kernel AdamW on CUDA), and its warmup +
    decay schedule."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(config.optim, parameters, config.lr, betas=(config.adam_beta1, config.adam_beta2),
                               weight_decay=config.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.lr_scheduler_type, round(config.warmup_ratio * total_steps), total_steps))
    return optimizer, scheduler


class TorchBackend:
    """One process, or DDP (gradients all-reduced by its hooks during backward): torch's own optimizer step."""

    lockstep = False  # evaluation and generation need no other rank

    def __init__(self, module, model, optimizer, scheduler, scaler, *, max_grad_norm: float, world: distributed.World):
        self.module, self.model = module, model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.max_grad_norm, self.world = max_grad_norm, world

    def forward(self, batch: dict):
        return self.module(batch)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def no_sync(self, last_micro_batch: bool):
        """Skip DDP's all-reduce on every micro-batch of the window but the last."""
        if last_micro_batch or not self.world.distributed:
            return contextlib.nullcontext()
        return self.module.no_sync()

    def clip_gradients(self) -> torch.Tensor:
        """Clip the window's gradients; returns their norm before clipping, on the device (nothing waits for it)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm or float("inf"))

    def step(self) -> None:
        """Step (after clip_gradients), schedule, clear."""
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_weights(self):
        return contextlib.nullcontext()

    def save(self, folder: str) -> None:
        """Optimizer, schedule and scaler (rank 0: every rank holds the same)."""
        if self.world.is_main:
            torch.save(self.optimizer.state_dict(), os.path.join(folder, OPTIMIZER_FILE))
            save_schedule(folder, self.scheduler, self.scaler)

    def load(self, folder: str) -> None:
        """Weights, optimizer, schedule and scaler of a checkpoint this backend saved."""
        saved_by = {DEEPSPEED_FOLDER: "a DeepSpeed run: resume it with the same --deepspeed config",
                    FSDP_FOLDER: "an FSDP run: resume it with the same --fsdp"}
        for state_folder, run in saved_by.items():
            if not os.path.isfile(os.path.join(folder, OPTIMIZER_FILE)) and os.path.isdir(os.path.join(folder, state_folder)):
                raise CheckpointError(f"{folder} was saved by {run}")
        load_weights(self.model, folder)
        self.optimizer.load_state_dict(load_tensors(os.path.join(folder, OPTIMIZER_FILE)))
        load_schedule(folder, self.scheduler, self.scaler)
