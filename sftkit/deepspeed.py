"""The DeepSpeed backend: the only module that imports deepspeed, lazily.

The training loop stays the same: the engine runs forward/backward/step of the same loss module,
the schedule and normalised loss are sftkit's, and checkpoints hold DeepSpeed's own state
(for resume) beside the usual adapter or safetensors export.
"""
from __future__ import annotations

import contextlib
import json
import os
from functools import partial

import torch

from .checkpoint import DEEPSPEED_FOLDER, load_schedule, save_schedule
from .errors import CheckpointError, OptionError, SftkitError
from .jsonfile import read_object
from .paths import packaged

NAMED_CONFIGS = ("zero2", "zero3", "zero2_offload", "zero3_offload")
QUANTIZED_ZERO3 = ("a quantized base (quantization_bit, GPTQ) does not train under DeepSpeed ZeRO-3: ZeRO-3 splits every "
                   "weight across ranks, and a packed 4/8-bit weight cannot be split and put back together (its "
                   "quantization state lives outside the tensor). Use ZeRO-2 (--deepspeed zero2) or plain DDP for QLoRA: "
                   "each rank then holds its own quantized copy")


def config_path(name_or_path: str) -> str:
    """A shipped config by name (zero2, zero3, zero2_offload, zero3_offload) or a JSON file path."""
    if name_or_path in NAMED_CONFIGS:
        return packaged("sftkit.ds_config", f"{name_or_path}.json")
    if not os.path.isfile(name_or_path):
        raise OptionError("deepspeed", f"DeepSpeed config '{name_or_path}' not found (shipped: {', '.join(NAMED_CONFIGS)})")
    return name_or_path


def check_config(config, world_size: int) -> None:
    """--deepspeed before anything loads: DeepSpeed installed, its config readable and agreeing with the options."""
    _deepspeed()
    fill_config(config.deepspeed, micro_batch=config.batch_size, accumulation=config.gradient_accumulation_steps,
                world_size=world_size, max_grad_norm=config.max_grad_norm, compute_dtype=torch.float32)


def deepspeed_stage(name_or_path: str) -> int:
    """The ZeRO stage of a shipped or JSON config; 0 when the file cannot be read (using it reports why)."""
    try:
        with open(config_path(name_or_path), encoding="utf-8") as handle:
            return stage(json.load(handle))
    except (OSError, ValueError, SftkitError):
        return 0


def fill_config(name_or_path: str, *, micro_batch: int, accumulation: int, world_size: int, max_grad_norm: float,
                compute_dtype: torch.dtype, hidden_size: int | None = None) -> dict:
    """The JSON config with every "auto" replaced from the training options, as HF's integration does."""
    path = config_path(name_or_path)
    config = read_object(path, partial(OptionError, "deepspeed"))
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in values.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise OptionError("deepspeed", f"{path} sets {key}={config[key]} but the training options give {value}")
    for section, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if config.get(section, {}).get("enabled") == "auto":
            config[section]["enabled"] = compute_dtype == dtype
    zero = config.get("zero_optimization", {})
    hidden = hidden_size or 1024
    for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if zero.get(key) == "auto":
            zero[key] = value
    return config


class DeepSpeedBackend:
    """The DeepSpeed engine around sftkit's loss module and torch optimizer; it accumulates, clips and steps
    itself at the end of each window, sftkit's schedule moves once per optimizer step."""

    def __init__(self, module: torch.nn.Module, optimizer, scheduler, ds_config: dict, world):
        self.model, self.scheduler, self.ds_config, self.world = module.model, scheduler, ds_config, world
        self.engine, _, _, _ = _deepspeed().initialize(model=module, optimizer=optimizer, config=ds_config,
                                                       model_parameters=[p for p in module.parameters() if p.requires_grad])
        # ZeRO-3 partitions every weight: any forward, in evaluation too, needs every rank.
        self.lockstep = stage(ds_config) >= 3

    def forward(self, batch: dict):
        return self.engine(batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed steps (and clips) only at the end of its accumulation window

    def no_sync(self, last_micro_batch: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces at its own accumulation boundary

    def clip_gradients(self) -> float:
        """The engine clipped and stepped at the end of the window's last backward; its gradient norm."""
        return float(self.engine.get_global_grad_norm() or 0.0)

    def step(self) -> None:
        self.scheduler.step()

    @property
    def learning_rate(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def full_weights(self):
        return gathered(self.model, self.ds_config)

    def save(self, folder: str) -> None:
        """DeepSpeed's own state (partitioned optimizer, module) into <folder>/deepspeed on every rank; the schedule."""
        self.engine.save_checkpoint(folder, tag=DEEPSPEED_FOLDER)
        if self.world.is_main:
            save_schedule(folder, self.scheduler, None)

    def load(self, folder: str) -> None:
        path, _ = self.engine.load_checkpoint(folder, tag=DEEPSPEED_FOLDER, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{folder} holds no DeepSpeed state ({DEEPSPEED_FOLDER}/): it was not saved by a DeepSpeed run")
        load_schedule(folder, self.scheduler, None)


def stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def gathered(model: torch.nn.Module, ds_config: dict):
    """Inside, every rank sees whole parameters (ZeRO-3 partitions them); a no-op for other stages."""
    if stage(ds_config) < 3:
        yield
        return
    with _deepspeed().zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise SftkitError("--deepspeed needs DeepSpeed, which is not installed: pip install 'sftkit[deepspeed]'") from None
    return deepspeed
