"""The DeepSpeed engine: the only module that imports deepspeed, lazily.

The training loop stays the same: the engine runs forward/backward/step of the same loss module,
the schedule and token-normalised loss are sftkit's, and checkpoints hold DeepSpeed's own state
(for resume) beside the usual adapter or safetensors export.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch

from .paths import REPO_ROOT

NAMED_CONFIGS = ("zero2", "zero3", "zero2_offload", "zero3_offload")
STATE_FOLDER = "deepspeed"


def config_path(name_or_path: str) -> str:
    """A shipped config by name (zero2, zero3, zero2_offload, zero3_offload) or a JSON file path."""
    if name_or_path in NAMED_CONFIGS:
        return str(REPO_ROOT / "ds_config" / f"{name_or_path}.json")
    if not os.path.isfile(name_or_path):
        raise FileNotFoundError(f"DeepSpeed config '{name_or_path}' not found (shipped: {', '.join(NAMED_CONFIGS)})")
    return name_or_path


def fill_config(name_or_path: str, *, micro_batch: int, accumulation: int, world_size: int, max_grad_norm: float,
                compute_dtype: torch.dtype, hidden_size: int | None = None) -> dict:
    """The JSON config with every "auto" replaced from the training options, as HF's integration does."""
    with open(config_path(name_or_path), encoding="utf-8") as handle:
        config = json.load(handle)
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
            raise ValueError(f"DeepSpeed config sets {key}={config[key]} but the training options give {value}")
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


def initialize(module: torch.nn.Module, optimizer, ds_config: dict):
    """A DeepSpeed engine around the loss module and sftkit's own (torch) optimizer."""
    deepspeed = _deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config,
                                           model_parameters=[p for p in module.parameters() if p.requires_grad])
    return engine


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


def save(engine, folder: str) -> None:
    """DeepSpeed's own state (partitioned optimizer, module) into <folder>/deepspeed; every rank calls this."""
    engine.save_checkpoint(folder, tag=STATE_FOLDER)


def load(engine, folder: str) -> None:
    path, _ = engine.load_checkpoint(folder, tag=STATE_FOLDER, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"{folder} holds no DeepSpeed state ({STATE_FOLDER}/): it was not saved by a DeepSpeed run")


def _deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise ImportError("--deepspeed needs DeepSpeed: pip install 'sftkit[deepspeed]'") from None
    return deepspeed
