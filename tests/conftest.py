from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI, `make test`): derandomized, no example
# database. HYPOTHESIS_PROFILE=explore draws new examples every run and keeps failures in .hypothesis/.
settings.register_profile("repeatable", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "carvana_samples"


@pytest.fixture(scope="session")
def real_samples() -> Path:
    if not (REAL / "train_512" / "train").is_dir():
        pytest.skip(f"real Carvana samples not found at {REAL} (they live beside the project, never in it)")
    return REAL


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A small synthetic data set shared by the tests: 3 training cars, 1 test car."""
    from common.data.synth import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("sample"), cars=3, test_cars=1, seed=1, jobs=2)


TINY = [
    "data.val_cars=1",
    "stage1.size=64",
    "stage1.epochs=2",
    "stage1.depth=3",
    "stage1.width=4",
    "stage1.batch_size=8",
    "stage1.workers=1",
    "stage2.epochs=1",
    "stage2.depth=3",
    "stage2.width=4",
    "stage2.crop=128",
    "stage2.batch_size=4",
    "stage2.val_images=1",
    "stage2.workers=0",
    "predict.batch_size=2",
    "device=cpu",
    "stage2.tile=512",
    "stage2.min_overlap=32",
]  # 512 tiles hug a ~700 px tall box: half the CPU time of 1024


def tiny_config(root, out, *more):
    from common.config import load_config

    return load_config(None, [f"data.root={root}", f"output.dir={out}", *TINY, *more])


def copy_run(cfg: dict, out: Path) -> dict:
    """A copy of a run folder and its config pointing at the copy: a test that writes into a run
    works on its own copy, never on a fixture other tests read."""
    import shutil

    shutil.copytree(cfg.output.dir, out)
    return cfg.updated({"output.dir": str(out)})


@pytest.fixture(scope="session")
def evaluated(tiny_run, tmp_path_factory):
    """`carvana evaluate` once on a copy of the tiny run: (its config, the per-image metrics)."""
    from common.model_source import open_source
    from pipelines.evaluate import evaluate

    cfg = copy_run(tiny_run, tmp_path_factory.mktemp("evaluated") / "run")
    return cfg, evaluate(cfg, open_source(cfg, strict=False))


@pytest.fixture(scope="session")
def tiny_run(sample_root, tmp_path_factory):
    """Both stages trained for a moment on the shared sample data, plus the stage-1 cache."""
    from common.model_source import open_source
    from stage1_lowres import predict as s1_predict
    from stage1_lowres import train as s1_train
    from stage2_fullres import train as s2_train

    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(sample_root, out)
    s1_train.main(cfg)
    assert s1_predict.main(cfg, open_source(cfg, strict=False)) == 0
    s2_train.main(cfg, open_source(cfg, strict=False))
    return cfg
