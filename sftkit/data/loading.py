"""Reading raw rows from local files, Hugging Face and ModelScope; the dataset registry; split and sample.

Every row travels with where it came from (source, line) so a bad one can be named exactly.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from .errors import DataError
from .formats import Message, to_messages
from .images import image_size, resolve_image

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
class Drop:
    """What a dataset's preprocess returns for a raw row it leaves out on purpose (a filter), with the reason."""

    reason: str


# A pure function from one raw row to the canonical row (a dict of a known schema), several canonical
# rows (one raw row can hold several examples), None or Drop(reason) to leave the row out.
Preprocess = Callable[[dict], "dict | list[dict] | Drop | None"]
SAMPLE_SEED = 42  # a registered sample is the same rows on every run and machine


@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset: where it lives on each hub (or on this machine), which subsets and splits make it
    (loaded and concatenated), and how one raw row becomes a canonical one."""

    name: str
    ms_id: str | None = None
    hf_id: str | None = None
    subsets: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("train",)
    preprocess: Preprocess | None = None
    sample: int | None = None
    columns: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    path: str | None = None
    hf_subsets: tuple[str, ...] | None = None
    hf_splits: tuple[str, ...] | None = None

    def parts(self, hub: str) -> list[tuple[str | None, str]]:
        """The (subset, split) pairs to load from this hub, in order; subset None is the hub's default."""
        subsets = self.hf_subsets if hub == "hf" and self.hf_subsets is not None else self.subsets
        splits = self.hf_splits if hub == "hf" and self.hf_splits is not None else self.splits
        return [(subset, split) for subset in (subsets or (None,)) for split in splits]


DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, ms_id: str | None = None, hf_id: str | None = None, *,
                     subsets: str | tuple[str, ...] | list[str] = (), split: str | tuple[str, ...] | list[str] = "train",
                     preprocess: Preprocess | None = None, sample: int | None = None, columns: dict | None = None,
                     tags: tuple[str, ...] = (), path: str | None = None, hf_subsets: tuple[str, ...] | list[str] | None = None,
                     hf_split: str | tuple[str, ...] | list[str] | None = None, exist_ok: bool = False) -> DatasetInfo:
    """Add a dataset name for hub ids or a local `path` (file or `datasets` folder).

    Every subset x split is loaded and concatenated; `sample` keeps that many raw rows (seeded) before
    `preprocess`; `columns` renames raw columns first (e.g. {"question": "query"}). `hf_subsets`/`hf_split`
    name the parts on Hugging Face where they differ from ModelScope's.
    """
    if name in DATASETS and not exist_ok:
        raise ValueError(f"dataset '{name}' is already registered")
    if not (ms_id or hf_id or path):
        raise ValueError(f"dataset '{name}' needs a ModelScope id, a Hugging Face id or a local path")
    if preprocess is not None and not callable(preprocess):
        raise ValueError(f"dataset '{name}': preprocess must be a function of one raw row")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample <= 0):
        raise ValueError(f"dataset '{name}': sample must be a positive number of rows, got {sample!r}")
    DATASETS[name] = DatasetInfo(name, ms_id, hf_id, _names(subsets), _names(split) or ("train",), preprocess, sample,
                                 dict(columns or {}), tuple(tags), path,
                                 None if hf_subsets is None else _names(hf_subsets),
                                 None if hf_split is None else _names(hf_split))
    return DATASETS[name]


