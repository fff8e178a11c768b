"""The built-in datasets convert from rows in their real hub formats (tests/data/datasets holds a few rows of
each, written from the dataset cards and ms-swift's preprocessing), through NAME=PATH and the real loading path;
subsets, filters, samples and drops are counted."""
from __future__ import annotations

import ast
import json
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from sftkit.data import datasets as builtin
from sftkit.data.errors import DataError
from sftkit.data.loading import DATASETS, Drop, LoadReport, load_conversations, register_dataset
from sftkit.data.pipeline import build_examples
from sftkit_cli.main import main
from sftkit_cli.registry import list_command

FIXTURES = Path(__file__).resolve().parent / "data" / "datasets"


def fixture(name: str) -> Path:
    found = sorted(FIXTURES.glob(f"{name}.*"))
    assert len(found) == 1, f"built-in dataset '{name}' needs exactly one fixture in {FIXTURES} (found {found})"
    return found[0]


def raw_lines(path: Path) -> int:
    text = path.read_text(encoding="utf-8")
    return len(text.splitlines()) - (1 if path.suffix == ".csv" else 0)


@pytest.fixture
def scratch_datasets():
    before = dict(DATASETS)
    yield
    DATASETS.clear()
    DATASETS.update(before)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_every_builtin_dataset_has_one_fixture_and_every_fixture_a_dataset():
    assert set(builtin.BUILTIN) <= set(DATASETS)
    for name in builtin.BUILTIN:
        fixture(name)
    assert {path.stem for path in FIXTURES.iterdir()} == set(builtin.BUILTIN)


@pytest.mark.parametrize("name", sorted(builtin.BUILTIN))
def test_builtin_fixture_converts_through_name_equals_path(name, tokenizer):
    path = fixture(name)
    conversations, report = load_conversations([f"{name}={path}"], strategy="error")
    assert report.rows == raw_lines(path) and report.kept + sum(report.skipped.values()) == report.rows
    assert conversations and report.conversations == len(conversations)
    for conversation in conversations:
        assert conversation[-1].role == "assistant" and conversation[-1].content.strip()
        assert any(message.role == "user" for message in conversation)
    examples, dropped = build_examples(conversations, tokenizer=tokenizer, template="default")
    assert dropped == 0 and all(any(label != -100 for label in example["labels"]) for example in examples)


def test_msagent_rows_are_python_literals_and_the_tool_turns_split():
    raw = json.loads(fixture("damo-agent-zh").read_text(encoding="utf-8").splitlines()[0])
    assert isinstance(raw["conversations"], str)  # the hub stores the list as its Python literal
    conversations, _ = load_conversations([f"damo-agent-zh={fixture('damo-agent-zh')}"])
    assert [m.role for m in conversations[0]] == ["system", "user", "tool_call", "tool", "assistant"]
    assert json.loads(conversations[0][2].content.strip("`").removeprefix("JSON\n"))["api_name"] == "modelscope_text-ie"


def test_msagent_filters_count_the_rows_each_variant_leaves_out():
    full = load_conversations([f"damo-agent-zh={fixture('damo-agent-zh')}"])[1]
    mini = load_conversations([f"damo-agent-mini-zh={fixture('damo-agent-mini-zh')}"])[1]
    reason = "fewer than two tools listed before the first user turn (ms-swift's MSAgent-Bench filter)"
    # full: 3 rows list tools ("name" or "plugin_name"), 1 general row has none
    assert (full.kept, full.skipped[reason]) == (3, 1)
    # mini: only the rows listing "plugin_name" tools stay; the "name" row and the general row go
    assert (mini.kept, mini.skipped[reason]) == (2, 2)


def test_agent_instruct_needs_its_repair_and_gets_it():
    raw = json.loads(fixture("agent-instruct-all-en").read_text(encoding="utf-8").splitlines()[0])["conversations"]
    with pytest.raises(SyntaxError):
        ast.literal_eval(raw)
    row = builtin.agent_instruct({"conversations": raw})
    assert [turn["from"] for turn in row["conversations"]][:2] == ["human", "gpt"]
    # Hugging Face's copy holds a real list: the same function takes it as it is
    assert builtin.agent_instruct({"conversations": row["conversations"]}) == row


def test_classification_prompts_and_their_labels():
    conversations, report = load_conversations([f"cmnli-zh={fixture('cmnli-zh')}"])
    assert [c[-1].content for c in conversations] == ["neutral", "entailment", "contradiction"]
    assert conversations[0][0].content.startswith("Task: Natural Language Inference\nSentence1: ")
    assert conversations[0][0].content.endswith("\nCategory: neutral, entailment, contradiction\nOutput:")
    assert report.skipped == {"label -1 (unlabelled row)": 1}
    jd, jd_report = load_conversations([f"jd-sentiment-zh={fixture('jd-sentiment-zh')}"])
    assert [c[-1].content for c in jd] == ["positive", "negative", "positive"] and jd_report.skipped == {"no label": 1}


