"""`carvana run`: steps skipped when done, reruns limited to what changed, --force, resume after a kill;
the bundle it writes cuts photos out with the README's line."""
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import TINY

CLI = [sys.executable, "-m", "pipelines", "run"]
FAULTS = [sys.executable, str(Path(__file__).with_name("faults.py"))]  # a command stopped at an exact point


def _states(stdout: str) -> dict[str, str]:
    return {line.split()[1].rstrip(":"): line.split()[0] for line in stdout.splitlines() if line.startswith(("[run]", "[skip]"))}


def test_pipeline_caches_steps(sample_root, tmp_path):
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(sample_root)}, "output": {"dir": str(tmp_path / "out")}}))
    args = [*CLI, str(config), *TINY, "data.limit_test=2"]
    first = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert set(_states(first).values()) == {"[run]"} and len(_states(first)) == 6
    assert "validation Dice" in first and "stage 1 alone" in first and "cascade" in first
    assert (tmp_path / "out" / "report" / "index.html").stat().st_size > 10_000
    assert (tmp_path / "out" / "config.yaml").is_file()
    _readme_cutout(tmp_path / "out" / "bundle", sorted((sample_root / "test").glob("*.jpg"))[:1], tmp_path / "cutouts")

    again = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert set(_states(again).values()) == {"[skip]"}

    changed = subprocess.run([*args, "stage2.blend=mean"], capture_output=True, text=True, check=True).stdout
    states = _states(changed)
    assert states["stage1_train"] == states["stage1_predict"] == "[skip]"
    assert states["stage2_train"] == states["stage2_predict"] == states["evaluate"] == "[run]"

    forced = subprocess.run([*args, "stage2.blend=mean", "--force", "stage1_predict"], capture_output=True, text=True, check=True).stdout
    states = _states(forced)
    assert states["stage1_train"] == "[skip]" and states["stage1_predict"] == states["stage2_train"] == "[run]"
    assert "reusing" in forced  # the forced stage-1 predict still reuses its valid box cache


def _readme_cutout(bundle: Path, photos: list[Path], out: Path) -> None:
    """The README's background-removal line, run as written but for its photos, folder and bundle."""
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Background removal")[1]
    words = shlex.split(re.search(r"```\n(carvana cutout .*)\n```", section).group(1))
    assert words[words.index("--model") + 1] == "outputs/demo/bundle"  # what `make demo` writes
    swap = {"--out": str(out), "--model": str(bundle)}
    args = [swap.get(words[i - 1], w) for i, w in enumerate(words) if i > 1 and not (w.endswith("/") or w.endswith(".jpg"))]
    done = subprocess.run([sys.executable, "-m", "pipelines", "cutout", *map(str, photos), *args, "device=cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "synthetic cars only" in done.stderr  # the demo's nets say what they learned
    stem = photos[0].stem
    assert {f"{stem}_mask.png", f"{stem}.png", f"{stem}_on_white.jpg"} <= {p.name for p in out.iterdir()}


def test_killed_pipeline_resumes_training_from_its_checkpoint(sample_root, tmp_path):
    """SIGKILL right after stage 2's first epoch is saved (sent by tests/faults.py, not a race); the rerun skips
    stage 1, resumes stage 2 from that checkpoint and finishes."""
    out = tmp_path / "out"
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"data": {"root": str(sample_root)}, "output": {"dir": str(out)}}))
    args = [*CLI, str(config), *TINY, "stage2.epochs=2", "data.limit_test=2"]
    killed = subprocess.run([*FAULTS, "--at", "stage2.epoch:1", "--", *args[3:]], capture_output=True)
    assert killed.returncode == -signal.SIGKILL and (out / "stage2" / "last.pt").is_file()
    rerun = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    states = _states(rerun)
    assert states["stage1_train"] == states["stage1_predict"] == "[skip]" and states["stage2_train"] == "[run]"
    assert "resuming an interrupted run" in rerun and "after epoch 1" in rerun
    assert "epoch 2/2" in rerun and "epoch 1/2" not in rerun  # only the missing epoch was trained
    assert (out / "submission.csv.gz").is_file()
