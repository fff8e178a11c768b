"""`sftkit`: the click group. Commands are thin: build the config, call the library."""
from __future__ import annotations

import dataclasses
import os
import sys

import click

from sftkit.config import PreviewConfig, RLHFConfig, TrainConfig

from .deploy import deploy
from .options import DEBUG_ENV, ConfigCommand, config_command
from .registry import list_command
from .use import chat, evaluate, infer, merge
from .webui import web_ui


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="sftkit", prog_name="sftkit")
@click.option("--debug", is_flag=True, help=f"show the full traceback of an error (also: {DEBUG_ENV}=1)")
@click.option("--local_rank", "--local-rank", type=int, hidden=True,
              help="passed by the deepspeed launcher; the same as its LOCAL_RANK variable, which is what is read")
def main(debug: bool, local_rank):
    """sftkit: supervised fine-tuning of LLMs and tool-calling agents.

    Exit codes: 0 done, 1 error, 2 usage error, 130/143 training stopped by SIGINT/SIGTERM (checkpoint saved).
    """


@main.command(cls=ConfigCommand)
@config_command(PreviewConfig)
def preview(config: PreviewConfig):
    """Print encoded examples with trainable tokens marked, and token length statistics."""
    from sftkit.data.preview import preview as run_preview

    if config.color is None:
        config = dataclasses.replace(config, color=sys.stdout.isatty())
    run_preview(config, echo=click.echo)


@main.command(cls=ConfigCommand)
@config_command(TrainConfig)
def train(config: TrainConfig):
    """Fine-tune a causal LM with LoRA or full parameters (default: the embedded SmolLM2 on the bundled data)."""
    run_training(config)


@main.command(cls=ConfigCommand)
@config_command(RLHFConfig)
def rlhf(config: RLHFConfig):
    """Preference training (DPO, ORPO, SimPO, CPO, KTO) on chosen/rejected or labelled answers, in the loop of train."""
    run_training(config)


def run_training(config: TrainConfig) -> None:
    from sftkit.distributed import launch_command, run_launcher
    from sftkit.train import train as run_train

    command = launch_command(os.environ, sys.argv[1:])
    if command:
        # As ms-swift does: NPROC_PER_NODE=N [NNODES=M NODE_RANK=i MASTER_ADDR=...] sftkit train|rlhf ... reruns
        # itself under torchrun; a process that torchrun, deepspeed or srun started runs here.
        sys.exit(run_launcher(command))
    run_train(config)


for command in (list_command, chat, infer, evaluate, merge, deploy, web_ui):
    main.add_command(command)

if __name__ == "__main__":
    main()