def _names(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


@dataclass
class LoadReport:
    """What loading kept and what it left out, with reasons: nothing is dropped without a count."""

    rows: int = 0
    kept: int = 0
    conversations: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    with_images: int = 0

    def skip(self, error: DataError) -> None:
        self.skipped[error.message] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    def drop(self, reason: str, count: int = 1) -> None:
        """Rows a dataset leaves out on purpose (its filter or its sample): counted, never an error."""
        self.skipped[reason] += count

    def summary(self) -> str:
        lines = [f"{self.kept} of {self.rows} rows kept"
                 + (f" ({self.conversations} conversations)" if self.conversations != self.kept else "")]
        lines += [f"  skipped {count}: {reason}" for reason, count in self.skipped.most_common()]
        lines += [f"  e.g. {example}" for example in self.examples]
        if self.with_images:
            lines.append(f"  note: {self.with_images} kept rows carry images")
        return "\n".join(lines)


def read_file(path: str) -> Iterator[Row]:
    """Rows of a local .jsonl/.json/.csv file, each with its 1-based line (or row index for .json)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"unsupported file type '{suffix}', expected one of {', '.join(FILE_SUFFIXES)}", source=path)
    if not os.path.isfile(path):
        raise DataError("no such file", source=path)
    if suffix == ".jsonl":
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    yield Row(path, number, None, _not_utf8(error, path, number))
                    continue
                if text.strip():
                    yield _json_row(text, path, number)
        return
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line_start = raw.rfind(b"\n", 0, error.start) + 1
        raise _not_utf8(error, path, raw.count(b"\n", 0, error.start) + 1, line_start) from None
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        start = 2
        for row in reader:
            yield Row(path, start, {key: value for key, value in row.items() if key is not None})
            start = reader.line_num + 1
    else:
        yield from _json_rows(text, path)


def _not_utf8(error: UnicodeDecodeError, path: str, line: int, line_start: int = 0) -> DataError:
    """Where a byte that is not UTF-8 sits (line and column), so the user can find and re-save it."""
    column = error.start - line_start + 1
    return DataError(f"not UTF-8 text: byte 0x{error.object[error.start]:02x} at column {column} "
                     "(save the file as UTF-8)", source=path, line=line)


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
    """Raw rows of a registered or hub dataset, every subset x split in order, downloaded through ModelScope
    (default) or Hugging Face."""
    use_hf = hub == "hf" or not info.ms_id
    dataset_id = info.hf_id if use_hf else info.ms_id
    for subset, split in info.parts("hf" if use_hf else "modelscope"):
        source = f"{'hf' if use_hf else 'ms'}::{dataset_id}{f':{subset}' if subset else ''}[{split}]"
        table = _without_image_decoding(_hub_table(dataset_id, subset, split, use_hf, source))
        for index, row in enumerate(table):
            yield Row(source, index, dict(row))


def _hub_table(dataset_id: str, subset: str | None, split: str, use_hf: bool, source: str):
    try:
        if use_hf:
            import datasets

            return datasets.load_dataset(dataset_id, subset, split=split)
        try:
            from modelscope.msdatasets import MsDataset
        except ImportError as error:
            raise DataError(f"ModelScope datasets need modelscope with its dataset extras ({error}): "
                            "pip install 'modelscope[datasets]' (or use --hub hf)", source=source) from None
        table = MsDataset.load(dataset_id, subset_name=subset or "default", split=split)
        return table.to_hf_dataset() if hasattr(table, "to_hf_dataset") else table
    except DataError:
        raise
    except Exception as error:  # hubs raise many types; the user needs the id and the reason
        raise DataError(f"could not load from the hub: {type(error).__name__}: {error}. Offline? Pass a local copy "
                        "instead (NAME=PATH for a registered name).", source=source) from None


def _without_image_decoding(table):
    """Image columns as {path, bytes} instead of decoded pictures: rows carry a reference, as ms-swift's did."""
    features = getattr(table, "features", None)
    if not features:
        return table
    import datasets

    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            table = table.cast_column(name, datasets.Image(decode=False))
    return table


def _renamed(row: dict, columns: dict) -> dict:
    for old, new in columns.items():
        if old in row:
            row[new] = row.pop(old)
    return row


def open_dataset(spec: str, hub: str = "modelscope") -> tuple[DatasetInfo | None, Iterator[Row]]:
    """The registered entry a spec names (None for a plain file, folder or hub id) and its raw rows.

    A spec is a local .jsonl/.json/.csv file, a saved `datasets` folder, a registered name, NAME=PATH
    (a registered name's preprocessing on a local copy of its raw rows), or hf::ID / ms::ID.
    """
    name, equals, path = spec.partition("=")
    if equals and not os.path.exists(spec):
        if name not in DATASETS:
            close = difflib.get_close_matches(name, DATASETS, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else " See sftkit list datasets."
            raise DataError(f"'{name}' in '{spec}' is not a registered dataset (and no file has that name).{hint}")
        if not path:
            raise DataError(f"'{spec}': give the path of a local copy of {name}'s raw rows after '='")
        return DATASETS[name], _read_local(path, DATASETS[name].splits)
    if spec.lower().endswith(FILE_SUFFIXES) or os.path.isfile(spec):
        return None, read_file(spec)
    if spec in DATASETS:
        info = DATASETS[spec]
        return info, _read_local(info.path, info.splits) if info.path else read_hub(info, hub)
    prefix, _, dataset_id = spec.partition("::")
    if dataset_id and prefix in ("hf", "ms"):
        return None, read_hub(DatasetInfo(spec, ms_id=dataset_id if prefix == "ms" else None,
                                          hf_id=dataset_id if prefix == "hf" else None), "hf" if prefix == "hf" else "modelscope")
    if os.path.isdir(spec):
        return None, _read_local_dataset(spec)
    close = difflib.get_close_matches(spec, DATASETS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else (
        " Use a .jsonl/.json/.csv path, a registered name (sftkit list datasets), NAME=PATH, hf::ID or ms::ID.")
    raise DataError(f"unknown dataset '{spec}'.{hint}")


def read_dataset(spec: str, hub: str = "modelscope") -> Iterator[Row]:
    """Raw rows of one dataset spec (see open_dataset), before any registered preprocessing."""
    return open_dataset(spec, hub)[1]


def _read_local(path: str, splits: tuple[str, ...]) -> Iterator[Row]:
    return _read_local_dataset(path, splits) if os.path.isdir(path) else read_file(path)


def _read_local_dataset(path: str, splits: tuple[str, ...] = ("train",)) -> Iterator[Row]:
    import datasets

    try:
        table = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"not a saved datasets folder: {error}", source=path) from None
    if isinstance(table, datasets.DatasetDict):
        present = [split for split in splits if split in table]
        if not present:
            raise DataError(f"the folder holds the splits {', '.join(table)}, none of {', '.join(splits)}", source=path)
        for split in present:
            source = f"{path}[{split}]" if len(table) > 1 else path
            for index, row in enumerate(_without_image_decoding(table[split])):
                yield Row(source, index, dict(row))
        return
    for index, row in enumerate(_without_image_decoding(table)):
        yield Row(path, index, dict(row))


def prepare_row(info: DatasetInfo | None, raw: dict) -> list[dict] | Drop:
    """One raw row as canonical rows: a registered dataset's columns renamed, then its preprocess; or a Drop."""
    if info is None:
        return [raw]
    row = _renamed(dict(raw), info.columns) if info.columns else raw
    if info.preprocess is None:
        return [row]
    try:
        result = info.preprocess(row)
    except DataError:
        raise
    except KeyError as error:
        raise DataError("missing field", field=str(error.args[0]) if error.args else None) from None
    except (TypeError, ValueError, AttributeError, IndexError) as error:  # a row the function did not expect
        raise DataError(f"{info.name}'s preprocessing failed: {type(error).__name__}: {error}") from None
    if result is None:
        return Drop(f"left out by {info.name}'s preprocessing")
    if isinstance(result, Drop):
        return result
    rows = [result] if isinstance(result, dict) else result
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise DataError(f"{info.name}'s preprocess must return a dict, a list of dicts, None or Drop, "
                        f"got {type(result).__name__}")
    return rows or Drop(f"no examples in the row ({info.name})")


def row_images(row: dict) -> list:
    """The images of a canonical row (ms-swift's `images` column) as references: strings, with the bytes of a
    hub image ({bytes, path}) written to the cache."""
    images = row.get("images")
    if images is None or images == []:
        return []
    images = [images] if isinstance(images, (str, dict)) else images
    if not isinstance(images, list):
        raise DataError("must be a list of image paths, URLs or base64 strings", field="images")
    references = []
    for index, image in enumerate(images):
        try:
            references.append(resolve_image(image) if isinstance(image, dict) else image)
        except DataError as error:
            raise DataError(error.message, field=f"images[{index}]") from None
    return references


def resolved_images(conversation: list[Message], base_dir: str | None) -> list[Message]:
    """The conversation with every image resolved (relative paths against base_dir, then the current folder)
    and checked to open; errors name the image as images[k], counted over the conversation."""
    index, resolved = 0, []
    for message in conversation:
        references = []
        for reference in message.images:
            try:
                references.append(resolve_image(reference, base_dir))
                image_size(references[-1])
            except DataError as error:
                raise DataError(error.message, field=f"images[{index}]") from None
            index += 1
        resolved.append(replace(message, images=tuple(references)) if references else message)
    return resolved


def _base_dir(source: str) -> str | None:
    """The folder relative image paths of a local source start from."""
    if os.path.isfile(source):
        return os.path.dirname(os.path.abspath(source))
    return os.path.abspath(source) if os.path.isdir(source) else None


def load_conversations(specs: list[str], *, strategy: str = "error", schema: str | None = None,
                       hub: str = "modelscope", report: LoadReport | None = None,
                       convert: Callable[[dict], object] | None = None) -> tuple[list[list[Message]], LoadReport]:
    """Read, preprocess and convert every row of every spec, concatenated in order.

    strategy decides what a bad row does: "error" raises (naming file, line and field), "warning"
    prints and skips, "skip" skips; every skip is counted in the report, and so is every row a
    registered dataset leaves out on purpose (its filter or its sample). `convert` replaces to_messages
    (e.g. to_preference for preference rows).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"check_dataset_strategy must be one of {STRATEGIES}, got '{strategy}'")
    report = report or LoadReport()
    conversations = []
    for spec in specs:
        rows_before = report.rows
        info, rows = open_dataset(spec, hub)
        if info is not None and info.sample is not None:
            rows = _sampled(rows, info, report)
        for row in rows:
            report.rows += 1
            if row.error is not None:
                _handle(row.error, strategy, report)
                continue
            try:
                prepared = prepare_row(info, row.data)
                if isinstance(prepared, Drop):
                    report.drop(prepared.reason)
                    continue
                converted = [convert(canonical) if convert else
                             resolved_images(to_messages({**canonical, "images": row_images(canonical)}, schema),
                                             _base_dir(row.source)) for canonical in prepared]
            except DataError as error:
                _handle(error.at(row.source, row.line), strategy, report)
                continue
            conversations += converted
            report.kept += 1
            report.conversations += len(converted)
            report.with_images += not convert and any(message.images for conversation in converted for message in conversation)
        if report.rows == rows_before:
            header_only = spec.lower().endswith(".csv") and os.path.isfile(spec) and os.path.getsize(spec) > 0
            raise DataError("has a header but no rows" if header_only else "holds no rows", source=spec)
    return conversations, report


def _sampled(rows: Iterator[Row], info: DatasetInfo, report: LoadReport) -> list[Row]:
    """A registered dataset's seeded sample of its raw rows, in their order (ms-swift's "mini" variants).

    One pass with a reservoir, so a large hub dataset never sits in memory whole.
    """
    generator = random.Random(SAMPLE_SEED)
    reservoir: list[tuple[int, Row]] = []
    total = 0
    for index, row in enumerate(rows):
        total = index + 1
        if index < info.sample:
            reservoir.append((index, row))
        elif (slot := generator.randrange(index + 1)) < info.sample:
            reservoir[slot] = (index, row)
    if total > info.sample:
        report.rows += total - info.sample
        report.drop(f"outside {info.name}'s sample of {info.sample} rows", total - info.sample)
    return [row for _, row in sorted(reservoir, key=lambda pair: pair[0])]


def _handle(error: DataError, strategy: str, report: LoadReport) -> None:
    if strategy == "error":
        raise error
    if strategy == "warning":
        print(f"warning: skipping {error}")
    report.skip(error)


def validation_size(rows: int, test_ratio: float) -> int:
    """test_ratio of the rows, but at least min(20, 10% of them) (and 1) when test_ratio > 0: a 1% split of a few
    hundred rows (4 examples) is too noisy to choose the best checkpoint on."""
    if test_ratio <= 0 or rows < 2:
        return 0
    return max(int(round(rows * test_ratio)), min(20, rows // 10), 1)


def split_and_sample(items: list, *, test_ratio: float = 0.0, sample: int | None = None, seed: int = 42) -> tuple[list, list]:
    """Seeded shuffle, hold out test_ratio of it for validation, then keep `sample` training items (-1/None: all)."""
    if not 0.0 <= test_ratio < 1.0:
        raise ValueError(f"dataset_test_ratio must be in [0, 1), got {test_ratio}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = validation_size(len(items), test_ratio)
    validation = [items[i] for i in order[:held]]
    train = [items[i] for i in order[held:]]
    if sample is not None and sample >= 0:
        train = train[:sample]
    return train, validation


from . import datasets as _builtin  # noqa: E402,F401  (registers the built-in datasets)
