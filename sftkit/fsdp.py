"""The FSDP2 backend: parameters, gradients and optimizer state sharded over every rank with PyTorch's own
`fully_shard`; the only module that imports torch.distributed.fsdp and torch.distributed.checkpoint, lazily.

Units: each decoder layer, the backbone (embeddings, final norm), the output head, and the loss module as
the root. The loss runs the backbone and then the head in chunks (sftkit/loss.py), never the model's own
forward, so the backbone and the head each own their parameters and their own hooks gather them: through
the root in training, directly in evaluation and generation. A head tied to the input embeddings shares
the backbone's unit (FSDP keeps a shared parameter in one unit).

Checkpoints hold torch.distributed.checkpoint shards in safetensors files (every rank writes its own; the
offsets are JSON in each file's header) plus JSON for the optimizer's hyperparameters: reading them back
unpickles nothing. The default DCP format is not used because it pickles its .metadata file.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from .backend import TorchBackend
from .checkpoint import FSDP_FOLDER, load_json, load_schedule, save_json, save_schedule
from .errors import CheckpointError, SftkitError, TrainingError

STRATEGIES = ("full_shard", "shard_grad_op")
FLAGS = ("auto_wrap", "offload")
GROUPS_FILE = "param_groups.json"


@dataclass(frozen=True)
class Strategy:
    """What --fsdp asks for, in ms-swift's (and HF's) words: 'full_shard auto_wrap offload'."""

    reshard_after_forward: bool = True  # full_shard; shard_grad_op keeps each layer gathered until its backward
    offload: bool = False  # parameters, gradients and optimizer state live in CPU memory


def parse_strategy(text: str) -> Strategy:
    """full_shard or shard_grad_op (full_shard when neither), with auto_wrap (always on: one unit per decoder
    layer) and offload."""
    words = text.replace(",", " ").split()
    unknown = [word for word in words if word not in STRATEGIES + FLAGS]
    if not words or unknown or all(name in words for name in STRATEGIES):
        raise ValueError(f"fsdp must be full_shard or shard_grad_op, optionally with auto_wrap and offload "
                         f"(e.g. 'full_shard auto_wrap offload'), got '{text}'")
    return Strategy(reshard_after_forward="shard_grad_op" not in words, offload="offload" in words)


def shard(module: torch.nn.Module, *, strategy: Strategy, world_size: int, device: torch.device,
          compute_dtype: torch.dtype) -> torch.nn.Module:
    """Shard the loss module's model in place (see the module docstring for the units); returns the module.

    Mixed precision gathers parameters in the compute dtype and reduces gradients in float32; the master
    weights keep their own dtype (float32 adapters or full weights, a frozen base in its load dtype).
    """
    _require_torch_apis()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if world_size < 2:
        raise TrainingError("--fsdp shards over several processes: launch with NPROC_PER_NODE=N (N >= 2) or torchrun")
    if compute_dtype == torch.float16:
        raise TrainingError("--fsdp trains in bf16 or fp32 (fp16 would need a loss scaler that agrees across shards): "
                            "use --dtype bf16 or fp32")
    model = module.model
    mesh = init_device_mesh(device.type, (world_size,))
    precision = dict(param_dtype=None if compute_dtype == torch.float32 else compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if strategy.offload else OffloadPolicy()
    common = dict(mesh=mesh, offload_policy=offload, mp_policy=MixedPrecisionPolicy(**precision))
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=strategy.reshard_after_forward, **common)
    backbone, head = getattr(model, model.base_model_prefix), model.get_output_embeddings()
    # The head runs once per loss chunk and is needed again first thing in backward: it stays gathered.
    if {id(p) for p in head.parameters()} & {id(p) for p in backbone.parameters()}:
        fully_shard([backbone, head], reshard_after_forward=False, **common)
    else:
        fully_shard(backbone, reshard_after_forward=strategy.reshard_after_forward, **common)
        fully_shard(head, reshard_after_forward=False, **common)
    # The root casts nothing: the batch's loss weights stay float32.
    root_precision = MixedPrecisionPolicy(**precision, cast_forward_inputs=False)
    return fully_shard(module, mesh=mesh, offload_policy=offload, mp_policy=root_precision)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules transformers says must not be split (its decoder layer classes), innermost first."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names and module is not model]
    if not layers:
        raise TrainingError(f"--fsdp shards one unit per decoder layer, but {type(model).__name__} names no decoder "
                            "layer class (_no_split_modules)")
    return layers[::-1]


class FSDPBackend(TorchBackend):
    """sftkit's optimizer on the sharded parameters (each rank steps its own shards), gradients reduce-scattered
    by FSDP's hooks in backward."""

    lockstep = True  # every forward gathers parameters from every rank, in evaluation and generation too

    def __init__(self, module, optimizer, scheduler, *, max_grad_norm: float, world):
        super().__init__(module, module.model, optimizer, scheduler, None, max_grad_norm=max_grad_norm, world=world)

    def no_sync(self, last_micro_batch: bool):
        """Reduce-scatter gradients only in the window's last backward; before it each rank keeps its own sum.

        Set here and left set: the loop runs the backward after leaving this context.
        """
        self.module.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor:
        """Clip by the global norm (over every rank's shards); returns it, whole, on the device."""
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm or float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    @contextlib.contextmanager
    def full_weights(self):
        """Yields the trained tensors whole, on rank 0's CPU (empty elsewhere; every rank gathers): the adapter
        with LoRA, every weight in full fine-tuning."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        yield get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                          ignore_frozen_params=True))

    def save(self, folder: str) -> None:
        """Every rank writes its shards of the trained parameters and their optimizer state into <folder>/fsdp;
        rank 0 the optimizer's hyperparameters and the schedule as JSON."""
        from torch.distributed import checkpoint as dcp

        model_state, optimizer_state = self._state()
        groups = optimizer_state.pop("param_groups")
        state_folder = os.path.join(folder, FSDP_FOLDER)
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 storage_writer=dcp.HuggingFaceStorageWriter(state_folder, save_distributed=True))
        if self.world.is_main:
            save_json(state_folder, GROUPS_FILE, {"param_groups": groups})
            save_schedule(folder, self.scheduler, None)

    def load(self, folder: str) -> None:
        """Read the shards back into this run's parameters and optimizer state, and the schedule."""
        from torch.distributed import checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        state_folder = os.path.join(folder, FSDP_FOLDER)
        if not os.path.isdir(state_folder):
            raise CheckpointError(f"{folder} holds no FSDP state ({FSDP_FOLDER}/): it was not saved by an --fsdp run")
        groups = load_json(state_folder, GROUPS_FILE)["param_groups"]
        model_state, optimizer_state = self._state()
        del optimizer_state["param_groups"]
        try:
            dcp.load({"model": model_state, "optimizer": optimizer_state},
                     storage_reader=dcp.HuggingFaceStorageReader(state_folder))
        except Exception as error:  # DCP wraps a missing shard or a mismatched model in its own error types
            raise CheckpointError(f"{state_folder} does not fit this run's model and optimizer ({error})") from None
        # DCP found every trained tensor (a missing one fails the load); the frozen base is not in the checkpoint.
        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        set_model_state_dict(self.model, model_state, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, {**optimizer_state, "param_groups": groups}, options=options)
        load_schedule(folder, self.scheduler, None)

    def _state(self) -> tuple[dict, dict]:
        """This rank's shards of the trained parameters and of their optimizer state (created if not yet)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(ignore_frozen_params=True)
        # A tied head is the embeddings under a second name: one copy (safetensors refuses shared memory).
        trained = {name for name, parameter in self.model.named_parameters() if parameter.requires_grad}
        model_state = {name: value for name, value in get_model_state_dict(self.model, options=options).items()
                       if name in trained}
        return model_state, get_optimizer_state_dict(self.model, self.optimizer, options=options)


def _require_torch_apis() -> None:
    """A clear error when this torch lacks FSDP2 or DCP's safetensors storage."""
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        raise SftkitError(f"--fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard) and DCP's safetensors storage, "
                          f"missing from torch {torch.__version__} ({error}); sftkit is tested with torch 2.13") from None
