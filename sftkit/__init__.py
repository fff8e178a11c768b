"""sftkit: supervised fine-tuning of LLMs and tool-calling agents.

The public API, re-exported: the data pipeline, LoRA, model loading, training (SFT and preference).
"""
from .chat import infer, merge
from .config import (ChatConfig, DeployConfig, EvalConfig, InferConfig, MergeConfig, PreviewConfig, RLHFConfig, TrainConfig,
                     build_config)
from .constrained import ToolCallGuide, tool_call_guide
from .data.errors import DataError
from .data.formats import Message, to_messages
from .data.loading import Drop, load_conversations, register_dataset, split_and_sample
from .data.pipeline import build_example, build_examples, build_preference_example, collate, encode, mask, truncate
from .data.preference_formats import PreferenceRow, to_preference
from .data.templates import Template, get_template, register_template, render
from .data.vision import VisionProcessor, collate_images
from .lora import (
    LoRAConfig,
    LoRALinear,
    adapters_disabled,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from .errors import CheckpointError, ModelLoadError, OptionError, SftkitError, TrainingError, TrainingStopped
from .evaluate import evaluate_checkpoint, evaluate_generation
from .generation import GenerationConfig, generate_batch, generate_stream
from .inference import load_for_inference
from .metrics import agent_metrics, bleu4, call_errors, parse_tool_calls, rouge_l, text_metrics
from .model import get_model_tokenizer, load_model, load_model_and_tokenizer, load_processor, load_tokenizer, resolve_model_dir
from .registry import MODELS, ModelInfo, infer_model_type, register_model
from .tools import Tool, conversation_tools, offered_tools
from .train import train

__all__ = [
    "CheckpointError", "ModelLoadError", "OptionError", "SftkitError", "TrainingStopped", "evaluate_checkpoint",
    "ChatConfig", "DeployConfig", "EvalConfig", "GenerationConfig", "InferConfig", "MODELS", "MergeConfig", "ModelInfo",
    "agent_metrics", "bleu4", "evaluate_generation", "generate_batch", "generate_stream", "get_model_tokenizer",
    "infer", "infer_model_type", "load_for_inference", "merge", "parse_tool_calls", "register_model", "rouge_l",
    "text_metrics", "Tool", "ToolCallGuide", "call_errors", "conversation_tools", "offered_tools", "tool_call_guide",
    "VisionProcessor", "collate_images", "load_processor",
    "PreferenceRow", "RLHFConfig", "adapters_disabled", "build_preference_example", "to_preference",
    "DataError", "Drop", "LoRAConfig", "LoRALinear", "Message", "PreviewConfig", "Template", "TrainConfig", "TrainingError",
    "build_config", "build_example", "build_examples", "collate", "count_parameters", "encode", "get_template",
    "inject_lora", "load_adapter", "load_conversations", "load_model", "load_model_and_tokenizer", "load_tokenizer",
    "lora_state_dict", "mask", "merge_lora", "register_dataset", "register_template", "render", "resolve_model_dir",
    "save_adapter", "split_and_sample", "to_messages", "train", "truncate", "unload_lora", "unmerge_lora",
]
