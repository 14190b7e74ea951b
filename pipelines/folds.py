"""`carvana folds STAGE K`: train a stage K times, fold k holding out cars k, k+K, k+2K, ...
(`data.val_cars=k/K`), each in its own run folder `<output.dir>/folds/<k>/<stage>/`. Setting the
stage's checkpoint to the list of the K `best.pt` files then averages their probabilities at
prediction, as the competition's winners did; the prediction caches are keyed on every file.
"""

from __future__ import annotations

from pathlib import Path

from common.config import Settings
from common.data.kaggle import index_split
from common.errors import ConfigError
from common.log import log
from common.model import checkpoint_paths


def train_folds(stage: str, k: int, cfg: Settings) -> int:
    from common.model_source import open_source
    from stage1_lowres import train as s1_train
    from stage2_fullres import train as s2_train

    cars = len({s.car for s in index_split(cfg.data.root, "train", cfg.data.hq)})
    if not 2 <= k <= cars:
        raise ConfigError(f"folds: K={k} must be between 2 and the number of training cars ({cars})")
    out = Path(cfg.output.dir)
    main = s1_train.main if stage == "stage1" else lambda c: s2_train.main(c, open_source(c, strict=False))
    best = []
    for fold in range(1, k + 1):
        changes = {"data.val_cars": f"{fold}/{k}", "output.dir": str(out / "folds" / str(fold))}
        if stage == "stage2":  # the refiner folds share the main run's stage 1: its boxes and its (ensemble of) nets
            changes |= {
                "bboxes.path": cfg.bboxes.path or str(out / "bboxes.csv"),
                "stage1.checkpoint": [str(p) for p in checkpoint_paths(cfg, "stage1")],
            }
        fold_cfg = cfg.updated(changes)
        log.info(f"folds: {stage} fold {fold}/{k} -> {fold_cfg.output.dir}")
        main(fold_cfg)
        best.append(str(Path(fold_cfg.output.dir) / stage / "best.pt"))
    log.info(f"folds: {k} {stage} nets trained; predict with their ensemble:\n  {stage}.checkpoint=[{', '.join(best)}]")
    return 0
