"""Bad input, interrupted runs and atomic outputs (the reliability issue), each case tested."""
import gzip
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.data import DataError, index_split, scan_pairs
from pipelines.cli import main as cli
from stage1_lowres import predict as s1_predict
from stage2_fullres import predict as s2_predict

from conftest import tiny_config

CLI = [sys.executable, "-m", "pipelines"]


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
    assert len(pairs) == 43 and {img for img, _ in skipped} == set(bad)
    for img, reason in skipped:
        assert Path(img).stem in reason and bad[img] in reason  # names the file (image or mask) and why
    assert sum("skipping training pair" in str(w.message) for w in caught) == 5


def test_training_run_lists_skipped_pairs(sample_root, tmp_path, capsys):
    root = _copy(sample_root, tmp_path / "data")
    bad = _break_training_pairs(root)
    out = tmp_path / "out"
    code = cli(["stage1", "train", f"data.root={root}", f"output.dir={out}", "data.max_bad_share=0.2", "stage1.epochs=1",
                "stage1.size=32", "stage1.depth=2", "stage1.width=4", "data.val_cars=1", "device=cpu"])
    assert code == 0
    listed = pd.read_csv(out / "stage1" / "skipped.csv")
    assert set(listed.img) == set(bad)
    printed = capsys.readouterr().out
    assert all(Path(name).stem in printed for name in bad)


def test_unreadable_test_images_do_not_stop_prediction(tiny_run, tmp_path):
    root = _copy(tiny_run["data"]["root"], tmp_path / "data")
    tests = sorted((root / "test").glob("*.jpg"))
    tests[0].write_bytes(b"")
    data = tests[1].read_bytes()
    tests[1].write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    cfg = tiny_config(root, out, f"stage1.checkpoint={tiny_run['output']['dir']}/stage1/best.pt",
                      f"stage2.checkpoint={tiny_run['output']['dir']}/stage2/best.pt")
    assert s1_predict.main(cfg) == 1  # scripts notice
    assert s2_predict.main(cfg) == 1
    sub = pd.read_csv(gzip.open(out / "submission.csv.gz"), dtype=str, keep_default_na=False)
    errors = pd.read_csv(out / "errors.csv")
    assert len(sub) + len(errors[errors.stage == "stage2"]) == len(tests)  # no silent drops
    assert set(errors.img) == {tests[0].name, tests[1].name} and set(errors.stage) == {"stage1", "stage2"}
    assert errors.reason.str.contains("empty file").any()
    # the same from the command line: exit status 1 and a count
    proc = subprocess.run([*CLI, "stage2", "predict", *[f"{k}={v}" for k, v in _flat(cfg)]], capture_output=True, text=True)
    assert proc.returncode == 1 and "2 of 16 image(s) failed" in proc.stderr


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
    cfg = tiny_config(tiny_run["data"]["root"], out, f"stage1.checkpoint={tiny_run['output']['dir']}/stage1/best.pt",
                      "data.limit_test=2")
    monkeypatch.setattr(Coarse, "probs", lambda self, images: torch.zeros(len(images), self.size, self.size))  # sees no car
    assert s1_predict.main(cfg) == 0
    boxes = pd.read_csv(out / "bboxes.csv")
    assert (boxes.found == 0).all() and (boxes.x1 == 1918).all() and (boxes.x0 == 0).all()
    assert any("found no car" in str(w.message) for w in recwarn)
    sub = pd.read_csv(gzip.open(out / "stage1_submission.csv.gz"), dtype=str, keep_default_na=False)
    assert len(sub) == 2 and (sub.rle_mask == "").all()


def test_image_smaller_than_a_tile_is_refined(tmp_path):
    import torch

    from common.config import load_config
    from common.model import UNet
    from stage2_fullres.cascade import Cascade

    image = torch.randint(0, 255, (3, 300, 500), dtype=torch.uint8)
    cfg = load_config(None, ["stage2.coarse_channel=false", "predict.batch_size=1"])
    prob = Cascade(None, UNet(3, 3, 4).eval(), cfg, torch.device("cpu")).predict([image], [(10, 20, 480, 290)])[0].prob
    assert prob.shape == (300, 500) and (prob[:20] == 0).all() and (prob[20:290, 10:480] > 0).all()


