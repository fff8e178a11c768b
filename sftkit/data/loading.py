"""Reading raw rows from local files, Hugging Face and ModelScope; the dataset registry; split and sample.

Every row travels with where it came from (source, line) so a bad one can be named exactly.
"""
from __future__ import annotations

import csv
import difflib
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from .errors import DataError
from .formats import Message, to_messages

FILE_SUFFIXES = (".jsonl", ".json", ".csv")
STRATEGIES = ("error", "warning", "skip")


@dataclass(frozen=True)
class Row:
    """One raw row, or the error that made its line unreadable (so reading can go on past it)."""

    source: str
    line: int | str
    data: dict | None
    error: DataError | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset: where it lives on each hub (or on this machine) and how its columns map to a known schema."""

    name: str
    ms_id: str | None = None
    hf_id: str | None = None
    subset: str | None = None
    split: str = "train"
    columns: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    path: str | None = None


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, ms_id: str | None = None, hf_id: str | None = None, *, subset: str | None = None,
                     split: str = "train", columns: dict | None = None, tags: tuple[str, ...] = (),
                     path: str | None = None, exist_ok: bool = False) -> DatasetInfo:
    """Add a dataset name for hub ids or a local `path` (file or `datasets` folder); `columns` renames raw
    columns to a known schema's (e.g. {"question": "query"})."""
    if name in DATASETS and not exist_ok:
        raise ValueError(f"dataset '{name}' is already registered")
    if not (ms_id or hf_id or path):
        raise ValueError(f"dataset '{name}' needs a ModelScope id, a Hugging Face id or a local path")
    DATASETS[name] = DatasetInfo(name, ms_id, hf_id, subset, split, dict(columns or {}), tuple(tags), path)
    return DATASETS[name]


@dataclass
class LoadReport:
    """What loading kept and what it skipped, with reasons: nothing is dropped without a count."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        self.skipped[error.message] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    def summary(self) -> str:
        lines = [f"{self.kept} of {self.rows} rows kept"]
        lines += [f"  skipped {count}: {reason}" for reason, count in self.skipped.most_common()]
        lines += [f"  e.g. {example}" for example in self.examples]
        return "\n".join(lines)


def read_file(path: str) -> Iterator[Row]:
    """Rows of a local .jsonl/.json/.csv file, each with its 1-based line (or row index for .json)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"unsupported file type '{suffix}', expected one of {', '.join(FILE_SUFFIXES)}", source=path)
    if not os.path.isfile(path):
        raise DataError("no such file", source=path)
    with open(path, encoding="utf-8", newline="" if suffix == ".csv" else None) as handle:
        if suffix == ".jsonl":
            for number, text in enumerate(handle, start=1):
                if text.strip():
                    yield _json_row(text, path, number)
        elif suffix == ".csv":
            reader = csv.DictReader(handle)
            start = 2
            for row in reader:
                yield Row(path, start, {key: value for key, value in row.items() if key is not None})
                start = reader.line_num + 1
        else:
            yield from _json_rows(handle.read(), path)


def _json_row(text: str, path: str, line: int) -> Row:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return Row(path, line, None, DataError(f"malformed JSON: {error.msg} (column {error.colno})", source=path, line=line))
    if not isinstance(value, dict):
        return Row(path, line, None, DataError(f"a row must be a JSON object, got {type(value).__name__}", source=path, line=line))
    return Row(path, line, value)


