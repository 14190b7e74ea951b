"""`carvana run CONFIG`: every step of the cascade, skipping the steps already done.

Each step's fingerprint hashes the settings it reads and the fingerprints of the steps it depends
on. A step whose outputs exist and whose fingerprint is unchanged is skipped; a step recorded as
started but not finished with the same fingerprint was interrupted, and training resumes from its
last checkpoint. State lives in `<output.dir>/pipeline_state.json`, written atomically.

Under torchrun (`torchrun --nproc_per_node=8 -m pipelines run CONFIG`), the training steps run on
every rank (DDP); the other steps and all files belong to rank 0 while the other ranks wait.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from common import distributed
from common.config import Settings, depends, load_config, save_config
from common.errors import ConfigError
from common.io import output_lock, write_text
from common.log import log

DISTRIBUTED_STEPS = {"stage1_train", "stage2_train"}  # the steps every torchrun rank runs (DDP)


def _data_fingerprint(cfg: Settings) -> str:
    """Names and sizes of the data files: cheap even for 100k images, changes when the data does."""
    root = Path(cfg.data.root)
    h = hashlib.sha256()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for f in sorted(folder.iterdir()):
            h.update(f"{folder.name}/{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


def _steps(cfg: Settings) -> list[tuple[str, list[str], Callable[[], dict], Callable[[Settings], int | None], list[Path]]]:
    """(name, upstream steps, settings it reads, action, outputs)."""
    from common.synth import write_sample_data
    from pipelines.evaluate import evaluate
    from stage1_lowres import predict as s1_predict
    from stage1_lowres import train as s1_train
    from stage2_fullres import predict as s2_predict
    from stage2_fullres import train as s2_train

    out = Path(cfg.output.dir)

    def sample(c: Settings):
        log.info(f"generating {c.sample.cars} training and {c.sample.test_cars} test cars into {c.data.root}")
        write_sample_data(c.data.root, c.sample.cars, c.sample.test_cars, c.sample.seed)

    def reads(*outputs: str, files: bool = False) -> Callable[[], dict]:
        """A step's fingerprint: the settings its outputs depend on, as their declarations say."""
        return lambda: {o: depends(cfg, o) for o in outputs} | ({"files": _data_fingerprint(cfg)} if files else {})

    return [
        ("sample_data", [], reads("sample"), sample, [Path(cfg.data.root) / "train"]),
        ("stage1_train", ["sample_data"], reads("stage1.model", files=True), s1_train.main, [out / "stage1" / "best.pt"]),
        ("stage1_predict", ["stage1_train"], reads("boxes", "test_rows"), s1_predict.main,
         [out / "bboxes.csv", out / "stage1_submission.csv.gz"]),
        ("stage2_train", ["stage1_predict"], reads("stage2.model"), s2_train.main, [out / "stage2" / "best.pt"]),
        ("evaluate", ["stage2_train"], reads("masks"), lambda c: evaluate(c) is None, [out / "report" / "metrics.csv"]),
        # with predict.threshold=auto the submission uses the threshold evaluate found best
        ("stage2_predict", ["stage2_train"] + (["evaluate"] if cfg.predict.threshold == "auto" else []),
         reads("masks", "test_rows"), s2_predict.main, [out / "submission.csv.gz"]),
    ]


def run_pipeline(config: str, overrides: list[str], force: list[str] = ()) -> int:
    cfg = load_config(config, overrides)
    with output_lock(cfg.output.dir, f"carvana run {config}"):  # the steps run in this process, under this one lock
        return _run_steps(cfg, force)


def _run_steps(cfg: Settings, force: list[str]) -> int:
    out = Path(cfg.output.dir)
    state_path = out / "pipeline_state.json"
    steps = _steps(cfg)
    names = [s[0] for s in steps]
    unknown = [f for f in force if f not in names + ["report"]]
    if unknown:
        raise ConfigError(f"--force {unknown[0]}: not a step; steps are {', '.join(names + ['report'])}")
    if cfg.sample.cars == 0:  # real data: nothing to generate
        steps = [s for s in steps if s[0] != "sample_data"]
    ranks = distributed.ranks()
    if ranks.on:  # under torchrun: training steps on every rank, the others on rank 0 while the rest wait
        distributed.init(cfg.device)
    state = distributed.from_main(json.loads(state_path.read_text()) if ranks.main and state_path.is_file() else {})
    if ranks.main:
        save_config(cfg, out / "config.yaml")
    fingerprints: dict[str, str] = {}
    forced: set[str] = set(force)
    table, status = [], 0

    def save_state():
        if ranks.main:
            write_text(state_path, json.dumps(state, indent=2))

    for name, upstream, settings, action, outputs in steps:
        if any(u in forced for u in upstream):
            forced.add(name)
        fp = hashlib.sha256(json.dumps([settings(), [fingerprints.get(u, "") for u in upstream]], sort_keys=True, default=str).encode()).hexdigest()[:16]
        fingerprints[name] = fp
        record = state.get(name, {})
        missing = [str(p) for p in outputs if not p.exists()]
        if name == "sample_data" and not missing:
            reason = None  # a data root that has data is never overwritten
        elif name in forced:
            reason = "forced"
        elif record.get("finished") != fp:
            reason = "settings or inputs changed" if record.get("finished") else "not run before"
        elif missing:
            reason = f"output missing: {missing[0]}"
        else:
            reason = None
        reason = distributed.from_main(reason)  # rank 0's view of the outputs decides for every rank
        if reason is None:
            log.info(f"[skip] {name}: outputs present and fingerprint {fp} unchanged")
            table.append({"step": name, "state": "skipped", "seconds": 0.0})
            continue
        resume = record.get("started") == fp and reason != "forced"
        log.info(f"[run]  {name}: {reason}" + (" (resuming an interrupted run)" if resume else ""))
        state[name] = {"started": fp}
        save_state()
        step_cfg = cfg.updated({"stage1.resume": resume, "stage2.resume": resume})
        t0 = time.monotonic()
        code = (action(step_cfg) or 0) if ranks.main or name in DISTRIBUTED_STEPS else 0
        distributed.barrier()
        seconds = time.monotonic() - t0
        status = max(status, code)
        state[name] = {"started": fp, "finished": fp, "seconds": round(seconds, 1)}
        save_state()
        table.append({"step": name, "state": "ran" if code == 0 else f"ran (exit {code})", "seconds": round(seconds, 1)})

    if not ranks.main:
        return status
    from pipelines.report import write_report

    report = write_report(cfg, table)
    table.append({"step": "report", "state": "ran", "seconds": 0.0})
    _print_summary(cfg, table, report)
    return status


def _print_summary(cfg: Settings, table: list[dict], report: Path) -> None:
    out = Path(cfg.output.dir)
    log.info("\nstep             state      seconds")
    for row in table:
        log.info(f"{row['step']:<16} {row['state']:<10} {row['seconds']:>7.1f}")
    summary = out / "report" / "summary.json"
    if summary.is_file():
        scores = json.loads(summary.read_text())
        log.info(f"\nvalidation Dice ({scores['images']} images): stage 1 alone {scores['mean_dice_stage1']:.4f}   "
                 f"cascade {scores['mean_dice_cascade']:.4f}")
    log.info(f"submission: {out / 'submission.csv.gz'}\nreport:     {report}")