def test_one_hc3_row_gives_one_example_per_answer():
    conversations, report = load_conversations([f"hc3-zh={fixture('hc3-zh')}"])
    assert (report.kept, report.conversations) == (2, 5)
    assert [c[-1].content for c in conversations] == ["Human", "ChatGPT", "Human", "Human", "ChatGPT"]
    assert "2 of 2 rows kept (5 conversations)" in report.summary()


def test_coco_rows_carry_the_image_reference():
    path = fixture("coco-en")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    canonical = [builtin.coco_caption(row) for row in rows]
    assert canonical[0]["images"] == [rows[0]["image"]["path"]] and canonical[1]["images"] == [rows[1]["image"]]
    assert canonical[0]["query"].count("<image>") == 1 and "&&" not in canonical[0]["response"]
    conversations, report = load_conversations([f"coco-en={path}"])
    assert report.with_images == 2 and "2 kept rows carry images" in report.summary()
    with pytest.raises(DataError, match="field 'image'"):
        builtin.coco_caption({"image": {"bytes": b"...", "path": None}, "caption": "x"})


def test_saved_datasets_folder_with_an_image_column_keeps_the_path(tmp_path):
    import datasets
    from PIL import Image

    picture = tmp_path / "cat.png"
    Image.new("RGB", (2, 2)).save(picture)
    table = datasets.Dataset.from_dict({"image": [str(picture)], "caption": ["a cat&&a small cat"]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "coco"))
    conversations, report = load_conversations([f"coco-en={tmp_path / 'coco'}"])
    assert conversations[0][-1].content == "a cat" and report.with_images == 1


def test_saved_datasetdict_reads_the_registered_splits(tmp_path):
    import datasets

    rows = lambda n: [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(n)]  # noqa: E731
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(2)), "val": datasets.Dataset.from_list(rows(1)),
                          "test": datasets.Dataset.from_list(rows(5))}).save_to_disk(str(tmp_path / "medical"))
    _, report = load_conversations([f"medical-zh={tmp_path / 'medical'}"], strategy="skip")
    assert report.rows == 3  # train + val, as ms-swift trained on; test is not read


def test_subsets_are_each_loaded_and_concatenated(monkeypatch):
    loads = []

    class FakeMsDataset:
        @staticmethod
        def load(dataset_id, subset_name, split):
            loads.append((dataset_id, subset_name, split))
            return [{"conversation": repr([{"human": f"hi from {subset_name}", "assistant": "hello"}])}]

    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", types.SimpleNamespace(MsDataset=FakeMsDataset))
    conversations, report = load_conversations(["sharegpt-zh"])
    assert loads == [("huangjintao/sharegpt", subset, "train") for subset in ("common-zh", "computer-zh", "unknow-zh")]
    assert [c[0].content for c in conversations] == ["hi from common-zh", "hi from computer-zh", "hi from unknow-zh"]
    loads.clear()
    load_conversations(["multi-alpaca-all"], strategy="skip")
    assert [subset for _, subset, _ in loads] == list(builtin.MULTI_ALPACA_LANGUAGES) and len(loads) == 11
    loads.clear()
    load_conversations(["medical-en"], strategy="skip")
    assert loads == [("huangjintao/medical_zh", "en", "train"), ("huangjintao/medical_zh", "en", "val")]


def test_hub_errors_name_the_subset(monkeypatch):
    class Offline:
        @staticmethod
        def load(dataset_id, subset_name, split):
            raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", types.SimpleNamespace(MsDataset=Offline))
    with pytest.raises(DataError, match=r"ms::huangjintao/sharegpt:common-en\[train\]: could not load .*NAME=PATH"):
        load_conversations(["sharegpt-en"])


def test_hugging_face_parts_can_differ_from_modelscope_parts():
    info = DATASETS["agent-instruct-all-en"]
    assert info.parts("modelscope")[0] == ("alfworld", "train")
    assert info.parts("hf") == [(None, split) for split in builtin.AGENT_INSTRUCT_PARTS]


def test_registered_sample_is_seeded_ordered_and_counted(tmp_path, scratch_datasets):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"query": f"q{i}", "response": f"r{i}"} for i in range(10)])
    register_dataset("tiny-mini", path=path, sample=3)
    first, report = load_conversations(["tiny-mini"])
    again, _ = load_conversations([f"tiny-mini={path}"])
    kept = [int(c[0].content[1:]) for c in first]
    assert len(first) == 3 and kept == sorted(kept) and kept != [0, 1, 2] and again == first  # spread, not the head
    assert (report.rows, report.kept) == (10, 3) and report.skipped == {"outside tiny-mini's sample of 3 rows": 7}
    assert DATASETS["medical-mini-zh"].sample == 50000 and DATASETS["cmnli-mini-zh"].sample == 20000
    assert DATASETS["medical-mini-zh"].preprocess is DATASETS["medical-zh"].preprocess


