"""`sftkit`: the click group. Commands are thin: build the config, call the library."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import click

from sftkit.config import PreviewConfig, RLHFConfig, TrainConfig

from .deploy import deploy
from .options import config_command
from .registry import list_command
from .use import chat, evaluate, infer, merge


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """sftkit: supervised fine-tuning of LLMs and tool-calling agents."""


@main.command()
@config_command(PreviewConfig)
def preview(config: PreviewConfig):
    """Print encoded examples with trainable tokens marked, and token length statistics."""
    from sftkit.data.preview import preview as run_preview

    if config.color is None:
        config = dataclasses.replace(config, color=sys.stdout.isatty())
    run_preview(config, echo=click.echo)


@main.command()
@config_command(TrainConfig)
def train(config: TrainConfig):
    """Fine-tune a causal LM with LoRA or full parameters (default: the embedded SmolLM2 on the bundled data)."""
    run_training(config)


@main.command()
@config_command(RLHFConfig)
def rlhf(config: RLHFConfig):
    """Preference training (DPO, ORPO, SimPO, CPO, KTO) on chosen/rejected or labelled answers, in the loop of train."""
    run_training(config)


def run_training(config: TrainConfig) -> None:
    from sftkit.distributed import relaunch_command
    from sftkit.train import train as run_train

    nproc = int(os.environ.get("NPROC_PER_NODE", "1"))
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        # As ms-swift does: NPROC_PER_NODE=N sftkit train|rlhf ... reruns itself under torchrun.
        sys.exit(subprocess.call(relaunch_command(nproc, sys.argv[1:])))
    run_train(config)


for command in (list_command, chat, infer, evaluate, merge, deploy):
    main.add_command(command)

if __name__ == "__main__":
    main()
