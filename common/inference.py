"""Running a net over batches of images: the same code for validation and prediction, both stages."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch import nn


def to_input(images: np.ndarray, coarse: np.ndarray | None = None) -> torch.Tensor:
    """uint8 (N, H, W, 3) [+ float (N, H, W) coarse probability] -> float (N, C, H, W) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    if coarse is not None:
        x = torch.cat([x, torch.from_numpy(np.ascontiguousarray(coarse, dtype=np.float32))[:, None]], 1)
    return x


@torch.no_grad()
def forward_batches(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """Logits (float32, on the CPU) for `x` in batches; fp16 autocast on CUDA."""
    model.eval()
    for i in range(0, len(x), batch_size):
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            yield model(x[i : i + batch_size].to(device)).float().cpu()


def predict_probs(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int, flip: bool = False) -> np.ndarray:
    """Probabilities (N, H, W); with `flip`, the mean with the prediction on the mirrored input."""
    probs = torch.cat([torch.sigmoid(z) for z in forward_batches(model, x, device, batch_size)])
    if flip:
        mirrored = torch.cat([torch.sigmoid(z) for z in forward_batches(model, x.flip(-1), device, batch_size)])
        probs = (probs + mirrored.flip(-1)) / 2
    return probs[:, 0].numpy()
