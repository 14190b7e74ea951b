"""The cascade from Python: `load_model` gives a `Model` whose `cutout` cuts one photo out (a path, bytes,
a PIL image or an array), whose `predict` streams many photo files through it in batches, and whose
`rle` gives the Kaggle string of a cut. It is the code `carvana cutout` and `carvana serve` run: the
same model source (common/model_source.py), the same `Cascade`, the same picture (pipelines/picture.py).

    from pipelines import load_model

    model = load_model("outputs/demo/bundle", device="cpu")
    cut = model.cutout("car.jpg")
    cut.rgba.save("car.png")

A `Model` may be shared by threads: its device steps run one at a time (a lock), each with the whole
device; for more photos a second than one device step at a time gives, run `carvana serve`, which
batches the requests of many clients.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from common.config import FIELDS, Settings, load_config
from common.data.images import PHOTO_FORMATS, decode_photo, read_image
from common.data.rle import rle_encode
from common.errors import CarvanaError, ConfigError, Failure, ImageReadError
from common.model import pick_device
from common.model_source import ModelSource, open_source
from common.prediction.step import Result
from common.prediction.writer import OnHostOutput, Output, PredictionWriter
from pipelines.picture import Cut, cut_photos, cut_planes
from stage2_fullres.cascade import Cascade

Photo = str | os.PathLike | bytes | Image.Image | np.ndarray


class CutoutFailed(CarvanaError):
    """A photo the cascade could not cut out (`failure` says where and why, e.g. more tiles than allowed)."""

    def __init__(self, failure: Failure):
        super().__init__(str(failure))
        self.failure = failure


def settings_of(cfg: Settings, options: dict[str, Any]) -> Settings:
    """`cfg` with keyword options set, checked as the settings are: a name is a setting's last part
    (`batch_size` -> predict.batch_size, `device`, `clean_edges` -> cutout.clean_edges), looked up in
    the sections a prediction reads."""
    changes = {}
    for name, value in options.items():
        keys = [k for k in (name, f"predict.{name}", f"cutout.{name}") if k in FIELDS]
        if not keys:
            raise ConfigError(
                f"load_model: no prediction setting named {name!r} (e.g. device, batch_size, tta_flip, workers)"
            )
        changes[keys[0]] = value
    return cfg.updated(changes)


def load_model(
    model: str | os.PathLike | None = None,
    *,
    config: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    **options: Any,
) -> Model:
    """The cascade of a bundle folder (`model`, as `--model`), else of a config's checkpoints (`config`
    and dotted `overrides`, as `--config`), with prediction settings as keywords (`device="cpu"`,
    `batch_size=4`, ...); checked before any net is built (ConfigError, CheckpointError)."""
    cfg = settings_of(load_config(config, list(overrides)), options)
    source = open_source(cfg, model)
    return Model(source.settings(cfg), source)


class Model:
    """A cascade ready to cut photos out; `load_model` makes one. The nets are built on first use."""

    def __init__(self, cfg: Settings, source: ModelSource):
        self.cfg, self.source, self.threshold = cfg, source, source.threshold
        self.lock = threading.Lock()  # one call at a time: the nets and the device's queue are the model's
        self._cascade: Cascade | None = None

    @property
    def cascade(self) -> Cascade:
        """The nets on the device, built on first use (under the lock)."""
        if self._cascade is None:
            self._cascade = Cascade.load(self.source, self.cfg, pick_device(self.cfg.device))
        return self._cascade

    def cutout(self, photo: Photo) -> Cut:
        """One photo's cut-out; ImageReadError for what is not a photo, CutoutFailed for one the cascade cannot cut."""
        rgb = as_rgb(photo, self.cfg.serve.max_pixels)
        with self.lock:
            cut = cut_photos(self.cascade, [rgb], self.threshold)[0]
        if isinstance(cut, Failure):
            raise CutoutFailed(cut.named(_name(photo)))
        return cut

    def predict(self, photos: Iterable[str | os.PathLike]) -> Iterator[tuple[str, Cut | Failure]]:
        """(photo, its Cut or Failure) for each photo file, in order, streamed: read ahead by the reader,
        `predict.batch_size` at a time through the device, the cuts made in a writer thread (a photo that
        cannot be read or cut out is its Failure, and the others go on)."""
        paths = [Path(p) for p in photos]
        with CutQueue(paths) as cuts:
            for output in self.outputs(paths):
                cuts.write(output)
                yield from cuts.ready()
        yield from cuts.ready()

    def outputs(self, photos: list[Path], desc: str = "") -> Iterator[Output]:
        """Each photo's output for a `CutWriter`, in order: its planes on the device, or its failure. Each
        device step runs under the lock: other threads' calls run between steps. `desc`: a progress bar."""
        with self.lock:
            results = self.cascade.run(photos, desc=desc)
        while (output := self._next(results)) is not None:
            yield output

    def _next(self, results: Iterator[tuple[int, Result]]) -> Output | None:
        """The next photo's output, its device work done under the lock."""
        with self.lock:
            i, result = next(results, (None, None))
            if i is None:
                return None
            if isinstance(result, Failure):
                return Output(i, result)
            return Output(i, result, *cut_planes(result, self.threshold))

    def rle(self, cut: Cut) -> str:
        """The Kaggle submission string of the cut's mask (row-major runs, 1-based)."""
        return rle_encode(cut.mask)


