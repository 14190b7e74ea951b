"""`carvana run`: the data generated as `make demo` generates it, resume after a kill, steps skipped when
done, reruns limited to what changed, --force, `predict.threshold=auto`; the bundle it writes cuts photos
out with the README's line."""

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from helpers import TINY

from common.data.rle import rle_decode

CLI = [sys.executable, "-m", "pipelines", "run"]
FAULTS = [sys.executable, str(Path(__file__).with_name("faults.py"))]  # a command stopped at an exact point


def _states(stdout: str) -> dict[str, str]:
    return {
        line.split()[1].rstrip(":"): line.split()[0]
        for line in stdout.splitlines()
        if line.startswith(("[run]", "[skip]"))
    }


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """A fresh `carvana run` that generates its data (as `make demo` does: sample.cars and a data.root
    without train/), killed by SIGKILL right after stage 2's first epoch is saved (sent by tests/faults.py,
    not a race), then run again to the end: (its command, its folder, the killed process, whether stage
    2's last.pt was on disk after the kill, the rerun's stdout)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config = tmp / "p.yaml"
    sample = {"cars": 3, "test_cars": 1, "seed": 1}  # the shared sample data's (tests/conftest.py)
    config.write_text(
        yaml.safe_dump({"data": {"root": str(tmp / "data")}, "sample": sample, "output": {"dir": str(tmp / "out")}})
    )
    args = [*CLI, str(config), *TINY, "stage2.epochs=2", "data.limit_test=2"]
    killed = _killed([*FAULTS, "--at", "stage2.epoch:1", "--", *args[3:]], tmp)
    saved = (tmp / "out" / "stage2" / "last.pt").is_file()
    rerun = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return args, tmp / "out", killed, saved, rerun


def _killed(command: list[str], folder: Path) -> subprocess.CompletedProcess:
    """`command`, killed by tests/faults.py, run as a job of its own; once it is dead, what is left of its
    job is killed too, as a terminal kills a job (the worker processes that generated the data idle for
    minutes, and would hold a pipe to the test open)."""
    out, err = folder / "killed.out", folder / "killed.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        job = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, start_new_session=True)
        job.wait(600)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(job.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, job.returncode, out.read_text(), err.read_text())


def test_carvana_run_generates_the_data_carvana_sample_data_writes(resumed, sample_root):
    """The run's first step wrote, file for file, what `carvana sample-data` writes with the same counts
    and seed (the shared sample data, tests/conftest.py); the rerun found it and left it."""
    _, out, killed, _, rerun = resumed
    assert _states(killed.stdout)["sample_data"] == "[run]" and _states(rerun)["sample_data"] == "[skip]"

    def files(root: Path) -> dict:
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    generated = files(out.parent / "data")
    assert len(generated) == 4 * 16 + 3 * 16 + 4 and generated == files(sample_root)


def test_killed_pipeline_resumes_training_from_its_checkpoint(resumed):
    """The rerun skips stage 1, resumes stage 2 from the checkpoint of the killed run and finishes."""
    _, out, killed, saved, rerun = resumed
    assert killed.returncode == -signal.SIGKILL and saved
    states = _states(rerun)
    assert states["stage1_train"] == states["stage1_predict"] == "[skip]" and states["stage2_train"] == "[run]"
    assert "resuming an interrupted run" in rerun and "after epoch 1" in rerun
    assert "epoch 2/2" in rerun and "epoch 1/2" not in rerun  # only the missing epoch was trained
    assert (out / "submission.csv.gz").is_file()


def test_pipeline_caches_steps(resumed, tmp_path):
    args, out, killed, _, rerun = resumed
    # every step ran once: the killed run's up to stage 2's training, the rest in the rerun
    assert set(_states(killed.stdout).values()) == {"[run]"} and len(_states(killed.stdout)) == 4
    assert [s for s, state in _states(rerun).items() if state == "[run]"] == [
        "stage2_train",
        "evaluate",
        "stage2_predict",
        "bundle",
    ]
    assert "validation Dice" in rerun and "stage 1 alone" in rerun and "cascade" in rerun
    assert (out / "report" / "index.html").stat().st_size > 10_000
    assert (out / "config.yaml").is_file()
    _readme_cutout(out / "bundle", sorted((out.parent / "data" / "test").glob("*.jpg"))[:1], tmp_path / "cutouts")

    again = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert set(_states(again).values()) == {"[skip]"} and len(_states(again)) == 7

    changed = subprocess.run([*args, "stage2.blend=mean"], capture_output=True, text=True, check=True).stdout
    states = _states(changed)
    assert states["stage1_train"] == states["stage1_predict"] == "[skip]"
    assert states["stage2_train"] == states["stage2_predict"] == states["evaluate"] == "[run]"

    forced = subprocess.run(
        [*args, "stage2.blend=mean", "--force", "evaluate"], capture_output=True, text=True, check=True
    ).stdout
    states = _states(forced)  # the forced step and the steps that read its outputs, no others
    assert states["evaluate"] == states["bundle"] == "[run]"
    assert (
        states["stage1_train"]
        == states["stage1_predict"]
        == states["stage2_train"]
        == states["stage2_predict"]
        == "[skip]"
    )

    # predict.threshold=auto: the submission's masks are the cascade's probability above the threshold of the
    # best mean validation Dice in evaluate's sweep, so evaluate runs first; the nets are not retrained
    auto = subprocess.run(
        [*args, "stage2.blend=mean", "predict.threshold=auto"], capture_output=True, text=True, check=True
    ).stdout
    assert [s for s, state in _states(auto).items() if state == "[run]"] == ["evaluate", "stage2_predict", "bundle"]
    sweep = pd.read_csv(out / "report" / "threshold_sweep.csv")
    best = float(sweep.threshold[sweep.dice_cascade.idxmax()])
    probs = _fresh_probabilities(out)
    submission = pd.read_csv(out / "submission.csv.gz", dtype=str, keep_default_na=False)
    assert list(submission.img) == list(probs) and len(probs) == 2
    for img, rle in zip(submission.img, submission.rle_mask, strict=True):
        mask = rle_decode(rle, probs[img].shape)
        assert 0 < mask.mean() < 1
        np.testing.assert_array_equal(mask, probs[img] > best)
    assert json.loads((out / "bundle" / "bundle.json").read_text())["threshold"] == best
    # the tiny nets' best is 0.5, which any threshold setting could give: a sweep whose best is 0.35, and
    # stage 2 predicted again (evaluate's outputs are there and current): its masks follow the sweep
    sweep.loc[sweep.threshold.round(2) == 0.35, "dice_cascade"] = sweep.dice_cascade.max() + 0.001
    sweep.to_csv(out / "report" / "threshold_sweep.csv", index=False)
    again = [*args, "stage2.blend=mean", "predict.threshold=auto", "--force", "stage2_predict"]
    states = _states(subprocess.run(again, capture_output=True, text=True, check=True).stdout)
    assert [s for s, state in states.items() if state == "[run]"] == ["stage2_predict"]
    submission = pd.read_csv(out / "submission.csv.gz", dtype=str, keep_default_na=False)
    for img, rle in zip(submission.img, submission.rle_mask, strict=True):
        np.testing.assert_array_equal(rle_decode(rle, probs[img].shape), probs[img] > np.float32(0.35))
    assert any(not np.array_equal(probs[img] > 0.35, probs[img] > best) for img in probs)


def _fresh_probabilities(out: Path) -> dict[str, np.ndarray]:
    """The cascade's probability of each test image of the run, predicted anew from its nets, config and
    cached boxes, in the submission's order."""
    from common.config import load_config
    from common.model_source import open_source
    from stage2_fullres.cascade import Cascade

    cfg = load_config(out / "config.yaml")
    boxes = pd.read_csv(out / "bboxes.csv").set_index("img")
    names = pd.read_csv(Path(cfg.data.root) / "sample_submission.csv").img[: cfg.data.limit_test].tolist()
    cascade = Cascade.load(open_source(cfg, strict=False), cfg, torch.device("cpu"))
    paths = [Path(cfg.data.root) / "test" / name for name in names]
    found = cascade.run(paths, [tuple(int(v) for v in boxes.loc[name, ["x0", "y0", "x1", "y1"]]) for name in names])
    return {names[i]: pred.prob.numpy() for i, pred in found}


def _readme_cutout(bundle: Path, photos: list[Path], out: Path) -> None:
    """The README's background-removal line, run as written but for its photos, folder and bundle."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Background removal")[1]
    words = shlex.split(re.search(r"```\n(carvana cutout .*)\n```", section).group(1))
    assert words[words.index("--model") + 1] == "outputs/demo/bundle"  # what `make demo` writes
    swap = {"--out": str(out), "--model": str(bundle)}
    args = [
        swap.get(words[i - 1], w) for i, w in enumerate(words) if i > 1 and not (w.endswith("/") or w.endswith(".jpg"))
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "cutout", *map(str, photos), *args, "device=cpu"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "synthetic cars only" in done.stderr  # the demo's nets say what they learned
    stem = photos[0].stem
    assert {f"{stem}_mask.png", f"{stem}.png", f"{stem}_on_white.jpg"} <= {p.name for p in out.iterdir()}
