"""Stage 1 boxes and cache, stage 2 submission: on a tiny run over the synthetic sample data."""

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import TINY, copy_run, photos_of, tiny_config
from scipy import ndimage

from common.data.rle import rle_decode
from common.model_source import mask_threshold, open_source
from stage1_lowres import predict as s1_predict
from stage2_fullres import predict as s2_predict


def _submission(path):
    return pd.read_csv(gzip.open(path), dtype=str, keep_default_na=False)


def test_stage1_writes_boxes_for_train_and_test_and_a_submission(tiny_run, sample_root):
    out = tiny_run.output.dir
    boxes = pd.read_csv(f"{out}/bboxes.csv")
    assert list(boxes.columns[:9]) == ["img", "split", "width", "height", "x0", "y0", "x1", "y1", "found"]
    assert sorted(boxes.split.unique()) == ["test", "train"] and len(boxes) == 64
    assert (
        (boxes.x0 >= 0) & (boxes.x1 <= 1918) & (boxes.x0 < boxes.x1) & (boxes.y0 < boxes.y1) & (boxes.y1 <= 1280)
    ).all()
    sub = _submission(f"{out}/stage1_submission.csv.gz")
    order = pd.read_csv(sample_root / "sample_submission.csv").img.tolist()
    assert list(sub.columns) == ["img", "rle_mask"] and sub.img.tolist() == order
    first = boxes.set_index("img").loc[sub.img[0]]
    mask = rle_decode(sub.rle_mask[0], (1280, 1918))  # the coarse mask lies (almost all) inside the box made from it
    assert mask.sum() > 10_000 and mask[first.y0 : first.y1, first.x0 : first.x1].sum() > 0.99 * mask.sum()


def test_stage1_cache_is_reused_without_the_model_and_invalidated_by_settings(tiny_run, tmp_path, capsys, monkeypatch):
    cfg = copy_run(tiny_run, tmp_path / "run")
    out = tmp_path / "run"
    before = (out / "bboxes.csv").read_bytes()
    monkeypatch.setattr(s1_predict.Coarse, "load", lambda *a, **k: pytest.fail("the model must not be loaded"))
    assert s1_predict.main(cfg, open_source(cfg)) == 0
    assert "reusing" in capsys.readouterr().out and (out / "bboxes.csv").read_bytes() == before
    monkeypatch.undo()
    wider = tiny_config(tiny_run.data.root, out, "stage1.margin=80")
    assert s1_predict.main(wider, open_source(wider)) == 0
    assert "reusing" not in capsys.readouterr().out
    old, new = pd.read_csv(pd.io.common.BytesIO(before)), pd.read_csv(out / "bboxes.csv")
    assert (new.x1 - new.x0 >= old.x1 - old.x0).all() and (new.key != old.key).all()


def test_changed_checkpoint_invalidates_the_cache(tiny_run, tmp_path, capsys):
    cfg = copy_run(tiny_run, tmp_path / "run")
    out = tmp_path / "run"
    ckpt = torch.load(out / "stage1" / "best.pt", weights_only=False)
    ckpt["epoch"] += 100  # same net, different bytes: a different checkpoint
    torch.save(ckpt, out / "stage1" / "best.pt")
    assert s1_predict.main(cfg, open_source(cfg)) == 0
    assert "reusing" not in capsys.readouterr().out


def test_stage2_submission_format_and_order(tiny_run, sample_root, tmp_path):
    cfg = copy_run(tiny_run, tmp_path / "run")
    assert s2_predict.main(cfg, open_source(cfg)) == 0
    out = cfg.output.dir
    sub = _submission(f"{out}/submission.csv.gz")
    assert list(sub.columns) == ["img", "rle_mask"]
    assert sub.img.tolist() == pd.read_csv(sample_root / "sample_submission.csv").img.tolist()
    for rle in sub.rle_mask[:3]:
        assert rle_decode(rle, (1280, 1918)).sum() > 0


def test_boxes_from_another_run_skip_stage1(tiny_run, tmp_path):
    cfg = tiny_config(
        tiny_run.data.root,
        tmp_path / "other",
        f"bboxes.path={tiny_run.output.dir}/bboxes.csv",
        f"stage1.checkpoint={tiny_run.output.dir}/stage1/best.pt",
        f"stage2.checkpoint={tiny_run.output.dir}/stage2/best.pt",
        "data.limit_test=2",
    )
    assert s2_predict.main(cfg, open_source(cfg)) == 0
    assert not (tmp_path / "other" / "bboxes.csv").exists()
    assert len(_submission(tmp_path / "other" / "submission.csv.gz")) == 2


