"""Bad input, interrupted runs and atomic outputs, each case tested."""

import errno
import gzip
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import tiny_config, tiny_nets
from PIL import Image

from common.data.kaggle import index_split
from common.errors import DataError
from common.model_source import open_source
from common.training.batches import scan_pairs
from pipelines.cli import main as cli
from stage1_lowres import predict as s1_predict
from stage2_fullres import predict as s2_predict

CLI = [sys.executable, "-m", "pipelines"]
FAULTS = [sys.executable, str(Path(__file__).with_name("faults.py"))]  # a command stopped at an exact point


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _break_training_pairs(root: Path) -> dict[str, str]:
    """One of each kind of bad training pair; returns img -> the reason expected in the warning."""
    train = sorted((root / "train").glob("*.jpg"))
    masks = root / "train_masks"
    bad = {}
    data = train[0].read_bytes()
    train[0].write_bytes(data[: len(data) // 3])
    bad[train[0].name] = "truncated"
    train[1].write_bytes(b"")
    bad[train[1].name] = "empty file"
    train[2].write_bytes(b"GIF89a but not really an image")
    bad[train[2].name] = "not a readable image"
    Image.new("L", (100, 80)).convert("P").save(masks / f"{train[3].stem}_mask.gif")
    bad[train[3].name] = "mask is 100x80"
    (masks / f"{train[4].stem}_mask.gif").unlink()
    values = np.zeros((1280, 1918), np.uint8)
    values[100:200, 100:300] = 7
    Image.fromarray(values).save(masks / f"{train[4].stem}_mask.png")
    bad[train[4].name] = "mask values"
    return bad


def test_bad_training_pairs_are_skipped_with_reasons_or_stop_training(sample_root, tmp_path):
    root = _copy(sample_root, tmp_path / "data")
    bad = _break_training_pairs(root)
    # grayscale and RGBA images, and a stray copy, are fine
    gray = sorted((root / "train").glob("*.jpg"))[5]
    Image.open(gray).convert("L").save(gray, format="JPEG")
    shutil.copy(gray, root / "train" / f"{gray.stem}(1).jpg")
    samples = index_split(root, "train")
    with pytest.raises(DataError, match=r"5 of 48 training pairs are unreadable.*max_bad_share"):
        scan_pairs(samples, (64, 64), max_bad_share=0.01, jobs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs, skipped = scan_pairs(samples, (64, 64), max_bad_share=0.2, jobs=2)
    assert len(pairs) == 43 and set(skipped) == set(bad)
    for img, failure in skipped.items():
        assert Path(img).stem in failure.file and bad[img] in failure.reason  # names the file (image or mask) and why
    assert sum("skipping training pair" in str(w.message) for w in caught) == 5


# stage 1 trained for one epoch of a net smaller than the tiny nets: where writing, not learning, is tested
ONE_SMALL_EPOCH = [
    "stage1.epochs=1",
    "stage1.size=32",
    "stage1.depth=2",
    "stage1.width=4",
    "data.val_cars=1",
    "device=cpu",
]


def test_training_run_lists_skipped_pairs(sample_root, tmp_path, capsys):
    root = _copy(sample_root, tmp_path / "data")
    bad = _break_training_pairs(root)
    out = tmp_path / "out"
    code = cli(
        [
            "stage1",
            "train",
            f"data.root={root}",
            f"output.dir={out}",
            "data.max_bad_share=0.2",
            *ONE_SMALL_EPOCH,
        ]
    )
    assert code == 0
    listed = pd.read_csv(out / "stage1" / "skipped.csv")
    assert set(listed.img) == set(bad)
    printed = capsys.readouterr().out
    assert all(Path(name).stem in printed for name in bad)


def test_unreadable_test_images_do_not_stop_prediction(tiny_run, tmp_path):
    root = _copy(tiny_run.data.root, tmp_path / "data")
    tests = [root / "test" / name for name in pd.read_csv(root / "sample_submission.csv").img[:4]]  # data.limit_test=4
    tests[0].write_bytes(b"")
    data = tests[1].read_bytes()
    tests[1].write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    cfg = tiny_config(
        root,
        out,
        *tiny_nets(tiny_run),
        "data.limit_test=4",
    )
    assert s1_predict.main(cfg, open_source(cfg)) == 1  # scripts notice
    assert s2_predict.main(cfg, open_source(cfg)) == 1
    sub = pd.read_csv(gzip.open(out / "submission.csv.gz"), dtype=str, keep_default_na=False)
    errors = pd.read_csv(out / "errors.csv")
    assert len(sub) + len(errors[errors.stage == "stage2"]) == len(tests)  # no silent drops
    assert set(errors.img) == {tests[0].name, tests[1].name} and set(errors.stage) == {"stage1", "stage2"}
    assert errors.reason.str.contains("empty file").any()
    # the same from the command line: exit status 1 and a count
    proc = subprocess.run(
        [*CLI, "stage2", "predict", *[f"{k}={v}" for k, v in _flat(cfg.model_dump())]], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "2 of 4 image(s) failed" in proc.stderr


def _flat(cfg, prefix=""):
    for k, v in cfg.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        elif not isinstance(v, list):
            yield f"{prefix}{k}", v


def test_empty_prediction_and_no_car_found(tiny_run, tmp_path, recwarn, monkeypatch):
    import torch

    from stage1_lowres.coarse import Coarse

    out = tmp_path / "out"
    cfg = tiny_config(
        tiny_run.data.root, out, f"stage1.checkpoint={tiny_run.output.dir}/stage1/best.pt", "data.limit_test=2"
    )
    monkeypatch.setattr(
        Coarse, "probs", lambda self, images: torch.zeros(len(images), self.size, self.size)
    )  # sees no car
    assert s1_predict.main(cfg, open_source(cfg)) == 0
    boxes = pd.read_csv(out / "bboxes.csv")
    assert (boxes.found == 0).all() and (boxes.x1 == 1918).all() and (boxes.x0 == 0).all()
    assert any("found no car" in str(w.message) for w in recwarn)
    sub = pd.read_csv(gzip.open(out / "stage1_submission.csv.gz"), dtype=str, keep_default_na=False)
    assert len(sub) == 2 and (sub.rle_mask == "").all()


def test_config_mistakes_fail_at_start_with_one_line(tmp_path, capsys):
    for args, expected in [
        (["stage1", "train", "stage1.epoch=3"], "did you mean 'stage1.epochs'"),
        (["stage1", "train", "stage1.batch_size=x"], "must be int"),
        (["stage1", "train", f"data.root={tmp_path}/nowhere"], "data folder not found"),
        (["stage2", "predict", f"data.root={tmp_path}", f"bboxes.path={tmp_path}/b.csv"], "does not exist"),
    ]:
        assert cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    (tmp_path / "train").mkdir()
    assert cli(["stage1", "train", f"data.root={tmp_path}"]) == 2
    assert "no images" in capsys.readouterr().err


def _predict_args(tiny_run, out, *more, images=4):
    """`stage2 predict` of the first `images` test images, one chunk each."""
    src = tiny_run.output.dir
    return [
        "stage2",
        "predict",
        f"output.dir={out}",
        f"data.root={tiny_run.data.root}",
        f"bboxes.path={src}/bboxes.csv",
        *tiny_nets(tiny_run),
        "predict.chunk=1",
        f"data.limit_test={images}",
        *more,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_run, tmp_path_factory) -> bytes:
    """The submission of an uninterrupted `stage2 predict` of 6 test images."""
    out = tmp_path_factory.mktemp("uninterrupted")
    assert cli(_predict_args(tiny_run, out, images=6)) == 0
    return (out / "submission.csv.gz").read_bytes()


@pytest.mark.parametrize("sig", ["KILL", "INT"])
def test_a_prediction_stopped_mid_run_resumes_to_the_same_bytes(tiny_run, uninterrupted, tmp_path, sig):
    """A real `stage2 predict` gets SIGKILL (a crash) or SIGINT (Ctrl-C) just before it writes chunk 3
    of 6, sent by tests/faults.py at that exact point (not a race): only whole chunks are on disk, a
    Ctrl-C ends with status 130 and one line, and the rerun does only the rest and writes the
    submission of an uninterrupted run, byte for byte."""
    out = tmp_path / "out"
    args = _predict_args(tiny_run, out, images=6)
    # SIGINT handled as in a terminal, even when this test runs under a parent that ignores it (a background job)
    stopped = subprocess.run(
        [*FAULTS, "--at", "chunk:3", "--signal", sig, "--", *args],
        capture_output=True,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    parts = sorted(p.name for p in out.glob("stage2_chunks/*/part-*.csv"))
    if sig == "KILL":
        assert stopped.returncode == -signal.SIGKILL and parts == [
            "part-000000.csv",
            "part-000001.csv",
            "part-000002.csv",
        ]
    else:  # the writer thread may finish the chunk in hand before the main thread stops
        assert stopped.returncode == 130 and stopped.stderr.strip().splitlines()[-1].startswith(
            "interrupted; finished work is saved"
        )
        assert 3 <= len(parts) < 6 and all(
            len(pd.read_csv(part)) == 1 for part in out.glob("stage2_chunks/*/part-*.csv")
        )
    assert not list(out.glob("stage2_chunks/*/.part-*")) and not (out / "submission.csv.gz").exists()  # no partial file
    rerun = subprocess.run([*CLI, *args], check=True, capture_output=True, text=True)
    assert f"{6 - len(parts)} test images to do, {len(parts)} already done" in rerun.stdout
    assert (out / "submission.csv.gz").read_bytes() == uninterrupted


def test_one_run_per_output_folder_and_a_stale_lock_is_taken_over(tiny_run, tmp_path):
    """Two real processes: the first holds the folder (stopped by tests/faults.py right before chunk 1,
    so it is alive and mid-run); a second command on the same folder refuses, naming the holder.
    After the holder is killed (SIGKILL: no clean-up), the next run takes the stale lock over and finishes."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [*FAULTS, "--at", "chunk:1", "--signal", "STOP", "--", *_predict_args(tiny_run, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _, status = os.waitpid(holder.pid, os.WUNTRACED)  # returns once the hook has stopped it
        assert os.WIFSTOPPED(status)
        second = subprocess.run(
            [*CLI, "stage1", "predict", f"output.dir={out}", f"data.root={tiny_run.data.root}"],
            capture_output=True,
            text=True,
        )
        assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
        assert f"in use by pid {holder.pid} on " in second.stderr and "carvana stage2 predict" in second.stderr
        assert not (out / "bboxes.csv").exists() and not list(
            out.glob("stage1_chunks")
        )  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # chunk 0 is done; the writer thread may have finished chunk 1 too before the hook stopped the main thread
    done = len(list(out.glob("stage2_chunks/*/part-*.csv")))
    assert 1 <= done < 4
    third = subprocess.run([*CLI, *_predict_args(tiny_run, out)], capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock of pid {holder.pid}" in third.stderr
    assert f"{4 - done} test images to do, {done} already done" in third.stdout
    assert (out / ".carvana.lock").read_text() == ""  # released cleanly this time


def _fail_writes(monkeypatch, name: str, code: int = errno.ENOSPC):
    """Make the atomic writer's write of files named `name` fail as a full disk does: half the bytes
    reach the temporary file, then the OS error."""
    import common.io

    real = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if Path(path).name.startswith(f".{name}."):
            os.ftruncate(fd, os.fstat(fd).st_size // 2)
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(common.io.os, "fsync", fsync)


def test_full_disk_during_prediction_ends_with_one_line_and_the_rerun_gives_the_same_bytes(
    tiny_run, tmp_path, monkeypatch, capsys
):
    assert cli(_predict_args(tiny_run, tmp_path / "clean")) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    _fail_writes(monkeypatch, "part-000002.csv")
    assert cli(_predict_args(tiny_run, out)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "part-000002.csv" in err and "No space left on device" in err, err
    assert sorted(p.name for p in out.glob("stage2_chunks/*/*")) == [
        "part-000000.csv",
        "part-000001.csv",
    ]  # no partial file
    assert not (out / "submission.csv.gz").exists()
    monkeypatch.undo()  # space freed
    assert cli(_predict_args(tiny_run, out)) == 0
    assert "2 test images to do, 2 already done" in capsys.readouterr().out
    assert (out / "submission.csv.gz").read_bytes() == (tmp_path / "clean" / "submission.csv.gz").read_bytes()


@pytest.mark.parametrize("name,code", [("best.pt", errno.ENOSPC), ("history.csv", errno.EACCES)])
def test_failed_checkpoint_or_history_write_ends_training_with_one_line(
    sample_root, tmp_path, monkeypatch, capsys, name, code
):
    out = tmp_path / "out"
    args = [
        "stage1",
        "train",
        f"data.root={sample_root}",
        f"output.dir={out}",
        *ONE_SMALL_EPOCH,
    ]
    _fail_writes(monkeypatch, name, code)
    assert cli(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / "stage1" / name) in err and os.strerror(code) in err, err
    assert not (out / "stage1" / name).exists() and not list(out.glob("stage1/.*.tmp"))
    monkeypatch.undo()
    assert cli(args) == 0 and (out / "stage1" / name).is_file()


def test_unwritable_output_folder_is_an_error_before_any_work(tiny_run, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    import stage2_fullres.predict

    monkeypatch.setattr(stage2_fullres.predict, "main", lambda cfg, source: pytest.fail("work started"))
    assert cli(_predict_args(tiny_run, blocker / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"output folder {blocker / 'out'} cannot be written" in err, err


def _malformed_cases(tiny_run, tmp_path):
    src, root = Path(tiny_run.output.dir), Path(tiny_run.data.root)
    boxes = pd.read_csv(src / "bboxes.csv", dtype=str, keep_default_na=False)
    (tmp_path / "nocols.csv").write_text(boxes.drop(columns=["x1", "y1"]).to_csv(index=False))
    outside = boxes.copy()
    outside.loc[3, "x1"] = "2500"
    (tmp_path / "outside.csv").write_text(outside.to_csv(index=False))
    data = tmp_path / "data"
    data.mkdir()
    for folder in ("train", "train_masks", "test"):
        (data / folder).symlink_to(root / folder)
    (data / "sample_submission.csv").write_text("id,rle_mask\nx,1 2\n")
    ckpt = (src / "stage2" / "best.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(ckpt[: len(ckpt) // 2])
    (tmp_path / "bad.yaml").write_text("stage1: {epochs: 3\n")
    (tmp_path / "list.yaml").write_text("- stage1.epochs=3\n")
    return [
        (["--config", str(tmp_path / "bad.yaml")], "bad.yaml: not valid YAML at line 2"),
        (["--config", str(tmp_path / "list.yaml")], "list.yaml: expected a mapping"),
        ([f"bboxes.path={tmp_path / 'nocols.csv'}"], "nocols.csv: missing column(s) x1, y1"),
        (
            [f"bboxes.path={tmp_path / 'outside.csv'}"],
            f"outside.csv: 1 box(es) not inside their image, e.g. {boxes.img[3]}",
        ),
        ([f"data.root={data}"], "sample_submission.csv: needs an 'img' column"),
        ([f"stage2.checkpoint={tmp_path / 'torn.pt'}"], "torn.pt: not a checkpoint of this project"),
    ]


def test_malformed_inputs_beyond_images_are_one_line_exit_2_and_nothing_written(tiny_run, tmp_path, capsys):
    for i, (more, expected) in enumerate(_malformed_cases(tiny_run, tmp_path)):
        out = tmp_path / f"out{i}"
        assert cli(_predict_args(tiny_run, out, *more)) == 2, expected
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not out.exists()
    with pytest.raises(SystemExit) as stop:
        cli(["stage2", "predict", "--config", str(tmp_path / "list.yaml"), "stage1.epochs"])
    assert (
        stop.value.code == 2
        and capsys.readouterr().err.strip() == "error: override 'stage1.epochs' must look like key=value"
    )
