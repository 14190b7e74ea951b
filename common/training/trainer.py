"""The one training loop both stages use: `train` over `train_one_epoch`, `validate_epoch` and
`save_epoch`, in the shape of torchvision's references/segmentation.

Checkpoints (`last.pt` every epoch, `best.pt` on the best validation Dice) hold the weights, the
optimiser and scaler state, the epoch, the history and the resolved config; the data order and
augmentations are seeded by (seed, epoch, rank), so `resume` continues exactly where a stopped run
ended. `max_minutes` bounds wall-clock time per invocation, validation included; with
`epochs: auto` the epoch count is fixed from the second epoch's pace so the schedule fits the budget.

On the device: channels_last (tensor-core convolutions without transposes), cudnn benchmark,
bf16 autocast where the card has it (fp16 + GradScaler otherwise; on the CPU bf16 where it is native and
at least 10% faster than fp32 for this net, timed once per run), optional
torch.compile. Under torchrun: DDP (gradients averaged over ranks in backward), optional
SyncBatchNorm, rank 0 validates and writes, and its time-budget decision is shared.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from common.config import Settings, Stage2, Training, save_config
from common.errors import ConfigError, DataError, Failure, TrainingError
from common.io import save_figure, save_torch, write_csv
from common.log import log
from common.metrics import dice_counts, dice_of
from common.model import DTYPES, amp_dtype, autocast, load_checkpoint, precision_name
from common.training import distributed
from common.training.augment import augment_batch
from common.training.batches import TrainingPairs, report_skipped
from common.training.distributed import Ranks
from common.training.losses import bce_dice_loss


@dataclass(frozen=True)
class Scores:
    """Validation of one epoch: the mean loss and the mean per-image Dice (NaN: not scored)."""

    loss: float
    dice: float


Validate = Callable[[nn.Module], Scores]
Predicted = Iterator[
    tuple[int, "torch.Tensor | Failure"]
]  # index, float32 (H, W) probability on the device, or why not


class Batches(Protocol):  # common/training/batches.py
    def __len__(self) -> int: ...
    def epoch(self, e: int): ...


def step_seconds(model: nn.Module, s: Training, dtypes: tuple[torch.dtype | None, ...], rounds: int = 3) -> dict:
    """Seconds of one forward + backward of a copy of `model` on a random batch of the training
    shape, on the CPU, per autocast type: the best of `rounds` after a warm-up round, the types
    interleaved so that a passing load (a finishing reader process) slows them alike. The weights,
    the global RNG and the data stay untouched."""
    side = s.crop if isinstance(s, Stage2) else s.size  # stage 2 trains on crops, stage 1 on whole squashed images
    x = torch.rand(s.batch_size, model.args["in_channels"], side, side, generator=torch.Generator().manual_seed(0))
    x, y = x.contiguous(memory_format=torch.channels_last), (x[:, :1] > 0.5).float()
    probe, times = copy.deepcopy(model).train(), {d: [] for d in dtypes}
    for _ in range(rounds + 1):
        for dtype in dtypes:
            t = time.perf_counter()
            with autocast(torch.device("cpu"), dtype):
                bce_dice_loss(probe(x), y).backward()
            times[dtype].append(time.perf_counter() - t)
    return {d: min(t[1:]) for d, t in times.items()}


def faster_cpu_dtype(model: nn.Module, s: Training, history: list[dict], ranks: Ranks) -> torch.dtype | None:
    """precision=auto on a CPU with native bf16: bf16 where it trains this net at least 10% faster
    here, else fp32.
    The CPU flag does not predict it (docs/experiments/2026-11-precision-on-cpus.md). Rank 0 times it;
    history.csv records the pick, so a resumed run keeps it."""
    if history and history[-1].get("precision") in ("bf16", "fp32"):
        return DTYPES[history[-1]["precision"]]
    seconds = step_seconds(model, s, (torch.bfloat16, None)) if ranks.main else {}
    # bf16 only when clearly faster: fp32 is the safer choice, and a tie would make reruns pick at random
    name = distributed.from_main(
        ("bf16" if seconds[torch.bfloat16] < 0.9 * seconds[None] else "fp32") if ranks.main else None
    )
    if ranks.main:  # the other ranks have no timings to show
        log.info(
            f"precision=auto: a training step takes {seconds[torch.bfloat16] * 1000:.0f} ms in bf16 and "
            f"{seconds[None] * 1000:.0f} ms in fp32 on this CPU; training in {name}"
        )
    return DTYPES[name]


def training_dtype(
    model: nn.Module, s: Training, history: list[dict], device: torch.device, ranks: Ranks
) -> torch.dtype | None:
    """The autocast type training runs in: `amp_dtype`, and with precision=auto on a CPU with native
    bf16 the faster of bf16 and fp32 for this net (`faster_cpu_dtype`)."""
    dtype = amp_dtype(s.precision, device)
    if dtype == torch.bfloat16 and device.type == "cpu" and s.precision == "auto":
        return faster_cpu_dtype(model, s, history, ranks)
    return dtype


def _lr_factor(schedule: str, epoch: int, epochs: int | None, step_every: int) -> float:
    """Per epoch, never per second: a run is reproducible whatever the machine's speed. `epochs` None:
    the count is not fixed yet (epochs=auto, epochs 1 and 2), and cosine holds its peak, so two runs that
    fix the same count train alike whatever epoch 1's provisional plan was."""
    if schedule == "cosine":
        return 1.0 if epochs is None else 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "step":
        return 0.1 ** (epoch // max(step_every, 1))
    return 1.0  # constant (the config allows nothing else)


def build_optimizer(model: nn.Module, s: Training) -> torch.optim.Optimizer:
    """The stage's optimizer from its settings (the trainer's, and the benchmarks' ceiling runs)."""
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=s.lr, betas=(0.9, s.beta2), weight_decay=s.weight_decay)  # adam