def test_coarse_channel_mismatch_is_a_clear_error(tiny_run):
    from common.errors import CheckpointError

    cfg = tiny_config(tiny_run.data.root, tiny_run.output.dir, "stage2.coarse_channel=false")
    with pytest.raises(CheckpointError, match="input channels"):
        s2_predict.main(cfg, open_source(cfg))


def test_refiner_without_coarse_channel_needs_only_the_cached_boxes(tiny_run, sample_root, tmp_path):
    """With stage2.coarse_channel=false, stage 2 predicts from bboxes.csv alone: no stage-1
    checkpoint is read, not even for the chunk key."""
    from common.model import UNet

    cfg = copy_run(tiny_run, tmp_path / "run")
    out = tmp_path / "run"
    ckpt = torch.load(out / "stage2" / "best.pt", weights_only=False)
    torch.manual_seed(0)
    rgb_only = UNet(3, ckpt["model_args"]["depth"], ckpt["model_args"]["width"])
    torch.save(ckpt | {"model": rgb_only.state_dict(), "model_args": rgb_only.args}, out / "stage2" / "best.pt")
    (out / "stage1" / "best.pt").unlink()
    cfg = cfg.updated({"stage2.coarse_channel": False, "data.limit_test": 4})
    assert s2_predict.main(cfg, open_source(cfg)) == 0
    sub = _submission(out / "submission.csv.gz")
    assert sub.img.tolist() == pd.read_csv(sample_root / "sample_submission.csv").img.tolist()[:4]
    assert (sub.rle_mask != "").all()


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two bool masks counted in numpy, 1 where both are empty (as Kaggle scored Carvana)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2 * int((pred & truth).sum()) / total


def _near_the_boundary(truth: np.ndarray, radius: int) -> np.ndarray:
    """The pixels whose (2r+1)-square window holds both car and background."""
    size = 2 * radius + 1
    return ndimage.maximum_filter(truth, size, mode="nearest") & ~ndimage.minimum_filter(truth, size, mode="nearest")


