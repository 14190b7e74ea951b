"""`carvana evaluate`: per-image Dice of stage 1 alone and of the cascade on the validation cars
(whole image, and within a few pixels of the true boundary, where the refiner earns its keep), the
share of car pixels inside the stage-1 box, the threshold sweep, the ten worst images, and
overlays showing where each stage is wrong. `score` computes, `save` writes the report files.

The sweep is also where the mask threshold comes from under `predict.threshold: auto`: this module
writes `report/threshold_sweep.csv`, the model source of the config's checkpoints reads it
(common/model_source.py `mask_threshold`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from common.boxes import Box
from common.config import Settings
from common.data.images import read_image, read_mask
from common.data.kaggle import Sample, index_split, split_by_car
from common.errors import DataError, Failure
from common.io import atomic_path, save_figure, write_csv, write_text
from common.log import log
from common.metrics import dice, dice_counts, dice_of, sweep_counts, sweep_dice
from common.model import pick_device
from common.model_source import ModelSource, sweep_path
from common.prediction.step import Prediction
from common.prediction.transfer import from_host, to_host_all
from common.training.losses import edge_band
from stage1_lowres.box_cache import cached_boxes
from stage1_lowres.coarse import Coarse
from stage2_fullres.cascade import Cascade

FALSE_POSITIVE = np.array([255, 40, 40], np.uint8)  # predicted car, truly background
FALSE_NEGATIVE = np.array([40, 120, 255], np.uint8)  # missed car
BOX, SEAM = np.array([255, 220, 0], np.uint8), np.array([0, 230, 230], np.uint8)
THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)  # the sweep of validation Dice against the mask threshold
EDGE_RADIUS = 3  # edge Dice: pixels within this distance of the true boundary
KEPT = 12  # the worst images whose masks stay in memory for the overlays


@dataclass(frozen=True)
class Kept:
    """One validation image's masks on the host, kept for its overlay."""

    sample: Sample
    truth: np.ndarray
    stage1: np.ndarray
    cascade: np.ndarray
    box: Box
    windows: tuple[Box, ...]  # what the refiner saw: tiles or band patches (none from stage 1 alone)


@dataclass
class Evaluation:
    metrics: pd.DataFrame  # one row per validation image
    sweep: pd.DataFrame  # mean Dice of each stage per mask threshold
    kept: dict[str, Kept]  # the worst images, by img
    refined: bool  # a refiner ran: the cascade's columns hold figures, not NaN

    @property
    def ranking(self) -> str:
        """The column that ranks the images: the cascade's Dice, or stage 1's without a refiner."""
        return "dice_cascade" if self.refined else "dice_stage1"


def score(cfg: Settings, source: ModelSource) -> Evaluation:
    """Every validation image predicted as `stage2 predict` predicts (stage 1 alone without a refiner)
    and scored against its mask."""
    samples = index_split(cfg.data.root, "train", cfg.data.hq)
    _, val = split_by_car(samples, cfg.data.val_cars)
    boxes = cached_boxes(cfg)
    has_refiner = source.has("refiner")
    if not has_refiner:
        log.info("evaluate: no stage-2 net yet; scoring stage 1 alone")
    device = pick_device(cfg.device)
    # stage 1 is scored even when the refiner takes no coarse channel
    predictor = Cascade.load(source, cfg, device) if has_refiner else Coarse.load(source, cfg, device)
    threshold = source.threshold
    ranking = "dice_cascade" if has_refiner else "dice_stage1"
    rows, sweeps, kept, pending = [], [], {}, []

    def finish() -> None:  # the pending images' figures, read from the device in one copy
        nonlocal kept
        planes = [plane for image_planes, _ in pending for plane in image_planes]
        on_host = iter(to_host_all(planes)())
        for image_planes, done in pending:
            row, sweep, masks = done([next(on_host) for _ in image_planes])
            rows.append(row)
            sweeps.append(sweep)
            kept[row["img"]] = masks
        pending.clear()
        if len(kept) > KEPT:  # keep only the worst few in memory for the overlays
            worst = sorted(rows, key=lambda r: r[ranking])[:KEPT]
            kept = {r["img"]: kept[r["img"]] for r in worst if r["img"] in kept}

    for i, result in predictor.run([x.image for x in val], [boxes[x.img] for x in val], desc="evaluate"):
        if isinstance(result, Failure):
            raise DataError(f"evaluate stopped, a validation image failed ({result.stage}): {result}")
        pending.append(_score_image(val[i], result, cfg.stage1.threshold, threshold if has_refiner else None))
        if len(pending) == predictor.batch_size:  # one host sync per batch of images
            finish()
    finish()
    mean = np.mean(sweeps, axis=0)
    sweep = pd.DataFrame({"threshold": THRESHOLDS, "dice_stage1": mean[:, 0], "dice_cascade": mean[:, 1]})
    return Evaluation(pd.DataFrame(rows), sweep, kept, has_refiner)


