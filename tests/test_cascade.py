"""The streaming `Cascade` predictor: the same masks as the old per-image path (tests/reference.py),
every image accounted for, the GPU-only code paths (nvjpeg bytes, static compiled batches) exercised
on the CPU, and the writer that keeps submission order."""

from __future__ import annotations

import contextlib
import io
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import reference
import torch
from helpers import photos_of, tiny_config
from PIL import Image

from common.data.chunks import Chunk, ChunkStore
from common.errors import DataError, Failure
from common.metrics import dice
from common.model import UNet, load_net
from common.model_source import open_source
from common.prediction.writer import ChunkWriter, Output
from stage1_lowres.box_cache import cached_boxes
from stage1_lowres.coarse import Coarse
from stage2_fullres import predict as s2_predict
from stage2_fullres.cascade import Cascade

CPU = torch.device("cpu")


def _settings(*more):
    """Prediction settings with stage 1 at 32 px, no data or run folder needed."""
    return tiny_config("unused", "unused", "stage1.size=32", *more)


@dataclass(frozen=True)
class Numbered:
    """A chunk row of these tests: an image name and a number."""

    img: str
    n: int = 0

    def record(self) -> dict:
        return {"img": self.img, "n": self.n}


def _nets(run_cfg):
    out = run_cfg.output.dir
    return load_net(f"{out}/stage1/best.pt", CPU)[0], load_net(f"{out}/stage2/best.pt", CPU)[0]


def _agreement(run_cfg, paths, boxes, flip=False):
    """Per-image Dice between the old path's masks and the Cascade's, each of the old path's masks holding
    car and background (two empty masks have Dice 1): (stage 1's, the refine path's on the same stage-1
    probability) lists. Stage 1 sees each photo through another decoding in each path (a JPEG draft decode
    at reduced size, the full decode resized on the device), so its masks differ a little; the refine
    paths, given one probability, differ only by rounding."""
    stage1, refiner = _nets(run_cfg)
    cfg = tiny_config(run_cfg.data.root, run_cfg.output.dir, f"predict.tta_flip={flip}", "predict.workers=0")
    cascade = Cascade(Coarse(stage1, cfg, CPU), refiner, cfg, CPU)
    s1, s2 = [], []
    for i, pred in cascade.run(paths, boxes):
        settings = {"flip": flip, "batch": cfg.predict.batch_size, "tile": cfg.stage2.tile}
        old = reference.old_predict(stage1, None, paths[i], cfg.stage1.size, boxes[i], **settings)
        refined = reference.old_predict(
            stage1,
            refiner,
            paths[i],
            cfg.stage1.size,
            boxes[i],
            min_overlap=cfg.stage2.min_overlap,
            coarse=pred.coarse.numpy(),
            **settings,
        )
        for mask in (old["coarse"] > 0.5, refined["prob"] > 0.5):
            assert 0.01 < mask.mean() < 0.99, (paths[i], mask.mean())
        s1.append(dice(pred.coarse.numpy() > 0.5, old["coarse"] > 0.5))
        s2.append(dice(pred.prob.numpy() > 0.5, refined["prob"] > 0.5))
    return s1, s2


def test_cascade_masks_match_the_old_per_image_path(tiny_run):
    """One decode and a device resize for stage 1, tiles of several images per pass: image by image,
    given the same stage-1 probability, the cascade's masks match the old path's (numpy tiles and
    stitching) to Dice >= 0.9999; stage 1's, from the two decodes of sharp-edged synthetic cars, to 0.97 at
    the tests' 64 px (one pixel there is 30 at full resolution)."""
    boxes = cached_boxes(tiny_run)
    paths = photos_of(tiny_run)[:3]
    s1, s2 = _agreement(tiny_run, paths, [boxes[p.name] for p in paths], flip=True)
    print(f"Dice new vs old path: stage 1 min {min(s1):.5f}, cascade min {min(s2):.5f}")
    assert min(s2) >= 0.9999 and min(s1) >= 0.97


