"""benchmarks/gpu_check.py --quick on this machine's CPU, on generated cars (so on every clone): every check
it can run here passes, the CUDA-only ones say why they are skipped, and the JSON holds what the benchmarks
documentation reads; a killed run keeps what it finished; a part past its limit fails with the reason and
the others still run; the default plan for a card fits the documented call. So the script that proves the
GPU path never rots between the runs on a lent GPU."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")
NO_CUDA = {"CUDA_VISIBLE_DEVICES": ""}  # the CPU's checks and skips, on any machine


def _gpu_check(*args, env=None, timeout=900):
    return subprocess.run(
        [sys.executable, SCRIPT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **NO_CUDA, **(env or {})},
    )


@pytest.fixture
def gpu_check(monkeypatch):
    """The script as a module, as on a card with one GPU and nvjpeg (nothing here runs on it)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "CUDA", True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return gpu_check


def test_gpu_check_quick_passes_on_the_cpu_on_generated_cars(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = _gpu_check("--quick", "--samples", "generated", "--out", str(out), "--work", str(tmp_path / "work"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("device", "date", "torch", "predict_images_per_s", "stage1_train_ratio", "stage2_train_ratio"):
        assert key in result
    assert result["samples"].startswith("generated") and result["probes"] == {}
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
    # the speed row: the steady state of stage2 predict's loop on a warm cascade, its start-up apart
    row = result["speed"]["predict_pil"]
    assert row["images"] == 8 and row["images_per_s"] > 0 and "steady state" in row["includes"]
    assert set(row["startup_s"]) == {"nets_loaded", "warm_up_4_photos", "reader_start_and_first_batch"}
    shares = row["shares"]  # each step's share of the step time, rounded to 4 places
    assert all(v >= 0 for v in shares.values()) and sum(shares.values()) == pytest.approx(1, abs=5e-5 * len(shares))
    band = result["speed"]["band_vs_tiles"]  # the band against the tiles, on the trained nets
    assert band["tiles"]["failed"] == band["band"]["failed"] == 0 and band["band"]["refined_pixels_per_photo"] > 0
    assert band["band_time_share"] > 0
    assert 0 < result["stage1_train_ratio"] and 0 < result["stage2_train_ratio"]
    assert "gpu_check on cpu" in done.stdout and re.search(r"^async_equals_sync +ok", done.stdout, re.M)
    assert re.search(r"^  total +\d+$", done.stdout, re.M)  # the plan, before the first part
    assert done.stdout.index("  total") < done.stdout.index("environment: running")
    applied = dict(re.findall(r"^(\w+): running \(estimate \d+ s, limit (\d+) s\)$", done.stdout, re.M))
    assert applied and {name: int(s) for name, s in applied.items()} == {  # the plan's limits are the ones applied
        name: limit for name, limit in result["limits"].items() if name in applied
    }


def test_gpu_check_killed_keeps_the_parts_it_finished(tmp_path):
    """The script kills itself right after the environment part (a hook for this test): its JSON is
    there, with that part and the plan, and says the run did not finish."""
    out = tmp_path / "gpu_check.json"
    done = _gpu_check(
        "--quick",
        "--only",
        "environment,train_plain",
        "--samples",
        "generated",
        "--out",
        str(out),
        "--work",
        str(tmp_path / "work"),
        env={"GPU_CHECK_KILL_AFTER": "environment"},
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["checks"] == {"environment": True} and result["speed"] == {} and not result["finished"]
    assert result["parts"] == ["environment", "train_plain"] and result["estimates"]["train_plain"] > 0


def test_the_json_is_written_before_anything_that_can_fail(tmp_path):
    """Samples that are not there: the JSON already holds the machine and the plan's parts, and the error."""
    out = tmp_path / "gpu_check.json"
    done = _gpu_check("--quick", "--samples", str(tmp_path / "nowhere"), "--out", str(out), timeout=120)
    assert done.returncode == 2 and "no samples in" in done.stderr
    result = json.loads(out.read_text())
    assert result["torch"] == torch.__version__ and result["parts"] and "no samples in" in result["error"]
    assert not result["finished"] and result["checks"] == {}


def test_the_parts_run_correctness_first_then_speed_then_compiling_and_the_default_plan_fits_the_call(gpu_check):
    """On a card with one GPU and nvjpeg: the checks first, the speed rows next, the parts that compile last;
    the default plan's estimates total at most what the documented call leaves for them (DEFAULT_PLAN_S)."""
    parts = gpu_check.chosen(gpu_check.DEFAULT_PARTS)
    kinds = ["compile" if p.compiles else "check" if p.check else "speed" for p in parts]
    assert kinds == sorted(kinds, key=["check", "speed", "compile"].index)
    assert "train_compiled" not in [p.name for p in parts]
    ctx = gpu_check.Context(False, None, Path("unused"), nvjpeg=True)
    estimates = gpu_check.plan_estimates(ctx, parts)
    assert "dask_two_devices" not in estimates and {"sanitizer", "predict_nvjpeg", "compile_static"} <= set(estimates)
    assert sum(estimates.values()) <= gpu_check.DEFAULT_PLAN_S <= 420
    assert all(gpu_check.limit_of(e, False) >= e + 60 for e in estimates.values())


def test_a_part_past_its_limit_fails_with_the_reason_and_its_child_is_killed(gpu_check, tmp_path, monkeypatch):
    """A part whose child process hangs: at the part's deadline the child (and its group) is killed and the
    part is a failed check saying why; an in-process part that hangs is stopped by the alarm the same way."""
    ctx = gpu_check.Context(True, None, tmp_path, nvjpeg=False)
    started = []
    popen = gpu_check.subprocess.Popen

    def recorded(*args, **kwargs):  # the child's pid as the script starts it, whatever the child has done yet
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(gpu_check.subprocess, "Popen", recorded)
    hang = "import time; time.sleep(600)"

    def hangs_in_a_child(ctx):
        gpu_check.child([sys.executable, "-c", hang], ctx, "a child that hangs")
        return True, {}

    def hangs_here(ctx):
        time.sleep(600)
        return True, {}

    result = {"checks": {}, "details": {}, "speed": {}}
    for name, run in (("in_a_child", hangs_in_a_child), ("here", hangs_here)):
        ctx.deadline, ctx.limit_reason = time.monotonic() + 2, "stopped at its limit of 2 s (from its estimate, 1 s)"
        gpu_check.run_part(gpu_check.Part(name, run, True), ctx, result)
        assert result["checks"][name] is False
        assert result["details"][name]["error"].startswith("PartTimeout: stopped at its limit of 2 s")
    assert "its child process (a child that hangs) was killed" in result["details"]["in_a_child"]["error"]
    with pytest.raises(ProcessLookupError):  # the child is gone, not left running
        os.kill(started[0].pid, 0)


def test_the_start_up_probes_record_any_exception_and_go_on(gpu_check):
    """A torchvision without its image ops raises AttributeError at the nvjpeg probe: recorded, not a crash."""
    result = {"probes": {}}

    def broken():
        raise AttributeError("'_OpNamespace' 'image' object has no attribute 'decode_jpegs_cuda'")

    assert gpu_check.probe(result, "nvjpeg", broken, False) is False
    assert result["probes"] == {
        "nvjpeg": "AttributeError: '_OpNamespace' 'image' object has no attribute 'decode_jpegs_cuda'"
    }


def test_the_sample_list_names_the_real_files_gpu_prepare_copies(real_samples):
    listed = subprocess.run(
        [sys.executable, SCRIPT, "--list-samples", "--samples", str(real_samples)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listed and all((real_samples / name).is_file() for name in listed)


def test_gpu_prepare_prints_the_call_the_docs_give():
    """The command benchmarks/gpu_prepare.sh prints (without building .gpu/) is the one in docs/benchmarks.md."""
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_prepare.sh"), "--print"], capture_output=True, text=True, check=True
    )
    command = next(line for line in done.stdout.splitlines() if "gpu_check.py" in line and "pip install" in line)
    assert "--budget 420" in command and "--out $OUT/gpu_check.json" in command and "--samples .gpu/samples" in command
    assert "timeout_s 600" in done.stdout and '[".gpu"]' in done.stdout
    assert f"    {command}\n" in (ROOT / "docs" / "benchmarks.md").read_text()
