"""LoRA for nn.Linear, transformers' Conv1D and quantized linear layers, saved and loaded in peft's adapter format
without importing peft."""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .architecture import output_head
from .errors import CheckpointError, OptionError
from .fused import UPDATE_DTYPES, lora_linear
from .quant import is_quantized_linear

ALL_LINEAR = "all-linear"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# peft saves PeftModelForCausalLM.base_model (LoraModel).model, with the adapter name stripped.
PEFT_PREFIX = "base_model.model."
MERGE_QUANTIZED = (
    "merging into 4-bit (or 8-bit, GPTQ) weights loses quality: reload the base in full precision and merge there"
)

_PEFT_INIT = {"default": True, "gaussian": "gaussian"}
# init_lora_weights=False only leaves B random at creation; weights loaded from a file overwrite it.
_INIT_FROM_PEFT = {True: "default", False: "default", "gaussian": "gaussian"}

# peft 0.21 LoraConfig fields that change which layers are adapted or what they compute; we support only their
# "off" values, so a file using one is refused instead of loaded wrongly.
_PEFT_UNSUPPORTED = {
    "alora_invocation_tokens": None,
    "alpha_pattern": {},
    "arrow_config": None,
    "bias": "none",
    "exclude_modules": None,
    "kasa_config": None,
    "layer_replication": None,
    "layers_pattern": None,
    "layers_to_transform": None,
    "lora_bias": False,
    "megatron_config": None,
    "modules_to_save": None,
    "monteclora_config": None,
    "rank_pattern": {},
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_dora": False,
    "use_qalora": False,
    "velora_config": None,
}
# The rest of peft 0.21's LoraConfig at its defaults, so our file has every key peft writes.
# peft_version stays None: we are not peft, and peft fills in its own version when it reads the file.
_PEFT_OTHER = {
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    # Whether the layers store their weight transposed (Conv1D): the layers decide, as in peft, which sets it to
    # match each target; save_adapter writes what the model's layers are.
    "fan_in_fan_out": False,
    "inference_mode": True,
    "loftq_config": {},
    "lora_ga_config": None,
    "megatron_core": "megatron.core",
    "peft_type": "LORA",
    "peft_version": None,
    "qalora_group_size": 16,
    "revision": None,
    "task_type": "CAUSAL_LM",
}


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA hyper-parameters, named after the paper; `to_peft_dict`/`from_peft_dict` translate to peft's names.

    target_modules: a regex fully matching dotted module names, a list of names or `.name` suffixes, or
    "all-linear" (alias "all") for every nn.Linear except the output head.
    """

    r: int = 8
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False
    init: str = "default"

    def __post_init__(self):
        # A list is stored as a sorted tuple: hashable, and equal however the names were ordered.
        targets = self.target_modules
        if isinstance(targets, str) and targets.lower() in (ALL_LINEAR, "all"):
            targets = ALL_LINEAR
        elif isinstance(targets, (list, tuple, set, frozenset)):
            targets = tuple(sorted(set(targets)))
        object.__setattr__(self, "target_modules", targets)
        problems = _config_problems(self)
        if problems:
            raise ValueError("invalid LoRAConfig: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        """rsLoRA divides by sqrt(r) so the update's size does not shrink as the rank grows."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict:
        """The adapter_config.json peft 0.21 writes for the same LoraConfig."""
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            **_PEFT_UNSUPPORTED,
            **_PEFT_OTHER,
            "base_model_name_or_path": base_model_name_or_path,
            "init_lora_weights": _PEFT_INIT[self.init],
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "r": self.r,
            "target_modules": targets,
            "use_rslora": self.use_rslora,
        }

    @classmethod
    def from_peft_dict(cls, d: dict) -> LoRAConfig:
        """Read a peft adapter_config.json; refuses peft features we do not implement rather than ignore them."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"not a LoRA adapter: peft_type={d['peft_type']!r}")
        used = [f"{key}={d[key]!r}" for key, off in _PEFT_UNSUPPORTED.items() if d.get(key) and d[key] != off]
        if used:
            raise ValueError(f"adapter uses peft features sftkit does not support: {', '.join(used)}")
        init = d.get("init_lora_weights", True)
        init = init.lower() if isinstance(init, str) else init
        if init not in _INIT_FROM_PEFT:
            raise ValueError(f"unsupported init_lora_weights={init!r}; sftkit supports True, False and 'gaussian'")
        # Defaults are peft's, for hand-written files that leave a key out.
        return cls(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0),
            target_modules=d.get("target_modules"),
            use_rslora=d.get("use_rslora", False),
            init=_INIT_FROM_PEFT[init],
        )


def _config_problems(config: LoRAConfig) -> list[str]:
    """Every problem at once, so one run shows all that needs fixing."""
    problems = []
    if isinstance(config.r, bool) or not isinstance(config.r, int) or config.r <= 0:
        problems.append(f"r must be a positive int, got {config.r!r}")
    if not 0 <= config.dropout < 1:
        problems.append(f"dropout must be in [0, 1), got {config.dropout!r}")
    if config.init not in _PEFT_INIT:
        problems.append(f"init must be one of {sorted(_PEFT_INIT)}, got {config.init!r}")
    targets = config.target_modules
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            problems.append(f"target_modules {targets!r} is not a valid regex: {err}")
    elif not isinstance(targets, tuple) or not targets or not all(isinstance(t, str) and t for t in targets):
        problems.append(f"target_modules must be a regex, 'all-linear' or a non-empty list of names, got {targets!r}")
    return problems


class LoRALinear(nn.Module):
    """nn.Linear plus a trainable low-rank update B @ A.

    The base `weight`/`bias` are kept under their own names, so base checkpoint keys never change, and the
    adapter keys `<name>.lora_A.weight` equal peft's saved keys after the `base_model.model.` prefix.
    """

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__()
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        # Like peft: the base's device and dtype, but never an integer (quantized) dtype.
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self._add_lora(base.in_features, base.out_features, config, device=base.weight.device, dtype=dtype)

    def _add_lora(self, in_features: int, out_features: int, config: LoRAConfig, *, device: torch.device,
                  dtype: torch.dtype) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.r, self.scaling, self.merged, self.disabled = config.r, config.scaling, False, False
        self.dropout = nn.Dropout(config.dropout)
        self.fused = None  # None: eager autograd; "compute" or "fp32": fused.lora_linear with that update dtype
        self.lora_A = nn.Linear(self.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, self.out_features, bias=False, device=device, dtype=dtype)
        _init_lora(self.lora_A.weight, self.lora_B.weight, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not self.merged and not self.disabled:
            return lora_linear(x, self.weight, self.bias, self.lora_A.weight, self.lora_B.weight, self.scaling,
                               self.dropout.p, self.training, self.fused)
        result = F.linear(x, self.weight, self.bias)
        return result if self.merged or self.disabled else self._add_update(result, x)

    def _add_update(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The update runs in the adapter's dtype (or autocast's) and is added in the base output's dtype."""
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling in float32: a bf16 product would round away much of a small update."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        if not self.merged:
            self._add_to_weight(self.delta_weight())
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._add_to_weight(-self.delta_weight())
            self.merged = False

    @torch.no_grad()
    def _add_to_weight(self, delta: torch.Tensor) -> None:
        # Add in float32 and round once to the weight dtype.
        self.weight.copy_(self.weight.float() + delta)

    def to_base(self) -> nn.Module:
        """The plain layer again, holding this layer's (merged) weight and bias."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"scaling={self.scaling:g}, merged={self.merged}"
        )


class LoRAQuantLinear(LoRALinear):
    """LoRA on a quantized linear (bitsandbytes 4/8-bit, GPTQ), kept whole as `base_layer` because only its own
    forward can read its packed weight. The adapter is float32, like peft's, and cannot be merged."""

    def __init__(self, base: nn.Module, config: LoRAConfig):
        nn.Module.__init__(self)
        self.base_layer = base
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        self._add_lora(base.in_features, base.out_features, config, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result if self.disabled else self._add_update(result, x)

    def merge(self) -> None:
        raise ValueError(MERGE_QUANTIZED)


class LoRAConv1D(LoRALinear):
    """transformers' Conv1D (GPT-2 and the families built on it, PolyLM) plus LoRA. Conv1D is a linear layer whose
    weight is stored transposed, [in, out] (peft's fan_in_fan_out); the adapter is shaped as for nn.Linear."""

    def __init__(self, base: Conv1D, config: LoRAConfig):
        nn.Module.__init__(self)
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self._add_lora(base.nx, base.nf, config, device=base.weight.device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Conv1D's own computation, so the unmerged layer gives exactly the base's output plus the update.
        result = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight).view(*x.shape[:-1], self.out_features)
        return result if self.merged or self.disabled else self._add_update(result, x)

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().T

    def to_base(self) -> nn.Module:
        with torch.device("meta"):
            conv = Conv1D(self.out_features, self.in_features)
        conv.weight, conv.bias = self.weight, self.bias
        return conv


def use_fused_lora(model: nn.Module, update_dtype: str | None = "compute") -> int:
    """Run every LoRALinear through fused.lora_linear (update_dtype None: back to eager autograd); returns how many.
    LoRA on a quantized base keeps the eager path: only the base layer's own forward can read its weight."""
    if update_dtype is not None and update_dtype not in UPDATE_DTYPES:
        raise ValueError(f"update_dtype must be one of {', '.join(UPDATE_DTYPES)}, got {update_dtype!r}")
    layers = [m for m in model.modules() if isinstance(m, LoRALinear) and not isinstance(m, LoRAQuantLinear)]
    for layer in layers:
        layer.fused = update_dtype
    return len(layers)


def _init_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, config: LoRAConfig) -> None:
    """peft's init: B = 0 so the injected model starts equal to the base model; A must not be 0 or nothing trains."""
    if config.init == "gaussian":
        nn.init.normal_(lora_A, std=1 / config.r)
    else:
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
    nn.init.zeros_(lora_B)