def test_cascade_matches_the_old_path_on_real_photos(tiny_run, real_samples):
    paths = sorted((real_samples / "test_fullres").glob("*.jpg"))[::8]
    box = (60, 300, 1860, 1100)
    s1, s2 = _agreement(tiny_run, paths, [box] * len(paths))
    print(f"real photos, Dice new vs old path: stage 1 min {min(s1):.5f}, cascade min {min(s2):.5f}")
    assert min(s2) >= 0.9999 and min(s1) >= 0.99


@pytest.mark.parametrize(
    "height,width,tile,box", [(90, 150, 64, (5, 10, 140, 85)), (300, 500, 512, (10, 20, 480, 290))]
)
def test_untrained_residual_refiner_reproduces_the_coarse_mask(height, width, tile, box):
    """The refiner's last layer starts at zero and adds its output to the coarse logit, so before any
    training the whole refine path (tiles cut on the device, forward, blended, stitched; 64 px tiles
    overlapping, or one 512 px tile reflect-padded around a smaller image) gives back stage 1's
    probability inside the box and background outside."""
    cfg = _settings(f"stage2.tile={tile}", f"stage2.min_overlap={tile // 4}", "predict.batch_size=3")
    torch.manual_seed(0)
    cascade = Cascade(Coarse(UNet(3, 2, 4).eval(), cfg, CPU), UNet(4, 3, 4, prior_skip=True).eval(), cfg, CPU)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8)
    pred = cascade.predict([image, image], [box, None])  # the second box found by stage 1, in the same batch
    x0, y0, x1, y1 = box
    torch.testing.assert_close(
        pred[0].prob[y0:y1, x0:x1], pred[0].coarse[y0:y1, x0:x1].clamp(1e-4, 1 - 1e-4), atol=1e-5, rtol=0
    )
    outside = torch.ones(height, width, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert pred[0].prob[outside].eq(0).all() and pred[1].prob.shape == (height, width)


def test_every_image_comes_back_in_order_with_errors_named(tmp_path):
    paths = []
    for k in range(7):
        path = tmp_path / f"photo{k}.jpg"
        Image.fromarray(np.full((40 + k, 60, 3), 30 * k, np.uint8)).save(path)
        paths.append(path)
    paths[2].write_bytes(b"")
    paths[5] = tmp_path / "missing.jpg"
    coarse = Coarse(UNet(3, 2, 4).eval(), _settings("predict.batch_size=3", "predict.workers=2"), CPU)
    results = list(coarse.run(paths))
    assert [i for i, _ in results] == list(range(7))
    assert [i for i, result in results if isinstance(result, Failure)] == [2, 5]
    assert results[2][1] == Failure(str(paths[2]), "empty file", "read")
    assert results[5][1].file == str(paths[5]) and "not found" in results[5][1].reason
    assert all(pred.coarse.shape == (40 + i, 60) for i, pred in results if i not in (2, 5))


def test_an_image_too_large_for_the_tile_settings_is_an_error_and_the_batch_goes_on(tmp_path):
    """64 px tiles with a 32 px overlap cut a 1400x1000 photo into 1333 tiles, over the planner's
    limit: that photo's result names it and the settings; the photos beside it are refined."""
    sizes = [(90, 150), (1000, 1400), (70, 120)]
    paths = []
    for k, (h, w) in enumerate(sizes):
        paths.append(tmp_path / f"photo{k}.png")
        Image.fromarray(np.full((h, w, 3), 40 * k, np.uint8)).save(paths[-1])
    cfg = _settings("stage2.tile=64", "stage2.min_overlap=32", "predict.batch_size=3")
    cascade = Cascade(Coarse(UNet(3, 2, 4).eval(), cfg, CPU), UNet(4, 3, 4, prior_skip=True).eval(), cfg, CPU)
    results = dict(cascade.run(paths, [(0, 0, w, h) for h, w in sizes]))
    failure = results[1]
    assert isinstance(failure, Failure) and (failure.file, failure.stage) == (str(paths[1]), "stage2")
    assert "stage2.tile=64 with stage2.min_overlap=32" in failure.reason and "1333 tiles" in failure.reason
    assert [results[k].prob.shape for k in (0, 2)] == [(90, 150), (70, 120)]


def test_jpeg_bytes_path_decodes_on_the_device_and_falls_back(tiny_run, tmp_path, monkeypatch):
    """The nvjpeg path (JPEG bytes read by the workers, decoded in batches on the device) runs here
    with a stand-in decoder: same predictions as the PIL path; a truncated JPEG is decoded by PIL,
    which names the problem; a JPEG the device decoder rejects falls back to PIL."""
    from common.prediction import reader

    calls = []

    def fake_decode(data, device):
        calls.append(len(data))
        out = []
        for d in data:
            im = Image.open(io.BytesIO(d.numpy().tobytes()))
            if im.mode == "L":
                raise RuntimeError("unsupported")  # like nvjpeg on a JPEG it cannot do
            out.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).to(device))
        return out

    paths = photos_of(tiny_run)[:3]
    bad, gray = tmp_path / "bad.jpg", tmp_path / "gray.jpg"
    bad.write_bytes(paths[0].read_bytes()[:5000])
    Image.open(paths[1]).convert("L").save(gray)
    stage1, _ = _nets(tiny_run)
    coarse = Coarse(stage1, tiny_run.updated({"predict.batch_size": 4, "predict.workers": 1}), CPU)
    plain = [pred for _, pred in coarse.run(paths)]
    monkeypatch.setattr(reader, "nvjpeg_decoder", lambda device: fake_decode)
    assert [pred.box for _, pred in coarse.run(paths)] == [
        pred.box for pred in plain
    ] and calls == []  # pil: nvjpeg unused
    coarse.decode = "nvjpeg"
    got = [pred for _, pred in coarse.run([paths[0], gray, paths[1], bad, paths[2]])]
    assert calls == [3, 1, 1, 1, 1]  # the gray JPEG fails the batch of three: one by one; the truncated one never comes
    for a, b in zip(plain, [got[0], got[2], got[4]], strict=True):
        torch.testing.assert_close(a.coarse, b.coarse)
    assert isinstance(got[3], Failure) and got[3].file.endswith("bad.jpg") and "truncated" in got[3].reason
    assert got[1].coarse.shape == (1280, 1918)


