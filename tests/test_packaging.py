"""What `pip install .` ships: every package of the four layers, so a new sub-package cannot be left
out of a wheel while the tests (run from the source tree) still pass."""

from __future__ import annotations

import configparser

from helpers import ROOT
from setuptools import find_packages

LAYERS = ("common", "stage1_lowres", "stage2_fullres", "pipelines")


def test_every_package_of_the_layers_is_in_the_wheel():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    include = [p.strip() for p in setup["options.packages.find"]["include"].replace("\n", ",").split(",") if p.strip()]
    shipped = set(find_packages(str(ROOT), include=include))
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for layer in LAYERS
        for init in (ROOT / layer).rglob("__init__.py")
    }
    assert on_disk and on_disk <= shipped, f"setup.cfg's include misses {sorted(on_disk - shipped)}"
