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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from common.config import Settings, depends, digest, load_config, save_config
from common.errors import ConfigError
from common.io import output_lock, write_text
from common.log import log
from common.training import distributed


@dataclass(frozen=True)
class Step:
    name: str
    inputs: tuple[str, ...]  # the steps whose outputs it reads: their fingerprints are part of its own
    outputs: tuple[Path, ...]  # what it makes; a missing one reruns it
    reads: Callable[[], dict]  # what its outputs depend on: the settings it reads (and the data files' listing)
    action: Callable[[Settings], int]  # its exit status
    every_rank: bool = False  # under torchrun: run on every rank (DDP training), not on rank 0 alone


def _data_fingerprint(cfg: Settings) -> str:
    """Names and sizes of the data files: cheap even for 100k images, changes when the data does (streamed
    into the hash, not `digest`ed as one JSON list)."""
    root = Path(cfg.data.root)
    h = hashlib.sha256()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        for f in sorted(folder.iterdir()):
            h.update(f"{folder.name}/{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()


def steps(cfg: Settings) -> list[Step]:
    """The pipeline's steps, in order."""
    from common.data.synth import write_sample_data
    from common.model_source import open_source
    from pipelines.bundle import make_bundle
    from pipelines.evaluate import main as evaluate
    from stage1_lowres import predict as s1_predict
    from stage1_lowres import train as s1_train
    from stage2_fullres import predict as s2_predict
    from stage2_fullres import train as s2_train

    out = Path(cfg.output.dir)

    def sample(c: Settings) -> int:
        log.info(f"generating {c.sample.cars} training and {c.sample.test_cars} test cars into {c.data.root}")
        write_sample_data(c.data.root, c.sample.cars, c.sample.test_cars, c.sample.seed)
        return 0

    def bundle(c: Settings) -> int:
        make_bundle(c, open_source(c), out / "bundle")
        return 0

    def sourced(action: Callable[[Settings, Any], int], strict: bool) -> Callable[[Settings], int]:
        """A command run with the run's checkpoints as its model source (`strict`: open_source's)."""
        return lambda c: action(c, open_source(c, strict=strict))

    def reads(*outputs: str, files: bool = False) -> Callable[[], dict]:
        """A step's fingerprint: the settings its outputs depend on, as their declarations say."""
        return lambda: {o: depends(cfg, o) for o in outputs} | ({"files": _data_fingerprint(cfg)} if files else {})

    auto = cfg.predict.threshold == "auto"  # the submission then uses the threshold evaluate found best
    return [
        Step("sample_data", (), (Path(cfg.data.root) / "train",), reads("sample"), sample),
        Step(
            "stage1_train",
            ("sample_data",),
            (out / "stage1" / "best.pt",),
            reads("stage1.model", files=True),
            s1_train.main,
            every_rank=True,
        ),
        Step(
            "stage1_predict",
            ("stage1_train",),
            (out / "bboxes.csv", out / "stage1_submission.csv.gz"),
            reads("boxes", "test_rows"),
            sourced(s1_predict.main, strict=False),
        ),
        Step(
            "stage2_train",
            ("stage1_predict",),
            (out / "stage2" / "best.pt",),
            reads("stage2.model"),
            sourced(s2_train.main, strict=False),
            every_rank=True,
        ),
        Step(
            "evaluate",
            ("stage2_train",),
            (out / "report" / "metrics.csv",),
            reads("masks"),
            sourced(evaluate, strict=False),
        ),
        Step(
            "stage2_predict",
            ("stage2_train", "evaluate") if auto else ("stage2_train",),
            (out / "submission.csv.gz",),
            reads("masks", "test_rows"),
            sourced(s2_predict.main, strict=True),
        ),
        Step(
            "bundle", ("stage2_train", "evaluate"), (out / "bundle" / "bundle.json",), reads("boxes", "masks"), bundle
        ),
    ]


def run_pipeline(config: str, overrides: list[str], force: list[str] = ()) -> int:
    cfg = load_config(config, overrides)
    with output_lock(cfg.output.dir, f"carvana run {config}"):  # the steps run in this process, under this one lock
        return _run_steps(cfg, force)


class State:
    """`pipeline_state.json`: each step's fingerprint when it started and when it finished; rank 0's,
    written atomically after every change."""

    def __init__(self, path: Path, ranks: distributed.Ranks):
        self.path, self.main = path, ranks.main
        self.steps: dict[str, dict] = distributed.from_main(
            json.loads(path.read_text()) if ranks.main and path.is_file() else {}
        )

    def of(self, name: str) -> dict:
        return self.steps.get(name, {})

    def record(self, name: str, **entry) -> None:
        self.steps[name] = entry
        if self.main:
            write_text(self.path, json.dumps(self.steps, indent=2))


def _run_steps(cfg: Settings, force: list[str]) -> int:
    out = Path(cfg.output.dir)
    pipeline = steps(cfg)
    names = [s.name for s in pipeline] + ["report"]
    unknown = [f for f in force if f not in names]
    if unknown:
        raise ConfigError(f"--force {unknown[0]}: not a step; steps are {', '.join(names)}")
    if cfg.sample.cars == 0:  # real data: nothing to generate
        pipeline = [s for s in pipeline if s.name != "sample_data"]
    ranks = distributed.ranks()
    if ranks.on:  # under torchrun: training steps on every rank, the others on rank 0 while the rest wait
        distributed.init(cfg.device)
    state = State(out / "pipeline_state.json", ranks)
    if ranks.main:
        save_config(cfg, out / "config.yaml")
    fingerprints: dict[str, str] = {}
    forced: set[str] = set(force)
    table, status = [], 0
    for step in pipeline:
        if any(u in forced for u in step.inputs):
            forced.add(step.name)
        fp = fingerprints[step.name] = digest([step.reads(), [fingerprints.get(u, "") for u in step.inputs]])
        reason = distributed.from_main(
            _why_run(step, state.of(step.name), fp, step.name in forced)
        )  # rank 0's view decides
        if reason is None:
            log.info(f"[skip] {step.name}: outputs present and fingerprint {fp} unchanged")
            table.append({"step": step.name, "state": "skipped", "seconds": 0.0})
            continue
        resume = state.of(step.name).get("started") == fp and reason != "forced"
        log.info(f"[run]  {step.name}: {reason}" + (" (resuming an interrupted run)" if resume else ""))
        code, seconds = _run_step(
            step, cfg.updated({"stage1.resume": resume, "stage2.resume": resume}), state, fp, ranks
        )
        status = max(status, code)
        table.append({"step": step.name, "state": "ran" if code == 0 else f"ran (exit {code})", "seconds": seconds})
    if not ranks.main:
        return status
    from pipelines.report import write_report

    report = write_report(cfg, table)
    table.append({"step": "report", "state": "ran", "seconds": 0.0})
    _print_summary(cfg, table, report)
    return status


def _run_step(step: Step, cfg: Settings, state: State, fingerprint: str, ranks: distributed.Ranks) -> tuple[int, float]:
    """Run `step`, recorded as started before and finished after: (its exit status, seconds)."""
    state.record(step.name, started=fingerprint)
    t0 = time.monotonic()
    code = step.action(cfg) if ranks.main or step.every_rank else 0
    distributed.barrier()
    seconds = round(time.monotonic() - t0, 1)
    state.record(step.name, started=fingerprint, finished=fingerprint, seconds=seconds)
    return code, seconds


def _why_run(step: Step, record: dict, fingerprint: str, forced: bool) -> str | None:
    """Why `step` runs (None: it is skipped): its record in pipeline_state.json and its outputs against
    `fingerprint`."""
    missing = [str(p) for p in step.outputs if not p.exists()]
    if step.name == "sample_data" and not missing:
        return None  # a data root that has data is never overwritten
    if forced:
        return "forced"
    if record.get("finished") != fingerprint:
        return "settings or inputs changed" if record.get("finished") else "not run before"
    if missing:
        return f"output missing: {missing[0]}"
    return None


def _print_summary(cfg: Settings, table: list[dict], report: Path) -> None:
    out = Path(cfg.output.dir)
    log.info("\nstep             state      seconds")
    for row in table:
        log.info(f"{row['step']:<16} {row['state']:<10} {row['seconds']:>7.1f}")
    from pipelines.evaluate import Summary

    scores = Summary.read(cfg)
    if scores is not None:
        log.info(
            f"\nvalidation Dice ({scores.images} images): stage 1 alone {scores.mean_dice_stage1:.4f}   cascade "
            f"{scores.mean_dice_cascade:.4f}"
        )
    log.info(f"submission: {out / 'submission.csv.gz'}\nreport:     {report}")
