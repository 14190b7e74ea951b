"""The one U-Net, shared by both stages: Conv-BN-ReLU blocks, max-pool down, bilinear up + skip."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def block(c_in: int, c_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
              nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """`depth` levels, `width` channels at the top level, doubling per level (capped at 512).

    Any input size works: the input is padded to a multiple of 2**(depth-1) and the output cropped
    back, so whole 1918x1280 images and 1024 tiles go through the same net.

    With `prior_skip`, the last input channel is a probability (stage 1's coarse mask) and its logit
    is added to the output: the net learns only the correction, so an untrained refiner already
    reproduces the coarse mask and training starts from stage-1 quality.
    """

    def __init__(self, in_channels: int = 3, depth: int = 5, width: int = 16, dropout: float = 0.0, prior_skip: bool = False):
        super().__init__()
        self.args = {"in_channels": in_channels, "depth": depth, "width": width, "dropout": dropout, "prior_skip": prior_skip}
        chans = [min(width * 2**i, 512) for i in range(depth)]
        drops = [dropout if i >= depth - 2 else 0.0 for i in range(depth)]
        self.encoder = nn.ModuleList(block(c_in, c, d) for c_in, c, d in zip([in_channels] + chans[:-1], chans, drops))
        self.decoder = nn.ModuleList(block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth - 1)))
        self.head = nn.Conv2d(chans[0], 1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if prior_skip:
            nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of shape (N, 1, H, W)."""
        h, w = x.shape[-2:]
        prior = torch.logit(x[:, -1:].float().clamp(1e-4, 1 - 1e-4)) if self.args["prior_skip"] else None
        m = 2 ** (len(self.encoder) - 1)
        x = F.pad(x, (0, -w % m, 0, -h % m), mode="replicate")
        skips = []
        for i, enc in enumerate(self.encoder):
            x = enc(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for dec, skip in zip(self.decoder, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], 1))
        out = self.head(x)[..., :h, :w]
        return out if prior is None else out + prior