def _score_image(
    sample: Sample, pred: Prediction, stage1_threshold: float, threshold: float | None
) -> tuple[list[torch.Tensor], Callable[[list[np.ndarray]], tuple[dict, list, Kept]]]:
    """One image's counts and masks taken on the device, as fixed-size tensors (no size the host must
    read), and the function that makes its metrics row, the Dice at each threshold of the sweep and the
    masks kept from those tensors once on the host. `threshold` None: no refiner, stage 1 alone."""
    nan = float("nan")
    truth = read_mask(sample.mask, expect_size=(pred.width, pred.height))
    on_device = from_host(truth, pred.coarse.device)
    band = edge_band(on_device[None, None].float(), EDGE_RADIUS)[0, 0] > 0  # where the refiner must earn its keep
    stage1 = pred.coarse > stage1_threshold
    cascade = pred.mask(threshold) if threshold is not None else stage1
    planes = [
        stage1,
        cascade,
        sweep_counts(pred.coarse, on_device, THRESHOLDS),
        dice_counts(stage1, on_device, band),
    ]
    if threshold is not None:
        planes += [sweep_counts(pred.prob, on_device, THRESHOLDS), dice_counts(cascade, on_device, band)]

    def done(on_host: list[np.ndarray]) -> tuple[dict, list, Kept]:
        stage1_host, cascade_host, sweep1, edge1, *refined = on_host
        sweep2, edge2 = refined or (None, None)
        sweep = list(
            zip(
                sweep_dice(torch.from_numpy(sweep1)),
                sweep_dice(torch.from_numpy(sweep2)) if refined else [nan] * len(THRESHOLDS),
                strict=True,
            )
        )
        x0, y0, x1, y1 = pred.box
        inside, car = int(truth[y0:y1, x0:x1].sum()), int(truth.sum())
        row = {
            "img": sample.img,
            "car": sample.car,
            "dice_stage1": dice(stage1_host, truth),
            "dice_cascade": dice(cascade_host, truth) if refined else nan,
            "edge_dice_stage1": dice_of(*edge1.tolist()),
            "edge_dice_cascade": dice_of(*edge2.tolist()) if refined else nan,
            "x0": x0,
            "y0": y0,
            "x1": x1,
            "y1": y1,
            "car_pixels_outside_box": car - inside,
            "box_coverage": inside / max(car, 1),
        }
        return row, sweep, Kept(sample, truth, stage1_host, cascade_host, pred.box, pred.windows)

    return planes, done


@dataclass(frozen=True)
class Summary:
    """report/summary.json: the validation's headline figures (the README's, the bundle's, the report's)."""

    images: int
    mean_dice_stage1: float
    mean_dice_cascade: float  # NaN without a refiner
    mean_edge_dice_stage1: float  # within `edge_radius` px of the true boundary
    mean_edge_dice_cascade: float
    edge_radius: int
    min_box_coverage: float  # the least share of an image's car pixels inside its stage-1 box
    images_losing_car_pixels_to_the_box: int
    worst_box_coverage: list[str]  # images, worst first
    worst: list[str]  # the ten worst images by the ranking Dice

    @staticmethod
    def path(cfg: Settings) -> Path:
        return Path(cfg.output.dir) / "report" / "summary.json"

    @classmethod
    def read(cls, cfg: Settings) -> Summary | None:
        """The last `carvana evaluate`'s summary of this run, or None where it has not run."""
        path = cls.path(cfg)
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def write(self, cfg: Settings) -> None:
        write_text(self.path(cfg), json.dumps(asdict(self), indent=2))


