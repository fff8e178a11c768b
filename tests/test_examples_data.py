"""The example data generators are deterministic, the committed files are their output, and the rows keep
the conventions the parsers and the agent evaluation rely on."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GENERATORS = {
    "chat": (EXAMPLES / "data" / "make_chat.py", EXAMPLES / "data", ["chat.jsonl"]),
    "formats": (
        EXAMPLES / "data" / "formats" / "make_formats.py",
        EXAMPLES / "data" / "formats",
        ["alpaca.jsonl", "alpaca.csv", "query_response.jsonl", "sharegpt.jsonl", "msagent.jsonl",
         "messages_tools.jsonl", "bad.jsonl", "bad.README.md"],
    ),
    "agent": (EXAMPLES / "agent" / "make_dataset.py", EXAMPLES / "agent", ["train.jsonl", "test.jsonl", "test_general.jsonl"]),
    "preference": (EXAMPLES / "preference" / "make_dataset.py", EXAMPLES / "preference", ["train.jsonl", "test.jsonl"]),
}
# One tool call as MSAgent-Bench writes it; an assistant value is zero or more of these, then the answer.
CALL = re.compile(
    r"<\|startofthink\|>```JSON\n(?P<call>.*?)\n```<\|endofthink\|>\n\n"
    r"<\|startofexec\|>```JSON\n(?P<result>.*?)\n```<\|endofexec\|>\n"
)
MARKERS = ["<|startofthink|>", "<|endofthink|>", "<|startofexec|>", "<|endofexec|>"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def generate(name: str, out: Path) -> Path:
    script, _, _ = GENERATORS[name]
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Every generator run twice into fresh directories."""
    return {name: tuple(generate(name, tmp_path_factory.mktemp(f"{name}-{run}")) for run in "ab") for name in GENERATORS}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_are_deterministic_and_match_committed_files(generated, name):
    _, committed_dir, files = GENERATORS[name]
    first, second = generated[name]
    assert sorted(p.name for p in first.iterdir()) == sorted(files)
    for file in files:
        assert (first / file).read_bytes() == (second / file).read_bytes(), f"{file} differs between runs"
        assert (first / file).read_bytes() == (committed_dir / file).read_bytes(), f"{file} is stale: rerun {name}"


def split_calls(value: str) -> tuple[list[dict], list[dict], str]:
    """(calls, results, answer) of an MSAgent assistant value; fails unless it is calls followed by plain text."""
    calls, results, position = [], [], 0
    for match in CALL.finditer(value):
        assert match.start() == position, f"text between or before tool calls: {value!r}"
        calls.append(json.loads(match["call"]))
        results.append(json.loads(match["result"]))
        position = match.end()
    answer = value[position:]
    assert not any(marker in answer for marker in MARKERS), f"unbalanced or malformed markers: {value!r}"
    assert answer.strip(), f"no final answer: {value!r}"
    return calls, results, answer


def msagent_files() -> list[Path]:
    return [EXAMPLES / "data" / "formats" / "msagent.jsonl", EXAMPLES / "agent" / "train.jsonl",
            EXAMPLES / "agent" / "test.jsonl", EXAMPLES / "agent" / "test_general.jsonl"]


@pytest.mark.parametrize("path", msagent_files(), ids=lambda p: p.name)
def test_msagent_assistant_values_have_well_formed_calls(path):
    for row in read_jsonl(path):
        turns = row["conversations"]
        assert turns[0]["from"] == "system"
        assert [t["from"] for t in turns[1:]] == ["user", "assistant"] * ((len(turns) - 1) // 2)
        for turn in turns:
            if turn["from"] != "assistant":
                continue
            value = turn["value"]
            assert [value.count(m) for m in MARKERS[::2]] == [value.count(m) for m in MARKERS[1::2]]
            calls, _, _ = split_calls(value)
            for call in calls:
                assert isinstance(call["api_name"], str) and isinstance(call["parameters"], dict)
                assert call.get("url", "http://").startswith("http://")  # MSAgent-Bench requires api_name and parameters


def test_msagent_sample_covers_two_calls_multi_round_and_chinese():
    rows = read_jsonl(EXAMPLES / "data" / "formats" / "msagent.jsonl")
    assistant = [t["value"] for row in rows for t in row["conversations"] if t["from"] == "assistant"]
    assert any(value.count("<|startofthink|>") == 2 for value in assistant)
    assert any(sum(t["from"] == "assistant" for t in row["conversations"]) >= 2 for row in rows)
    assert any(re.search(r"[\u4e00-\u9fff]", row["conversations"][1]["value"]) for row in rows)


def test_chat_rows_have_expected_roles():
    rows = read_jsonl(EXAMPLES / "data" / "chat.jsonl")
    assert 350 <= len(rows) <= 450
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body == ["user", "assistant"] * (len(body) // 2) and body, roles
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
    assert any(len(row["messages"]) >= 6 for row in rows), "expected some multi-turn rows"
    assert any(re.search(r"[\u4e00-\u9fff]", m["content"]) for row in rows for m in row["messages"])


def test_format_samples_parse():
    formats = EXAMPLES / "data" / "formats"
    for name in ["alpaca.jsonl", "query_response.jsonl", "sharegpt.jsonl", "msagent.jsonl", "messages_tools.jsonl"]:
        assert 5 <= len(read_jsonl(formats / name)) <= 8, name
    with open(formats / "alpaca.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["instruction", "input", "output"]
    assert any("," in value and "\n" in value for row in rows for value in row.values())
    for row in read_jsonl(formats / "messages_tools.jsonl"):
        assert row["tools"] and all(tool["function"]["name"] for tool in row["tools"])
        for message in row["messages"]:
            for call in message.get("tool_calls", []):
                assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_bad_rows_match_their_readme():
    formats = EXAMPLES / "data" / "formats"
    lines = (formats / "bad.jsonl").read_text(encoding="utf-8").splitlines()
    listed = re.findall(r"^\| (\d+) \|", (formats / "bad.README.md").read_text(encoding="utf-8"), re.M)
    assert listed == [str(n) for n in range(1, len(lines) + 1)]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])
    assert all(isinstance(json.loads(line), dict) for line in lines[1:])


def test_preference_pairs_differ_only_in_format():
    from sftkit.data.preference_formats import to_preference

    splits = {name: read_jsonl(EXAMPLES / "preference" / f"{name}.jsonl") for name in ("train", "test")}
    assert len(splits["train"]) == 600 and len(splits["test"]) == 100
    assert not {row["prompt"] for row in splits["train"]} & {row["prompt"] for row in splits["test"]}
    for row in splits["train"] + splits["test"]:
        assert to_preference(row).paired
        number = re.fullmatch(r'\{"answer": (-?\d+)\}', row["chosen"]).group(1)
        assert not re.fullmatch(r'\{"answer": (-?\d+)\}', row["rejected"]) and re.search(rf"\b{number}\b", row["rejected"])