def inject_lora(model: nn.Module, config: LoRAConfig, exclude: tuple[str, ...] = ()) -> list[str]:
    """Replace the targeted linears with LoRALinear (LoRAQuantLinear on a quantized one, LoRAConv1D on a Conv1D) and
    freeze everything else; returns their names. Modules under an `exclude` name (e.g. a frozen vision tower) are
    never targeted."""
    names = [name for name in target_names(model, config.target_modules) if not _under(name, exclude)]
    if not names:
        raise OptionError("lora_target_modules", f"{_shown(config.target_modules)} matches only modules under "
                          f"{list(exclude)}, which stay frozen")
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        layer_class = LoRAQuantLinear if is_quantized_linear(base) else LoRAConv1D if isinstance(base, Conv1D) else LoRALinear
        _set_submodule(model, name, layer_class(base, config))
    return names


def target_names(model: nn.Module, target_modules: str | tuple[str, ...]) -> list[str]:
    """The sorted names of the layers a target spec selects, matched like peft; raises if that is no layer."""
    modules = dict(model.named_modules())
    injected = [name for name, module in modules.items() if isinstance(module, LoRALinear)]
    if injected:
        raise ValueError(f"model already has LoRA layers (e.g. {injected[0]}); call unload_lora first")
    if target_modules == ALL_LINEAR:
        heads = _output_head_names(model, modules)
        names = [name for name, module in modules.items() if _is_linear(module) and name not in heads]
    else:
        names = [name for name in modules if _matches(target_modules, name)]
    if not names:
        linear = [name for name, module in modules.items() if _is_linear(module)]
        short = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear))
        raise OptionError("lora_target_modules", f"{_shown(target_modules)} matches no layer of this model. Linear "
                          f"layers it can match by name: {short} (full names such as {linear[0] if linear else '-'}), "
                          "or all-linear")
    unsupported = [f"{name} ({type(modules[name]).__name__})" for name in names if not is_adaptable(modules[name])]
    if unsupported:
        raise OptionError("lora_target_modules", f"LoRA supports only nn.Linear, Conv1D and bitsandbytes/GPTQ quantized "
                          f"linears; {_shown(target_modules)} matches {unsupported[:10]}")
    return sorted(names)


