"""A normal (not editable) install works on its own: the wheel carries the CLI, the DeepSpeed presets and the
default data, found with importlib.resources from any folder."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(folder), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    return next(folder.glob("sftkit-*.whl"))


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"sftkit/ds_config/{name}.json" for name in ("zero2", "zero3", "zero2_offload", "zero3_offload")}
    shipped |= {"sftkit/example_data/chat.jsonl", "sftkit_cli/main.py", "sftkit/train.py", "sftkit/data/pipeline.py"}
    assert shipped <= names, sorted(shipped - names)
    assert not [name for name in names if name.split("/")[0] in ("tests", "bench", "examples", "cli", "ds_config")]


@pytest.mark.slow
def test_installed_wheel_trains_with_the_bundled_data_and_finds_the_presets(wheel, tiny_model_dir, tmp_path):
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    found = subprocess.run([sys.executable, "-c", "from sftkit.paths import bundled; from sftkit.deepspeed import config_path; "
                            "print(bundled('chat.jsonl')); print(config_path('zero3'))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr[-2000:]
    assert all(line.startswith(str(site)) for line in found.stdout.split()), found.stdout
    trained = subprocess.run([sys.executable, "-m", "sftkit_cli.main", "train", "--model", tiny_model_dir, "--template", "chatml",
                              "--max_steps", "1", "--max_length", "64", "--output_dir", str(tmp_path / "out")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert "400 rows kept" in trained.stdout and "chat with it: sftkit chat --ckpt_dir" in trained.stdout
