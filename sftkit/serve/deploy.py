"""`sftkit deploy`: load a trained model and its adapters once, then serve them over the OpenAI API until SIGTERM.

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish for up to
shutdown_timeout seconds, stops the engine and ends the process by that signal, as uvicorn does.
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace

from ..checkpoint import resolve_checkpoint
from ..config import DeployConfig
from ..constrained import tool_call_guide
from ..data.formats import Message
from ..data.templates import get_template
from ..errors import CheckpointError
from ..generation import generation_config
from ..inference import is_adapter, load_for_inference
from ..lora import LoRALinear
from ..prompts import prompt_ids
from ..run import read_run_args
from .engine import Engine
from .multi_lora import serve_adapters
from .server import ServedModel, Service, create_app


def load_service(config: DeployConfig) -> Service:
    """The model, its adapters and their served names, ready for create_app; CheckpointError for anything unusable."""
    if config.infer_backend == "vllm":
        from .vllm_backend import load_vllm_service

        return load_vllm_service(config)
    folders = {name: adapter_folder(folder) for name, folder in config.adapter_dirs().items()}
    model, tokenizer, settings = load_for_inference(config.ckpt_dir, config.model, template=config.template,
                                                    system=config.system, dtype=config.dtype)
    main = config.served_model_name or served_name(settings.ckpt_dir or settings.model_dir)
    if main in folders:
        raise CheckpointError(f"--adapters: '{main}' is already the model's name; pick another (or --served_model_name)")
    carries_lora = any(isinstance(module, LoRALinear) for module in model.modules())
    rows = None
    if folders:
        try:
            rows = serve_adapters(model, folders, loaded_as=main if carries_lora else None)
        except ValueError as error:
            raise CheckpointError(f"--adapters: {error}") from None
    models = served_models(config, main, main if carries_lora and rows is not None else None, settings.template, settings.system,
                           folders)
    check_prompts(models, tokenizer)
    if config.constrained_tool_calls:
        models = {name: replace(served, guide=tool_call_guide(tokenizer, served.template, config.score_tool_calls,
                                                              config.ground_tool_values))
                  for name, served in models.items()}
    engine = Engine(model, tokenizer, max_num_seqs=config.max_num_seqs, max_queue=config.max_queue, adapter_rows=rows)
    return Service(engine, tokenizer, models, config.max_model_len or context_length(model.config),
                   generation_config(config), vocab_size=model.get_input_embeddings().num_embeddings,
                   api_key=config.api_key, tools_prompt=config.tools_prompt, processor=settings.processor)


def served_models(config: DeployConfig, main: str, main_adapter: str | None, template: str, system: str | None,
                  folders: dict[str, str]) -> dict[str, ServedModel]:
    """The main name, then each adapter's: an adapter from a training run renders with that run's template
    and system prompt unless --template/--system say otherwise."""
    models = {main: ServedModel(main, main_adapter, get_template(template), system)}
    for name, folder in folders.items():
        args = _run_args(folder)
        models[name] = ServedModel(
            name, name, get_template(config.template or args.get("template") or template),
            config.system if config.system is not None else args.get("system", system))
    return models


def served_name(folder: str) -> str:
    return os.path.basename(os.path.normpath(folder))


def adapter_folder(folder: str) -> str:
    """The folder holding the adapter: the folder itself, or a run folder's best checkpoint."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"--adapters: {folder} is not a folder")
    if is_adapter(folder):
        return folder
    try:
        checkpoint = resolve_checkpoint(folder, "best")
    except FileNotFoundError:
        raise CheckpointError(f"--adapters: {folder} holds no adapter_config.json and no checkpoint") from None
    if not is_adapter(checkpoint):
        raise CheckpointError(f"--adapters: {checkpoint} holds full weights, not a LoRA adapter")
    return checkpoint


def _run_args(folder: str) -> dict:
    """The training run's arguments when the adapter comes from one (a plain peft folder has none)."""
    try:
        return read_run_args(folder)
    except CheckpointError:
        return {}


def context_length(model_config) -> int:
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    length = getattr(text_config, "max_position_embeddings", None)
    if not length:
        raise CheckpointError("the model's config names no max_position_embeddings: pass --max_model_len")
    return length


def check_prompts(models: dict[str, ServedModel], tokenizer) -> None:
    """Render a one-message conversation for every served name now, so a template that cannot work fails at start."""
    for served in models.values():
        try:
            prompt_ids([Message("user", "hi")], tokenizer, served.template, served.system)
        except ValueError as error:
            raise CheckpointError(f"model {served.name}: cannot render a prompt: {error}") from None


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound before the model loads, so a port in use fails at once."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise CheckpointError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def deploy(config: DeployConfig, echo=print) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    import uvicorn

    sock = listening_socket(config.host, config.port)
    service = load_service(config)
    host, port = sock.getsockname()[:2]
    echo(f"serving {', '.join(service.models)} at http://{host}:{port}/v1 "
         f"(backend {config.infer_backend}, context {service.context} tokens)")
    server = uvicorn.Server(uvicorn.Config(create_app(service), timeout_graceful_shutdown=config.shutdown_timeout,
                                           log_level="info"))
    server.run(sockets=[sock])