def test_evaluate_scores_each_image_as_a_fresh_prediction_scores_against_its_mask(evaluated):
    """metrics.csv holds one row per image of the validation car (the first of the three, data.val_cars=1).
    Every stage-1 figure (Dice, Dice within 3 px of the true boundary, the car pixels inside the box) and
    the stage-1 column of the threshold sweep equal figures counted here from a fresh prediction and the
    mask file; so do the cascade's figures of the first two batches (the cascade costs seconds an image).
    summary.json's figures are metrics.csv's; its worst images are the lowest, their overlays drawn."""
    from common.data.images import read_mask
    from stage1_lowres.coarse import Coarse
    from stage2_fullres.cascade import Cascade

    cfg, _ = evaluated
    root, report = Path(cfg.data.root), Path(cfg.output.dir) / "report"
    metrics = pd.read_csv(report / "metrics.csv", dtype={"img": str, "car": str})
    train = sorted(p.name for p in (root / "train").glob("*.jpg"))
    first_car = min(name.rsplit("_", 1)[0] for name in train)
    assert metrics.img.tolist() == [name for name in train if name.startswith(first_car + "_")]
    paths = [root / "train" / img for img in metrics.img]
    truths = [read_mask(root / "train_masks" / f"{p.stem}_mask.gif") for p in paths]
    cached = pd.read_csv(Path(cfg.output.dir) / "bboxes.csv").set_index("img")
    boxes = [tuple(int(v) for v in cached.loc[img, ["x0", "y0", "x1", "y1"]]) for img in metrics.img]
    source, cpu = open_source(cfg), torch.device("cpu")
    coarse = {i: pred.coarse.numpy() for i, pred in Coarse.load(source, cfg, cpu).run(paths, boxes)}

    for i, row in metrics.iterrows():
        truth, stage1 = truths[i], coarse[i] > cfg.stage1.threshold
        assert 0.05 < truth.mean() < 0.95 and 0.05 < stage1.mean() < 0.95  # a car and background, both
        near = _near_the_boundary(truth, 3)
        x0, y0, x1, y1 = boxes[i]
        inside = int(truth[y0:y1, x0:x1].sum())
        assert (row.x0, row.y0, row.x1, row.y1) == boxes[i]
        assert row.dice_stage1 == pytest.approx(_dice(stage1, truth), abs=1e-12), row.img
        assert row.edge_dice_stage1 == pytest.approx(_dice(stage1 & near, truth & near), abs=1e-12), row.img
        assert row.car_pixels_outside_box == truth.sum() - inside and row.box_coverage == inside / truth.sum()
    sweep = pd.read_csv(report / "threshold_sweep.csv")
    assert sweep.threshold.tolist() == pytest.approx(np.arange(0.1, 0.91, 0.05).tolist())
    for t, got in zip(sweep.threshold, sweep.dice_stage1, strict=True):
        # the probabilities are float32: the threshold as the float32 they are compared with; the sweep's
        # figures are float32 (counted on the device), the others float64
        expected = np.mean([_dice(coarse[i] > np.float32(t), truths[i]) for i in coarse])
        assert got == pytest.approx(expected, abs=1e-6), t

    refined = Cascade.load(source, cfg, cpu).run(paths[:4], boxes[:4])
    for i, pred in refined:
        cascade, near, row = pred.prob.numpy() > source.threshold, _near_the_boundary(truths[i], 3), metrics.loc[i]
        assert 0.05 < cascade.mean() < 0.95
        assert row.dice_cascade == pytest.approx(_dice(cascade, truths[i]), abs=1e-12), row.img
        assert row.edge_dice_cascade == pytest.approx(_dice(cascade & near, truths[i] & near), abs=1e-12), row.img

    summary = json.loads((report / "summary.json").read_text())
    assert summary["images"] == len(metrics) == 16 and summary["edge_radius"] == 3
    for figure in ("dice_stage1", "dice_cascade", "edge_dice_stage1", "edge_dice_cascade"):
        assert summary[f"mean_{figure}"] == pytest.approx(metrics[figure].mean(), abs=1e-12), figure
    assert summary["min_box_coverage"] == metrics.box_coverage.min()
    assert summary["images_losing_car_pixels_to_the_box"] == (metrics.car_pixels_outside_box > 0).sum()
    ranked = metrics.set_index("img").dice_cascade
    worst = ranked[summary["worst"]]
    assert len(worst) == 10 and worst.is_monotonic_increasing and worst.max() <= ranked.drop(worst.index).min()
    assert {p.stem for p in (report / "overlays").glob("*.png")} == {Path(img).stem for img in summary["worst"][:6]}
    assert (report / "threshold_sweep.png").is_file()


def test_the_summary_counts_every_image_that_loses_car_pixels_to_its_box(tmp_path):
    """Twelve validation images whose boxes cut off some of the car: summary.json counts twelve and lists
    the ten worst, worst first."""
    from common.config import load_config
    from pipelines.evaluate import THRESHOLDS, Evaluation, save

    cfg = load_config(None, [f"output.dir={tmp_path}"])
    metrics = pd.DataFrame(
        {
            "img": [f"car_{k:02d}.jpg" for k in range(16)],
            "car": "car",
            "dice_stage1": 0.9,
            "dice_cascade": 0.95,
            "edge_dice_stage1": 0.8,
            "edge_dice_cascade": 0.85,
            "car_pixels_outside_box": [k + 1 if k < 12 else 0 for k in range(16)],
            "box_coverage": [1 - (k + 1) / 1000 if k < 12 else 1.0 for k in range(16)],
        }
    )
    sweep = pd.DataFrame({"threshold": THRESHOLDS, "dice_stage1": 0.9, "dice_cascade": 0.95})
    summary = save(cfg, Evaluation(metrics, sweep, {}, True))
    assert summary.images_losing_car_pixels_to_the_box == 12
    assert summary.worst_box_coverage == [f"car_{k:02d}.jpg" for k in range(11, 1, -1)]


def test_stage1_training_is_reproducible_on_cpu(sample_root, tmp_path):
    from stage1_lowres import train as s1_train

    histories = []
    for run in ("a", "b"):
        # fp32: under `auto` a CPU with native bf16 times bf16 against fp32, and two runs may pick differently
        cfg = tiny_config(sample_root, tmp_path / run, "stage1.epochs=1", "stage1.precision=fp32")
        s1_train.main(cfg)
        histories.append(
            pd.read_csv(tmp_path / run / "stage1" / "history.csv").drop(columns=["seconds", "data_seconds"])
        )  # timings
    pd.testing.assert_frame_equal(histories[0], histories[1])


