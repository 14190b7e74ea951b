"""Training runs on disk: checkpoints (read, written atomically, rebuilt into nets) and the
learning-curve plot. What the trainer writes and what prediction reads, in one place."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from common.config import ConfigError
from common.io import atomic_path
from common.model import UNet


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


def plot_history(run_dir: str | Path) -> Path:
    """Redraw `learning_curves.png` from `history.csv`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
