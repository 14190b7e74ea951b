"""`carvana bundle --config FILE --out DIR [--onnx]`: a trained run's cascade as a folder to hand on
(common/bundle.py holds the format and reads it back)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import torch
import yaml

from common.bundle import FIXED, FORMAT, INPUT, MANIFEST, Manifest, NetSpec, save_net, sha256, write_manifest
from common.config import Settings, setting_value
from common.data.kaggle import index_split, split_by_car
from common.errors import ConfigError
from common.io import write_text
from common.log import log
from common.model import Ensemble, checkpoint_paths, load_checkpoint
from common.model_source import ModelSource
from pipelines.evaluate import Summary

CPU = torch.device("cpu")


def make_bundle(cfg: Settings, source: ModelSource, out: Path, name: str = "carvana", onnx: bool = False) -> Manifest:
    """Write the source's cascade into `out` as a bundle: the nets' weights (and ONNX files), the model
    card, then bundle.json."""
    nets = {
        "stage1": (source.net("stage1", CPU), cfg.stage1.size),
        "refiner": (source.net("refiner", CPU), cfg.stage2.window),
    }
    for which, (net, _) in nets.items():
        if isinstance(net, Ensemble):
            raise ConfigError(
                f"the {which} net is an ensemble of {len(net.models)} nets; a bundle holds one net per stage"
            )
    out.mkdir(parents=True, exist_ok=True)
    for stale in (MANIFEST, "stage1.onnx", "refiner.onnx"):  # a rebuilt folder is no bundle until its new bundle.json
        (out / stale).unlink(missing_ok=True)
    files = []
    for which, (net, _) in nets.items():
        save_net(net, out / f"{which}.safetensors")
        files.append(f"{which}.safetensors")
    if onnx:
        from common.onnx_export import export

        for which, (net, size) in nets.items():
            export(net, net.args["in_channels"], size, out / f"{which}.onnx")
            files.append(f"{which}.onnx")
    manifest = Manifest(
        format=FORMAT,
        name=name,
        created=dt.date.today().isoformat(),
        nets={
            which: NetSpec(file=f"{which}.safetensors", architecture="UNet", args=net.args)
            for which, (net, _) in nets.items()
        },
        prediction={k: setting_value(cfg, k) for k in FIXED},
        input=INPUT,
        threshold=source.threshold,
        files={f: sha256(out / f) for f in files},
        validation=validation(cfg),
        training_data=training_data(cfg),
    )
    write_text(out / "README.md", model_card(manifest))
    write_manifest(out, manifest)
    log.info(f"bundle: {out} ({', '.join(files)}, bundle.json, README.md); use it with --model {out}")
    return manifest


def validation(cfg: Settings) -> dict:
    """The run's figures: `carvana evaluate`'s summary where it ran, else the checkpoints' best validation Dice."""
    s = Summary.read(cfg)
    if s is not None:
        date = dt.date.fromtimestamp(Summary.path(cfg).stat().st_mtime).isoformat()
        return {
            "source": "carvana evaluate",
            "date": date,
            "images": s.images,
            "mean_dice_stage1": s.mean_dice_stage1,
            "mean_dice_cascade": s.mean_dice_cascade,
            "mean_edge_dice_cascade": s.mean_edge_dice_cascade,
        }
    best = {stage: load_checkpoint(checkpoint_paths(cfg, stage)[0], CPU)["best_dice"] for stage in ("stage1", "stage2")}
    return {
        "source": "training validation (no carvana evaluate report)",
        "best_dice_stage1": best["stage1"],
        "best_dice_stage2": best["stage2"],
    }


def training_data(cfg: Settings) -> dict:
    """What the nets learned from: the synthetic cars of `carvana sample-data` or photos, and which cars."""
    root = Path(cfg.data.root)
    samples = index_split(cfg.data.root, "train", cfg.data.hq)
    train, val = split_by_car(samples, cfg.data.val_cars)
    return {
        "kind": "synthetic" if (root / "synthetic.json").is_file() else "photos",
        "root": str(root),
        "train_cars": sorted({x.car for x in train}),
        "val_cars": sorted({x.car for x in val}),
        "images": len(samples),
    }


