"""`carvana bundle`: a trained run as a folder that predicts the run's masks byte for byte with
`--model` (cutout, stage2 predict), refuses a bundle of another format, with a changed or missing
file or with weights that do not fit, in one line naming the file, and never unpickles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import copy_run, photos_of

from common.config import load_config, save_config
from pipelines.cli import main as cli


@pytest.fixture(scope="module")
def bundled(evaluated, tmp_path_factory):
    """(the run's config file, the bundle's folder) of a copy of the evaluated tiny run whose mask threshold
    is evaluate's best (predict.threshold: auto), its sweep's best moved to 0.35 (the tiny nets' is 0.5,
    which a bundle would carry without `auto` too)."""
    folder = tmp_path_factory.mktemp("bundled")
    run = copy_run(evaluated[0], folder / "run").updated({"predict.threshold": "auto"})
    sweep_csv = folder / "run" / "report" / "threshold_sweep.csv"
    sweep = pd.read_csv(sweep_csv)
    sweep.loc[sweep.threshold.round(2) == 0.35, "dice_cascade"] = sweep.dice_cascade.max() + 0.001
    sweep.to_csv(sweep_csv, index=False)
    config = folder / "run.yaml"
    save_config(run, config)
    assert cli(["bundle", "--config", str(config), "--out", str(folder / "bundle"), "--onnx"]) == 0
    return config, folder / "bundle"


def _photos(bundle: Path) -> list[Path]:
    """The test photos of the data the bundle's nets were trained on."""
    root = json.loads((bundle / "bundle.json").read_text())["training_data"]["root"]
    return photos_of(load_config(None, [f"data.root={root}"]))


def test_the_bundle_describes_its_nets_data_and_figures(bundled, evaluated):
    """bundle.json and the model card say what the nets are, what they learned, how well (the means of
    evaluate's per-image figures) and the mask threshold the run predicts with (its sweep's best); with
    --onnx the ONNX files sit beside the weights, their sha256 listed (common/onnx_export.py is tested
    against PyTorch in tests/test_onnx.py)."""
    _, bundle = bundled
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["format"] == 1 and manifest["name"] == "carvana"
    assert set(manifest["files"]) == {"stage1.safetensors", "refiner.safetensors", "stage1.onnx", "refiner.onnx"}
    assert manifest["nets"]["refiner"]["args"]["in_channels"] == 4 and manifest["prediction"]["stage2.tile"] == 512
    metrics = pd.read_csv(Path(evaluated[0].output.dir) / "report" / "metrics.csv")
    figures = manifest["validation"]
    assert figures["source"] == "carvana evaluate" and figures["images"] == len(metrics) == 16
    for figure in ("dice_stage1", "dice_cascade", "edge_dice_cascade"):
        assert figures[f"mean_{figure}"] == pytest.approx(metrics[figure].mean(), abs=1e-12), figure
    assert manifest["threshold"] == 0.35  # the sweep's best
    assert manifest["training_data"]["kind"] == "synthetic"
    from safetensors import safe_open

    for spec in manifest["nets"].values():  # what a tool reading only a weight file's header learns of its net
        with safe_open(bundle / spec["file"], framework="pt") as f:
            meta = f.metadata()
        assert (meta["format"], meta["architecture"], json.loads(meta["args"])) == ("pt", "UNet", spec["args"])
    card = (bundle / "README.md").read_text()
    assert "synthetic cars only" in card and "mean_dice_cascade" in card


