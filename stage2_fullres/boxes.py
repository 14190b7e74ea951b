"""Car boxes for stage 2, from the stage-1 cache (`bboxes.path`, else `<output.dir>/bboxes.csv`)."""
from __future__ import annotations

from pathlib import Path

from common.boxes import Box
from common.config import ConfigError
from stage1_lowres import predict as stage1_predict


def stage1_boxes(cfg: dict) -> dict[str, Box]:
    """img -> box; runs `stage1 predict` first when this run has no cache yet."""
    given = cfg["bboxes"]["path"]
    path = Path(given) if given else Path(cfg["output"]["dir"]) / "bboxes.csv"
    if given and not path.is_file():
        raise ConfigError(f"bboxes.path={given} does not exist")
    if not given:
        stage1_predict.main(cfg)  # reuses a valid cache without loading the model
    frame = stage1_predict.load_boxes(path)
    return {r.img: (int(r.x0), int(r.y0), int(r.x1), int(r.y1)) for r in frame.itertuples()}