KAGGLE = "carvana-image-masking-challenge"
RULES = "https://www.kaggle.com/competitions/carvana-image-masking-challenge/rules"
FIGURES = {  # bundle.json's validation figures -> their names on a model card
    "mean_dice_cascade": "mean Dice, cascade",
    "mean_dice_stage1": "mean Dice, stage 1 alone",
    "mean_edge_dice_cascade": "mean Dice within 3 px of the true boundary, cascade",
    "best_dice_stage2": "best validation Dice while training, cascade",
    "best_dice_stage1": "best validation Dice while training, stage 1",
}


def front_matter(m: Manifest) -> dict:
    """The model card's metadata as a model hub reads it: licence, library, task, data set and the
    validation figures (a `model-index`). Weights trained on the Kaggle photos carry the competition's
    terms; the synthetic cars are the project's own, under its licence."""
    licence = (
        {"license": "mit"}
        if m.synthetic
        else {"license": "other", "license_name": f"{KAGGLE}-rules", "license_link": RULES}
    )
    dataset = "carvana-sample-data" if m.synthetic else KAGGLE
    onnx = ["onnx"] if any(f.endswith(".onnx") for f in m.files) else []
    metrics = [{"type": "dice", "name": FIGURES[k], "value": v} for k, v in m.validation.items() if k in FIGURES]
    return licence | {
        "library_name": "carvana-cascade",
        "pipeline_tag": "image-segmentation",
        "tags": ["image-segmentation", "background-removal", "cars", "carvana", "unet", "safetensors", *onnx],
        "datasets": [dataset],
        "metrics": ["dice"],
        "model-index": [
            {
                "name": m.name,
                "results": [
                    {
                        "task": {"type": "image-segmentation", "name": "Image Segmentation"},
                        "dataset": {"type": dataset, "name": f"{dataset}, validation cars", "split": "validation"},
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }


def model_card(m: Manifest) -> str:
    """README.md of the bundle: what the nets are, what they learned, how well, and what they are not for."""
    data = m.training_data
    figures = "\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in m.validation.items())
    limits = (
        "**Trained on synthetic cars only** (`carvana sample-data`): the nets have never seen a photo. Use this "
        "bundle to try the commands; on real photos it finds windows, lights and wheels, not the car. For real photos "
        "train with `pipelines/pipeline.yaml` on the Kaggle Carvana data, then run `carvana bundle`."
        if m.synthetic
        else "Trained on studio photos of cars on a turntable (the Kaggle Carvana layout): photos far from that "
        "(street scenes, several cars, heavy occlusion) are outside what it learned."
    )
    cars = len(data["train_cars"]) + len(data["val_cars"])
    pred = m.prediction
    refines = (
        f"{pred['stage2.patch']} px patches over the band within {pred['stage2.band']} px of stage 1's outline"
        if pred.get("stage2.refine") == "band"
        else f"{pred['stage2.tile']} px tiles of the car's box"
    )
    meta = yaml.safe_dump(front_matter(m), sort_keys=False)
    return f"""---
{meta}---

# {m.name}: a two-stage car-segmentation cascade

Made by `carvana bundle` on {m.created}. Format {m.format} (docs/bundle.md).

## Use
`carvana cutout PHOTOS... --out DIR --model THIS_FOLDER`, `carvana serve --model THIS_FOLDER`,
`carvana stage2 predict --config CONFIG --model THIS_FOLDER`, or from Python
`pipelines.load_model("THIS_FOLDER").cutout("car.jpg")` (the carvana-cascade project: docs/python.md).
Intended use: background removal of studio photos of a car, and Carvana submissions.

## Nets
- stage 1: UNet {m.nets["stage1"].args} on the whole photo at {m.prediction["stage1.size"]} px
- refiner: UNet {m.nets["refiner"].args} on {refines}
- input: {m.input}; mask threshold {m.threshold}

## Training data
{data["kind"]}: {data["images"]} images of {cars} cars under `{data["root"]}`;
validation cars: {", ".join(data["val_cars"])}.

## Figures
{figures}

## Limits
{limits}
"""
