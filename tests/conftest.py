from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import copy_run, tiny_config
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
    """A small synthetic data set shared by the tests, written as a user writes one (`carvana sample-data`):
    3 training cars, 1 test car."""
    from pipelines.cli import main as cli

    out = tmp_path_factory.mktemp("sample")
    assert cli(["sample-data", "--out", str(out), "--cars", "3", "--test-cars", "1", "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def evaluated(tiny_run, tmp_path_factory):
    """`carvana evaluate` once on a copy of the tiny run: (its config, the per-image metrics)."""
    from common.model_source import open_source
    from pipelines.evaluate import evaluate

    cfg = copy_run(tiny_run, tmp_path_factory.mktemp("evaluated") / "run")
    return cfg, evaluate(cfg, open_source(cfg, strict=False))


@pytest.fixture(scope="session")
def tiny_run(sample_root, tmp_path_factory):
    """Both stages trained for a moment on the shared sample data (stage 1 enough to outline the cars),
    plus the stage-1 cache."""
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
