from __future__ import annotations

from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "carvana_samples"


@pytest.fixture(scope="session")
def real_samples() -> Path:
    if not (REAL / "train_512" / "train").is_dir():
        pytest.skip(f"real Carvana samples not found at {REAL} (they live beside the project, never in it)")
    return REAL


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """A small synthetic data set shared by the tests: 3 training cars, 1 test car."""
    from common.synth import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("sample"), cars=3, test_cars=1, seed=1, jobs=2)
