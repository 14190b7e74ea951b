"""The picture a user asked for, built one way for every door in: `Picture` is what was asked (from
`carvana cutout`'s flags, `/v1/cutout`'s query, `/v2`'s `rgba` output and the Python API alike), `Cut`
is one photo's cut-out on the host, and `render` makes the one from the other. The pixels come from
pipelines/matting.py: the soft alpha, the clean edge and the composite."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
import torch
from PIL import Image, ImageColor

from common.boxes import Box
from common.errors import ConfigError, Failure
from common.prediction.step import Prediction
from common.prediction.transfer import from_host, to_host_all
from pipelines.matting import alpha, composite_on, foreground
from stage2_fullres.cascade import Cascade

Kind = Literal["rgba", "mask", "composite"]
Edge = Literal["soft", "hard"]
Format = Literal["png", "webp", "jpeg"]
MEDIA = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class Picture:
    """What to make of a cut-out: `output` rgba (the photo with the car's alpha), mask (the alpha alone)
    or composite (the car on `background`); `alpha` soft (the edge follows the probability) or hard
    (0 or 255); `clean_edges`: the soft edge in the car's own colour, not the photo's (which carries the
    old background); `crop`: cut to the car's box; `format` png, webp or jpeg (no alpha: not for rgba).
    A combination that cannot be made is a ConfigError naming it."""

    output: Kind = "rgba"
    alpha: Edge = "soft"
    clean_edges: bool = True
    background: str = "white"
    crop: bool = False
    format: Format = "png"

    def __post_init__(self) -> None:
        for name, kind in (("output", Kind), ("alpha", Edge), ("format", Format)):
            if getattr(self, name) not in get_args(kind):
                raise ConfigError(f"{name}={getattr(self, name)!r}: one of {', '.join(get_args(kind))}")
        try:
            ImageColor.getrgb(self.background)
        except ValueError:
            raise ConfigError(
                f"background={self.background}: not a colour (a name such as white, or #rrggbb)"
            ) from None
        if self.format == "jpeg" and self.output == "rgba":
            raise ConfigError("format=jpeg has no alpha channel: use output=composite or mask, or format=png or webp")

    @property
    def media_type(self) -> str:
        return MEDIA[self.format]


@dataclass(frozen=True)
class Cut:
    """One photo's cut-out on the host: its pixels, the car mask (the submission's, `Prediction.mask`),
    the soft alpha (>= 128 exactly on the mask), the car's box and whether stage 1 saw a car."""

    rgb: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # bool (H, W)
    alpha: np.ndarray  # uint8 (H, W), soft
    box: Box
    found: bool
    cleaned: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def alpha_of(self, edge: Edge) -> np.ndarray:
        return self.alpha if edge == "soft" else self.mask.astype(np.uint8) * 255

    def clean(self, edge: Edge) -> np.ndarray:
        """The photo with the car's own colour in the soft edge (`matting.foreground`), made once for
        every picture of this cut."""
        if edge not in self.cleaned:
            self.cleaned[edge] = foreground(torch.from_numpy(self.rgb), torch.from_numpy(self.alpha_of(edge))).numpy()
        return self.cleaned[edge]

    @property
    def rgba(self) -> Image.Image:
        """The cutout as a PIL RGBA image: soft, clean edges, as `carvana cutout` writes NAME.png by default."""
        return self.picture()

    def picture(self, **choices: Any) -> Image.Image:
        """The picture `Picture(**choices)` describes (output, alpha, clean_edges, background, crop) as a PIL image."""
        return Image.fromarray(self.pixels(Picture(**choices)))

    def pixels(self, picture: Picture) -> np.ndarray:
        """The picture as an array: (H, W, 4) rgba, (H, W) mask, (H, W, 3) composite; cropped after cleaning."""
        a = self.alpha_of(picture.alpha)
        rgb = self.clean(picture.alpha) if picture.clean_edges and picture.output != "mask" else self.rgb
        if picture.crop:
            x0, y0, x1, y1 = self.box
            rgb, a = rgb[y0:y1, x0:x1], a[y0:y1, x0:x1]
        if picture.output == "mask":
            return a
        if picture.output == "composite":
            return composite_on(rgb, a, ImageColor.getrgb(picture.background))
        return np.dstack([rgb, a])


def render(cut: Cut, picture: Picture, fast: bool = False) -> bytes:
    """The picture encoded. `fast`: PNG at zlib level 1 (faster, larger: for HTTP answers;
    docs/experiments/2026-12-serve-memory.md); files keep PIL's default level."""
    buf = io.BytesIO()
    options = {"quality": 92} if picture.format != "png" else {"compress_level": 1} if fast else {}
    Image.fromarray(cut.pixels(picture)).save(buf, format=picture.format.upper(), **options)
    return buf.getvalue()


def cut_planes(pred: Prediction, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The planes a `Cut` is made of, on the device: the bool mask and the uint8 soft alpha."""
    return pred.mask(threshold), alpha(pred, threshold)


def cut_photos(cascade: Cascade, photos: list[np.ndarray], threshold: float) -> list[Cut | Failure]:
    """One device step for photos on the host: the cascade's mask and soft alpha of each made on the
    device; only they come back, as bool and uint8, all in one copy awaited once (the step's one host
    sync besides stage 1's for the boxes)."""
    results = cascade.predict([from_host(rgb, cascade.device).permute(2, 0, 1) for rgb in photos], [None] * len(photos))
    done = [r for r in results if isinstance(r, Prediction)]
    planes = iter(to_host_all([plane for r in done for plane in cut_planes(r, threshold)])())
    return [
        r if isinstance(r, Failure) else Cut(rgb, next(planes), next(planes), r.box, r.found)
        for rgb, r in zip(photos, results, strict=True)
    ]