def _shown(target_modules) -> str:
    return repr(target_modules) if isinstance(target_modules, str) else ",".join(target_modules)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _matches(target_modules: str | tuple[str, ...], name: str) -> bool:
    """peft's rule: a string is a full regex match; a list entry matches the whole name or a dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def _output_head_names(model: nn.Module, modules: dict[str, nn.Module]) -> set[str]:
    """all-linear leaves the vocabulary projection alone: it is huge and usually tied to the embeddings."""
    head = output_head(model)
    if head is not None:
        return {name for name, module in modules.items() if module is head}
    return {name for name in modules if name.rpartition(".")[2] == "lm_head"}


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear and its subclasses (bitsandbytes' are), Conv1D (as peft's all-linear), and GPTQ linears."""
    return isinstance(module, (nn.Linear, Conv1D)) or is_quantized_linear(module)


def is_adaptable(module: nn.Module) -> bool:
    """LoRALinear calls F.linear on the weight, which is wrong for a subclass with its own forward; the quantized
    ones we know go through LoRAQuantLinear, which calls their forward."""
    plain = any(isinstance(module, kind) and type(module).forward is kind.forward for kind in (nn.Linear, Conv1D))
    return plain or is_quantized_linear(module)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Fold each update into its base weight, so inference costs nothing extra; merging twice is a no-op."""
    layers = _lora_layers(model)
    quantized = [name for name, layer in layers if isinstance(layer, LoRAQuantLinear)]
    if quantized:
        raise ValueError(
            f"cannot merge LoRA into quantized layers ({len(quantized)}, e.g. {quantized[0]}): {MERGE_QUANTIZED}"
        )
    tied = _shared_parameter_ids(model)
    blocked = [name for name, layer in layers if id(layer.weight) in tied]
    if blocked:
        raise ValueError(f"cannot merge {blocked}: the weight is tied to another module, which would change too")
    for _, layer in layers:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take the updates back out of the base weights, e.g. to train on after a merged evaluation."""
    for _, layer in _lora_layers(model):
        layer.unmerge()


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside, every LoRA layer computes its base layer alone: the model is its own base again, which is the
    reference model of preference training without a second copy in memory."""
    layers = [layer for _, layer in _lora_layers(model)]
    merged = [name for name, layer in _lora_layers(model) if layer.merged]
    if merged:
        raise ValueError(f"merged adapters cannot be switched off ({merged[0]}): unmerge_lora first")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.disabled = state


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge and put the plain layers back, so the model saves and loads like the base architecture."""
    merge_lora(model)
    for name, layer in _lora_layers(model):
        _set_submodule(model, name, layer.to_base())
    return model


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    counts = Counter(id(param) for _, param in model.named_parameters(remove_duplicate=False))
    return {param_id for param_id, count in counts.items() if count > 1}


