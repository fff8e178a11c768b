"""Checks before the expensive part: what a training run needs is checked before the model's weights load.

The output folder, the cache, the DeepSpeed config, the checkpoint to resume (its files against its manifest,
who wrote it, whether this run's options would change it), the template, the data and the LoRA target
patterns (matched against the modules of the model built from its config.json on the meta device) all fail
in seconds: a bad line 2 of the data never costs a model load first.
"""
from __future__ import annotations

from . import distributed, run
from .checkpoint import check_files, read_train_state, require_resumable, resolve_shared_checkpoint
from .data import cache as dataset_cache
from .errors import OptionError
from .lora import target_names
from .manifest import signing_key
from .model import empty_model
from .registry import MODELS, resolve_lora_targets


def check_setup(config, world: distributed.World, say=print) -> str | None:
    """Checks that need no model; returns the checkpoint folder to resume from (checked), or None."""
    if config.max_forward_tokens > 0 and world.size > 1:
        raise OptionError("max_forward_tokens", "splits micro-batches in one process only: DDP ranks must run the same "
                          "number of forward passes (each one syncs the model's buffers)")
    resume = resolve_shared_checkpoint(config.resume_from_checkpoint, world) if config.resume_from_checkpoint else None
    if world.is_main:
        if resume:
            run.check_output_dir(run.run_dir_of(resume), suffix=True)
        else:
            run.check_output_dir(config.output_dir, config.add_output_dir_suffix)
    signing_key(create=True)  # every checkpoint's manifest is signed with it
    if config.dataset_cache:
        dataset_cache.check_writable()
    if config.deepspeed:
        from .deepspeed import check_config

        check_config(config, world.size)
    if resume:
        check_files(resume, resume=True, trust=config.trust_checkpoint, say=say)
        require_resumable(resume)
        read_train_state(resume)
    return resume


def check_model(config, model_dir: str, resume: str | None) -> list[str]:
    """Checks that need the model's config but not its weights: the LoRA targets match some layer, and a resume
    keeps the run's options (returns the differences --ignore_args_mismatch accepted)."""
    if config.sft_type == "lora":
        info = MODELS.get(config.model_type)
        model = empty_model(model_dir, trust_remote_code=config.trust_remote_code,
                            automodel_class=info.automodel_class if info else None)
        target_names(model, resolve_lora_targets(config.model_type, config.lora_target_modules))
    if resume is None:
        return []
    return run.check_resume_args(resume, config.run_arguments(model_dir), config.ignore_args_mismatch)
