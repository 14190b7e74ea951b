"""Stage 1 boxes and cache, stage 2 submission: on a tiny run over the synthetic sample data."""

import gzip

import pandas as pd
import pytest
from conftest import copy_run, tiny_config

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
    import torch

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
    import torch

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


def test_evaluate_scores_both_stages(evaluated):
    cfg, metrics = evaluated
    assert len(metrics) == 16 and metrics.dice_stage1.between(0, 1).all() and metrics.dice_cascade.between(0, 1).all()
    report = cfg.output.dir + "/report"
    assert len(list(__import__("pathlib").Path(report, "overlays").glob("*.png"))) == 6
    sweep = pd.read_csv(f"{report}/threshold_sweep.csv").set_index("threshold")
    assert len(sweep) == 17 and __import__("pathlib").Path(report, "threshold_sweep.png").is_file()
    # at the configured threshold the sweep is the mean of the per-image scores
    assert sweep.loc[0.5, "dice_stage1"] == pytest.approx(metrics.dice_stage1.mean())
    assert sweep.loc[0.5, "dice_cascade"] == pytest.approx(metrics.dice_cascade.mean())


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
    pd.DataFrame(
        {"threshold": [0.3, 0.35, 0.4], "dice_stage1": [0.99, 0.98, 0.97], "dice_cascade": [0.995, 0.997, 0.996]}
    ).to_csv(tmp_path / "out" / "report" / "threshold_sweep.csv", index=False)
    assert mask_threshold(cfg) == 0.35  # the cascade's best, not stage 1's
    assert mask_threshold(tiny_config(tmp_path / "data", tmp_path / "out", "predict.threshold=0.6")) == 0.6


def test_fold_ensemble_trains_k_runs_and_predicts_with_their_mean(sample_root, tmp_path, capsys):
    import torch

    from common.model import Ensemble, UNet
    from pipelines.cli import main as cli
    from stage1_lowres.box_cache import cache_key

    a, b = UNet(3, 2, 4).eval(), UNet(3, 2, 4).eval()
    x = torch.rand(2, 3, 32, 32)
    expected = torch.logit((torch.sigmoid(a(x)) + torch.sigmoid(b(x))) / 2, eps=1e-6)
    torch.testing.assert_close(Ensemble([a, b])(x), expected)

    out = tmp_path / "out"
    args = [
        f"data.root={sample_root}",
        f"output.dir={out}",
        "data.val_cars=1",
        "stage1.size=64",
        "stage1.depth=3",
        "stage1.width=4",
        "stage1.epochs=1",
        "stage1.workers=1",
        "device=cpu",
    ]
    assert cli(["folds", "stage1", "2", *args]) == 0
    folds = [out / "folds" / str(k) / "stage1" / "best.pt" for k in (1, 2)]
    assert all(p.is_file() for p in folds)
    histories = [pd.read_csv(p.parent / "history.csv") for p in folds]
    assert histories[0].val_dice.iloc[0] != histories[1].val_dice.iloc[0]  # different held-out cars
    ensemble = [
        *args,
        f"stage1.checkpoint=[{folds[0]}, {folds[1]}]",
        "data.limit_test=2",
        f"output.dir={tmp_path / 'pred'}",
    ]
    assert cli(["stage1", "predict", *ensemble]) == 0
    boxes = pd.read_csv(tmp_path / "pred" / "bboxes.csv")
    single = tiny_config(sample_root, tmp_path / "pred", f"stage1.checkpoint={folds[0]}")
    both = tiny_config(sample_root, tmp_path / "pred", ensemble[-3])
    assert set(boxes.key) == {cache_key(both, open_source(both))} != {cache_key(single, open_source(single))}
