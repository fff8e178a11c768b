"""Running sftkit train (or rlhf) in several processes (torchrun, gloo on CPU) from tests."""
import json
import os
import socket
import subprocess
import sys

from sftkit.distributed import relaunch_command


def options(model_dir, data_file, output_dir, **extra):
    values = {"model": model_dir, "dataset": data_file, "template": "chatml", "max_steps": 4, "eval_steps": 2,
              "save_steps": 2, "logging_steps": 1, "learning_rate": 5e-3, "lora_dropout": 0.0, "dataset_test_ratio": 0.2,
              "output_dir": str(output_dir), "add_output_dir_suffix": False, "save_total_limit": 10}
    values.update(extra)
    return values


def torchrun(values: dict, nproc: int = 2, timeout: int = 300, command: str = "train"):
    port = _free_port()
    argv = [command] + [item for key, value in values.items() for item in (f"--{key}", str(value))]
    command = relaunch_command(nproc, argv)
    command.insert(3, f"--master_port={port}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]