def lora_state_dict(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters themselves (not copies), keyed `<module>.lora_A.weight` / `<module>.lora_B.weight`.

    Live parameters, so a caller can hand them to an optimizer, cast them or copy weights into them.
    """
    state = {}
    for name, layer in _lora_layers(model):
        state[f"{name}.lora_A.weight"] = layer.lora_A.weight
        state[f"{name}.lora_B.weight"] = layer.lora_B.weight
    return state


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters count once, packed 4-bit ones as the weights they hold."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(_weight_count(p) for p in params)


def _weight_count(param: nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit weights per byte of its storage dtype (like peft's count).
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def save_adapter(
    model: nn.Module, config: LoRAConfig, out_dir: str, base_model_name_or_path: str | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter_config.json + adapter_model.safetensors exactly as peft does, so peft loads them as is.

    `tensors` (keyed as lora_state_dict) replace the model's own adapter weights, e.g. whole ones gathered from shards.
    """
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save")
    mismatched = [name for name, layer in layers if (layer.r, layer.scaling) != (config.r, config.scaling)]
    if mismatched:
        raise ValueError(f"config r={config.r}, scaling={config.scaling:g} does not match layers {mismatched[:10]}")
    targets = _saved_target_modules(model, config.target_modules, sorted(name for name, _ in layers))
    base = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    peft_config = replace(config, target_modules=targets).to_peft_dict(base)
    peft_config["fan_in_fan_out"] = any(isinstance(layer, LoRAConv1D) for _, layer in layers)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        f.write(json.dumps(peft_config, indent=2, sort_keys=True))
    state = lora_state_dict(model)
    if tensors is not None:
        state = {key: tensors[key] for key in state}
    saved = {PEFT_PREFIX + key: param.detach().to("cpu").contiguous() for key, param in state.items()}
    save_file(saved, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})