class CutWriter(PredictionWriter):
    """Each photo's `Cut` made in the writer thread (the photo decoded again there, on the host,
    rather than copied back from the device) and handed to `on_cut` with a failure in its place."""

    def __init__(self, name: str, photos: list[Path]):
        super().__init__(name)
        self.photos = photos

    def on_cut(self, index: int, photo: Path, result: Cut | Failure) -> None:
        raise NotImplementedError

    def write_on_host(self, output: OnHostOutput) -> None:
        photo, result = self.photos[output.index], output.result
        if not isinstance(result, Failure):
            try:
                result = Cut(read_image(photo), output.mask, output.alpha, result.box, result.found)
            except ImageReadError as e:  # changed on disk since the reader read it
                result = Failure.of(e)
        self.on_cut(output.index, photo, result)


class CutQueue(CutWriter):
    """The cuts in order for a generator to hand out (`ready`); bounded by the writer's own queue."""

    def __init__(self, photos: list[Path]):
        super().__init__("cut-writer", photos)
        self.done: queue.SimpleQueue[tuple[str, Cut | Failure]] = queue.SimpleQueue()

    def on_cut(self, index: int, photo: Path, result: Cut | Failure) -> None:
        self.done.put((str(photo), result))

    def ready(self) -> Iterator[tuple[str, Cut | Failure]]:
        while not self.done.empty():
            yield self.done.get()


def as_rgb(photo: Photo, max_pixels: int) -> np.ndarray:
    """uint8 (H, W, 3) pixels of a photo given as a path, bytes, a PIL image or an array, read as the CLI
    reads files (EXIF orientation applied); ImageReadError naming it otherwise."""
    if isinstance(photo, np.ndarray):
        if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
            raise ImageReadError("array", f"an (H, W, 3) uint8 RGB array is a photo; got {photo.dtype} {photo.shape}")
        return np.array(photo, order="C", copy=not (photo.flags.writeable and photo.flags.c_contiguous))
    if isinstance(photo, Image.Image):
        return np.array(ImageOps.exif_transpose(photo).convert("RGB"))
    if isinstance(photo, bytes):
        return decode_photo(photo, "bytes", PHOTO_FORMATS, max_pixels)
    if isinstance(photo, (str, os.PathLike)):
        return read_image(photo)
    raise ImageReadError(type(photo).__name__, "a photo is a path, bytes, a PIL image or an (H, W, 3) uint8 array")


def _name(photo: Photo) -> str:
    return str(photo) if isinstance(photo, (str, os.PathLike)) else type(photo).__name__
