"""Training runs on disk: checkpoints (read, written atomically, rebuilt into nets) and the
learning-curve plot. What the trainer writes and what prediction reads, in one place."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from common.config import Settings, Training
from common.errors import CheckpointError, ConfigError, SetupError
from common.io import atomic_path
from common.model import UNet


def pick_device(name: str) -> torch.device:
    """The device of `name` (auto | cpu | cuda | cuda:N), made this process's current CUDA device, so
    that streams, events and allocations without an explicit device land on it too."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # needs CUDA: not testable on the CPU
    return device


def build_model(settings: Training, in_channels: int, prior_skip: bool = False, seed: int = 0) -> nn.Module:
    """A fresh U-Net whose initial weights depend only on `seed`."""
    torch.manual_seed(seed)
    return UNet(in_channels, settings.depth, settings.width, settings.dropout, prior_skip)


def load_checkpoint(path: str | Path, device: torch.device, expect: dict | None = None) -> dict:
    """Read a checkpoint; `expect` (model args) must match the net it holds, if given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (train first, or set the stage's checkpoint key)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        args = ckpt["model_args"]
    except Exception as e:  # a torn or foreign file: name it, do not dump a traceback
        raise CheckpointError(f"{path}: not a checkpoint of this project ({type(e).__name__}: {e})") from None
    if expect is not None and args != expect:
        raise CheckpointError(f"{path} was trained with {args}, the config asks for {expect}; change the config or retrain")
    return ckpt


def load_model(path: str | Path, device: torch.device, expect: dict | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the net a checkpoint was trained with, in eval mode."""
    ckpt = load_checkpoint(path, device, expect)
    model = UNet(**ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def checkpoint_paths(cfg: Settings, stage: str) -> list[Path]:
    """`<stage>.checkpoint`: empty = `<output.dir>/<stage>/best.pt`; one path; or a list of paths,
    an ensemble (e.g. the K folds of `carvana folds`)."""
    value = getattr(cfg, stage).checkpoint
    if not value:
        return [Path(cfg.output.dir) / stage / "best.pt"]
    return [Path(v) for v in (value if isinstance(value, list) else [value])]


def checkpoints_hash(paths: list[Path]) -> str:
    """Content hash of every checkpoint of an ensemble, in order: cache keys cover them all."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"|")
    return h.hexdigest()


class Ensemble(nn.Module):
    """Nets whose probabilities are averaged, as the competition's winners averaged their folds.
    Returns the logit of the mean probability, so it stands in for one net everywhere."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.args = models[0].args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prob = torch.stack([torch.sigmoid(m(x).float()) for m in self.models]).mean(0)
        return torch.logit(prob, eps=1e-6)


def load_models(paths: list[Path], device: torch.device) -> tuple[nn.Module, list[dict]]:
    """One net, or the ensemble of several with the same inputs; and their checkpoints."""
    loaded = [load_model(p, device) for p in paths]
    first = loaded[0][1]
    for path, (_, ckpt) in zip(paths[1:], loaded[1:]):
        if ckpt["model_args"]["in_channels"] != first["model_args"]["in_channels"]:
            raise CheckpointError(f"{path} takes {ckpt['model_args']['in_channels']} input channels, {paths[0]} "
                              f"{first['model_args']['in_channels']}: an ensemble's nets must take the same inputs")
    return (loaded[0][0] if len(loaded) == 1 else Ensemble([m for m, _ in loaded]).eval()), [c for _, c in loaded]


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