def test_static_batches_for_compile_do_not_change_results(tiny_run):
    """With predict.compile, partial batches are padded to one shape; the padding must not leak."""
    stage1, refiner = _nets(tiny_run)
    paths = photos_of(tiny_run)[:1]
    box = [cached_boxes(tiny_run)[paths[0].name]]
    cfg = tiny_config("unused", "unused", "predict.batch_size=3", "predict.tta_flip=true", "predict.workers=0")
    cascade = Cascade(Coarse(stage1, cfg, CPU), refiner, cfg, CPU)
    plain = next(cascade.run(paths, box))[1].prob
    cascade.buckets = cascade.coarse.buckets = (3,)  # the padding path (compile), without a compilation
    torch.testing.assert_close(next(cascade.run(paths, box))[1].prob, plain, atol=1e-5, rtol=0)


def test_stage1_sees_one_batch_shape_under_compile_and_the_padding_does_not_leak(tmp_path):
    """Coarse with a static batch (predict.compile): 5 images at batch 2 reach the net as three
    batches of 2 (4 with the mirrored copies), and the probabilities equal the unpadded ones."""
    shapes = []

    class Recording(UNet):
        def forward(self, x):
            shapes.append(len(x))
            return super().forward(x)

    torch.manual_seed(0)
    net = Recording(3, 2, 4).eval()
    images = [torch.randint(0, 256, (3, 40 + k, 60), dtype=torch.uint8) for k in range(5)]
    plain = Coarse(net, _settings("predict.tta_flip=true"), CPU).probs(images)
    assert shapes == [10]
    shapes.clear()
    # predict.compile sets the static batch; the net itself is compiled by `Coarse.load` only
    static = Coarse(net, _settings("predict.tta_flip=true", "predict.compile=true"), CPU)
    assert static.buckets == (2,) and Coarse(net, _settings("predict.compile=false"), CPU).buckets == ()
    static = static.probs(images)
    assert shapes == [4, 4, 4]
    torch.testing.assert_close(static, plain, atol=1e-6, rtol=0)