def _json_rows(text: str, path: str) -> Iterator[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        # A .json file holding one object per line is common: read it as JSONL.
        if error.msg == "Extra data":
            for number, line_text in enumerate(text.splitlines(), start=1):
                if line_text.strip():
                    yield _json_row(line_text, path, number)
            return
        raise DataError(f"malformed JSON: {error.msg}", source=path, line=error.lineno) from None
    rows = value if isinstance(value, list) else [value]
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            yield Row(path, f"row {index}", None, DataError(f"a row must be a JSON object, got {type(row).__name__}", source=path, line=f"row {index}"))
        else:
            yield Row(path, f"row {index}", row)


def read_hub(info: DatasetInfo, hub: str = "modelscope") -> Iterator[Row]:
    """Rows of a registered or hub dataset, downloaded through ModelScope (default) or Hugging Face."""
    use_hf = hub == "hf" or not info.ms_id
    dataset_id = info.hf_id if use_hf else info.ms_id
    source = f"{'hf' if use_hf else 'ms'}::{dataset_id}[{info.split}]"
    try:
        if use_hf:
            import datasets

            table = datasets.load_dataset(dataset_id, info.subset, split=info.split)
        else:
            try:
                from modelscope.msdatasets import MsDataset
            except ImportError as error:
                raise DataError(f"ModelScope datasets need modelscope with its dataset extras ({error}): "
                                "pip install 'modelscope[datasets]' (or use --hub hf)", source=source) from None
            table = MsDataset.load(dataset_id, subset_name=info.subset or "default", split=info.split)
            table = table.to_hf_dataset() if hasattr(table, "to_hf_dataset") else table
    except DataError:
        raise
    except Exception as error:  # hubs raise many types; the user needs the id and the reason
        raise DataError(f"could not load from the hub: {type(error).__name__}: {error}. Offline? Pass a local file instead.", source=source) from None
    for index, row in enumerate(table):
        yield Row(source, index, _renamed(dict(row), info.columns))


def _renamed(row: dict, columns: dict) -> dict:
    for old, new in columns.items():
        if old in row:
            row[new] = row.pop(old)
    return row


def read_dataset(spec: str, hub: str = "modelscope") -> Iterator[Row]:
    """Rows of one dataset spec: a local file, a local `datasets` folder, a registered name, or hf::id / ms::id."""
    if spec.lower().endswith(FILE_SUFFIXES) or os.path.isfile(spec):
        return read_file(spec)
    if spec in DATASETS and DATASETS[spec].path:
        return _read_registered_path(DATASETS[spec])
    if spec in DATASETS:
        return read_hub(DATASETS[spec], hub)
    prefix, _, dataset_id = spec.partition("::")
    if dataset_id and prefix in ("hf", "ms"):
        return read_hub(DatasetInfo(spec, ms_id=dataset_id if prefix == "ms" else None, hf_id=dataset_id if prefix == "hf" else None),
                        "hf" if prefix == "hf" else "modelscope")
    if os.path.isdir(spec):
        return _read_local_dataset(spec)
    close = difflib.get_close_matches(spec, DATASETS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else " Use a .jsonl/.json/.csv path, a registered name (sftkit list datasets), hf::ID or ms::ID."
    raise DataError(f"unknown dataset '{spec}'.{hint}")


def _read_registered_path(info: DatasetInfo) -> Iterator[Row]:
    for row in read_dataset(info.path):
        yield row if row.data is None else replace(row, data=_renamed(dict(row.data), info.columns))


def _read_local_dataset(path: str) -> Iterator[Row]:
    import datasets

    table = datasets.load_from_disk(path)
    if isinstance(table, datasets.DatasetDict):
        table = table["train"]
    for index, row in enumerate(table):
        yield Row(path, index, dict(row))


def load_conversations(specs: list[str], *, strategy: str = "error", schema: str | None = None,
                       hub: str = "modelscope", report: LoadReport | None = None,
                       convert: Callable[[dict], object] | None = None) -> tuple[list[list[Message]], LoadReport]:
    """Read and convert every row of every spec, concatenated in order.

    strategy decides what a bad row does: "error" raises (naming file, line and field), "warning"
    prints and skips, "skip" skips; every skip is counted in the report. `convert` replaces to_messages
    (e.g. to_preference for preference rows).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"check_dataset_strategy must be one of {STRATEGIES}, got '{strategy}'")
    report = report or LoadReport()
    conversations = []
    for spec in specs:
        for row in read_dataset(spec, hub):
            report.rows += 1
            if row.error is not None:
                _handle(row.error, strategy, report)
                continue
            try:
                conversations.append(convert(row.data) if convert else to_messages(row.data, schema))
                report.kept += 1
            except DataError as error:
                _handle(error.at(row.source, row.line), strategy, report)
    return conversations, report


def _handle(error: DataError, strategy: str, report: LoadReport) -> None:
    if strategy == "error":
        raise error
    if strategy == "warning":
        print(f"warning: skipping {error}")
    report.skip(error)


def split_and_sample(items: list, *, test_ratio: float = 0.0, sample: int | None = None, seed: int = 42) -> tuple[list, list]:
    """Seeded shuffle, hold out test_ratio of it for validation, then keep `sample` training items (-1/None: all)."""
    if not 0.0 <= test_ratio < 1.0:
        raise ValueError(f"dataset_test_ratio must be in [0, 1), got {test_ratio}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = int(round(len(items) * test_ratio))
    if test_ratio > 0 and len(items) > 1:
        held = max(held, 1)
    validation = [items[i] for i in order[:held]]
    train = [items[i] for i in order[held:]]
    if sample is not None and sample >= 0:
        train = train[:sample]
    return train, validation


# The datasets the ms-swift README names. Columns map each to a known schema where its raw
# columns differ; hub ids as published on ModelScope (and Hugging Face where a copy exists).
_BUILTIN = [
    ("alpaca-en", "AI-ModelScope/alpaca-gpt4-data-en", "vicgalle/alpaca-gpt4", {}),
    ("alpaca-zh", "AI-ModelScope/alpaca-gpt4-data-zh", "llm-wizard/alpaca-gpt4-data-zh", {}),
    ("multi-alpaca-all", "damo/nlp_polylm_multialpaca_sft", None, {}),
    ("instinwild-en", "wyj123456/instinwild", None, {}),
    ("instinwild-zh", "wyj123456/instinwild", None, {}),
    ("cot-en", "YorickHe/CoT", None, {}),
    ("cot-zh", "YorickHe/CoT_zh", None, {}),
    ("firefly-all-zh", "wyj123456/firefly", "YeungNLP/firefly-train-1.1M", {"input": "query", "target": "response"}),
    ("instruct-en", "wyj123456/instruct", None, {"prompt": "query", "completion": "response"}),
    ("gpt4all-en", "wyj123456/GPT4all", None, {"prompt": "query", "response": "response"}),
    ("sharegpt-en", "huangjintao/sharegpt", None, {}),
    ("sharegpt-zh", "huangjintao/sharegpt", None, {}),
    ("sharegpt", "huangjintao/sharegpt", None, {}),
    ("damo-agent-zh", "damo/MSAgent-Bench", None, {}),
    ("damo-agent-mini-zh", "damo/MSAgent-Bench", None, {}),
    ("agent-instruct-all-en", "huangjintao/AgentInstruct_copy", "THUDM/AgentInstruct", {}),
    ("code-alpaca-en", "wyj123456/code_alpaca_en", "sahil2801/CodeAlpaca-20k", {}),
    ("leetcode-python-en", "AI-ModelScope/leetcode-solutions-python", None, {"code_with_problem": "query", "explanation_only": "response"}),
    ("codefuse-python-en", "codefuse-ai/CodeExercise-Python-27k", None, {}),
    ("codefuse-evol-instruction-zh", "codefuse-ai/Evol-instruction-66k", None, {}),
    ("medical-en", "huangjintao/medical_zh", None, {}),
    ("medical-zh", "huangjintao/medical_zh", None, {}),
    ("medical-mini-zh", "huangjintao/medical_zh", None, {}),
    ("lawyer-llama-zh", "AI-ModelScope/lawyer_llama_data", None, {}),
    ("tigerbot-law-zh", "AI-ModelScope/tigerbot-law-plugin", None, {"content": "response"}),
    ("blossom-math-zh", "AI-ModelScope/blossom-math-v2", "Azure99/blossom-math-v2", {"input": "query", "output": "response"}),
    ("school-math-zh", "AI-ModelScope/school_math_0.25M", "BelleGroup/school_math_0.25M", {}),
    ("text2sql-en", "AI-ModelScope/texttosqlv2_25000_v2", None, {}),
    ("sql-create-context-en", "AI-ModelScope/sql-create-context", "b-mc2/sql-create-context",
     {"question": "instruction", "context": "input", "answer": "output"}),
    ("advertise-gen-zh", "lvjianjin/AdvertiseGen", "shibing624/AdvertiseGen", {"content": "query", "summary": "response"}),
    ("dureader-robust-zh", "modelscope/DuReader_robust-QG", None, {"text1": "query", "text2": "response"}),
    ("cmnli-zh", "clue", "clue", {}),
    ("jd-sentiment-zh", "DAMO_NLP/jd", None, {}),
    ("hc3-zh", "simpleai/HC3-Chinese", "Hello-SimpleAI/HC3-Chinese", {}),
    ("hc3-en", "simpleai/HC3", "Hello-SimpleAI/HC3", {}),
    ("ms-bench", "iic/ms_bench", None, {}),
]

_SUBSETS = {"instinwild-en": "subset", "instinwild-zh": "default", "sharegpt-en": "common-en", "sharegpt-zh": "common-zh",
            "medical-en": "en", "medical-zh": "zh", "medical-mini-zh": "zh", "cmnli-zh": "cmnli"}

for _name, _ms, _hf, _columns in _BUILTIN:
    register_dataset(_name, _ms, _hf, subset=_SUBSETS.get(_name), columns=_columns)