def test_stage2_predict_and_cutout_with_the_bundle_give_the_runs_bytes(bundled, tmp_path, monkeypatch, capsys):
    config, bundle = bundled
    out = config.parent / "run"
    assert cli(["stage2", "predict", "--config", str(config), "data.limit_test=3"]) == 0
    from_run = (out / "submission.csv.gz").read_bytes()
    (out / "submission.csv.gz").unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a bundle is read without unpickling"))
    assert cli(["stage2", "predict", "--config", str(config), "--model", str(bundle), "data.limit_test=3"]) == 0
    assert (out / "submission.csv.gz").read_bytes() == from_run

    photos = _photos(bundle)[:2]
    monkeypatch.undo()
    assert cli(["cutout", *map(str, photos), "--out", str(tmp_path / "run"), "--config", str(config)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a bundle is read without unpickling"))
    assert (
        cli(["cutout", *map(str, photos), "--out", str(tmp_path / "bundle"), "--model", str(bundle), "device=cpu"]) == 0
    )
    warned = capsys.readouterr().err
    assert warned.count("\n") == 1 and "synthetic cars only" in warned  # one line, and no other
    for photo in photos:
        for name in (f"{photo.stem}_mask.png", f"{photo.stem}.png"):
            assert (tmp_path / "bundle" / name).read_bytes() == (tmp_path / "run" / name).read_bytes()


def _format_2(b: Path) -> Path:
    manifest = json.loads((b / "bundle.json").read_text())
    (b / "bundle.json").write_text(json.dumps(manifest | {"format": 2}))
    return b / "bundle.json"


def _changed(b: Path) -> Path:
    with open(b / "refiner.safetensors", "ab") as f:
        f.write(b"\0")
    return b / "refiner.safetensors"


def _missing(b: Path) -> Path:
    (b / "stage1.safetensors").unlink()
    return b / "stage1.safetensors"


def _misfit(b: Path) -> Path:
    manifest = json.loads((b / "bundle.json").read_text())
    manifest["nets"]["refiner"]["args"]["width"] = 8  # the weights are of a width-4 net
    (b / "bundle.json").write_text(json.dumps(manifest))
    return b / "refiner.safetensors"


def _foreign(b: Path) -> Path:
    manifest = json.loads((b / "bundle.json").read_text())
    manifest["nets"]["stage1"]["architecture"] = "ResNet"
    (b / "bundle.json").write_text(json.dumps(manifest))
    return b / "bundle.json"


def _outside(b: Path) -> Path:
    manifest = json.loads((b / "bundle.json").read_text())
    manifest["files"]["../elsewhere.safetensors"] = manifest["files"].pop("refiner.safetensors")
    (b / "bundle.json").write_text(json.dumps(manifest))
    return b / "bundle.json"


def _relabelled(b: Path) -> Path:
    """The refiner's weights as they are, its header's metadata saying another width (the sha256 made to agree)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    tensors = load_file(b / "refiner.safetensors")
    manifest = json.loads((b / "bundle.json").read_text())
    args = manifest["nets"]["refiner"]["args"] | {"width": 8}
    save_file(tensors, b / "refiner.safetensors", {"format": "pt", "architecture": "UNet", "args": json.dumps(args)})
    manifest["files"]["refiner.safetensors"] = hashlib.sha256((b / "refiner.safetensors").read_bytes()).hexdigest()
    (b / "bundle.json").write_text(json.dumps(manifest))
    return b / "refiner.safetensors"


def _without_coarse_channel(b):
    manifest = json.loads((b / "bundle.json").read_text())
    manifest["prediction"]["stage2.coarse_channel"] = False  # the refiner still takes stage 1's channel
    (b / "bundle.json").write_text(json.dumps(manifest))
    return b / "bundle.json"


@pytest.mark.parametrize(
    "spoil, says",
    [
        (_format_2, "format 2"),
        (_changed, "changed"),
        (_missing, "missing"),
        (_misfit, "do not fit"),
        (_foreign, "UNet nets only"),
        (_outside, "not a file name"),
        (_relabelled, "its header's metadata says args="),
        (_without_coarse_channel, "takes 4 input channels, its settings give it 3"),
    ],
)
def test_a_spoilt_bundle_is_refused_in_one_line_naming_the_file(bundled, tmp_path, spoil, says, capsys):
    _, bundle = bundled
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    culprit = spoil(copy)
    photo = _photos(bundle)[0]
    assert cli(["cutout", str(photo), "--out", str(tmp_path / "out"), "--model", str(copy), "device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(culprit) in err and says in err, err
    assert not (tmp_path / "out" / f"{photo.stem}.png").exists()


def test_onnxruntime_runs_the_bundles_onnx_files_and_checkpoints_are_refused_it(bundled, tmp_path, capsys):
    """predict.backend=onnxruntime with a bundle made with --onnx: the masks of torch's but for a few of
    the car's edge pixels (fp32 in onnxruntime, bf16 or fp32 in torch); with checkpoints: one line, exit 2."""
    import numpy as np
    from PIL import Image

    config, bundle = bundled
    photo = _photos(bundle)[0]
    masks = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        assert (
            cli(
                [
                    "cutout",
                    str(photo),
                    "--out",
                    str(out),
                    "--model",
                    str(bundle),
                    "device=cpu",
                    f"predict.backend={backend}",
                ]
            )
            == 0
        )
        masks[backend] = np.asarray(Image.open(out / f"{photo.stem}_mask.png"))
    car = np.mean(masks["torch"] > 0)
    assert 0.01 < car < 0.99 and np.mean(masks["torch"] != masks["onnxruntime"]) < 0.005 * car  # edge pixels
    capsys.readouterr()
    assert (
        cli(
            [
                "cutout",
                str(photo),
                "--out",
                str(tmp_path / "refused"),
                "--config",
                str(config),
                "predict.backend=onnxruntime",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "carvana bundle --onnx" in err, err


def test_backend_auto_times_a_band_bundles_refiner_at_its_patch_size_and_cuts_out(
    bundled, tmp_path, capsys, monkeypatch
):
    """predict.backend=auto with a bundle made with --onnx for the band: both refiners timed on patches of
    the bundle's size (its ONNX file takes no other), whatever the user's settings say; the backend the
    times pick runs, and cuts a photo out."""
    import common.model_source
    from pipelines import load_model

    config, _ = bundled
    band = tmp_path / "band"
    words = ["stage2.refine=band", "stage2.patch=64", "stage2.context=8"]
    assert cli(["bundle", "--config", str(config), "--out", str(band), "--onnx", *words]) == 0
    assert json.loads((band / "bundle.json").read_text())["prediction"]["stage2.patch"] == 64
    timed = []
    monkeypatch.setattr(common.model_source, "quicker", lambda seconds: timed.append(seconds) or "onnxruntime")
    capsys.readouterr()
    model = load_model(band, device="cpu", backend="auto")  # the user's settings: tiles of 1024
    said = capsys.readouterr().out
    assert "of 64 px takes" in said and "running onnxruntime" in said, said
    assert len(timed) == 1 and set(timed[0]) == {"torch", "onnxruntime"} and min(timed[0].values()) > 0
    assert model.source.backend == "onnxruntime"
    photo = _photos(band)[0]
    cut = model.cutout(photo)
    assert 0 < cut.mask.mean() < 1
