"""Click options generated from a config dataclass, so the CLI and the config can never disagree."""
from __future__ import annotations

import dataclasses
import functools

import click

from sftkit.config import build_config
from sftkit.errors import SftkitError


def config_command(cls):
    """Decorate a click command: one option per field (dash-case, underscore and ms-swift spellings) plus --config.

    The command receives the built, validated config as its only argument.
    """

    def decorate(function):
        @click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML or JSON file of options (flags win).")
        @functools.wraps(function)
        def wrapper(config_file, **flags):
            overrides = {name: value for name, value in flags.items() if value not in (None, ())}
            try:
                config = build_config(cls, config_file, overrides)
            except ValueError as error:
                raise click.UsageError(str(error)) from None
            try:
                return function(config)
            except SftkitError as error:  # the user's mistake: its message, not a traceback
                raise click.ClickException(str(error)) from None

        for item in reversed(dataclasses.fields(cls)):
            wrapper = _option(item)(wrapper)
        return wrapper

    return decorate


def _option(item: dataclasses.Field):
    names = [f"--{item.name.replace('_', '-')}"]
    for spelling in (item.name,) + tuple(item.metadata.get("aliases", ())):
        for candidate in (f"--{spelling}", f"--{spelling.replace('_', '-')}"):
            if candidate not in names:
                names.append(candidate)
    default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
    shown = ",".join(default) if isinstance(default, tuple) else default
    shown = "none" if shown in (None, "") else shown
    text = f"{item.metadata.get('help', '')} [default: {shown}]"
    is_tuple = isinstance(default, tuple)
    kwargs = dict(default=None, help=text, multiple=is_tuple)
    if isinstance(default, bool) or "bool" in str(item.type):
        kwargs.update(is_flag=False, flag_value="true", metavar="BOOL")
    return click.option(*names, item.name, **kwargs)