class Clock:
    """The wall-clock budget of one invocation; rank 0's clock decides for every rank (`step_agreement`).
    `now` is the time source (seconds), injectable so that tests set the time instead of racing it."""

    def __init__(self, minutes: float, now: Callable[[], float] = time.monotonic):
        self.now, self.budget, self.val_seconds = now, minutes * 60 or math.inf, 0.0
        self.started = now()

    def elapsed(self) -> float:
        return self.now() - self.started

    def late(self) -> bool:
        """Would another step plus the next validation overrun? This process's clock, no device work."""
        return self.elapsed() + self.val_seconds > self.budget


def planned_epochs(clock: Clock, done: int, last_seconds: float) -> int:
    """epochs=auto: the `done` epochs plus as many as the rest of the budget holds at the pace of
    the last one (less 3% for plots and checkpoint writes), so the learning-rate schedule runs to
    its end instead of being cut off. Planned after epoch 1 (whose time includes set-up and
    warm-up) and fixed after epoch 2, at the steady pace. Rank 0's count, recorded in history.csv
    and the checkpoints: a resumed run keeps it."""
    left = 0.97 * clock.budget - clock.elapsed()
    count = done + max(int(left / max(last_seconds, 1e-9)), 0)
    return int(distributed.from_main(count))


@dataclass
class Loop:
    """What every epoch of one training invocation shares."""

    net: nn.Module  # what steps: the model, wrapped in DDP and compiled where asked
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    settings: Training
    device: torch.device
    dtype: torch.dtype | None  # the autocast type; None: fp32
    clock: Clock
    ranks: Ranks = Ranks()
    seed: int = 0


@dataclass(frozen=True)
class EpochStats:
    train_loss: float  # mean over the finite steps of every rank
    images: int
    skipped: int  # optimizer steps skipped for a non-finite loss
    data_seconds: float  # waiting for batches
    step_seconds: float
    out_of_time: bool


