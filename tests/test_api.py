"""The cascade from Python (`pipelines.load_model`): docs/python.md's examples run as written, a notebook
user's work gives the masks of the command line and the server byte for byte, settings are checked,
failures are typed, and one model serves several threads."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, call, photos_of, running
from PIL import Image

from common.config import save_config
from common.errors import ConfigError, Failure, ImageReadError
from pipelines import CutoutFailed, Model, load_model
from pipelines.cli import main as cli

DOCS = ROOT / "docs" / "python.md"


@pytest.fixture(scope="module")
def folder(tiny_run, tmp_path_factory) -> Path:
    """A folder laid out as docs/python.md's examples expect: the tiny run as `outputs/demo` with its
    bundle, its config as `pipelines/demo.yaml`, `car.jpg` and `my_photos/` (three photos and one that
    is no photo)."""
    root = tmp_path_factory.mktemp("notebook")
    for stage in ("stage1", "stage2"):
        shutil.copytree(Path(tiny_run.output.dir) / stage, root / "outputs" / "demo" / stage)
    save_config(tiny_run, root / "pipelines" / "demo.yaml")
    assert (
        cli(
            [
                "bundle",
                "--config",
                str(root / "pipelines" / "demo.yaml"),
                "--out",
                str(root / "outputs" / "demo" / "bundle"),
            ]
        )
        == 0
    )
    photos = photos_of(tiny_run)
    shutil.copy(photos[0], root / "car.jpg")
    (root / "my_photos").mkdir()
    for photo in photos[1:4]:
        shutil.copy(photo, root / "my_photos" / photo.name)
    (root / "my_photos" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def test_every_example_of_docs_python_runs_as_written(folder, monkeypatch):
    """The page's python blocks, in order, in one namespace (a notebook), in a folder laid out as the
    page says; what they write is there afterwards."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    readme = re.findall(r"```python\n(.*?)```", (DOCS.parents[1] / "README.md").read_text(), re.S)
    assert len(blocks) >= 8 and len(readme) == 1
    blocks += readme  # the README's three lines, after the page's (they overwrite car.png the same way)
    monkeypatch.chdir(folder)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), namespace)
    assert {p.name for p in (folder / "cutouts").iterdir()} == {
        p.stem + ".png" for p in (folder / "my_photos").glob("*.jpg")
    } - {"broken.png"}
    assert Image.open(folder / "car.png").mode == "RGBA" and Image.open(folder / "car_on_white.jpg").mode == "RGB"
    rows = (folder / "submission.csv").read_text().splitlines()
    assert rows[0] == "img,rle_mask" and len(rows) == 4


def test_a_notebook_users_work_gives_the_masks_of_the_cli_and_the_server(folder, tmp_path):
    """Load the bundle, cut out two photos from an array and a path, stream the folder through `predict`,
    write the RLE: masks equal `carvana cutout --model`'s files and `/v1/segment`'s RLE, byte for byte."""
    bundle = folder / "outputs" / "demo" / "bundle"
    photos = sorted((folder / "my_photos").glob("*.jpg"))
    good = [p for p in photos if p.name != "broken.jpg"]
    model = load_model(bundle, device="cpu")
    from_array = model.cutout(np.asarray(Image.open(good[0]).convert("RGB")))
    from_path = model.cutout(good[1])
    streamed = dict(model.predict(photos))
    assert isinstance(streamed[str(folder / "my_photos" / "broken.jpg")], Failure)
    np.testing.assert_array_equal(streamed[str(good[0])].mask, from_array.mask)
    np.testing.assert_array_equal(streamed[str(good[1])].alpha, from_path.alpha)

    assert cli(["cutout", *map(str, good), "--out", str(tmp_path / "cli"), "--model", str(bundle), "device=cpu"]) == 0
    for photo in good:
        cut = streamed[str(photo)]
        assert 0 < cut.mask.sum() < cut.mask.size  # a car, not an empty or a full mask
        written = np.asarray(Image.open(tmp_path / "cli" / f"{photo.stem}_mask.png")) > 0
        np.testing.assert_array_equal(written, cut.mask)
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "cli" / f"{photo.stem}.png")), np.asarray(cut.rgba)
        )

    with running(model.cfg.updated({"serve.max_wait_ms": 0}), model.source) as (url, _):
        for photo in good:
            status, _, answer = call(url + "/v1/segment", photo.read_bytes(), "image/jpeg")
            assert status == 200 and json.loads(answer)["rle_mask"] == model.rle(streamed[str(photo)])


