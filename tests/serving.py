"""Run a `sftkit deploy` app on 127.0.0.1 inside the test process, on a free port, always stopped afterwards."""
from __future__ import annotations

import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def running(service):
    """Yield the base URL (http://127.0.0.1:PORT/v1) of the app over `service`; stops the server (and engine) on exit."""
    import uvicorn

    from sftkit.serve.server import create_app

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def client(base_url: str, api_key: str = "unused", **options):
    """The official OpenAI client, without retries (a retried 429 would hide the refusal)."""
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60, **options)


def save_two_adapters(base_model, folder) -> dict[str, str]:
    """{"ours": an all-linear adapter saved by sftkit, "peft": a q/v adapter saved by peft itself}, B randomised."""
    import copy
    import os

    from peft import LoraConfig, get_peft_model

    import tiny
    from sftkit.lora import LoRAConfig, inject_lora, save_adapter

    ours = copy.deepcopy(base_model)
    config = LoRAConfig(r=4, alpha=16)
    inject_lora(ours, config)
    tiny.randomize_lora_B(ours, seed=3)
    save_adapter(ours, config, os.path.join(folder, "ours"))
    theirs = get_peft_model(copy.deepcopy(base_model),
                            LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    tiny.randomize_lora_B(theirs, seed=4)
    theirs.save_pretrained(os.path.join(folder, "peft"))
    return {"ours": os.path.join(folder, "ours"), "peft": os.path.join(folder, "peft")}
