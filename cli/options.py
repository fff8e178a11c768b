"""Click options generated from a config dataclass, so the CLI and the config can never disagree; and the rule
that turns a user's mistake into one `Error: ...` line with an exit code scripts can trust."""
from __future__ import annotations

import dataclasses
import functools
import os
import typing

import click

from sftkit.config import build_config
from sftkit.errors import SftkitError

DEBUG_ENV = "SFTKIT_DEBUG"
METAVARS = {bool: "BOOL", int: "INTEGER", float: "FLOAT", str: "TEXT"}


class ConfigCommand(click.Command):
    """A command whose list options also take several values after one flag (`--dataset a.jsonl b.jsonl`, as
    ms-swift's argparse does): the words up to the next option are spread into repeated flags."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        lists = {name for param in self.params if isinstance(param, click.Option) and param.multiple for name in param.opts}
        spread, current = [], None
        for arg in args:
            if arg.startswith("-"):
                name = arg.split("=", 1)[0]
                current = name if name in lists else None
                spread.append(arg)
            elif current and spread[-1] != current:
                spread += [current, arg]
            else:
                spread.append(arg)
        return super().parse_args(ctx, spread)


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
            return run_reporting_errors(function, config)

        hints = typing.get_type_hints(cls)
        for item in reversed(dataclasses.fields(cls)):
            wrapper = _option(item, hints[item.name])(wrapper)
        return wrapper

    return decorate


def run_reporting_errors(function, *args):
    """Run a command; a user's mistake (SftkitError) becomes click's one-line `Error: ...` with its exit code (1,
    2 for usage errors, 128 + signal for a stopped run). --debug or SFTKIT_DEBUG=1 shows the traceback instead."""
    try:
        return function(*args)
    except SftkitError as error:
        if debugging():
            raise
        if error.exit_code == 2:
            raise click.UsageError(str(error)) from None
        failure = click.ClickException(str(error))
        failure.exit_code = error.exit_code
        raise failure from None
    except KeyboardInterrupt as error:  # a second Ctrl-C (or SIGTERM) while stopping: no traceback either
        if debugging():
            raise
        click.echo(f"Aborted: {error or 'interrupted'}", err=True)
        raise click.exceptions.Exit(128 + getattr(error, "signal_number", 2)) from None


def debugging() -> bool:
    context = click.get_current_context(silent=True)
    root = context.find_root() if context else None
    return bool(root and root.params.get("debug")) or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes", "on")


def _option(item: dataclasses.Field, kind):
    names = [f"--{item.name.replace('_', '-')}"]
    for spelling in (item.name,) + tuple(item.metadata.get("aliases", ())):
        for candidate in (f"--{spelling}", f"--{spelling.replace('_', '-')}"):
            if candidate not in names:
                names.append(candidate)
    default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
    shown = ",".join(default) if isinstance(default, tuple) else default
    shown = "none" if shown in (None, "") else str(shown).lower() if isinstance(shown, bool) else shown
    choices = item.metadata.get("choices")
    text = item.metadata.get("help", "") + (f" [choices: {', '.join(map(str, choices))}]" if choices else "")
    is_tuple = isinstance(default, tuple)
    # Values stay strings for click: build_config converts and checks them, so every bad value is reported at once.
    value_type = _value_type(kind)
    if choices:
        metavar = "[" + "|".join(map(str, choices)) + "]"
    else:
        metavar = METAVARS.get(value_type, "TEXT") + ("..." if is_tuple else "")
    kwargs = dict(default=None, help=f"{text} [default: {shown}]", multiple=is_tuple, metavar=metavar)
    if value_type is bool:
        kwargs.update(is_flag=False, flag_value="true")
    return click.option(*names, item.name, **kwargs)


def _value_type(kind):
    """The type of one value: str for `str | None`, the element type of `tuple[str, ...]`."""
    while args := [arg for arg in typing.get_args(kind) if arg not in (type(None), Ellipsis)]:
        kind = args[0]
    return kind