def train_one_epoch(loop: Loop, data: Batches, epoch: int) -> EpochStats:
    """One pass over this rank's shard. A step whose loss is not finite on any rank is skipped on all.

    One host sync per optimizer step: the losses' finiteness, rank 0's clock and the running sums
    travel in one collective and one read (`distributed.step_agreement`); everything else stays queued."""
    net, opt, scaler, s, device, ranks = loop.net, loop.opt, loop.scaler, loop.settings, loop.device, loop.ranks
    net.train()
    aug_gen = torch.Generator().manual_seed(
        loop.seed * 1_000_003 + epoch * 1009 + ranks.rank
    )  # resume needs no saved state
    accum = s.accum
    total, seen = (
        torch.zeros((), device=device),
        torch.zeros((), device=device),
    )  # over finite steps, summed on the device
    window_finite = torch.ones(
        (), dtype=torch.bool, device=device
    )  # every micro-step of this optimizer step was finite
    skipped, bad_run, out_of_time, shown = 0, 0, False, (0.0, 0.0)
    data_s, step_s, t0, t = 0.0, 0.0, time.monotonic(), time.monotonic()
    bar = tqdm(
        total=len(data),
        desc=f"epoch {epoch + 1}/{s.epochs}",
        leave=False,
        mininterval=1.0,  # "auto" in epoch 1
        disable=None if ranks.main else True,
    )
    opt.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(data.epoch(epoch)):
        t_data = time.monotonic()
        data_s += t_data - t
        if s.augment != "none":
            x, y = augment_batch(x, y, aug_gen, s.augment)
        x = x.contiguous(memory_format=torch.channels_last)
        boundary = (i + 1) % accum == 0 or i + 1 == len(data)
        sync = (
            net.no_sync() if ranks.on and not boundary else contextlib.nullcontext()
        )  # DDP: average gradients once per optimizer step
        with sync:
            with autocast(device, loop.dtype):
                loss = bce_dice_loss(net(x), y, s.edge_weight)
            scaler.scale(loss / accum).backward()
        finite = torch.isfinite(loss.detach())  # stays on the device until the step's one sync
        window_finite &= finite
        total += torch.where(finite, loss.detach(), 0.0) * len(x)
        seen += finite * len(x)
        if boundary:
            ok, late, shown = distributed.step_agreement(
                window_finite, loop.clock.late(), total, seen
            )  # the step's sync point
            bad_run, skipped = (
                optimizer_step(opt, scaler, ok, bad_run, s.max_bad_steps, f"epoch {epoch + 1}, step {i + 1}"),
                skipped + (not ok),
            )
            window_finite.fill_(True)
            out_of_time = late
        t = time.monotonic()
        step_s += t - t_data
        bar.update()
        if i % 20 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{shown[0] / max(shown[1], 1):.4f}", img_s=f"{shown[1] / (t - t0):.1f}")
        if out_of_time:
            break
    bar.close()
    sums = distributed.total(torch.stack([total, seen]))
    mean, images = torch.stack([sums[0] / sums[1].clamp(min=1), sums[1]]).tolist()  # one read for both
    return EpochStats(mean, int(images), skipped, data_s, step_s, out_of_time)


def optimizer_step(
    opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ok: bool, bad_run: int, max_bad: int, where: str
) -> int:
    """Step when every rank's losses were finite, else skip; returns the run of skipped steps, and
    stops training when it reaches `max_bad` (best.pt keeps the last good model)."""
    if ok:
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return 0
    opt.zero_grad(set_to_none=True)
    if bad_run + 1 >= max_bad:
        raise TrainingError(
            f"{bad_run + 1} optimizer steps in a row had a non-finite loss ({where}); lower lr (now "
            f"{opt.param_groups[0]['lr']:.2e}) or set precision=fp32; best.pt still holds the last good model"
        )
    return bad_run + 1


NOT_SCORED = Scores(math.nan, math.nan)  # never best.pt


def validate_epoch(model: nn.Module, validate: Validate, ranks: Ranks) -> Scores:
    """Validation on rank 0 (the other ranks wait at the next collective); eval mode, no grad."""
    model.eval()
    if not ranks.main:
        return NOT_SCORED
    with torch.no_grad():
        return validate(model)


def validator(predict: Callable[[nn.Module], Predicted], truths: list[torch.Tensor], threshold: float) -> Validate:
    """Both stages' validation: `predict(model)` streams the validation images through the stage's own
    predictor (stage 1's `Coarse`, stage 2's `Cascade`), so the score is of what prediction makes; the
    loss on each probability and the mean per-image Dice of `prob > threshold` against the (H, W) truth."""

    def validate(model: nn.Module) -> Scores:
        counts, losses = [], []
        for i, prob in predict(model):
            if isinstance(prob, Failure):
                raise DataError(f"validation stopped, a validation image failed ({prob.stage}): {prob}")
            if prob.device.type == "cuda" and not truths[i].is_pinned():  # needs CUDA: not testable on the CPU
                truths[i] = truths[i].pin_memory()  # once: the copies of the later epochs are async
            truth = truths[i].to(prob.device, non_blocking=True)
            counts.append(dice_counts(prob > threshold, truth))
            logit = torch.logit(prob.clamp(1e-6, 1 - 1e-6))[None, None]
            losses.append(bce_dice_loss(logit, truth.float()[None, None]))
        if not counts:  # no images: no score, and never best.pt
            return NOT_SCORED
        losses = torch.stack(losses).tolist()  # the validation's one read of the device (with the next line's)
        scores = [dice_of(*c) for c in torch.stack(counts).tolist()]
        return Scores(sum(losses) / len(losses), sum(scores) / len(scores))

    return validate