def test_threshold_auto_takes_the_best_of_the_evaluate_sweep(tmp_path):
    from common.errors import ConfigError

    cfg = tiny_config(tmp_path / "data", tmp_path / "out", "predict.threshold=auto")
    with pytest.raises(ConfigError, match="run `carvana evaluate` with the same config first"):
        mask_threshold(cfg)
    assert mask_threshold(cfg, strict=False) == 0.5  # training and evaluation itself, before any sweep
    (tmp_path / "out" / "report").mkdir(parents=True)
    pd.DataFrame(  # an evaluate run before stage 2 had a net: no cascade's figures, as no sweep
        {"threshold": [0.3, 0.35], "dice_stage1": [0.99, 0.98], "dice_cascade": [float("nan")] * 2}
    ).to_csv(tmp_path / "out" / "report" / "threshold_sweep.csv", index=False)
    with pytest.raises(ConfigError, match="run `carvana evaluate` with the same config first"):
        mask_threshold(cfg)
    assert mask_threshold(cfg, strict=False) == 0.5
    pd.DataFrame(
        {"threshold": [0.3, 0.35, 0.4], "dice_stage1": [0.99, 0.98, 0.97], "dice_cascade": [0.995, 0.997, 0.996]}
    ).to_csv(tmp_path / "out" / "report" / "threshold_sweep.csv", index=False)
    assert mask_threshold(cfg) == 0.35  # the cascade's best, not stage 1's
    assert mask_threshold(tiny_config(tmp_path / "data", tmp_path / "out", "predict.threshold=0.6")) == 0.6


def test_folds_hold_out_disjoint_cars_covering_all_and_their_ensemble_averages_the_probabilities(
    sample_root, tmp_path, monkeypatch
):
    """`carvana folds stage1 2`: each fold trains on the cars the other holds out (what each fold's training
    read, recorded here), so the held-out cars of the folds are disjoint and together all the cars. The two
    `best.pt` given as stage1.checkpoint predict the mean of the two nets' probabilities, and key the boxes
    on both files."""
    from common.data.images import read_image
    from pipelines.cli import main as cli
    from stage1_lowres import train as s1_train
    from stage1_lowres.box_cache import cache_key
    from stage1_lowres.coarse import Coarse

    read = []
    real = s1_train.read_pairs

    def recording(*args, **kwargs):
        pairs = real(*args, **kwargs)
        read.append(({p.sample.car for p in pairs.train}, {p.sample.car for p in pairs.val}))
        return pairs

    monkeypatch.setattr(s1_train, "read_pairs", recording)
    out = tmp_path / "out"
    args = [*TINY, f"data.root={sample_root}", f"output.dir={out}", "stage1.epochs=3"]
    assert cli(["folds", "stage1", "2", *args]) == 0
    cars = {p.stem.rsplit("_", 1)[0] for p in (sample_root / "train").glob("*.jpg")}
    assert len(read) == 2 and len(cars) == 3
    (train_1, held_1), (train_2, held_2) = read
    assert held_1 and held_2 and not held_1 & held_2 and held_1 | held_2 == cars
    assert train_1 == cars - held_1 and train_2 == cars - held_2
    folds = [out / "folds" / str(k) / "stage1" / "best.pt" for k in (1, 2)]
    assert all(p.is_file() for p in folds)

    ensemble = f"stage1.checkpoint=[{folds[0]}, {folds[1]}]"
    both = tiny_config(sample_root, tmp_path / "pred", ensemble, "data.limit_test=2")
    singles = [tiny_config(sample_root, tmp_path / "pred", f"stage1.checkpoint={fold}") for fold in folds]
    images = [torch.from_numpy(read_image(p)).permute(2, 0, 1) for p in photos_of(both)[:2]]
    cpu = torch.device("cpu")
    mean, *members = (Coarse.load(open_source(c), c, cpu).probs(images) for c in (both, *singles))
    assert (members[0] - members[1]).abs().max() > 0.1  # two nets that differ
    torch.testing.assert_close(mean, (members[0] + members[1]) / 2, atol=1e-5, rtol=0)
    assert cli(["stage1", "predict", *args, ensemble, "data.limit_test=2", f"output.dir={tmp_path / 'pred'}"]) == 0
    keys = set(pd.read_csv(tmp_path / "pred" / "bboxes.csv").key)
    assert keys == {cache_key(both, open_source(both))} != {cache_key(singles[0], open_source(singles[0]))}