def test_stage1_boxes_of_a_batch_reach_the_host_in_one_copy(monkeypatch):
    """Boxes found by stage 1 for a whole batch come from one device-to-host copy of the batch, not one
    per image; a batch whose boxes are all given needs none."""
    from stage1_lowres import coarse as coarse_module

    copies = []
    real = coarse_module.to_host
    monkeypatch.setattr(coarse_module, "to_host", lambda t: copies.append(tuple(t.shape)) or real(t))
    torch.manual_seed(0)
    coarse = Coarse(UNet(3, 2, 4).eval(), _settings(), CPU)
    images = [torch.randint(0, 256, (3, 60, 90), dtype=torch.uint8) for _ in range(4)]
    preds = coarse.predict(images, [None, (1, 2, 30, 40), None, None])
    assert copies == [(4, 32, 32)]
    assert preds[1].box == (1, 2, 30, 40) and all(p.coarse.shape == (60, 90) for p in preds)
    coarse.predict(images, [(0, 0, 90, 60)] * 4)
    assert copies == [(4, 32, 32)]


def test_nvjpeg_is_probed_once_and_a_failing_decoder_falls_back_to_pil_with_one_line(monkeypatch, capsys):
    """On CUDA with predict.decode=nvjpeg the reader tries nvjpeg on a small JPEG once per device;
    where it fails (or torchvision is missing) JPEGs are decoded by PIL in the reader processes and
    one line says so. A decode runs on a stream of its own, the compute stream waits for it on the
    device (never the host), and each image is marked as used by the compute stream. Stand-ins for
    torchvision and the CUDA streams run it here."""
    import sys
    import types

    from common.prediction import reader

    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")

        def synchronize(self):
            events.append(f"host waits for {self.name}")

    compute, current = Stream("compute"), []
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1] if current else compute)

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "stream", on)
    cuda = torch.device("cuda")

    def install(decode_jpeg):
        io_module = types.SimpleNamespace(ImageReadMode=types.SimpleNamespace(RGB="RGB"), decode_jpeg=decode_jpeg)
        monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(io=io_module))
        monkeypatch.setitem(sys.modules, "torchvision.io", io_module)
        reader.nvjpeg_decoder.cache_clear()

    def broken(data, mode, device):
        events.append("decode")
        raise RuntimeError("nvjpeg library not found")

    install(broken)
    assert reader.nvjpeg_decoder(cuda) is None and reader.nvjpeg_decoder(cuda) is None
    out = capsys.readouterr().err  # a warning
    assert out.count("\n") == 1 and "nvjpeg library not found" in out and "PIL in the reader processes" in out
    assert events == ["decode"]  # probed once

    def without_image_ops(data, mode, device):  # a torchvision built without its image extension
        raise AttributeError("'_OpNamespace' 'image' object has no attribute 'decode_jpegs_cuda'")

    install(without_image_ops)
    assert reader.nvjpeg_decoder(cuda) is None
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and "AttributeError" in out and "PIL in the reader processes" in out

    class Image:
        def record_stream(self, stream):
            events.append(f"image used by {stream.name}")

    def decode_jpeg(data, mode, device):
        events.append(f"decode on {torch.cuda.current_stream(device).name}")
        return [Image() for _ in data]

    events.clear()
    install(decode_jpeg)
    decode = reader.nvjpeg_decoder(cuda)
    events.clear()
    decode([torch.zeros(4, dtype=torch.uint8)] * 2, cuda)
    assert events == ["decode on side", "compute waits for side", "image used by compute", "image used by compute"]
    reader.nvjpeg_decoder.cache_clear()


