"""`carvana stage2 train`: the refiner on random full-resolution crops inside jittered car boxes; with
`stage2.refine: band`, most crops centred on the outlines (the truth's and stage 1's), where the band
refiner works.

The net is fully convolutional, so it trains on crops (stage2.crop) and predicts on whole tiles.
Validation runs the `Cascade` on whole held-out images, as prediction does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.boxes import Box, expand_box, jitter_box
from common.config import Settings, Stage2
from common.data.images import read_image, read_mask, read_mask_cached
from common.errors import Failure
from common.model import build_model
from common.model_source import ModelSource
from common.training import distributed
from common.training.batches import LoaderBatches, Pair, read_pairs
from common.training.trainer import Run, fit, validator
from stage1_lowres.box_cache import cached_boxes
from stage1_lowres.coarse import Coarse, upsample
from stage2_fullres.cascade import Cascade, needs_stage1
from stage2_fullres.tiles import clamp_start, cut_tiles


def crop_window(box: Box, crop: int, width: int, height: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a random crop x crop window centred somewhere inside `box`, kept inside the image
    where it fits."""
    x0, y0, x1, y1 = box
    cx, cy = rng.integers(x0, x1), rng.integers(y0, y1)
    return int(clamp_start(cx - crop // 2, width, crop)), int(clamp_start(cy - crop // 2, height, crop))


OUTLINE_SHARE = 0.75  # refine=band: crops centred on an outline; the rest anywhere in the box, as for tiles


def outline_points(mask: np.ndarray) -> np.ndarray:
    """(n, 2) float y, x of the outline of a bool mask, in pixel-edge coordinates: the middle of each edge
    between two pixels that differ, down or across (so a mask at 1/k of the size gives points at the
    same place once multiplied by k)."""
    down, across = np.nonzero(mask[1:] != mask[:-1]), np.nonzero(mask[:, 1:] != mask[:, :-1])
    return np.concatenate([np.stack(down, 1) + (1, 0.5), np.stack(across, 1) + (0.5, 1)])


class CropDataset(Dataset):
    """Random crops of full-resolution pairs, with the coarse probability as a 4th channel under
    `stage2.coarse_channel` (`coarse`: each image's, at stage 1's size; with the band, also where crops centre).

    An item is `crops` crops of one image: the JPEG is decoded once for all of them and the mask
    comes from the compact mask cache after its first read. Keys are (index, epoch), and an item's
    randomness is seeded from its key, so crops do not depend on the worker that cuts them.
    """

    def __init__(
        self,
        pairs: list[Pair],
        boxes: dict[str, Box],
        settings: Stage2,
        coarse: dict[str, np.ndarray] | None,
        mask_cache: Path,
        seed: int = 0,
    ):
        self.pairs, self.boxes, self.s, self.coarse = pairs, boxes, settings, coarse
        self.mask_cache, self.seed = mask_cache, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        i, epoch = key
        rng = np.random.default_rng([self.seed, epoch, i])
        p, crop = self.pairs[i], self.s.crop
        image = torch.from_numpy(read_image(p.sample.image)).permute(2, 0, 1)
        mask = torch.from_numpy(read_mask_cached(p.sample.mask, self.mask_cache))[None]
        small = None if self.coarse is None else self.coarse[p.sample.img]
        prob = torch.from_numpy(small).float().div_(255) if small is not None and self.s.coarse_channel else None
        outlines = self._outlines(mask[0].numpy(), small, p.width, p.height) if self.s.refine == "band" else []
        xs, ys = [], []
        for _ in range(self.s.crops_per_image):
            box = jitter_box(self.boxes[p.sample.img], self.s.box_jitter, rng, p.width, p.height)
            if outlines and rng.random() < OUTLINE_SHARE:  # a point of one of the outlines, the crop around it
                points = outlines[rng.integers(len(outlines))]
                y, x = (int(v) for v in points[rng.integers(len(points))])
                box = (x, y, x + 1, y + 1)
            left, top = crop_window(box, crop, p.width, p.height, rng)
            window = [(left, top, left + crop, top + crop)]
            x = cut_tiles(image, window)[0].float().div_(255)
            if prob is not None:
                if left + crop <= p.width and top + crop <= p.height:
                    extra = upsample(prob, p.width, p.height, window[0])[None]
                else:  # an image smaller than the crop: reflect-pad the full map, as prediction does
                    extra = cut_tiles(upsample(prob, p.width, p.height)[None], window)[0]
                x = torch.cat([x, extra])
            xs.append(x)
            ys.append(cut_tiles(mask, window)[0].float())
        return torch.stack(xs), torch.stack(ys)

    @staticmethod
    def _outlines(truth: np.ndarray, small: np.ndarray | None, width: int, height: int) -> list[np.ndarray]:
        """The truth's outline and stage 1's (from its low-resolution probability, in full-resolution
        pixels), those that have points."""
        found = [outline_points(truth)]
        if small is not None:
            scale = np.array([height / small.shape[0], width / small.shape[1]])
            found.append(outline_points(small >= 128) * scale)  # the byte 128 is the first above 0.5
        return [points for points in found if len(points)]


def cascade_predictions(
    pairs: list[Pair], boxes: dict[str, Box], coarse: Coarse | None, cfg: Settings, device: torch.device
):
    """Validation's predictions: whole held-out images through the `Cascade`, as `stage2 predict` makes
    them (flip TTA included)."""
    paths, val_boxes = [p.sample.image for p in pairs], [boxes[p.sample.img] for p in pairs]

    def predict(model):
        for i, result in Cascade(coarse, model, cfg, device).run(paths, val_boxes):
            yield i, result if isinstance(result, Failure) else result.prob

    return predict


def main(cfg: Settings, source: ModelSource) -> int:
    """`stage2 train`: the source gives the stage-1 net (for the coarse channel) and the mask threshold
    validation scores at (the refiner is what this trains)."""
    s = cfg.stage2
    out = Path(cfg.output.dir)
    ranks, device = distributed.init(cfg.device)
    # the scan decodes every image once at stage-1 size; keep those only when stage 1's probability is needed
    pairs = read_pairs(cfg.data, (cfg.stage1.size, cfg.stage1.size), keep=needs_stage1(cfg), workers=s.workers)
    cached = cached_boxes(cfg)
    train_pairs = [p for p in pairs.train if p.box is not None]
    val_pairs = [p for p in pairs.val if p.sample.img in cached]
    if s.val_images:
        val_pairs = val_pairs[:: max(len(val_pairs) // s.val_images, 1)][: s.val_images]
    if s.train_boxes == "truth":
        train_box = {p.sample.img: expand_box(p.box, cfg.stage1.margin, p.width, p.height) for p in train_pairs}
    else:  # stage1 (the config allows nothing else)
        train_pairs = [p for p in train_pairs if p.sample.img in cached]
        train_box = {p.sample.img: cached[p.sample.img] for p in train_pairs}
    coarse_model, coarse = None, None
    if needs_stage1(cfg):  # its probability: the refiner's 4th channel, or where the band's crops centre
        coarse_model = Coarse.load(source, cfg, device)
        coarse = {}
        for k in range(0, len(train_pairs), 32):  # the scan's stage-1-size images, no second decode
            batch = train_pairs[k : k + 32]
            probs = coarse_model.probs([torch.from_numpy(p.image).permute(2, 0, 1).to(device) for p in batch])
            coarse |= {
                p.sample.img: (prob * 255).round().byte().cpu().numpy() for p, prob in zip(batch, probs, strict=True)
            }
        for p in pairs.train + pairs.val:
            p.image = p.mask = None  # the crops read full-resolution files
    about = (
        f"{len(train_pairs)} training images ({s.crops_per_image} x {s.crop}px crops each, {s.train_boxes} boxes), "
        f"{len(val_pairs)} validation images on "
        + (f"band patches of {s.patch}px" if s.refine == "band" else f"{s.tile}px tiles")
    )
    model = build_model(
        s, in_channels=4 if s.coarse_channel else 3, prior_skip=s.coarse_channel and s.prior_skip, seed=cfg.seed
    )
    crops = CropDataset(train_pairs, train_box, s, coarse, out / "cache" / "masks", seed=cfg.seed)
    with LoaderBatches(
        crops, s.batch_size, s.workers, device, ranks, seed=cfg.seed, per_item=s.crops_per_image
    ) as batches:
        truths = [torch.from_numpy(read_mask(p.sample.mask)) for p in val_pairs]  # read once, not every epoch
        validate = validator(
            cascade_predictions(val_pairs, cached, coarse_model, cfg, device), truths, source.threshold
        )
        fit(Run.of(cfg, "stage2", device, ranks), model, batches, validate, pairs, about)
    return 0
