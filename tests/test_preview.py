"""sftkit preview: encoded examples with trainable tokens marked, and length statistics."""
from pathlib import Path

from click.testing import CliRunner

from sftkit.config import PreviewConfig
from sftkit.data.preview import length_stats, preview
from sftkit_cli.main import main

FORMATS = Path(__file__).resolve().parent.parent / "examples" / "data" / "formats"


def test_cli_marks_calls_and_answers_but_not_results(tiny_model_dir):
    result = CliRunner().invoke(main, ["preview", "--tokenizer", tiny_model_dir, "--template", "chatml", "--num_examples", "1",
                                       "--dataset", str(FORMATS / "msagent.jsonl")])
    assert result.exit_code == 0, result.output
    assert "[[<|startofthink|>" in result.output and "<|endofthink|>]]" in result.output
    assert "[[<|startofexec|>" not in result.output
    assert "6 of 6 rows kept" in result.output and "tokens per example: count 6" in result.output


def test_statistics_count_truncated_and_dropped(tokenizer):
    lines = []
    stats = preview(PreviewConfig(dataset=(str(FORMATS / "alpaca.jsonl"),), template="chatml", max_length=24, num_examples=0),
                    tokenizer=tokenizer, echo=lines.append)
    assert stats["rows"] == 7 and stats["tokens"]["count"] == 7
    assert stats["truncated"] > 0
    assert stats["dropped_no_trainable_token"] <= stats["truncated"]
    assert any("truncated to 24" in line for line in lines)


def test_bad_rows_stop_the_cli_with_file_and_line(tiny_model_dir):
    result = CliRunner().invoke(main, ["preview", "--tokenizer", tiny_model_dir, "--dataset", str(FORMATS / "bad.jsonl")])
    assert result.exit_code != 0 and "bad.jsonl:1" in result.output


def test_length_stats_nearest_rank():
    assert length_stats(list(range(1, 101))) == {"count": 100, "min": 1, "median": 50, "p95": 95, "max": 100}
    assert length_stats([]) == {"count": 0}