def test_writer_and_store_keep_a_fixed_chunk_grid(tmp_path):
    """Chunk k holds items [k*size, (k+1)*size) whatever was written before; the rows of a chunk
    arrive in order through the writer thread; chunks read back in chunk order."""
    names = [f"{n}.jpg" for n in range(10)]
    store = ChunkStore(tmp_path, "k", ["img", "n"], 4, names)
    assert not store.folder.exists()  # nothing on disk before work
    items = list(zip(names, range(10), strict=True))
    store.write(1, [Numbered(img, n) for img, n in items[4:8]])  # finished first, e.g. by another worker
    todo = store.todo(items)
    assert [chunk.number for chunk in todo] == [0, 2] and todo[1].items == items[8:]
    planned = [item for chunk in todo for item in chunk.items]
    with ChunkWriter(store, todo, lambda output: Numbered(*planned[output.index])) as writer:
        for i in range(len(planned)):
            writer.write(Output(i, Failure(planned[i][0], "unused")))
    assert [len(p) for p in store.parts()] == [4, 4, 2] and store.todo(items) == []
    assert store.frame(["img"])["img"].tolist() == names
    assert (
        ChunkStore(tmp_path, "k", ["img", "n"], 4, names[:9]).folder != store.folder
    )  # another image list: other chunks

    def boom(output):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with ChunkWriter(ChunkStore(tmp_path, "k2", ["img"], 4, names), [Chunk(0, items[:4])], boom) as writer:
            writer.write(Output(0, Failure("0.jpg", "unused")))
            writer.close()


def test_a_failed_row_never_lets_the_rows_after_it_fill_its_chunk(tmp_path):
    """Item 1's row fails while items 2-5 are already queued (item 0's row holds the writer thread until
    they are): no chunk is written from the rows that follow, which would put item 2 in chunk 0 and
    make a resumed run trust it."""
    names = [f"{n}.jpg" for n in range(6)]
    store = ChunkStore(tmp_path, "k", ["img"], 2, names)
    queued = threading.Event()

    def row(output):
        if output.index == 0:
            queued.wait(10)
        if output.index == 1:
            raise OSError("disk full")
        return Numbered(names[output.index])

    with pytest.raises(OSError, match="disk full"):
        with ChunkWriter(store, store.todo(names), row) as writer:
            for i in range(6):
                writer.write(Output(i, Failure(names[i], "unused")))
            queued.set()
    assert store.done() == set()


def test_a_queued_item_keeps_no_full_resolution_map_alive(tmp_path):
    """While items wait for the writer thread, their predictions' full-resolution maps (stage 1's and the
    cascade's probability) are already freed: a queue of them holds only the planes on their way."""
    import gc
    import weakref

    from common.prediction.step import Prediction

    names = ["0.jpg", "1.jpg"]
    store = ChunkStore(tmp_path, "k", ["img"], 2, names)
    release = threading.Event()

    def row(output):
        release.wait(10)
        return Numbered(names[output.index])

    with ChunkWriter(store, store.todo(names), row) as writer:
        maps = []
        for i in range(2):
            coarse, prob = torch.rand(64, 96), torch.rand(64, 96)
            maps += [weakref.ref(coarse), weakref.ref(prob)]
            writer.write(Output(i, Prediction(96, 64, (0, 0, 96, 64), True, coarse, prob), prob > 0.5))
            del coarse, prob
        gc.collect()
        alive = [m() is not None for m in maps]
        release.set()
    assert not any(alive) and store.done() == {0}


def test_stage2_needs_the_stage1_boxes_first(tiny_run, tmp_path):
    cfg = tiny_config(tiny_run.data.root, tmp_path / "fresh")
    with pytest.raises(DataError, match="run `carvana stage1 predict`"):
        s2_predict.main(cfg, open_source(cfg))