def save_epoch(
    run_dir: Path, model: nn.Module, opt, scaler, history: list[dict], best: float, config: Settings
) -> float:
    """last.pt always; best.pt when this epoch's Dice is finite and the best so far (a NaN never
    becomes best.pt); history.csv and the plot. Returns the new best."""
    row = history[-1]
    state = {
        "model": model.state_dict(),
        "model_args": model.args,
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": row["epoch"],
        "best_dice": best,
        "history": history,
        "config": config.model_dump(),
    }
    finite = math.isfinite(row["val_dice"]) and math.isfinite(row["val_loss"])
    if finite and row["val_dice"] > best and all(torch.isfinite(p).all() for p in model.parameters()):
        best = state["best_dice"] = row["val_dice"]
        save_torch(run_dir / "best.pt", state)
    save_torch(run_dir / "last.pt", state)
    write_csv(run_dir / "history.csv", pd.DataFrame(history))
    plot_history(run_dir)
    return best


@dataclass(frozen=True)
class Run:
    """Where and how one training invocation runs: the stage's settings, its folder (checkpoints,
    history), the whole resolved config (its seed; recorded in the checkpoints), the device and the ranks."""

    settings: Training
    folder: Path
    config: Settings
    device: torch.device
    ranks: Ranks = Ranks()

    @classmethod
    def of(cls, cfg: Settings, stage: str, device: torch.device, ranks: Ranks) -> Run:
        """The run of `stage` (stage1 | stage2) in `<output.dir>/<stage>/`."""
        return cls(getattr(cfg, stage), Path(cfg.output.dir) / stage, cfg, device, ranks)


def fit(run: Run, model: nn.Module, data: Batches, validate: Validate, pairs: TrainingPairs, about: str) -> list[dict]:
    """What both stages' `train` commands do around the loop: the resolved settings beside the
    checkpoints, one line on the data, the loop, the skipped pairs and the best Dice."""
    ranks = run.ranks
    if ranks.main:
        save_config(run.config, run.folder / "config.yaml")
    log.info(f"{run.folder.name}: {about}, on {run.device}" + (f", {ranks.world} ranks" if ranks.on else ""))
    history = train(run, model, data, validate)
    if ranks.main:
        report_skipped(run.folder, pairs.skipped)
    best = max((h["val_dice"] for h in history), default=float("nan"))
    log.info(f"{run.folder.name} done: best val Dice {best:.4f}; checkpoints in {run.folder}")
    return history


