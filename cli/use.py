"""`sftkit chat | infer | eval | merge`: use a model after training. Thin: build the config, call the library."""
from __future__ import annotations

import click

from sftkit.config import ChatConfig, EvalConfig, InferConfig, MergeConfig

from .options import ConfigCommand, config_command


@click.command("chat", cls=ConfigCommand)
@config_command(ChatConfig)
def chat(config: ChatConfig):
    """Chat with a checkpoint (or the embedded default model). 'clear' resets the history, 'exit' or EOF ends.

    From a pipe every line is one message and every reply one block, with no prompt markers. With a
    vision-language model, '/image PATH' adds an image to the next message (--images: to the first).
    """
    from sftkit.chat import chat_repl
    from sftkit.generation import generation_config
    from sftkit.inference import load_for_inference

    model, tokenizer, settings = load_for_inference(config.ckpt_dir, config.model, template=config.template,
                                                    system=config.system, dtype=config.dtype,
                                                    trust_remote_code=config.trust_remote_code)
    chat_repl(model, tokenizer, settings.template, settings.system, generation_config(config), agent=config.agent,
              stream=config.stream, constrained=config.constrained_tool_calls, processor=settings.processor,
              images=config.images, scored=config.score_tool_calls, grounded=config.ground_tool_values)


@click.command("infer", cls=ConfigCommand)
@config_command(InferConfig)
def infer(config: InferConfig):
    """Answer every row of a dataset (default: the run's validation split) and write JSONL."""
    from sftkit.chat import infer as run_infer

    run_infer(config, echo=click.echo)


@click.command("eval", cls=ConfigCommand)
@config_command(EvalConfig)
def evaluate(config: EvalConfig):
    """Generate answers and score them against the references; writes a JSON report."""
    from sftkit.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(config)
    rows = [(name, value) for name, value in report["metrics"].items() if not isinstance(value, (list, dict))]
    rows += list(report["counts"].items())
    rows += [(f"errors.{kind}", count) for kind, count in report.get("errors", {}).get("counts", {}).items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        click.echo(f"{name:<{width}}  {shown}")
    click.echo(f"report: {report['output']}")


@click.command("merge", cls=ConfigCommand)
@config_command(MergeConfig)
def merge(config: MergeConfig):
    """Merge a LoRA checkpoint into its base model, loadable by plain transformers."""
    from sftkit.chat import merge as run_merge

    click.echo(f"merged model written to {run_merge(config)}")
