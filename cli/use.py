"""`sftkit chat | infer | eval | merge`: use a model after training. Thin: build the config, call sftkit.chat."""
from __future__ import annotations

import contextlib

import click

from sftkit.config import ChatConfig, EvalConfig, InferConfig, MergeConfig

from .options import config_command


@contextlib.contextmanager
def _reported():
    """Problems with the user's checkpoint, model or data end the command with their message, not a traceback."""
    from sftkit.chat import CheckpointError
    from sftkit.data.errors import DataError
    from sftkit.model import ModelLoadError

    try:
        yield
    except (CheckpointError, DataError, ModelLoadError) as error:
        raise click.ClickException(str(error)) from None


@click.command("chat")
@config_command(ChatConfig)
def chat(config: ChatConfig):
    """Chat with a checkpoint (or the embedded default model). 'clear' resets the history, 'exit' or EOF ends.

    From a pipe every line is one message and every reply one block, with no prompt markers.
    """
    from sftkit.chat import chat_repl, load_for_inference
    from sftkit.generation import generation_config

    with _reported():
        model, tokenizer, settings = load_for_inference(config.ckpt_dir, config.model, template=config.template,
                                                        system=config.system, dtype=config.dtype)
    chat_repl(model, tokenizer, settings.template, settings.system, generation_config(config), agent=config.agent,
              stream=config.stream, constrained=config.constrained_tool_calls)


@click.command("infer")
@config_command(InferConfig)
def infer(config: InferConfig):
    """Answer every row of a dataset (default: the run's validation split) and write JSONL."""
    from sftkit.chat import infer as run_infer

    with _reported():
        run_infer(config, echo=click.echo)


@click.command("eval")
@config_command(EvalConfig)
def evaluate(config: EvalConfig):
    """Generate answers and score them against the references; writes a JSON report."""
    from sftkit.chat import evaluate as run_evaluate

    with _reported():
        report = run_evaluate(config)
    rows = [(name, value) for name, value in report["metrics"].items() if not isinstance(value, (list, dict))]
    rows += list(report["counts"].items())
    rows += [(f"errors.{kind}", count) for kind, count in report.get("errors", {}).get("counts", {}).items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        click.echo(f"{name:<{width}}  {shown}")
    click.echo(f"report: {report['output']}")


@click.command("merge")
@config_command(MergeConfig)
def merge(config: MergeConfig):
    """Merge a LoRA checkpoint into its base model, loadable by plain transformers."""
    from sftkit.chat import merge as run_merge

    with _reported():
        output_dir = run_merge(config)
    click.echo(f"merged model written to {output_dir}")
