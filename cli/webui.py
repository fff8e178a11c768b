"""`sftkit web-ui`: serve the browser page. Thin: build the config, warn about exposure, launch."""
from __future__ import annotations

import click

from sftkit.config import WebUIConfig

from .options import config_command


@click.command("web-ui")
@config_command(WebUIConfig)
def web_ui(config: WebUIConfig):
    """Train, watch, chat, evaluate and preview data from a browser (default: http://127.0.0.1:7860)."""
    try:
        from sftkit.webui.app import launch
    except ImportError as error:
        raise click.ClickException(f"the web UI needs gradio ({error}): pip install 'sftkit[webui]'") from None
    if not config.loopback and config.credentials is None:
        click.echo(f"warning: listening on {config.host} without --auth: anyone who can reach this machine can train, "
                   "read files and run models through the page. Pass --auth user:password.", err=True)
    launch(config)
