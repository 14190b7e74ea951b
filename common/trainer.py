"""The one training loop both stages use.

Checkpoints (`last.pt` every epoch, `best.pt` on the best validation Dice) hold the weights, the
optimiser, scaler and RNG state, the epoch, the history and the resolved config, so `resume`
continues exactly where a stopped run ended. `max_minutes` bounds wall-clock time per invocation,
validation included. Mixed precision on CUDA, full precision on CPU.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from common.augment import augment_batch
from common.config import ConfigError
from common.faults import kill_point
from common.io import save_torch, write_csv
from common.losses import bce_dice_loss
from common.model import UNet

Validate = Callable[[nn.Module], dict]  # model -> {"val_loss": float, "val_dice": float}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return torch.device(name)


def build_model(settings: dict, in_channels: int, prior_skip: bool = False, seed: int = 0) -> nn.Module:
    """A fresh U-Net whose initial weights depend only on `seed`."""
    torch.manual_seed(seed)
    return UNet(in_channels, settings["depth"], settings["width"], settings["dropout"], prior_skip)


def load_checkpoint(path: str | Path, device: torch.device, expect: dict | None = None) -> dict:
    """Read a checkpoint; `expect` (model args) must match the net it holds, if given."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path} (train first, or set the stage's checkpoint key)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        args = ckpt["model_args"]
    except Exception as e:  # a torn or foreign file: name it, do not dump a traceback
        raise ConfigError(f"{path}: not a checkpoint of this project ({type(e).__name__}: {e})") from None
    if expect is not None and args != expect:
        raise ConfigError(f"{path} was trained with {args}, the config asks for {expect}; change the config or retrain")
    return ckpt


def load_model(path: str | Path, device: torch.device, expect: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the net a checkpoint was trained with, in eval mode."""
    ckpt = load_checkpoint(path, device, expect)
    model = UNet(**ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def _lr_factor(schedule: str, epoch: int, epochs: int, step_every: int) -> float:
    """Per epoch, never per second: a run is reproducible whatever the machine's speed."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    if schedule == "step":
        return 0.1 ** (epoch // max(step_every, 1))
    return 1.0  # constant (the config allows nothing else)


def _optimizer(model: nn.Module, s: dict) -> torch.optim.Optimizer:
    if s["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    return torch.optim.Adam(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])  # adam


def train(model: nn.Module, dataset: Dataset, validate: Validate, settings: dict, run_dir: str | Path,
          config: dict, device: torch.device, seed: int = 0) -> list[dict]:
    """Train `model` on `dataset` ((x, y) pairs) per the stage `settings`; returns the history, one row an epoch."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    budget = settings["max_minutes"] * 60 or math.inf
    torch.manual_seed(seed)
    model.to(device)
    opt = _optimizer(model, settings)
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    shuffle_gen = torch.Generator().manual_seed(seed)
    aug_gen = torch.Generator().manual_seed(seed + 1)
    epoch, best, history = 0, -1.0, []

    last = run_dir / "last.pt"
    if settings["resume"] and last.is_file():
        ckpt = load_checkpoint(last, device, expect=model.args)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        shuffle_gen.set_state(ckpt["rng"]["shuffle"])
        aug_gen.set_state(ckpt["rng"]["augment"])
        epoch, best, history = ckpt["epoch"], ckpt["best_dice"], ckpt["history"]
        print(f"resuming {last} after epoch {epoch} (best val Dice {best:.4f})")

    loader = DataLoader(dataset, batch_size=settings["batch_size"], shuffle=True, drop_last=len(dataset) > settings["batch_size"],
                        num_workers=settings["workers"], generator=shuffle_gen, pin_memory=amp,
                        persistent_workers=settings["workers"] > 0)
    accum = max(settings["accum"], 1)
    val_seconds = 0.0
    while epoch < settings["epochs"]:
        lr = settings["lr"] * _lr_factor(settings["schedule"], epoch, settings["epochs"], settings["step_every"])
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        t0, seen, total = time.monotonic(), 0, torch.zeros((), device=device)
        out_of_time = False
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{settings['epochs']}", leave=False, mininterval=1.0, disable=None)
        opt.zero_grad(set_to_none=True)
        for i, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if settings["augment"]:
                x, y = augment_batch(x, y, aug_gen)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                loss = bce_dice_loss(model(x), y, settings["edge_weight"])
            scaler.scale(loss / accum).backward()
            if (i + 1) % accum == 0 or i + 1 == len(loader):
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
            seen += len(x)
            total += loss.detach() * len(x)  # stays on the device: no GPU sync per step
            if i % 20 == 0 and not bar.disable:
                bar.set_postfix(loss=f"{total.item() / seen:.4f}", img_s=f"{seen / (time.monotonic() - t0):.1f}")
            if time.monotonic() - started + val_seconds > budget:
                out_of_time = True
                break
        bar.close()
        v0 = time.monotonic()
        model.eval()
        with torch.no_grad():
            val = validate(model)
        val_seconds = time.monotonic() - v0
        epoch += 1
        row = {"epoch": epoch, "train_loss": total.item() / max(seen, 1), "val_loss": val["val_loss"], "val_dice": val["val_dice"],
               "lr": lr, "seconds": round(time.monotonic() - t0, 2)}
        history.append(row)
        state = {"model": model.state_dict(), "model_args": model.args, "optimizer": opt.state_dict(),
                 "scaler": scaler.state_dict(), "rng": {"shuffle": shuffle_gen.get_state(), "augment": aug_gen.get_state()},
                 "epoch": epoch, "best_dice": max(best, row["val_dice"]), "history": history, "config": config}
        if row["val_dice"] > best:
            best = row["val_dice"]
            save_torch(run_dir / "best.pt", state)
        save_torch(last, state)
        write_csv(run_dir / "history.csv", pd.DataFrame(history))
        plot_history(run_dir)
        kill_point(f"{run_dir.name}.epoch", epoch)
        print(f"epoch {epoch}/{settings['epochs']}: train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
              f"val Dice {row['val_dice']:.4f}  lr {lr:.2e}  {row['seconds']:.0f}s")
        if out_of_time:
            print(f"time budget of {settings['max_minutes']} min spent; stopping after epoch {epoch} (best val Dice {best:.4f})")
            break
    return history


def plot_history(run_dir: str | Path) -> Path:
    """Redraw `learning_curves.png` from `history.csv`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.io import atomic_path

    run_dir = Path(run_dir)
    csv = run_dir / "history.csv"
    if not csv.is_file():
        raise ConfigError(f"no history.csv in {run_dir}: not a training run folder")
    h = pd.read_csv(csv)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(h.epoch, h.train_loss, "o-", label="train")
    ax1.plot(h.epoch, h.val_loss, "o-", label="validation")
    ax1.set(xlabel="epoch", ylabel="loss (BCE + 1 - Dice)", yscale="log")
    ax1.legend()
    ax2.plot(h.epoch, h.val_dice, "o-", color="C2")
    ax2.set(xlabel="epoch", ylabel="validation Dice", title=f"best {h.val_dice.max():.4f}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    out = run_dir / "learning_curves.png"
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return out
