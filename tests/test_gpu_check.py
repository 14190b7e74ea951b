"""benchmarks/gpu_check.py --quick on this machine's CPU: every check it can run here passes, the
CUDA-only ones say why they are skipped, and the JSON holds what the benchmarks documentation reads.
So the script that proves the GPU path never rots between the runs on a lent GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_quick_passes_on_the_cpu(real_samples, tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(out),
                           "--samples", str(real_samples), "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("device", "predict_images_per_s", "stage1_train_ratio", "stage2_train_ratio", "checks"):
        assert key in result
    assert result["checks"] == {"environment": True, "async_equals_sync": True, "device_matches_cpu": True, "compile_static": True}
    assert set(result["skipped"]) == {"nvjpeg_matches_pil", "train_one_sync", "dask_two_devices", "sanitizer"}
    assert all("needs" in why for why in result["skipped"].values())
    assert result["predict_images_per_s"] > 0 and 0 < result["stage1_train_ratio"] and 0 < result["stage2_train_ratio"]
    assert "gpu_check on cpu" in done.stdout and "async_equals_sync      ok" in done.stdout