def train(run: Run, model: nn.Module, data: Batches, validate: Validate) -> list[dict]:
    """Train `model` on `data` per the run's stage settings; returns the history, one row an epoch."""
    s, run_dir, seed, config, device, ranks = (
        run.settings,
        run.folder,
        run.config.seed,
        run.config,
        run.device,
        run.ranks,
    )
    clock = Clock(s.max_minutes)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: the fastest kernels are picked once
    model.to(device).to(memory_format=torch.channels_last)
    opt = build_optimizer(model, s)
    scaler = torch.amp.GradScaler(
        "cuda", enabled=amp_dtype(s.precision, device) == torch.float16
    )  # bf16, fp32: no loss scaling
    epoch, best, history = _resume(run_dir / "last.pt", model, opt, scaler, device) if s.resume else (0, -1.0, [])
    dtype = training_dtype(model, s, history, device, ranks)
    precision = precision_name(dtype)  # recorded per epoch
    net = _parallel(model, s, ranks, device)  # after the resume: DDP starts every rank from rank 0's weights
    if s.compile:
        net = torch.compile(net)  # the first steps pay for the compilation
    loop = Loop(net, opt, scaler, s, device, dtype, clock, ranks, seed)
    auto = s.epochs == "auto"
    epochs = history[-1]["planned_epochs"] if auto and history else None if auto else s.epochs
    while epochs is None or epoch < epochs:
        fixed = None if auto and epoch < 2 else epochs  # epochs=auto: epoch 1's plan is provisional, not scheduled on
        lr = s.lr * _lr_factor(s.schedule, epoch, fixed, s.step_every)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = clock.now()
        stats = train_one_epoch(loop, data, epoch)
        v0 = clock.now()
        val = validate_epoch(model, validate, ranks)
        clock.val_seconds = clock.now() - v0
        epoch += 1
        if auto and epoch <= 2 and len(history) < 2:  # plan after epoch 1, fix after epoch 2
            epochs = planned_epochs(clock, epoch, clock.elapsed() if epoch == 1 else clock.now() - t0)
            log.info(
                f"epochs=auto: {clock.elapsed():.0f} s of the {s.max_minutes} min budget spent after epoch {epoch}, so "
                f"the {s.schedule} schedule runs over {epochs} epochs"
            )
        history.append(
            {
                "epoch": epoch,
                "train_loss": stats.train_loss,
                "val_loss": val.loss,
                "val_dice": val.dice,
                "lr": lr,
                "seconds": round(clock.now() - t0, 2),
                "images": stats.images,
                "skipped_steps": stats.skipped,
                "data_seconds": round(stats.data_seconds, 2),
                "planned_epochs": epochs,
                "precision": precision,
            }
        )
        if ranks.main:
            best = save_epoch(run_dir, model, opt, scaler, history, best, config)
        _log_epoch(history[-1], stats, epochs)
        if stats.out_of_time:
            log.info(
                f"time budget of {s.max_minutes} min spent; stopping after epoch {epoch} (best val Dice {best:.4f})"
            )
            break
    distributed.barrier()  # every rank leaves with rank 0's files written
    return history


def _parallel(model: nn.Module, s: Training, ranks: Ranks, device: torch.device) -> nn.Module:
    """Under torchrun: DDP (gradients averaged in backward), with SyncBatchNorm if asked; else the model itself."""
    if not ranks.on:
        return model
    if s.sync_bn:
        if device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); set it false on the CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _resume(last: Path, model: nn.Module, opt, scaler, device: torch.device) -> tuple[int, float, list[dict]]:
    """(epoch, best Dice, history) of `last.pt`, with the weights, optimizer and scaler restored; a fresh start
    without it. A run may resume on another card: one trained in bf16 (no loss scale) continues in fp16
    with a fresh scale, and an fp16 run's scale is ignored by a run without scaling."""
    if not last.is_file():
        return 0, -1.0, []
    ckpt = load_checkpoint(last, device, expect=model.args)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # a disabled scaler ignores the state it is given
        scaler.load_state_dict(ckpt["scaler"])
    elif scaler.is_enabled():  # saved without loss scaling (bf16, fp32), resumed with it (fp16: a card without bf16)
        log.info(f"{last}: no loss scale saved (trained without fp16); fp16 starts from the default scale")
    log.info(f"resuming {last} after epoch {ckpt['epoch']} (best val Dice {ckpt['best_dice']:.4f})")
    return ckpt["epoch"], ckpt["best_dice"], ckpt["history"]


def _log_epoch(row: dict, stats: EpochStats, epochs: int | None) -> None:
    log.info(
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  val Dice "
        f"{row['val_dice']:.4f}  lr {row['lr']:.2e}  {row['seconds']:.0f}s "
        f"({stats.images / max(stats.data_seconds + stats.step_seconds, 1e-9):.1f} img/s, data wait "
        f"{stats.data_seconds:.1f}s)" + (f"  skipped {stats.skipped} non-finite steps" if stats.skipped else "")
    )


def plot_history(run_dir: str | Path) -> Path:
    """Redraw `learning_curves.png` from `history.csv`."""
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    csv = run_dir / "history.csv"
    if not csv.is_file():
        raise ConfigError(f"no history.csv in {run_dir}: not a training run folder")
    h = pd.read_csv(csv)
    fig = Figure(figsize=(10, 3.6), layout="tight")
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(h.epoch, h.train_loss, "o-", label="train")
    ax1.plot(h.epoch, h.val_loss, "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss (BCE + 1 - Dice)", yscale="log")
    ax1.legend()
    ax2.plot(h.epoch, h.val_dice, "o-", color="C2")
    ax2.set(xlabel="epoch", ylabel="validation Dice", title=f"best {h.val_dice.max():.4f}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    out = run_dir / "learning_curves.png"
    save_figure(fig, out)
    return out
