"""Reading files and hubs, strategies for bad rows, the dataset registry, split and sample."""
import json
import sys
import types

import pytest

from sftkit.data import loading
from sftkit.data.errors import DataError
from sftkit.data.loading import DATASETS, load_conversations, read_dataset, read_file, register_dataset, split_and_sample


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_csv_line_numbers_follow_quoted_newlines(tmp_path):
    path = write(tmp_path / "a.csv", 'instruction,input,output\n"multi\nline",,yes\nq2,,\n')
    rows = list(read_file(path))
    assert [row.line for row in rows] == [2, 4]
    with pytest.raises(DataError) as caught:
        load_conversations([path])
    assert "a.csv:4" in str(caught.value) and "field 'output'" in str(caught.value)


def test_json_list_rows_are_indexed(tmp_path):
    path = write(tmp_path / "a.json", json.dumps([{"query": "q", "response": "r"}, {"query": "q"}]))
    with pytest.raises(DataError, match=r"a.json:row 1, field 'response': missing field"):
        load_conversations([path])


def test_json_file_with_one_object_per_line(tmp_path):
    path = write(tmp_path / "a.json", '{"query": "q", "response": "r"}\n{"query": "q2", "response": "r2"}\n')
    assert len(load_conversations([path])[0]) == 2


def test_several_files_concatenate_in_order(tmp_path):
    first = write(tmp_path / "a.jsonl", '{"query": "1", "response": "r"}\n')
    second = write(tmp_path / "b.csv", "query,response\n2,r\n")
    conversations, report = load_conversations([first, second])
    assert [c[0].content for c in conversations] == ["1", "2"] and report.kept == report.rows == 2


@pytest.mark.parametrize("strategy", ["warning", "skip"])
def test_skip_strategies_count_every_dropped_row(strategy, tmp_path, capsys):
    path = write(tmp_path / "a.jsonl", '{"query": "q", "response": "r"}\n{oops\n{"query": "q", "response": ""}\n{"query": "q", "response": "r"}\n')
    conversations, report = load_conversations([path], strategy=strategy)
    assert len(conversations) == 2 and report.rows == 4 and sum(report.skipped.values()) == 2
    assert "2 of 4 rows kept" in report.summary() and "empty response" in report.summary()
    assert ("warning: skipping" in capsys.readouterr().out) == (strategy == "warning")


def test_unknown_strategy_and_unsupported_file(tmp_path):
    with pytest.raises(ValueError, match="check_dataset_strategy"):
        load_conversations([], strategy="ignore")
    with pytest.raises(DataError, match="unsupported file type"):
        list(read_file(write(tmp_path / "a.txt", "x")))
    with pytest.raises(DataError, match="no such file"):
        list(read_file(str(tmp_path / "missing.jsonl")))


def test_unknown_dataset_name_hints():
    with pytest.raises(DataError, match="Did you mean alpaca-en"):
        read_dataset("alpaca-em")


def test_registry_has_the_ms_swift_datasets():
    for name in ["alpaca-en", "alpaca-zh", "damo-agent-zh", "damo-agent-mini-zh", "agent-instruct-all-en", "code-alpaca-en",
                 "leetcode-python-en", "medical-en", "medical-zh", "lawyer-llama-zh", "tigerbot-law-zh", "blossom-math-zh",
                 "school-math-zh", "text2sql-en", "sql-create-context-en", "advertise-gen-zh", "dureader-robust-zh", "sharegpt"]:
        assert name in DATASETS and (DATASETS[name].ms_id or DATASETS[name].hf_id)


def test_registered_dataset_reads_through_hub_and_renames_columns(monkeypatch):
    rows = [{"question": "q", "context": "c", "answer": "a"}]
    seen = {}

    class FakeMsDataset:
        @staticmethod
        def load(dataset_id, subset_name, split):
            seen.update(dataset_id=dataset_id, split=split)
            return rows

    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", types.SimpleNamespace(MsDataset=FakeMsDataset))
    conversations, _ = load_conversations(["sql-create-context-en"])
    assert seen == {"dataset_id": "AI-ModelScope/sql-create-context", "split": "train"}
    assert [m.content for m in conversations[0]] == ["q\nc", "a"]


def test_hub_failure_is_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"hf::org/data\[train\]: could not load from the hub: ConnectionError: no network"):
        list(read_dataset("hf::org/data"))


def test_register_dataset_needs_an_id_and_a_new_name():
    with pytest.raises(ValueError):
        register_dataset("nothing")
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("alpaca-en", "x/y")


def test_split_and_sample_is_seeded_and_disjoint():
    items = list(range(100))
    train, validation = split_and_sample(items, test_ratio=0.1, seed=1)
    assert len(validation) == 10 and len(train) == 90 and not set(train) & set(validation)
    assert split_and_sample(items, test_ratio=0.1, seed=1) == (train, validation)
    assert split_and_sample(items, test_ratio=0.1, seed=2) != (train, validation)
    assert len(split_and_sample(items, test_ratio=0.1, sample=20, seed=1)[0]) == 20
    assert split_and_sample(items, test_ratio=0.0, seed=1)[1] == []


def test_local_datasets_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"query": "q", "response": "r"}]).save_to_disk(str(tmp_path / "ds"))
    assert len(load_conversations([str(tmp_path / "ds")])[0]) == 1
    assert loading.FILE_SUFFIXES == (".jsonl", ".json", ".csv")


@pytest.mark.parametrize("rows,ratio,expected", [(400, 0.01, 20), (100, 0.01, 10), (16, 0.125, 2), (5, 0.01, 1),
                                                 (1000, 0.05, 50), (400, 0.0, 0), (1, 0.5, 0)])
def test_validation_split_has_a_sensible_minimum(rows, ratio, expected):
    """min(max(ratio, 20 rows), 10%): the default 1% of 400 rows would be 4 examples to choose the best checkpoint on."""
    from sftkit.data.loading import validation_size

    assert validation_size(rows, ratio) == expected
    assert len(split_and_sample(list(range(rows)), test_ratio=ratio)[1]) == expected


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfquery,response\nhi,there\n")
    assert next(read_file(str(path))).data == {"query": "hi", "response": "there"}