def save(cfg: Settings, ev: Evaluation) -> Summary:
    """report/: metrics.csv, threshold_sweep.csv and .png, summary.json and the worst images' overlays;
    returns the summary."""
    report = Path(cfg.output.dir) / "report"
    metrics = ev.metrics
    write_csv(report / "metrics.csv", metrics)
    write_csv(sweep_path(cfg), ev.sweep)
    plot_sweep(ev.sweep, report / "threshold_sweep.png")
    worst = metrics.nsmallest(10, ev.ranking)
    cut = metrics[metrics.car_pixels_outside_box > 0].nsmallest(10, "box_coverage")
    summary = Summary(
        len(metrics),
        float(metrics.dice_stage1.mean()),
        float(metrics.dice_cascade.mean()),
        float(metrics.edge_dice_stage1.mean()),
        float(metrics.edge_dice_cascade.mean()),
        EDGE_RADIUS,
        float(metrics.box_coverage.min()),
        int((metrics.car_pixels_outside_box > 0).sum()),
        cut.img.tolist(),
        worst.img.tolist(),
    )
    summary.write(cfg)
    for img in worst.img[:6]:
        if img in ev.kept:
            save_overlay(ev.kept[img], report / "overlays" / f"{Path(img).stem}.png")
    return summary


def evaluate(cfg: Settings, source: ModelSource) -> pd.DataFrame:
    """`score`, then `save`; returns the per-image metrics."""
    ev = score(cfg, source)
    s = save(cfg, ev)
    log.info(
        f"evaluate: {s.images} validation images; mean Dice stage 1 {s.mean_dice_stage1:.4f}, cascade "
        f"{s.mean_dice_cascade:.4f}; within {EDGE_RADIUS} px of the boundary: stage 1 {s.mean_edge_dice_stage1:.4f}, "
        f"cascade {s.mean_edge_dice_cascade:.4f}; box coverage min {s.min_box_coverage:.5f} "
        f"({s.images_losing_car_pixels_to_the_box} image(s) lose car pixels to the box); "
        f"{Path(cfg.output.dir) / 'report' / 'metrics.csv'}"
    )
    return ev.metrics


def main(cfg: Settings, source: ModelSource) -> int:
    evaluate(cfg, source)
    return 0


def plot_sweep(sweep: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.4), layout="tight")
    ax = fig.subplots()
    for column, label in (("dice_stage1", "stage 1 alone"), ("dice_cascade", "cascade")):
        if sweep[column].notna().any():
            best = sweep.loc[sweep[column].idxmax()]
            ax.plot(
                sweep.threshold,
                sweep[column],
                "o-",
                ms=3,
                label=f"{label} (best {best[column]:.4f} at {best.threshold:.2f})",
            )
    ax.set(xlabel="mask threshold", ylabel="mean validation Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def save_overlay(kept: Kept, path: Path) -> None:
    """Stage 1 (left) and the cascade (right) over the image, half size, with the edges of the windows
    the refiner saw (its tiles or band patches)."""
    image = read_image(kept.sample.image)
    panels = np.concatenate(
        [
            overlay(image, kept.stage1, kept.truth, kept.box, []),
            overlay(image, kept.cascade, kept.truth, kept.box, kept.windows),
        ],
        1,
    )
    small = Image.fromarray(panels).resize((panels.shape[1] // 2, panels.shape[0] // 2), Image.BILINEAR)
    with atomic_path(path) as tmp:
        small.save(tmp, format="PNG")


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, box: Box | None, windows: list) -> np.ndarray:
    """The image dimmed, errors in two colours, the box and the windows' edges drawn."""
    out = (image * 0.55).astype(np.uint8)
    out[pred & ~truth] = FALSE_POSITIVE
    out[~pred & truth] = FALSE_NEGATIVE
    h, w = pred.shape

    def rect(x0, y0, x1, y1, colour, t=3):
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        out[y0 : y0 + t, x0:x1] = colour
        out[max(y1 - t, 0) : y1, x0:x1] = colour
        out[y0:y1, x0 : x0 + t] = colour
        out[y0:y1, max(x1 - t, 0) : x1] = colour

    for win in windows:
        rect(*win, SEAM, 2)
    if box is not None:
        rect(*box, BOX, 4)
    return out