def test_preprocess_drops_are_counted_with_their_reason_and_never_raise(tmp_path, scratch_datasets):
    def keep_even(row):
        number = int(row["n"])
        if number % 4 == 1:
            return None
        if number % 2:
            return Drop("odd number")
        return {"query": str(number), "response": "even"}

    path = write_jsonl(tmp_path / "rows.jsonl", [{"n": i} for i in range(8)])
    register_dataset("evens", path=path, preprocess=keep_even)
    conversations, report = load_conversations(["evens"], strategy="error")
    assert [c[0].content for c in conversations] == ["0", "2", "4", "6"]
    assert report.skipped == {"left out by evens's preprocessing": 2, "odd number": 2}
    assert "4 of 8 rows kept" in report.summary() and "skipped 2: odd number" in report.summary()


def test_bad_rows_name_file_line_and_field(tmp_path, scratch_datasets):
    path = write_jsonl(tmp_path / "law.jsonl", [{"type": "t", "title": "x", "content": "c"}, {"type": "t", "content": "c"}])
    with pytest.raises(DataError, match=r"law.jsonl:2, field 'title': missing field"):
        load_conversations([f"tigerbot-law-zh={path}"])
    path = write_jsonl(tmp_path / "share.jsonl", [{"conversation": "[{'human': 'hi'}]"}])
    with pytest.raises(DataError, match=r"share.jsonl:1, field 'conversation\[0\].assistant': missing field"):
        load_conversations([f"sharegpt-en={path}"])
    path = write_jsonl(tmp_path / "agent.jsonl", [{"conversations": "[{'from': 'user', 'value': __import__('os')}]"}])
    with pytest.raises(DataError, match=r"agent.jsonl:1, field 'conversations': not a JSON or Python list literal"):
        load_conversations([f"damo-agent-zh={path}"])
    register_dataset("fragile", path=path, preprocess=lambda row: {"query": row["missing"], "response": "r"})
    with pytest.raises(DataError, match=r"agent.jsonl:1, field 'missing': missing field"):
        load_conversations(["fragile"])
    register_dataset("wrong", path=path, preprocess=lambda row: "text")
    with pytest.raises(DataError, match="must return a dict, a list of dicts, None or Drop, got str"):
        load_conversations(["wrong"])


def test_skip_strategy_goes_past_a_bad_raw_row(tmp_path):
    path = tmp_path / "jd.csv"
    path.write_text("sentence,label\ngood,1\nbad,7\nfine,1\n", encoding="utf-8")
    conversations, report = load_conversations([f"jd-sentiment-zh={path}"], strategy="skip")
    assert len(conversations) == 2 and report.skipped == {"label 7 is outside 0..1": 1}
    assert report.examples == [f"{path}:3, field 'label': label 7 is outside 0..1"]


def test_name_equals_path_errors(tmp_path):
    with pytest.raises(DataError, match=r"'alpaca-em' in 'alpaca-em=x.jsonl' is not a registered dataset \(and no file has that name\). Did you mean alpaca-en"):
        load_conversations(["alpaca-em=x.jsonl"])
    with pytest.raises(DataError, match="no such file"):
        load_conversations([f"alpaca-en={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(DataError, match="give the path of a local copy"):
        load_conversations(["alpaca-en="])
    # a file whose own name holds '=' is still a file
    odd = write_jsonl(tmp_path / "alpaca-en=odd.jsonl", [{"query": "q", "response": "r"}])
    assert len(load_conversations([odd])[0]) == 1


def test_register_dataset_validates_its_arguments(scratch_datasets):
    with pytest.raises(ValueError, match="sample must be a positive number"):
        register_dataset("x", "a/b", sample=0)
    with pytest.raises(ValueError, match="preprocess must be a function"):
        register_dataset("x", "a/b", preprocess="rename")
    info = register_dataset("x", "a/b", subsets="one", split=["train", "validation"])
    assert info.parts("modelscope") == [("one", "train"), ("one", "validation")]


def test_list_datasets_shows_subsets_sample_and_preprocess():
    rows = {row["name"]: row for row in json.loads(CliRunner().invoke(list_command, ["datasets", "--format", "json"]).output)}
    assert rows["sharegpt-zh"]["subsets"] == "common-zh,computer-zh,unknow-zh"
    assert rows["medical-mini-zh"]["sample"] == 50000 and rows["medical-mini-zh"]["split"] == "train,val"
    assert rows["damo-agent-mini-zh"]["preprocess"] == "msagent_mini"
    assert rows["instruct-en"]["preprocess"] == "columns prompt->query, completion->response"
    assert rows["alpaca-en"]["preprocess"] is None
    table = CliRunner().invoke(list_command, ["datasets"]).output
    assert "common-zh,computer-zh,unknow-zh" in table


def test_loading_report_without_registered_data_is_unchanged(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"query": "q", "response": "r"}])
    report = load_conversations([path])[1]
    assert report.summary() == "1 of 1 rows kept" and isinstance(report, LoadReport)


def test_cli_takes_name_equals_path_and_reports_the_filter(tiny_model_dir):
    result = CliRunner().invoke(main, ["preview", "--tokenizer", tiny_model_dir, "--template", "chatml", "--num_examples", "1",
                                       "--dataset", f"damo-agent-mini-zh={fixture('damo-agent-mini-zh')}"])
    assert result.exit_code == 0, result.output
    assert "2 of 4 rows kept" in result.output and "skipped 2: fewer than two tools" in result.output
    assert "[[<|startofthink|>" in result.output