def test_settings_given_as_keywords_are_checked_like_a_configs(folder):
    bundle = folder / "outputs" / "demo" / "bundle"
    with pytest.raises(ConfigError, match="predict.batch_size"):
        load_model(bundle, batch_size=0)
    with pytest.raises(ConfigError, match="no prediction setting named 'batchsize'"):
        load_model(bundle, batchsize=4)
    model = load_model(bundle, device="cpu", batch_size=3, tta_flip=False, clean_edges=False)
    assert (model.cfg.predict.batch_size, model.cfg.predict.tta_flip, model.cfg.cutout.clean_edges) == (3, False, False)


def test_what_is_no_photo_or_cannot_be_cut_raises_a_typed_error_naming_it(folder):
    model = load_model(folder / "outputs" / "demo" / "bundle", device="cpu")
    with pytest.raises(ImageReadError, match="not an image"):
        model.cutout(b"not a photo")
    with pytest.raises(ImageReadError, match=r"\(H, W, 3\) uint8"):
        model.cutout(np.zeros((8, 8), np.float32))
    too_many = Model(model.cfg.updated({"stage2.tile": 16, "stage2.min_overlap": 8}), model.source)  # 16 px tiles
    with pytest.raises(CutoutFailed, match="tiles") as refused:
        too_many.cutout(folder / "car.jpg")
    assert refused.value.failure.stage == "stage2" and refused.value.failure.file == str(folder / "car.jpg")


def test_one_model_serves_several_threads_with_one_threads_results(folder):
    """Threads share one model: its device steps never overlap (the refiner counts the callers inside it at
    once, with four threads calling), and each thread gets the masks it gets alone."""
    model = load_model(folder / "outputs" / "demo" / "bundle", device="cpu")
    photos = sorted((folder / "my_photos").glob("*.jpg"))[:2]
    alone = [model.cutout(p).mask for p in photos]
    together: dict[int, np.ndarray] = {}
    count = threading.Lock()
    inside, most = [0], [0]
    refiner = model.cascade.refiner

    def counting_refiner(x):
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return refiner(x)  # a forward pass of the refiner: long enough for an unguarded caller to come in
        finally:
            with count:
                inside[0] -= 1

    model.cascade.refiner = counting_refiner

    def cut(k: int) -> None:
        together[k] = model.cutout(photos[k % 2]).mask

    threads = [threading.Thread(target=cut, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(together) == [0, 1, 2, 3] and most[0] == 1
    for k, mask in together.items():
        np.testing.assert_array_equal(mask, alone[k % 2])


def test_the_bundles_model_card_begins_with_the_metadata_a_model_hub_reads(folder):
    """README.md's front matter parses as YAML; its licence, task and data set are said, and the figures of
    its model-index are bundle.json's own; a bundle of the Kaggle photos carries the competition's terms."""
    import yaml

    from common.bundle import Manifest
    from pipelines.bundle import RULES, front_matter

    bundle = folder / "outputs" / "demo" / "bundle"
    card = (bundle / "README.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert (meta["license"], meta["pipeline_tag"], meta["library_name"]) == (
        "mit",
        "image-segmentation",
        "carvana-cascade",
    )
    assert meta["datasets"] == ["carvana-sample-data"] and manifest["training_data"]["kind"] == "synthetic"
    figures = meta["model-index"][0]["results"][0]["metrics"]
    figures_json = {k: v for k, v in manifest["validation"].items() if isinstance(v, float)}
    assert len(figures) == len(figures_json) >= 2
    assert sorted(f["value"] for f in figures) == sorted(figures_json.values())
    assert "# carvana: a two-stage car-segmentation cascade" in card  # the body follows the metadata
    photos = Manifest.model_validate(manifest | {"training_data": manifest["training_data"] | {"kind": "photos"}})
    kaggle = front_matter(photos)
    assert (kaggle["license"], kaggle["license_link"], kaggle["datasets"]) == (
        "other",
        RULES,
        ["carvana-image-masking-challenge"],
    )


def test_backend_auto_runs_onnxruntime_only_where_it_is_clearly_faster(folder):
    """predict.backend=auto: a bundle without ONNX files, or checkpoints, run PyTorch; with ONNX files the
    measured times decide, and a near tie keeps PyTorch (so timing noise rarely flips a resumed run's
    choice, and with it its chunk key). tests/test_bundle.py times a real bundle's two refiners."""
    from common.bundle import read_bundle
    from common.model_source import open_source, quicker

    bundle = read_bundle(folder / "outputs" / "demo" / "bundle")
    cfg = load_model(bundle.folder, device="cpu").cfg.updated({"predict.backend": "auto"})
    assert open_source(cfg, bundle.folder).backend == "torch"  # made without --onnx
    assert open_source(cfg).__class__.__name__ == "Checkpoints"
    assert quicker({"torch": 1.0, "onnxruntime": 0.5}) == "onnxruntime"
    assert quicker({"torch": 0.5, "onnxruntime": 1.0}) == "torch"
    assert quicker({"torch": 1.0, "onnxruntime": 0.95}) == "torch"
