"""`carvana evaluate`: per-image Dice of stage 1 alone and of the cascade on the validation cars
(whole image, and within a few pixels of the true boundary, where the refiner earns its keep), the
share of car pixels inside the stage-1 box, the threshold sweep, the ten worst images, and
overlays showing where each stage is wrong."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from common.boxes import Box
from common.config import Settings
from common.data import index_split, split_by_car
from common.errors import DataError
from common.io import atomic_path, read_image, read_mask, write_csv, write_text
from common.log import log
from common.losses import edge_band
from common.metrics import dice, dice_sweep
from common.model import checkpoint_paths, pick_device
from common.predictor import mask_threshold
from stage1_lowres.predict import Coarse, cached_boxes
from stage2_fullres.predict import Cascade, plan_tiles

FALSE_POSITIVE = np.array([255, 40, 40], np.uint8)  # predicted car, truly background
FALSE_NEGATIVE = np.array([40, 120, 255], np.uint8)  # missed car
BOX, SEAM = np.array([255, 220, 0], np.uint8), np.array([0, 230, 230], np.uint8)
THRESHOLDS = np.round(np.arange(0.1, 0.91, 0.05), 2)  # the sweep of validation Dice against the mask threshold
EDGE_RADIUS = 3  # edge Dice: pixels within this distance of the true boundary


def plot_sweep(sweep: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4))
    for column, label in (("dice_stage1", "stage 1 alone"), ("dice_cascade", "cascade")):
        if sweep[column].notna().any():
            best = sweep.loc[sweep[column].idxmax()]
            ax.plot(sweep.threshold, sweep[column], "o-", ms=3, label=f"{label} (best {best[column]:.4f} at {best.threshold:.2f})")
    ax.set(xlabel="mask threshold", ylabel="mean validation Dice")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, box: Box | None, windows: list) -> np.ndarray:
    """The image dimmed, errors in two colours, the box and the tile edges drawn."""
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


def evaluate(cfg: Settings) -> pd.DataFrame:
    out = Path(cfg.output.dir)
    report = out / "report"
    device = pick_device(cfg.device)
    samples = index_split(cfg.data.root, "train", cfg.data.hq)
    _, val = split_by_car(samples, cfg.data.val_cars)
    boxes = cached_boxes(cfg)
    refiners = checkpoint_paths(cfg, "stage2")
    has_refiner = all(p.is_file() for p in refiners)
    if not has_refiner:
        log.info(f"evaluate: no stage-2 checkpoint at {', '.join(map(str, refiners))}; scoring stage 1 alone")
    # stage 1 is scored even when the refiner takes no coarse channel
    predictor = Cascade.from_config(cfg, device) if has_refiner else Coarse.from_config(cfg, device)
    s, thr1, thr = cfg.stage2, cfg.stage1.threshold, mask_threshold(cfg, strict=False)
    rows, keep, sweeps = [], {}, []
    for i, pred in predictor.run([x.image for x in val], [boxes[x.img] for x in val], desc="evaluate"):
        sample = val[i]
        if isinstance(pred, str):
            raise DataError(f"validation image unreadable: {pred}")
        truth = read_mask(sample.mask, expect_size=(pred.width, pred.height))
        on_device = torch.from_numpy(truth).to(pred.coarse.device)
        sweeps.append(list(zip(dice_sweep(pred.coarse, on_device, THRESHOLDS),
                               dice_sweep(pred.prob, on_device, THRESHOLDS) if has_refiner else [float("nan")] * len(THRESHOLDS))))
        band = edge_band(on_device[None, None].float(), EDGE_RADIUS)[0, 0] > 0  # where the refiner must earn its keep
        stage1_t = pred.coarse > thr1
        cascade_t = pred.prob > thr if has_refiner else stage1_t
        stage1, cascade_mask = stage1_t.cpu().numpy(), cascade_t.cpu().numpy()
        x0, y0, x1, y1 = pred.box
        inside = int(truth[y0:y1, x0:x1].sum())
        rows.append({"img": sample.img, "car": sample.car, "dice_stage1": dice(stage1, truth),
                     "dice_cascade": dice(cascade_mask, truth) if has_refiner else float("nan"),
                     "edge_dice_stage1": dice(stage1_t[band], on_device[band]),
                     "edge_dice_cascade": dice(cascade_t[band], on_device[band]) if has_refiner else float("nan"),
                     "x0": x0, "y0": y0, "x1": x1, "y1": y1, "car_pixels_outside_box": int(truth.sum()) - inside,
                     "box_coverage": inside / max(int(truth.sum()), 1)})
        keep[sample.img] = (sample, truth, stage1, cascade_mask, pred.box)
        if len(keep) > 12:  # keep only the worst few in memory for the overlays
            worst = sorted(rows, key=lambda r: r["dice_cascade"] if has_refiner else r["dice_stage1"])[:12]
            keep = {r["img"]: keep[r["img"]] for r in worst if r["img"] in keep}
    metrics = pd.DataFrame(rows)
    write_csv(report / "metrics.csv", metrics)
    mean = np.mean(sweeps, axis=0)
    sweep = pd.DataFrame({"threshold": THRESHOLDS, "dice_stage1": mean[:, 0], "dice_cascade": mean[:, 1]})
    write_csv(report / "threshold_sweep.csv", sweep)
    plot_sweep(sweep, report / "threshold_sweep.png")
    worst = metrics.nsmallest(10, "dice_cascade" if has_refiner else "dice_stage1")
    cut = metrics[metrics.car_pixels_outside_box > 0].nsmallest(10, "box_coverage")
    summary = {"images": len(metrics), "mean_dice_stage1": float(metrics.dice_stage1.mean()),
               "mean_dice_cascade": float(metrics.dice_cascade.mean()),
               "mean_edge_dice_stage1": float(metrics.edge_dice_stage1.mean()),
               "mean_edge_dice_cascade": float(metrics.edge_dice_cascade.mean()), "edge_radius": EDGE_RADIUS,
               "min_box_coverage": float(metrics.box_coverage.min()), "images_losing_car_pixels_to_the_box": int(len(cut)),
               "worst_box_coverage": cut.img.tolist(), "worst": worst.img.tolist()}
    write_text(report / "summary.json", json.dumps(summary, indent=2))
    for img in worst.img[:6]:
        if img not in keep:
            continue
        sample, truth, stage1, cascade_mask, box = keep[img]
        image = read_image(sample.image)
        windows = plan_tiles(truth.shape[1], truth.shape[0], box, s.tile, s.min_overlap)
        panels = np.concatenate([overlay(image, stage1, truth, box, []), overlay(image, cascade_mask, truth, box, windows)], 1)
        small = Image.fromarray(panels).resize((panels.shape[1] // 2, panels.shape[0] // 2), Image.BILINEAR)
        with atomic_path(report / "overlays" / f"{Path(img).stem}.png") as tmp:
            small.save(tmp, format="PNG")
    log.info(f"evaluate: {len(metrics)} validation images; mean Dice stage 1 {summary['mean_dice_stage1']:.4f}, "
             f"cascade {summary['mean_dice_cascade']:.4f}; within {EDGE_RADIUS} px of the boundary: stage 1 "
             f"{summary['mean_edge_dice_stage1']:.4f}, cascade {summary['mean_edge_dice_cascade']:.4f}; box coverage min "
             f"{summary['min_box_coverage']:.5f} ({len(cut)} image(s) lose car pixels to the box); {report / 'metrics.csv'}")
    return metrics
