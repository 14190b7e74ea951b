"""What a user runs: the `carvana` command line, the pipeline runner, and the cascade from Python.

    from pipelines import load_model
    model = load_model("outputs/demo/bundle")  # a bundle folder, or load_model(config="pipelines/demo.yaml")
    cut = model.cutout("car.jpg")               # a path, bytes, a PIL image or an (H, W, 3) uint8 array
    cut.rgba.save("car.png")

docs/python.md says more. The names are imported on first use, so the command line starts without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time `__getattr__` imports them
    from common.errors import Failure
    from pipelines.api import CutoutFailed, Model, load_model
    from pipelines.picture import Cut, Picture

__all__ = ["Cut", "CutoutFailed", "Failure", "Model", "Picture", "load_model"]
_MODULES = {"load_model": "pipelines.api", "Model": "pipelines.api", "CutoutFailed": "pipelines.api"}
_MODULES |= {"Cut": "pipelines.picture", "Picture": "pipelines.picture", "Failure": "common.errors"}


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_MODULES[name]), name)