def test_config_mistakes_fail_at_start_with_one_line(tmp_path, capsys):
    for args, expected in [
        (["stage1", "train", "stage1.epoch=3"], "did you mean 'stage1.epochs'"),
        (["stage1", "train", "stage1.epochs=x"], "must be int"),
        (["stage1", "train", f"data.root={tmp_path}/nowhere"], "data folder not found"),
        (["stage2", "predict", f"data.root={tmp_path}", f"bboxes.path={tmp_path}/b.csv"], "does not exist"),
    ]:
        assert cli(args) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    (tmp_path / "train").mkdir()
    assert cli(["stage1", "train", f"data.root={tmp_path}"]) == 2
    assert "no images" in capsys.readouterr().err


def test_killed_prediction_resumes_to_identical_bytes(tiny_run, tmp_path):
    """A real `stage2 predict` dies by SIGKILL just before writing chunk 3 (a test hook, not a race);
    the rerun finishes the rest and the submission equals an uninterrupted run byte for byte."""
    src = tiny_run["output"]["dir"]
    args = [f"data.root={tiny_run['data']['root']}", f"stage1.checkpoint={src}/stage1/best.pt", f"stage2.checkpoint={src}/stage2/best.pt",
            f"bboxes.path={src}/bboxes.csv", "predict.chunk=1", "data.limit_test=6", "stage2.depth=3", "stage2.width=4",
            "stage2.tile=512", "stage1.size=64", "device=cpu"]
    t0 = time.monotonic()
    subprocess.run([*CLI, "stage2", "predict", f"output.dir={tmp_path / 'full'}", *args], check=True, capture_output=True)
    full_seconds = time.monotonic() - t0

    out = tmp_path / "killed"
    killed = subprocess.run([*CLI, "stage2", "predict", f"output.dir={out}", *args], capture_output=True,
                            env={**os.environ, "CARVANA_TEST_KILL_AT_CHUNK": "3"})
    assert killed.returncode == -signal.SIGKILL
    assert len(list(out.glob("stage2_chunks/*/part-*.csv"))) == 3 and not (out / "submission.csv.gz").exists()  # chunks 0-2
    assert not list(out.glob("stage2_chunks/*/.part-*"))  # no partial file left behind
    t0 = time.monotonic()
    rerun = subprocess.run([*CLI, "stage2", "predict", f"output.dir={out}", *args], check=True, capture_output=True, text=True)
    rerun_seconds = time.monotonic() - t0
    assert "3 test images to do, 3 already done" in rerun.stdout
    assert (out / "submission.csv.gz").read_bytes() == (tmp_path / "full" / "submission.csv.gz").read_bytes()
    print(f"full run {full_seconds:.1f}s, rerun after a kill at chunk 3 of 6: {rerun_seconds:.1f}s")


def test_ctrl_c_stops_cleanly_and_the_rerun_completes(tiny_run, tmp_path):
    src = tiny_run["output"]["dir"]
    out = tmp_path / "out"
    args = [*CLI, "stage2", "predict", f"output.dir={out}", f"data.root={tiny_run['data']['root']}", f"bboxes.path={src}/bboxes.csv",
            f"stage1.checkpoint={src}/stage1/best.pt", f"stage2.checkpoint={src}/stage2/best.pt", "predict.chunk=1",
            "data.limit_test=8", "stage2.depth=3", "stage2.width=4", "stage2.tile=512", "stage1.size=64", "device=cpu"]
    # SIGINT as a terminal sends it, even when this test runs under a parent that ignores it (a background job)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not list(out.glob("stage2_chunks/*/part-*.csv")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err
    for part in out.glob("stage2_chunks/*/part-*.csv"):  # every chunk on disk is whole
        assert len(pd.read_csv(part)) == 1
    assert not list(out.glob("stage2_chunks/*/part-*.tmp"))
    subprocess.run(args, check=True, capture_output=True)
    assert len(pd.read_csv(gzip.open(out / "submission.csv.gz"))) == 8
