"""What the device path promises, shown on the CPU with stand-ins where CUDA would be needed: the
device read only where the code says it is (a dispatch mode that records the operations a CUDA
device answers only by a host sync), a lone photo running as its own tiles, the reader's pinned
memory bounded, and a Dask worker's GPU chosen from what the worker can see."""

from __future__ import annotations

import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from common.metrics import dice, dice_counts, sweep_counts, sweep_dice
from common.model import UNet, batch_buckets
from common.prediction.reader import PINNED_PHOTOS, loader_for
from stage1_lowres.coarse import Coarse

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing here runs on it


class DeviceReads(TorchDispatchMode):
    """Records the operations that, on a CUDA tensor, make the host wait for the device: a scalar read
    (`.item()`, `bool(t)`), a result whose size depends on the values (boolean indexing, `nonzero`,
    `bincount`, `unique`, ...), and an index made from host data inside the step (a list index: CUDA copies
    it from pageable memory, which waits for the stream). Not visible on a CPU: copies of finished results
    to the host (`to_host_all` makes them, once per batch: the tests count its calls) and host data given
    to the device without pinned memory (the code routes it through `from_host`)."""

    SIZED = {"nonzero", "masked_select", "bincount", "unique", "_unique2", "unique_consecutive", "repeat_interleave"}
    SCALAR = {"_local_scalar_dense", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.reads: Counter = Counter()
        self.lifted: dict[int, weakref.ref] = {}  # tensors made from host data (lists, arrays) in the mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = [i for i in (args[1] or []) if isinstance(i, torch.Tensor)] if name == "index" else []
        if name in self.SIZED or name in self.SCALAR:
            self.reads[name] += 1
        elif any(i.dtype == torch.bool for i in indices):
            self.reads["index (boolean)"] += 1
        elif any(self.lifted.get(id(i), lambda: None)() is i for i in indices):
            self.reads["index (host data)"] += 1
        out = func(*args, **(kwargs or {}))
        if name == "lift_fresh":
            self.lifted[id(out)] = weakref.ref(out)
        return out


def test_the_stand_in_sees_what_a_cuda_device_answers_only_by_a_sync():
    """The stand-in is no blind counter: each of these reads the device on CUDA, and each is recorded;
    work that stays on the device is not."""
    x, mask = torch.rand(3, 4, 4), torch.rand(3, 4, 4) > 0.5
    for read, kind in (
        (lambda: x[mask], "index (boolean)"),
        (lambda: x[[0, 2]], "index (host data)"),
        (lambda: torch.bincount(mask.flatten().long(), minlength=2), "bincount"),
        (lambda: x.sum().item(), "_local_scalar_dense"),
        (lambda: mask.nonzero(), "nonzero"),
    ):
        with DeviceReads() as seen:
            read()
        assert seen.reads == {kind: 1}
    with DeviceReads() as seen:
        (x * 2).sum(), x[x.argmax(0, keepdim=True).clamp(max=2)], x.masked_fill(mask, 0)
    assert not seen.reads


def test_dice_counts_take_no_device_read_and_match_the_masks():
    g = torch.Generator().manual_seed(0)
    prob, truth = torch.rand(70, 90, generator=g), torch.rand(70, 90, generator=g) > 0.4
    band = torch.rand(70, 90, generator=g) > 0.7
    thresholds = [0.2, 0.5, 0.8]
    with DeviceReads() as seen:
        sweep = sweep_counts(prob, truth, thresholds)
        edge = dice_counts(prob > 0.5, truth, band)
    assert not seen.reads
    assert sweep_dice(sweep) == pytest.approx([dice(prob > t, truth) for t in thresholds], abs=1e-6)
    both, predicted, true = edge.tolist()
    assert (both, predicted, true) == (
        int(((prob > 0.5) & truth)[band].sum()),
        int((prob > 0.5)[band].sum()),
        int(truth[band].sum()),
    )


def test_evaluate_reads_the_device_once_per_batch(tiny_run, tmp_path, monkeypatch):
    """`carvana evaluate` scores each image on the device without reading it, and brings a whole batch's
    masks and counts to the host in one copy."""
    from common.model_source import open_source
    from pipelines import evaluate

    copies, reads = [], Counter()
    real_copy, real_score = evaluate.to_host_all, evaluate._score_image

    def counted_copy(tensors):
        copies.append(len(tensors))
        return real_copy(tensors)

    def watched_score(*args):
        with DeviceReads() as seen:
            scored = real_score(*args)
        reads.update(seen.reads)
        return scored

    monkeypatch.setattr(evaluate, "to_host_all", counted_copy)
    monkeypatch.setattr(evaluate, "_score_image", watched_score)
    cfg = tiny_run.updated({"output.dir": str(tmp_path), "predict.batch_size": 3})
    for stage in ("stage1", "stage2"):
        cfg = cfg.updated({f"{stage}.checkpoint": f"{tiny_run.output.dir}/{stage}/best.pt"})
    cfg = cfg.updated({"bboxes.path": f"{tiny_run.output.dir}/bboxes.csv"})
    result = evaluate.score(cfg, open_source(cfg, strict=False))
    images = len(result.metrics)
    assert images >= 4 and not reads
    # 6 planes an image (two masks, two sweeps, two edge counts), one copy for each batch of 3 images
    assert copies == [18] * (images // 3) + ([6 * (images % 3)] if images % 3 else [])


def test_stage1_finds_the_boxes_of_a_batch_without_indexing_the_device_by_a_list():
    """Boxes to find for some images of a batch: the rows are picked on the host, after the batch's one
    copy (tests/test_cascade.py counts it); a Python list index on the device is a copy from pageable
    memory, which waits for the stream."""
    torch.manual_seed(0)
    coarse = Coarse(UNet(3, 2, 4).eval(), tiny_config("unused", "unused", "stage1.size=32"), CPU)
    images = [torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8) for _ in range(4)]
    given = [None, (1, 2, 30, 40), None, None]
    with DeviceReads() as seen:
        preds = coarse.predict(images, given)
    assert not seen.reads
    alone = [coarse.predict([images[k]], [None])[0].box for k in (0, 2, 3)]
    assert [preds[k].box for k in (0, 2, 3)] == alone and preds[1].box == given[1]


class RecordingNet(UNet):
    """A refiner that records the batch size of every call."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(len(x))
        return super().forward(x)


def test_batch_buckets_pad_only_where_it_pays():
    assert batch_buckets(CPU, False, 8) == ()  # a CPU takes a partial batch as it is
    assert batch_buckets(CUDA, False, 8) == (1, 2, 4, 8)  # eager CUDA: a few shapes, each tuned once
    assert batch_buckets(CUDA, False, 6) == (1, 2, 4, 6)
    assert batch_buckets(CUDA, True, 8) == batch_buckets(CPU, True, 8) == (8,)  # compiled: one shape


@pytest.mark.parametrize("flip", [False, True])
def test_one_photo_on_eager_cuda_runs_its_own_tiles_not_a_full_batch(flip):
    """A lone photo of two tiles, with eager CUDA's buckets at batch 8: the refiner sees 2 tiles (4 with
    flip TTA), not 8 (16); three photos' 6 tiles go in the bucket of 8. The padding never leaks."""
    from stage2_fullres.cascade import Cascade
    from stage2_fullres.tiles import plan_tiles

    cfg = tiny_config(
        "unused",
        "unused",
        "stage1.size=32",
        "predict.batch_size=8",
        f"predict.tta_flip={flip}",
        "stage2.tile=64",
        "stage2.min_overlap=8",
    )
    torch.manual_seed(0)
    refiner = RecordingNet(4, 2, 4, prior_skip=True).eval()
    with torch.no_grad():  # a refiner that is not the identity, so a leaked padding row would show
        refiner.head.weight.normal_(0, 0.1)
    cascade = Cascade(Coarse(UNet(3, 2, 4).eval(), cfg, CPU), refiner, cfg, CPU)
    photos = [torch.randint(0, 256, (3, 64, 120), dtype=torch.uint8) for _ in range(3)]
    box = (0, 0, 120, 64)
    assert len(plan_tiles(120, 64, box, 64, 8)) == 2
    plain = [p.prob for p in cascade.predict(photos, [box] * 3)]
    refiner.calls.clear()
    cascade.buckets = cascade.coarse.buckets = batch_buckets(CUDA, False, 8)
    one = cascade.predict(photos[:1], [box])
    assert refiner.calls == [2 * (1 + flip)]
    three = cascade.predict(photos, [box] * 3)
    assert refiner.calls[1:] == [8 * (1 + flip)]
    torch.testing.assert_close(one[0].prob, plain[0], atol=1e-5, rtol=0)
    for got, want in zip(three, plain, strict=True):
        torch.testing.assert_close(got.prob, want, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # built, never started
@pytest.mark.parametrize("batch", [1, 2, 8, 16, 64, 100])
@pytest.mark.parametrize("workers", [1, 4, 15, 63])
def test_the_readers_pinned_photos_stay_under_the_bound(batch, workers):
    """Reader processes and their read-ahead sized so that the photos decoded ahead of the device (each
    pinned on CUDA) never pass PINNED_PHOTOS, or one batch where a batch alone is larger; at least one
    reader process stays where one was asked for, and a few batches ahead when they fit."""
    paths = [Path(f"{k}.jpg") for k in range(10)]
    loader = loader_for(paths, CUDA, batch, workers, nvjpeg=None)
    ahead = loader.num_workers * loader.prefetch_factor * batch
    assert 1 <= loader.num_workers <= workers and loader.pin_memory
    assert ahead <= max(PINNED_PHOTOS, batch)
    if workers * 2 * batch <= PINNED_PHOTOS:  # where the default read-ahead fits, it is kept
        assert (loader.num_workers, loader.prefetch_factor) == (workers, 2)
    assert not loader_for(paths, CPU, batch, 0, nvjpeg=None).pin_memory  # nothing pinned on a CPU