def _saved_target_modules(model: nn.Module, target_modules, names: list[str]) -> str | tuple[str, ...]:
    """The spec written to the file; it must select exactly the injected layers, or the weights would not fit.

    all-linear is resolved here, as peft does, because what counts as the output head depends on the model.
    """
    if target_modules == ALL_LINEAR:
        return exact_targets(model, names)
    if not _selects_exactly(model, target_modules, names):
        raise ValueError(f"target_modules={target_modules!r} does not select exactly the model's LoRA layers")
    return target_modules


def exact_targets(model: nn.Module, names: list[str]) -> tuple[str, ...]:
    """A target spec that selects exactly these layers: their leaf names ("q_proj", ...) when those are
    unambiguous, else their full names."""
    names = sorted(names)
    leaves = tuple(sorted({name.rpartition(".")[2] for name in names}))
    return leaves if _selects_exactly(model, leaves, names) else tuple(names)


def _selects_exactly(model: nn.Module, targets, names: list[str]) -> bool:
    # peft matches before injecting, so the lora_A/lora_B inside our layers are not candidates.
    inside_lora = tuple(name + "." for name in names)
    modules = [name for name, _ in model.named_modules() if not name.startswith(inside_lora)]
    return sorted(name for name in modules if _matches(targets, name)) == sorted(names)


def load_adapter(model: nn.Module, adapter_dir: str) -> LoRAConfig:
    """Inject the adapter in adapter_dir (ours or peft's) and load its weights strictly.

    Keys are checked before the model is touched, so a bad adapter leaves the model as it was.
    """
    config = read_adapter_config(adapter_dir)
    tensors = _read_tensors(os.path.join(adapter_dir, WEIGHTS_NAME))
    try:
        names = target_names(model, config.target_modules)
        _check_adapter_tensors(_adapter_shapes(model, names, config.r), tensors)
    except ValueError as error:
        raise CheckpointError(f"the adapter in {adapter_dir} does not fit the model: {error}") from None
    inject_lora(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key.removeprefix(PEFT_PREFIX)].copy_(tensor)
    return config


def read_adapter_config(adapter_dir: str) -> LoRAConfig:
    """The LoRAConfig of a saved adapter; CheckpointError naming adapter_config.json when it cannot be used."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            return LoRAConfig.from_peft_dict(json.load(f))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: without it the adapter cannot be loaded") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is not a usable LoRA adapter config ({error})") from None


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    """A safetensors file (never a pickle: adapter_model.bin is not read)."""
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except Exception as error:  # safetensors raises its own types for a truncated or damaged file
        raise CheckpointError(f"{path} cannot be read ({error})") from None


def load_lora_weights(model: nn.Module, adapter_dir: str) -> None:
    """Copy a saved adapter into a model already injected with the same LoRA layers, strictly (names and shapes)."""
    tensors = {key.removeprefix(PEFT_PREFIX): value
               for key, value in _read_tensors(os.path.join(adapter_dir, WEIGHTS_NAME)).items()}
    current = lora_state_dict(model)
    if tensors.keys() != current.keys():
        missing, unexpected = sorted(current.keys() - tensors.keys()), sorted(tensors.keys() - current.keys())
        raise CheckpointError(f"{adapter_dir} does not fit this model's LoRA layers: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    misshaped = [key for key, value in current.items() if tuple(value.shape) != tuple(tensors[key].shape)]
    if misshaped:
        raise CheckpointError(f"{adapter_dir} has LoRA tensors of other shapes (another --lora_rank?): {misshaped[:5]}")
    with torch.no_grad():
        for key, parameter in current.items():
            parameter.copy_(tensors[key])


def _adapter_shapes(model: nn.Module, names: list[str], r: int) -> dict[str, tuple[int, ...]]:
    """The tensors a file must hold for these layers, under peft's saved key names."""
    shapes = {}
    for name in names:
        layer = model.get_submodule(name)
        in_features, out_features = (layer.nx, layer.nf) if isinstance(layer, Conv1D) else (layer.in_features, layer.out_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, in_features)
        shapes[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (out_features, r)
    return shapes


def _check_adapter_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor]) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    misshaped = [
        f"{key} {tuple(tensors[key].shape)} != {expected[key]}"
        for key in sorted(expected.keys() & tensors.keys())
        if tuple(tensors[key].shape) != expected[key]
    ]
    problems = [
        f"{label}: {', '.join(keys[:10])}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", misshaped))
        if keys
    ]
    if problems:
        raise ValueError("adapter does not fit the model; " + "; ".join(problems))
