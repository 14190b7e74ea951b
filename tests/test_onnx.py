"""ONNX export (common/onnx_export.py): both nets of the tiny trained cascade, exported once with a
free batch axis, give PyTorch's fp32 probabilities and masks in onnxruntime on real photos, and stand in
for the PyTorch nets in the cascade."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.data.images import read_image
from common.model import load_net, prepare
from common.onnx_export import OnnxNet, export
from stage1_lowres.coarse import Coarse, to_stage1_input, upsample
from stage2_fullres.cascade import Cascade
from stage2_fullres.tiles import cut_tiles, plan_tiles

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the onnx extra: pip install '.[onnx]')")

CPU = torch.device("cpu")
BOX = (60, 300, 1860, 1100)  # a wide car box on the 1918x1280 photos


@torch.no_grad()
def _assert_agree(net: torch.nn.Module, onnx_net: OnnxNet, x: torch.Tensor) -> None:
    """Probabilities within 1e-3 and masks (> 0.5) equal on at least 99.99% of the pixels."""
    want, got = torch.sigmoid(net(x)), torch.sigmoid(onnx_net(x))
    assert got.shape == want.shape == (len(x), 1, *x.shape[-2:])
    assert 0.01 < (want > 0.5).double().mean() < 0.99  # masks with an outline to agree on
    worst, same = (got - want).abs().max().item(), ((got > 0.5) == (want > 0.5)).double().mean().item()
    print(f"batch {len(x)}: max |p_onnx - p_torch| {worst:.2e}, masks agree on {same:.6%}")
    assert worst <= 1e-3 and same >= 0.9999


def test_exported_nets_match_pytorch_on_real_photos(tiny_run, real_samples, tmp_path):
    """Stage 1 on whole photos and the refiner on tiles of their car boxes with the coarse channel, at
    batch sizes 1 and 3 from one file each; the refiner as prediction holds it (channels_last weights)."""
    out, size, tile = Path(tiny_run.output.dir), tiny_run.stage1.size, tiny_run.stage2.tile
    stage1 = load_net(out / "stage1" / "best.pt", CPU)[0]
    refiner = prepare(load_net(out / "stage2" / "best.pt", CPU)[0], CPU)
    channels = refiner.args["in_channels"]
    export(stage1, 3, size, tmp_path / "stage1.onnx")
    export(refiner, channels, tile, tmp_path / "refiner.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refiner.onnx", "stage1.onnx"]  # no temporary file left
    onnx_stage1, onnx_refiner = OnnxNet(tmp_path / "stage1.onnx"), OnnxNet(tmp_path / "refiner.onnx")
    assert [(i.name, i.shape) for i in onnx_refiner.session.get_inputs()] == [("x", ["batch", channels, tile, tile])]
    assert [o.name for o in onnx_refiner.session.get_outputs()] == ["logits"]

    photos = [
        torch.from_numpy(read_image(p)).permute(2, 0, 1)
        for p in sorted((real_samples / "test_fullres").glob("*.jpg"))[::11]
    ]
    x = to_stage1_input(photos, size)
    with torch.no_grad():
        small = torch.sigmoid(stage1(x))[:, 0]
    windows = plan_tiles(1918, 1280, BOX, tile, tiny_run.stage2.min_overlap)[
        ::3
    ]  # a different part of each photo's car
    tiles = torch.cat(
        [
            torch.cat([cut_tiles(im, [w]).float() / 255, upsample(p, 1918, 1280, w)[None, None]], 1)
            for im, p, w in zip(photos, small, windows, strict=True)
        ]
    )
    for n in (1, 3):
        _assert_agree(stage1, onnx_stage1, x[:n])
        _assert_agree(refiner, onnx_refiner, tiles[:n, :channels])

    # OnnxNet stands in for the nets in the predictors (channels_last inputs, flip TTA doubling the batch);
    # the PyTorch cascade runs in prediction's precision (bf16 on CPUs that have it). A box of two tiles: fast
    flip, box = tiny_run.updated({"predict.tta_flip": True}), (400, 400, 1300, 900)
    masks = [
        Cascade(Coarse(s1, flip, CPU), s2, flip, CPU).predict(photos[:1], [box])[0].mask(0.5)
        for s1, s2 in ((stage1, refiner), (onnx_stage1, onnx_refiner))
    ]
    same = (masks[0] == masks[1]).double().mean().item()
    print(f"Cascade with onnxruntime nets: masks agree with PyTorch's on {same:.6%}")
    assert 0.01 < masks[0].double().mean() < 0.99  # a car's outline to agree on, not an empty or a full mask
    assert same >= 0.999
