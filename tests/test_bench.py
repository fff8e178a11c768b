"""The benchmark scripts run end to end (tiny model and tokenizer, seconds) and write the JSON the docs describe."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: int = 600) -> None:
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, capture_output=True,
                               text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]


@pytest.mark.slow
def test_train_throughput_quick(tmp_path):
    out = tmp_path / "train_throughput.json"
    run_script("train_throughput.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert {"benchmark", "machine", "settings", "data", "flops", "runs", "summary", "ratios"} <= result.keys()
    assert {"load_average", "load_average_after", "cpu_count", "torch", "transformers"} <= result["machine"].keys()
    names = {run["name"] for run in result["runs"]}
    assert names == {"sftkit:packed", "sftkit:padded", "sftkit:packing", "reference"}
    for run in result["runs"]:
        assert {"trainable_tokens_per_s", "all_tokens_per_s", "seconds_per_step", "peak_rss_mb", "peak_gpu_mem_mb",
                "final_loss", "loss_last_20pct", "padding_share", "achieved_tflops", "mfu", "steps", "losses"} <= run.keys()
        assert run["trainable_tokens_per_s"] > 0 and run["peak_rss_mb"] > 0 and len(run["losses"]) == run["steps"]
        # Equal trainable tokens: every run learns each example once, packed or not.
        assert run["examples_seen"] == result["data"]["examples"]
        assert run["trainable_tokens"] == result["data"]["trainable_tokens"]
    runs = {run["name"]: run for run in result["runs"]}
    assert 0 < runs["sftkit:packed"]["fill_ratio"] <= 1 and 0 < runs["sftkit:packing"]["fill_ratio"] <= 1
    # The user's view: default flags and --packing true, both at the reference's batch size and max length.
    assert runs["sftkit:padded"]["sftkit_flags"] == {**runs["sftkit:padded"]["sftkit_flags"], "packing": False, "batch_size": 4,
                                                     "max_memory": "auto", "varlen_attention": True, "gradient_checkpointing": False}
    assert runs["sftkit:packing"]["sftkit_flags"]["packing"] and runs["sftkit:packing"]["sftkit_flags"]["batch_size"] == 4
    assert runs["sftkit:packing"]["steps"] < runs["sftkit:padded"]["steps"] == runs["reference"]["steps"]
    assert all(runs[name]["estimated_peak_mb"] > 0 for name in ("sftkit:packed", "sftkit:padded", "sftkit:packing"))
    assert set(result["comparisons"].values()) == set(result["ratios"]) == {
        "sftkit:packed/reference", "sftkit:padded/reference", "sftkit:packing/reference"}
    for pair in result["ratios"].values():
        assert {"trainable_tokens_per_s", "all_tokens_per_s", "peak_rss_mb", "loss_last_20pct"} <= pair.keys()


@pytest.mark.slow
def test_preprocess_quick(tmp_path):
    out = tmp_path / "preprocess.json"
    run_script("preprocess.py", "--rows", "200", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert {"benchmark", "machine", "settings", "data", "runs", "summary", "ratios", "verification"} <= result.keys()
    assert set(result["summary"]) == {"sftkit:chatml", "sftkit:auto", "sftkit:chatml:batched", "sftkit:auto:batched", "reference"}
    assert all(figures["rows_per_s"] > 0 and figures["tokens_per_s"] > 0 for figures in result["summary"].values())
    assert set(result["data"]["schemas"]) == {"chat", "multi-turn", "alpaca"}
    assert "sftkit:chatml/reference" in result["ratios"]
    # Both sides must build the same examples, or the timing compares different work.
    assert result["verification"]["rows_checked"] == 200
    for check in result["verification"]["by_side"].values():
        assert check["input_ids_mismatches"] == 0 and check["trainable_mismatches"] == 0, check["examples"]


@pytest.mark.slow
def test_serve_quick(tmp_path):
    out = tmp_path / "serve.json"
    run_script("serve.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert {"benchmark", "machine", "settings", "levels"} <= result.keys()
    assert [level["concurrency"] for level in result["levels"]] == [1, 8, 32]
    for level in result["levels"]:
        assert level["requests"] == level["concurrency"] and level["generated_tokens"] > 0
        assert level["tokens_per_s"] > 0 and 0 < level["ttft_s"]["median"] <= level["latency_s"]["median"]


def test_constrained_decoding_quick(tmp_path):
    out = tmp_path / "constrained_decoding.json"
    run_script("constrained_decoding.py", "--quick", "--rows", "6", "--repeats", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert {"benchmark", "machine", "settings", "guide", "mask_per_token", "generation", "libraries"} <= result.keys()
    assert result["mask_per_token"]["in_call_us"]["count"] > 0 and result["mask_per_token"]["outside_us"]["count"] > 0
    assert result["mask_per_token"]["reference_tokens_refused"] == 0  # every reference call fits its grammar
    assert {run["constrained"] for run in result["generation"]["runs"]} == {True, False}
    assert set(result["libraries"]) == {"llguidance", "xgrammar", "lm-format-enforcer", "outlines-core"}
    assert result["libraries"]["llguidance"]["reference_calls_accepted"].split("/")[0] == \
        result["libraries"]["llguidance"]["reference_calls_accepted"].split("/")[1]
