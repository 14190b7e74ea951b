"""benchmarks/gpu_check.py --quick on this machine's CPU: every check it can run here passes, the
CUDA-only ones say why they are skipped, and the JSON holds what the benchmarks documentation reads.
So the script that proves the GPU path never rots between the runs on a lent GPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")


def test_gpu_check_quick_passes_on_the_cpu(real_samples, tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--quick",
            "--out",
            str(out),
            "--samples",
            str(real_samples),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # the CPU's checks and skips, on any machine
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in (
        "device",
        "date",
        "torch",
        "predict_images_per_s",
        "stage1_train_ratio",
        "stage2_train_ratio",
        "checks",
    ):
        assert key in result
    assert result["checks"] == {
        "environment": True,
        "async_equals_sync": True,
        "device_matches_cpu": True,
        "compile_static": True,
    }
    assert set(result["skipped"]) == {
        "nvjpeg_matches_pil",
        "train_one_sync",
        "nvjpeg_predict_matches_pil",
        "dask_two_devices",
        "sanitizer",
        "predict_nvjpeg",
        "predict_compiled",
    }
    assert all("needs" in why for why in result["skipped"].values())
    assert result["finished"] and set(result["estimates"]) == {"checkpoints", *result["checks"], *result["speed"]}
    assert result["predict_images_per_s"] > 0 and 0 < result["stage1_train_ratio"] and 0 < result["stage2_train_ratio"]
    assert "gpu_check on cpu" in done.stdout and re.search(r"^async_equals_sync +ok", done.stdout, re.M)
    assert re.search(r"^  total +\d+ s$", done.stdout, re.M)  # the plan, before the first part


def test_gpu_check_killed_keeps_the_parts_it_finished(real_samples, tmp_path):
    """The script kills itself right after the environment part (a hook for this test): its JSON is
    there, with that part and the plan, and says the run did not finish."""
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--quick",
            "--only",
            "environment,train_plain",
            "--out",
            str(out),
            "--samples",
            str(real_samples),
            "--work",
            str(tmp_path / "work"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GPU_CHECK_KILL_AFTER": "environment", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == -signal.SIGKILL, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checks"] == {"environment": True} and result["speed"] == {} and not result["finished"]
    assert result["parts"] == ["environment", "train_plain"] and result["estimates"]["train_plain"] > 0
    listed = subprocess.run(
        [sys.executable, SCRIPT, "--list-samples", "--samples", str(real_samples)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed and all((real_samples / name).is_file() for name in listed)  # what benchmarks/gpu_prepare.sh copies
