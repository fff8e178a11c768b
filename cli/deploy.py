"""`sftkit deploy`: serve a trained model over the OpenAI API. Thin: build the config, call sftkit.serve."""
from __future__ import annotations

import click

from sftkit.config import DeployConfig

from .options import config_command

DEPLOY_EXTRA = ("starlette", "uvicorn", "pydantic")


@click.command("deploy")
@config_command(DeployConfig)
def deploy(config: DeployConfig):
    """Serve a checkpoint (or model) and LoRA adapters as an OpenAI-compatible API: /v1/chat/completions
    (streaming, tool calls), /v1/completions, /v1/models, /health. Requests are batched together."""
    try:
        from sftkit.serve.deploy import deploy as run_deploy
    except ModuleNotFoundError as error:
        if error.name not in DEPLOY_EXTRA:
            raise
        raise click.ClickException(f"sftkit deploy needs the deploy extra ({error.name} is missing): "
                                   "pip install 'sftkit[deploy]'") from None
    run_deploy(config, echo=click.echo)
