"""`carvana`: one entry point over the stage scripts, evaluation and the pipeline runner."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path

from common.errors import CarvanaError, ConfigError, OutputError, SetupError
from common.log import log

OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")  # stage1.epochs=3 or device=cpu, not a photo


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (defaults apply where it is silent)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stage1.epochs=3 data.root=/data/carvana")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="a folder written by `carvana bundle`: its nets and mask settings, instead of the config's checkpoints",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carvana", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample-data", help="write a synthetic Kaggle-layout data set")
    p.add_argument("--out", required=True)
    p.add_argument("--cars", type=int, default=6)
    p.add_argument("--test-cars", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)

    for stage in ("stage1", "stage2"):
        p = sub.add_parser(stage, help=f"{stage}: train or predict")
        p.add_argument("action", choices=["train", "predict"])
        if stage == "stage2":
            _model_arg(p)
        _config_args(p)

    p = sub.add_parser("folds", help="train a stage on each of K folds of the cars (an ensemble for prediction)")
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("k", type=int, help="number of folds")
    _config_args(p)

    p = sub.add_parser("evaluate", help="per-image Dice of stage 1 and the cascade on the validation cars")
    _config_args(p)

    p = sub.add_parser(
        "cutout", help="cut the car out of any photos: NAME_mask.png, NAME.png (RGBA), optional composite"
    )
    p.add_argument("photos", nargs="+", help="JPEG/PNG/WebP files or folders; key=value words among them are overrides")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--composite", default=None, help="also write NAME_on_COLOUR.jpg on this flat colour (e.g. white, #00ff00)"
    )
    p.add_argument(
        "--alpha",
        choices=["soft", "hard"],
        default="soft",
        help="soft: the car's edge semi-transparent as the probability says; hard: 0/255 at the threshold",
    )
    p.add_argument(
        "--config", default=None, help="YAML config naming the checkpoints (defaults apply where it is silent)"
    )
    _model_arg(p)

    p = sub.add_parser(
        "bundle", help="write a trained run's cascade as a folder to hand on: safetensors, bundle.json, a model card"
    )
    p.add_argument("--out", required=True, help="the bundle's folder")
    p.add_argument("--onnx", action="store_true", help="also export both nets to ONNX (the onnx extra)")
    p.add_argument("--name", default="carvana", help="the model's name on a server (/v2/models/NAME)")
    _config_args(p)

    p = sub.add_parser(
        "serve", help="background removal over HTTP: a page, POST /v1/cutout and /v1/segment, /healthz, /metrics"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    _model_arg(p)
    _config_args(p)

    p = sub.add_parser(
        "config", help="print the resolved settings as YAML: what a job with this config and these overrides runs with"
    )
    p.add_argument(
        "--reference", action="store_true", help="print the configuration reference (docs/configuration.md) instead"
    )
    _config_args(p)

    p = sub.add_parser("plot", help="redraw learning_curves.png of a training run")
    p.add_argument("run_dir")

    p = sub.add_parser("run", help="run a pipeline YAML, skipping finished steps")
    p.add_argument("config")
    p.add_argument("--force", action="append", default=[], help="rerun this step and what depends on it")
    p.add_argument("overrides", nargs="*")
    return parser


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "sample-data":
        from common.data.synth import write_sample_data

        out = write_sample_data(args.out, cars=args.cars, test_cars=args.test_cars, seed=args.seed)
        print(f"wrote {args.cars} training and {args.test_cars} test cars to {out}")
        return 0
    if args.command == "plot":
        from common.training.trainer import plot_history

        print(plot_history(args.run_dir))
        return 0
    if args.command == "run":
        from pipelines.run import run_pipeline

        return run_pipeline(args.config, args.overrides, force=args.force)

    from common.config import as_yaml, load_config, reference
    from common.io import output_lock

    cfg = load_config(args.config, args.overrides)
    if args.command == "config":
        print(reference() if args.reference else as_yaml(cfg), end="")
        return 0
    source = None
    action = (args.command, getattr(args, "action", None))
    if action in SOURCED:  # the nets, resolved once: the config's checkpoints, or the bundle of --model
        source, cfg = _source(cfg, getattr(args, "model", None), action)
    if args.command == "serve":  # writes nothing, so no output lock
        try:
            from pipelines.serve import serve
        except ImportError as e:
            raise SetupError(
                f"carvana serve needs the serve extra ({e.name} is missing): pip install '.[serve]'"
            ) from None
        return serve(cfg, source, args.host, args.port)
    command = " ".join(["carvana", args.command] + ([args.action] if hasattr(args, "action") else []))
    with output_lock(args.out if args.command in ("cutout", "bundle") else cfg.output.dir, command):
        if args.command == "cutout":
            from pipelines.cutout import cutout, pictures

            return cutout(
                args.photos, args.out, cfg, source, pictures(args.alpha, cfg.cutout.clean_edges, args.composite)
            )
        if args.command == "bundle":
            from pipelines.bundle import make_bundle

            make_bundle(cfg, source, Path(args.out), args.name, args.onnx)
            return 0
        if args.command == "folds":
            from pipelines.folds import train_folds

            return train_folds(args.stage, args.k, cfg)
        if args.command == "evaluate":
            from pipelines.evaluate import main as evaluate

            return evaluate(cfg, source)
        return _stage(args.command, args.action, cfg, source)


# the commands that predict or validate with trained nets, and whether they need the mask threshold
# itself (True) or may fall back to 0.5 while `predict.threshold: auto` has no sweep yet (False)
SOURCED = {
    ("stage1", "predict"): False,
    ("stage2", "train"): False,
    ("stage2", "predict"): True,
    ("evaluate", None): False,
    ("cutout", None): True,
    ("serve", None): True,
    ("bundle", None): True,
}


def _source(cfg, model: str | None, action: tuple[str, str | None]):
    """The model source of a command and the settings it fixes; --model only where a command predicts."""
    from common.model_source import open_source

    if model is not None and action == ("stage2", "train"):
        raise ConfigError("--model is for prediction: stage2 train trains from the config")
    source = open_source(cfg, model, strict=SOURCED[action])
    if action[0] in ("cutout", "serve") and source.synthetic:
        log.warning(
            f"{model}: these nets learned synthetic cars only (carvana sample-data): for trying the commands, not for "
            "real photos; docs/bundle.md says how to make a bundle for real photos"
        )
    return source, source.settings(cfg)


def _stage(stage: str, action: str, cfg, source) -> int:
    """`carvana stage1|stage2 train|predict`."""
    if stage == "stage1":
        from stage1_lowres import predict, train

        return train.main(cfg) if action == "train" else predict.main(cfg, source)
    from stage2_fullres import predict, train

    return (train if action == "train" else predict).main(cfg, source)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Overrides (`key=value`) may come before or after `--config`: argparse alone takes positionals
    in one run, so the ones after an option arrive as unknown arguments and are collected here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "cutout":  # photos and overrides share the positionals
        extra += [w for w in args.photos if OVERRIDE.match(w)]
        args.photos, args.overrides = [w for w in args.photos if not OVERRIDE.match(w)], []
        if not args.photos:
            parser.error("cutout: name at least one photo or folder")
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    unknown = [e for e in extra if e not in overrides]
    for word in unknown:
        if not word.startswith("-"):  # a setting without its value: say so in one line, not with the usage
            parser.exit(2, f"error: override '{word}' must look like key=value\n")
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # huge pages for PyTorch's large CPU buffers (read at torch's first allocation, so set before any import of
    # it): fewer page faults per full-resolution step (docs/experiments/2026-12-serve-throughput.md); =0 is off

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    try:
        return dispatch(args)
    except OutputError as e:  # full disk, no permission: the file and the cause; finished work stays
        print(f"error: {e.strerror}; finished work is saved, rerun the same command once it can write", file=sys.stderr)
        return e.exit_code
    except CarvanaError as e:  # the class says whose mistake: the user's (2) or the work's (1)
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, rerun the same command to continue", file=sys.stderr)
        return 130
    except Exception as e:  # anything else is still one line; the traceback only on request
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
