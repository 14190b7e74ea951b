"""`carvana run`: resume after a kill, steps skipped when done, reruns limited to what changed, --force;
the bundle it writes cuts photos out with the README's line."""

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY

CLI = [sys.executable, "-m", "pipelines", "run"]
FAULTS = [sys.executable, str(Path(__file__).with_name("faults.py"))]  # a command stopped at an exact point


def _states(stdout: str) -> dict[str, str]:
    return {
        line.split()[1].rstrip(":"): line.split()[0]
        for line in stdout.splitlines()
        if line.startswith(("[run]", "[skip]"))
    }


@pytest.fixture(scope="module")
def resumed(sample_root, tmp_path_factory):
    """A fresh `carvana run` killed by SIGKILL right after stage 2's first epoch is saved (sent by
    tests/faults.py, not a race), then run again to the end: (its command, its folder, the killed
    process, whether stage 2's last.pt was on disk after the kill, the rerun's stdout)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    config = tmp / "p.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(sample_root)}, "output": {"dir": str(tmp / "out")}}))
    args = [*CLI, str(config), *TINY, "stage2.epochs=2", "data.limit_test=2"]
    killed = subprocess.run([*FAULTS, "--at", "stage2.epoch:1", "--", *args[3:]], capture_output=True, text=True)
    saved = (tmp / "out" / "stage2" / "last.pt").is_file()
    rerun = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return args, tmp / "out", killed, saved, rerun


def test_killed_pipeline_resumes_training_from_its_checkpoint(resumed):
    """The rerun skips stage 1, resumes stage 2 from the checkpoint of the killed run and finishes."""
    _, out, killed, saved, rerun = resumed
    assert killed.returncode == -signal.SIGKILL and saved
    states = _states(rerun)
    assert states["stage1_train"] == states["stage1_predict"] == "[skip]" and states["stage2_train"] == "[run]"
    assert "resuming an interrupted run" in rerun and "after epoch 1" in rerun
    assert "epoch 2/2" in rerun and "epoch 1/2" not in rerun  # only the missing epoch was trained
    assert (out / "submission.csv.gz").is_file()


def test_pipeline_caches_steps(resumed, sample_root, tmp_path):
    args, out, killed, _, rerun = resumed
    # every step ran once: the killed run's up to stage 2's training, the rest in the rerun
    assert set(_states(killed.stdout).values()) == {"[run]"} and len(_states(killed.stdout)) == 3
    assert [s for s, state in _states(rerun).items() if state == "[run]"] == [
        "stage2_train",
        "evaluate",
        "stage2_predict",
        "bundle",
    ]
    assert "validation Dice" in rerun and "stage 1 alone" in rerun and "cascade" in rerun
    assert (out / "report" / "index.html").stat().st_size > 10_000
    assert (out / "config.yaml").is_file()
    _readme_cutout(out / "bundle", sorted((sample_root / "test").glob("*.jpg"))[:1], tmp_path / "cutouts")

    again = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert set(_states(again).values()) == {"[skip]"} and len(_states(again)) == 6

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
