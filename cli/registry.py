"""`sftkit list models|templates|datasets`: every registry as an aligned table or JSON."""
from __future__ import annotations

import json

import click

MAX_CELL = 120


def model_rows() -> list[dict]:
    from sftkit.registry import MODELS

    return [{
        "model_type": info.model_type,
        "modelscope_id": info.model_id_or_path,
        "hf_id": info.hf_model_id,
        "template": info.template,
        "lora_targets": ",".join(info.lora_target_modules),
        "dtype": info.torch_dtype or "auto",
        "max_length": info.max_length,
        "remote_code": info.trust_remote_code,
        "tags": ",".join(info.tags),
    } for info in MODELS.values()]


def template_rows() -> list[dict]:
    from sftkit.data.templates import TEMPLATES

    return [{
        "name": name,
        "prefix": template.prefix,
        "prompt": template.prompt,
        "suffix": template.suffix,
        "separator": template.separator,
        "default_system": template.default_system,
        "stop_words": ",".join(template.stop_words),
        "tokenizer_template": template.use_tokenizer_template,
    } for name, template in TEMPLATES.items()]


def dataset_rows() -> list[dict]:
    from sftkit.data.loading import DATASETS

    return [{
        "name": info.name,
        "modelscope_id": info.ms_id,
        "hf_id": info.hf_id,
        "path": info.path,
        "subsets": ",".join(info.subsets),
        "split": ",".join(info.splits),
        "sample": info.sample,
        "preprocess": _preprocess_name(info.preprocess),
        "columns": ",".join(f"{old}->{new}" for old, new in info.columns.items()),
        "tags": ",".join(info.tags),
    } for info in DATASETS.values()]


def _preprocess_name(preprocess) -> str | None:
    """A function's name, or what a preprocess object says it does (e.g. its column mapping)."""
    return None if preprocess is None else getattr(preprocess, "__name__", None) or str(preprocess)


ROWS = {"models": model_rows, "templates": template_rows, "datasets": dataset_rows}


def table(rows: list[dict]) -> str:
    """Left-aligned columns; cells show escapes (\\n) and long ones end in '...', since JSON has the full text."""
    if not rows:
        return ""
    header = list(rows[0])
    cells = [header] + [[_cell(row[key]) for key in header] for row in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells)


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = json.dumps(value, ensure_ascii=False)[1:-1] if isinstance(value, str) else str(value)
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 3] + "..."


@click.command("list")
@click.argument("what", type=click.Choice(sorted(ROWS)))
@click.option("--format", "output_format", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="aligned columns, or JSON with every field in full")
def list_command(what: str, output_format: str):
    """List the registered models, chat templates or datasets."""
    rows = ROWS[what]()
    click.echo(json.dumps(rows, ensure_ascii=False, indent=1) if output_format == "json" else table(rows))
