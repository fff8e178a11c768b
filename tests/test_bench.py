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
    assert names == {"sftkit:packed", "sftkit:defaults", "sftkit:packing", "reference"}
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
    assert runs["sftkit:defaults"]["sftkit_flags"] == {
        **runs["sftkit:defaults"]["sftkit_flags"], "packing": False, "padding_free": True, "batch_size": 4,
        "max_memory": "auto", "varlen_attention": True, "gradient_checkpointing": False}
    assert runs["sftkit:defaults"]["padding_share"] == 0 < runs["reference"]["padding_share"]
    assert runs["sftkit:packing"]["sftkit_flags"]["packing"] and runs["sftkit:packing"]["sftkit_flags"]["batch_size"] == 4
    assert runs["sftkit:packing"]["steps"] < runs["sftkit:defaults"]["steps"] == runs["reference"]["steps"]
    assert all(runs[name]["estimated_peak_mb"] > 0 for name in ("sftkit:packed", "sftkit:defaults", "sftkit:packing"))
    assert set(result["comparisons"].values()) == set(result["ratios"]) == {
        "sftkit:packed/reference", "sftkit:defaults/reference", "sftkit:packing/reference"}
    for pair in result["ratios"].values():
        assert {"trainable_tokens_per_s", "all_tokens_per_s", "peak_rss_mb", "loss_last_20pct"} <= pair.keys()


@pytest.mark.slow
def test_gpu_quick(tmp_path):
    """bench/gpu.py on CPU: both sides, two token counts, the same first loss (equal weights, same work)."""
    out = tmp_path / "gpu.json"
    run_script("gpu.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert {"benchmark", "machine", "device", "settings", "flops_formula", "models", "skipped"} <= result.keys()
    (model,) = result["models"]
    measurements = model["measurements"]
    assert {m["side"] for m in measurements} == {"sftkit:eager", "sftkit:fused", "reference"}
    assert {m["tokens_per_step"] for m in measurements} == {128, 256}
    for m in measurements:
        assert m["ms_per_step"] > 0 and m["tokens_per_s"] > 0 and 0 < m["trainable_tokens"] < m["tokens"] <= m["tokens_per_step"]
        same_batch = [other["first_loss"] for other in measurements if other["tokens_per_step"] == m["tokens_per_step"]]
        assert max(same_batch) - min(same_batch) < 1e-3
    for side in ("sftkit:eager", "sftkit:fused"):
        figures = model["summary"][side]
        assert figures["fixed_overhead_ms"] is not None and set(figures["ratio_at_equal_batch"]) == {"128", "256"}
        assert figures["ratio_best_vs_reference_best"] > 0


def test_gpu_bench_reports_a_failing_side_and_goes_on():
    """An untested lever that breaks on the device costs its own row, not the run."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    class Broken:
        def start(self, steps):
            pass

        def step(self):
            raise RuntimeError("no kernel image is available")

        def stop(self):
            pass

        reset = stop

    args = gpu.parse_args(["--quick"])
    measured = gpu.measure(Broken(), [[]] * 3, args, torch.device("cpu"))
    assert measured["failed"].startswith("RuntimeError: no kernel image")
    measured.update(side="sftkit:compiled", tokens_per_step=128, tokens=100, trainable_tokens=60)
    summary = gpu.summarise([measured])
    assert summary["sftkit:compiled"]["fixed_overhead_ms"] is None and "failed" in gpu.describe("tiny", measured)


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
    assert [run["side"] for run in result["generation"]["runs"]] == ["free", "token", "scored", "grounded"]
    assert set(result["libraries"]) == {"llguidance", "xgrammar", "lm-format-enforcer", "outlines-core"}
    assert result["libraries"]["llguidance"]["reference_calls_accepted"].split("/")[0] == \
        result["libraries"]["llguidance"]["reference_calls_accepted"].split("/")[1]
