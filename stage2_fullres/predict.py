"""Stage 2 at prediction: the refiner on the tiles of several images at once, blended and pasted
into the full canvas (`Cascade`, after stage 1's `Coarse`); and the `stage2 predict` command, the
cascade's submission.

The command streams the test images through the `Cascade` with the cached boxes; the masks are
thresholded on the device, RLE strings and chunk files are made in a writer thread. Each chunk is
written atomically, so a killed run continues where it stopped and ends with the same bytes as an
uninterrupted one. With `predict.cluster`, the same chunks run as Dask tasks. `stage2 predict`,
stage-2 validation, `carvana evaluate`, `carvana cutout` and `carvana serve` all go through
`Cascade.predict`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import nn

from common.boxes import Box
from common.config import Settings, depends, digest
from common.data.chunks import ChunkStore, finish_predictions
from common.data.kaggle import test_samples
from common.data.rle import rle_encode
from common.errors import CheckpointError, DataError, Failure
from common.model import checkpoint_paths, checkpoints_hash, load_models, prepare, static_shapes
from common.prediction.jobs import Job, run_job
from common.prediction.reader import reader_processes
from common.prediction.step import Prediction, Predictor, Result, probabilities
from common.prediction.writer import Output
from stage1_lowres.predict import INPUT_VERSION, Coarse, cached_boxes, torch_only
from stage2_fullres.tiles import TooManyTiles, Window, blend_weights, cut_tiles, plan_tiles, stitch

if TYPE_CHECKING:  # the bundle module builds on this one
    from stage2_fullres.bundle import Bundle

# --- the cascade

def load_refiner(cfg: Settings, device: torch.device) -> nn.Module:
    paths = checkpoint_paths(cfg, "stage2")
    model, ckpts = load_models(paths, device)
    wants = 4 if cfg.stage2.coarse_channel else 3
    if ckpts[0]["model_args"]["in_channels"] != wants:
        raise CheckpointError(f"{paths[0]} takes {ckpts[0]['model_args']['in_channels']} input channels but stage2.coarse_channel="
                          f"{cfg.stage2.coarse_channel} needs {wants}; set it to match the checkpoint or retrain")
    return model


class Cascade(Predictor):
    """Stage 1 (optional when boxes are given and the refiner takes no coarse channel) + the refiner."""

    def __init__(self, coarse: Coarse | None, refiner: nn.Module, cfg: Settings, device: torch.device):
        s, p = cfg.stage2, cfg.predict
        self.coarse, self.refiner, self.device = coarse, refiner, device
        self.tile, self.min_overlap, self.coarse_channel = s.tile, s.min_overlap, s.coarse_channel
        self.batch_size, self.flip, self.workers, self.decode = p.batch_size, p.tta_flip, reader_processes(p.workers, device), p.decode
        self.static = static_shapes(device, p.compile)  # every refiner step sees `batch_size` tiles, a partial one padded
        self.weights = blend_weights(self.tile, s.blend, device)

    @classmethod
    def from_config(cls, cfg: Settings, device: torch.device, need_stage1: bool = True) -> "Cascade":
        """The nets the config names, ready for inference (channels_last, compiled if predict.compile);
        stage 1 only where it is needed: boxes to find (`need_stage1`) or a coarse channel."""
        torch_only(cfg)
        refiner = prepare(load_refiner(cfg, device), device, cfg.predict.compile)
        coarse = Coarse.from_config(cfg, device) if need_stage1 or cfg.stage2.coarse_channel else None
        return cls(coarse, refiner, cfg, device)

    @torch.no_grad()
    def predict(self, images: list[torch.Tensor], boxes: list[Box | None]) -> list[Result]:
        """uint8 (3, H, W) images on the device and their boxes (None: from stage 1) -> predictions, or
        a `Failure` for an image the tile settings cannot cover (`TooManyTiles`)."""
        if self.coarse is not None:
            preds = self.coarse.predict(images, boxes)
        else:  # every box given, no coarse channel: stage 1 is not needed
            preds = [Prediction(image.shape[-1], image.shape[-2], box, True, None) for image, box in zip(images, boxes)]
        plans = [self._plan(p) for p in preds]
        ok = [k for k, plan in enumerate(plans) if not isinstance(plan, Failure)]
        probs = self._refine([images[k] for k in ok], [preds[k] for k in ok], [plans[k] for k in ok]) if ok else []
        refined = dict(zip(ok, probs))
        return [replace(p, prob=refined[k]) if k in refined else plans[k] for k, p in enumerate(preds)]

    def _plan(self, p: Prediction) -> list[Window] | Failure:
        try:
            return plan_tiles(p.width, p.height, p.box, self.tile, self.min_overlap)
        except TooManyTiles as e:
            return Failure(None, str(e), "stage2")

    def _refine(self, images: list[torch.Tensor], preds: list[Prediction], plans: list[list[Window]]) -> list[torch.Tensor]:
        """Tiles of all images in one queue, `predict.batch_size` tiles per forward pass, then stitched
        into each image's full-resolution probability."""
        rgb = torch.cat([cut_tiles(image, windows) for image, windows in zip(images, plans)])  # uint8, cut on the device
        prior = torch.cat([cut_tiles(p.coarse[None], windows) for p, windows in zip(preds, plans)]) if self.coarse_channel else None
        probs = torch.cat([self.refine(rgb[i : i + self.batch_size], None if prior is None else prior[i : i + self.batch_size])
                           for i in range(0, len(rgb), self.batch_size)])
        starts = np.cumsum([0] + [len(windows) for windows in plans]).tolist()
        return [stitch(probs[a:b], windows, p.box, p.width, p.height, self.weights)
                for p, windows, a, b in zip(preds, plans, starts, starts[1:])]

    def refine(self, rgb: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        """(n, tile, tile) probabilities of n uint8 RGB tiles (and their coarse prior); under
        `static_shapes` a partial batch is padded to one shape, which would otherwise recompile or re-tune."""
        x = rgb.float().div_(255)
        if prior is not None:
            x = torch.cat([x, prior], 1)
        return probabilities(self.refiner, x, self.device, self.flip, pad_to=self.batch_size if self.static else 0)


# --- the `stage2 predict` command

COLUMNS = ["img", "rle_mask", "error"]


@dataclass(frozen=True)
class MaskItem:
    img: str
    path: str
    box: Box | None  # from bboxes.csv; None: stage 1 wrote no box for this image


@dataclass(frozen=True, kw_only=True)
class MaskJob(Job):
    """The cascade's mask of every test image, in submission order."""

    threshold: float  # the mask threshold (`predict.threshold`, or with auto the best of `carvana evaluate`)
    bundle: str = ""  # the folder of a `carvana bundle` whose nets to use (`--model`); empty: the config's checkpoints

    def build(self, device: torch.device) -> Cascade:
        if self.bundle:  # the boxes come from the cache
            from stage2_fullres.bundle import read_bundle

            return read_bundle(self.bundle).cascade(self.cfg, device, need_stage1=False)
        return Cascade.from_config(self.cfg, device, need_stage1=False)

    def outputs(self, cascade: Cascade, items: list[MaskItem], desc: str) -> Iterator[Output]:
        """An image without a box is a failure in its place; the others stream through the cascade."""
        known = [item for item in items if item.box is not None]
        results = cascade.run([Path(item.path) for item in known], [item.box for item in known], desc=desc)
        for i, item in enumerate(items):
            if item.box is None:
                yield Output(i, Failure(item.path, "no stage-1 box in the cache", "stage1"))
                continue
            _, result = next(results)
            yield Output(i, result, result.mask(self.threshold) if isinstance(result, Prediction) else None)
        next(results, None)  # lets the predictor close its progress bar and print its rate

    def row(self, item: MaskItem, result: Result, mask: np.ndarray | None) -> dict:
        if isinstance(result, Failure):
            return {"img": item.img, "rle_mask": "", "error": str(result)}
        return {"img": item.img, "rle_mask": rle_encode(mask), "error": ""}


def chunk_key(cfg: Settings, boxes: dict[str, Box], threshold: float, bundle: Bundle | None = None) -> str:
    """The nets' content (the checkpoints', or the bundle's weights), the boxes, the mask threshold
    and every setting that changes a mask."""
    def content(stage: str, net: str) -> str:
        return bundle.hash(net, cfg.predict.backend) if bundle is not None else checkpoints_hash(checkpoint_paths(cfg, stage))

    # with a coarse channel stage 1 counts too (its probability is a refiner input); without one,
    # stage 2 needs no stage-1 checkpoint here, only the cached boxes
    stage1 = content("stage1", "stage1") if cfg.stage2.coarse_channel else None
    return digest({**depends(cfg, "masks"), "threshold": threshold, "stage1": stage1, "stage1_input": INPUT_VERSION,
                   "stage2": content("stage2", "refiner"), "boxes": sorted(boxes.items())})


def main(cfg: Settings, threshold: float, bundle: Bundle | None = None) -> int:
    """`stage2 predict` with the mask threshold the caller resolved (pipelines/evaluate.py
    `mask_threshold`, or the bundle's), with the config's checkpoints or the bundle's nets."""
    boxes = cached_boxes(cfg)
    test = test_samples(cfg)
    if not test:
        raise DataError(f"no test images under {cfg.data.root}: nothing to predict")
    store = ChunkStore(Path(cfg.output.dir) / "stage2_chunks", chunk_key(cfg, boxes, threshold, bundle), COLUMNS, cfg.predict.chunk,
                       [x.img for x in test])
    job = MaskJob(desc="stage 2 predict", cfg=cfg, store=store, noun="test images", threshold=threshold,
                  bundle=str(bundle.folder) if bundle is not None else "")
    run_job(job, [MaskItem(x.img, str(x.image), boxes.get(x.img)) for x in test])
    return finish_predictions(Path(cfg.output.dir), store, test, test, "stage2", "submission.csv.gz")
