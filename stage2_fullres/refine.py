"""One full-resolution image through the refiner: box -> tiles -> net -> blend -> full canvas.

Validation and prediction both call `refine`, so validation Dice is measured the way the
submission is made.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.boxes import Box
from common.inference import predict_probs, to_input
from stage2_fullres.tiles import blend_weights, cut_tiles, plan_tiles, stitch


def refine(model: nn.Module, image: np.ndarray, coarse: np.ndarray | None, box: Box, settings: dict,
           device: torch.device, batch_size: int, flip: bool = False) -> np.ndarray:
    """Full-resolution car probability (H, W) for an RGB image, given its box and (optionally) the
    stage-1 probability upsampled to full resolution."""
    height, width = image.shape[:2]
    tile = settings["tile"]
    windows = plan_tiles(width, height, box, tile, settings["min_overlap"])
    x = to_input(cut_tiles(image, windows), None if coarse is None else cut_tiles(coarse, windows))
    probs = predict_probs(model, x, device, batch_size, flip=flip)
    return stitch(probs, windows, box, width, height, blend_weights(tile, settings["blend"]))
