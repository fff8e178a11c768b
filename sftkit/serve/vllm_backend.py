"""--infer_backend vllm: the same routes over vLLM's engine (its own batching and paged KV cache), for CUDA GPUs.

vLLM returns token ids; they go through the built-in engine's Sequence, so stop strings, the end of a
tool call and finish reasons mean exactly what they mean with the default backend. Adapters become
vLLM LoRARequests chosen by name. The only module that imports vllm, lazily.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import uuid

import torch

from ..errors import CheckpointError
from ..inference import is_adapter, model_source
from ..config import DeployConfig
from ..generation import generation_config, stop_token_set
from ..lora import CONFIG_NAME
from ..model import load_tokenizer
from .engine import EngineRequest, Event, QueueFull, Sequence
from .server import Service

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def load_vllm_service(config: DeployConfig) -> Service:
    """A Service whose backend is vLLM; CheckpointError when vllm or a GPU is missing."""
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise CheckpointError("--infer_backend vllm needs the vllm package (pip install vllm) and a CUDA GPU; "
                              "the default --infer_backend pt runs anywhere") from None
    if not torch.cuda.is_available():
        raise CheckpointError("--infer_backend vllm needs a CUDA GPU; the default --infer_backend pt runs on the CPU")
    from transformers import AutoConfig

    from .deploy import adapter_folder, check_prompts, context_length, served_models, served_name

    model_dir, checkpoint, args = model_source(config.ckpt_dir, config.model)
    main = config.served_model_name or served_name(checkpoint or model_dir)
    folders = {name: adapter_folder(folder) for name, folder in config.adapter_dirs().items()}
    if main in folders:
        raise CheckpointError(f"--adapters: '{main}' is already the model's name; pick another (or --served_model_name)")
    if checkpoint is not None and is_adapter(checkpoint):
        folders = {main: checkpoint, **folders}
    ids = itertools.count(1)
    lora_requests = {name: LoRARequest(name, next(ids), folder) for name, folder in folders.items()}
    tokenizer = load_tokenizer(model_dir)
    models = served_models(config, main, main if main in folders else None,
                           config.template or args.get("template") or "auto",
                           config.system if config.system is not None else args.get("system"),
                           {name: folder for name, folder in folders.items() if name != main})
    check_prompts(models, tokenizer)
    context = config.max_model_len or context_length(AutoConfig.from_pretrained(model_dir))
    engine = vllm.AsyncLLMEngine.from_engine_args(vllm.AsyncEngineArgs(
        model=model_dir, tokenizer=model_dir, dtype=VLLM_DTYPES[config.dtype or args.get("dtype") or "auto"],
        max_model_len=context, max_num_seqs=config.max_num_seqs, enable_lora=bool(lora_requests),
        max_loras=max(len(lora_requests), 1), max_lora_rank=_lora_rank_limit(folders.values())))
    backend = VllmBackend(engine, tokenizer, lora_requests, config.max_num_seqs + config.max_queue)
    return Service(backend, tokenizer, models, context, generation_config(config), vocab_size=len(tokenizer),
                   api_key=config.api_key, tools_prompt=config.tools_prompt)


def _lora_rank_limit(folders) -> int:
    """The smallest max_lora_rank vLLM accepts that fits every adapter."""
    ranks = []
    for folder in folders:
        with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as handle:
            ranks.append(int(json.load(handle).get("r", 8)))
    largest = max(ranks, default=8)
    return next((limit for limit in VLLM_LORA_RANKS if limit >= largest), largest)


class VllmBackend:
    """listen/stats/start/stop over vllm.AsyncLLMEngine, like engine.Engine."""

    def __init__(self, engine, tokenizer, lora_requests: dict, capacity: int):
        self.engine, self.tokenizer, self.lora_requests, self.capacity = engine, tokenizer, lora_requests, capacity
        self.eos_ids = stop_token_set(None, tokenizer)
        self.in_flight = 0

    def listen(self, request: EngineRequest) -> "VllmListener":
        if self.in_flight >= self.capacity:
            raise QueueFull(f"{self.in_flight} requests are in flight; retry later")
        return VllmListener(self, request)

    def stats(self) -> dict:
        return {"in_flight": self.in_flight}

    def start(self) -> None:
        """vLLM starts its loop with the first request."""

    def stop(self) -> None:
        getattr(self.engine, "shutdown", lambda: None)()  # vLLM before its V1 engine has no shutdown


class VllmListener:
    """One request's events from vLLM's token stream; close() aborts it there."""

    def __init__(self, backend: VllmBackend, request: EngineRequest):
        from vllm import SamplingParams

        self.backend, self.id, self.pending = backend, uuid.uuid4().hex, []
        self.sequence = Sequence(request, self.pending.append, backend.tokenizer, backend.eos_ids)
        config = request.config
        params = SamplingParams(
            n=1, max_tokens=config.max_new_tokens, temperature=config.temperature if config.do_sample else 0.0,
            top_p=config.top_p, top_k=config.top_k or -1, repetition_penalty=config.repetition_penalty,
            seed=config.seed, stop_token_ids=sorted(self.sequence.stops), detokenize=False)
        self.outputs = backend.engine.generate({"prompt_token_ids": list(request.prompt_ids)}, params, self.id,
                                               lora_request=backend.lora_requests.get(request.adapter))
        backend.in_flight += 1
        self.seen = 0
        self.open = True

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        while not self.pending:
            if self.sequence.finished:
                self.close()
                raise StopAsyncIteration
            output = await self.outputs.__anext__()
            completion = output.outputs[0]
            for token in completion.token_ids[self.seen:]:
                if not self.sequence.finished:
                    self.sequence.advance(token)
            self.seen = len(completion.token_ids)
            if output.finished and not self.sequence.finished:  # vLLM stopped first (its own EOS handling)
                self.sequence.deliver(Event(text=self.sequence.reply.finish(), finish_reason=completion.finish_reason or "stop",
                                            completion_tokens=self.seen))
        return self.pending.pop(0)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.backend.in_flight -= 1
            if not self.sequence.finished:
                asyncio.ensure_future(self.backend.engine.abort(self.id))
