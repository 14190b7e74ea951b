import re

import pydantic
import pytest
import yaml
from helpers import ROOT

from common.config import Settings, load_config, save_config
from common.errors import ConfigError


def test_overrides_parse_types():
    cfg = load_config(
        None, ["stage1.epochs=3", "predict.threshold=0.4", "data.root=/data/carvana", "data.val_cars=[a, b]"]
    )
    assert cfg.stage1.epochs == 3
    assert cfg.predict.threshold == 0.4
    assert cfg.data.root == "/data/carvana"
    assert cfg.data.val_cars == ["a", "b"]
    assert load_config(None, ["data.val_cars=2/5"]).data.val_cars == "2/5"
    assert load_config(None, ["stage1.max_minutes=2"]).stage1.max_minutes == 2.0
    assert load_config(None, ["stage2.augment=flip"]).stage2.augment == "flip"
    with pytest.raises(ConfigError, match="'stage2.augment' must be str, got True"):
        load_config(None, ["stage2.augment=true"])


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'stage1.epoch'.*'stage1.epochs'"):
        load_config(None, ["stage1.epoch=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match="stage1.epochs.*must be a number or auto; got 'many'"):
        load_config(None, ["stage1.epochs=many"])
    with pytest.raises(ConfigError, match="stage1.batch_size.*must be int"):
        load_config(None, ["stage1.batch_size=many"])
    with pytest.raises(ConfigError, match="stage1.max_minutes too"):
        load_config(None, ["stage1.epochs=auto"])
    with pytest.raises(ConfigError, match="predict.threshold.*must be a number or auto"):
        load_config(None, ["predict.threshold=best"])
    with pytest.raises(ConfigError, match=r"stage1.margin.*\[left, top, right, bottom\]"):
        load_config(None, ["stage1.margin=[1, 2]"])
    with pytest.raises(ConfigError, match="stage2.coarse_channel"):
        load_config(None, ["stage2.coarse_channel=3"])


def test_yaml_file_errors_name_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stage1:\n  sise: 256\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*stage1.sise.*stage1.size"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["stage1.epochs"])


def test_file_then_overrides_and_saved_round_trip(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stage1:\n  epochs: 7\n  size: 512\n")
    cfg = load_config(f, ["stage1.epochs=2"])
    assert (cfg.stage1.epochs, cfg.stage1.size) == (2, 512)
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text()) == cfg.model_dump()
    assert load_config(tmp_path / "out" / "config.yaml") == cfg  # how a user reruns a run folder's settings
    assert Settings().stage1.epochs != 2  # defaults untouched


def test_settings_are_read_only_and_changed_only_through_the_checks():
    cfg = load_config(None)
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cfg.stage1.epochs = 3  # frozen: a step cannot change the settings another step reads
    assert cfg.updated({"stage1.epochs": 3}).stage1.epochs == 3 and cfg.stage1.epochs == 10
    with pytest.raises(ConfigError, match="'stage1.epochs' must be >= 1"):
        cfg.updated({"stage1.epochs": 0})


def test_shipped_pipelines_load():
    root = ROOT / "pipelines"
    demo = load_config(root / "demo.yaml")
    full = load_config(root / "pipeline.yaml")
    assert demo.sample.cars > 0 and full.sample.cars == 0
    assert full.stage1.size == 512 and full.stage2.tile == 1024 and full.data.root == "data/carvana"


def test_the_configuration_reference_is_generated_from_the_declarations():
    """docs/configuration.md is what `carvana config --reference` prints: it names every setting and cannot drift."""
    from common.config import FIELDS, reference

    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == reference(), (
        "docs/configuration.md is stale: run `carvana config --reference > docs/configuration.md`"
    )
    assert all(f"| `{key}` |" in doc for key in FIELDS) and len(FIELDS) > 60


def test_cache_keys_follow_the_declarations(tmp_path):
    """A setting's `affects` decides which caches it invalidates: the box cache key changes with
    stage1.margin, not with a training-only setting or one about how prediction runs."""
    from common.model_source import open_source
    from stage1_lowres.box_cache import cache_key

    (tmp_path / "net.pt").write_bytes(b"weights")
    base = load_config(None, [f"stage1.checkpoint={tmp_path / 'net.pt'}"])
    source = open_source(base)

    def key(changes: dict) -> str:
        return cache_key(base.updated(changes), source)

    same = [key({k: v}) for k, v in {"stage1.lr": 0.5, "predict.workers": 3, "predict.chunk": 4}.items()]
    assert same == [key({})] * 3
    assert key({"stage1.margin": 8}) != key({})
    assert key({"predict.tta_flip": True}) != key({})


def test_overrides_parse_before_or_after_config_and_junk_is_refused(capsys):
    """The README writes `carvana stage1 train --config FILE key=value ...`; both orders must work."""
    from pipelines.cli import parse

    after = parse(
        ["stage1", "train", "--config", "pipelines/pipeline.yaml", "stage1.epochs=3", "data.root=/data/carvana"]
    )
    before = parse(
        ["stage1", "train", "stage1.epochs=3", "--config", "pipelines/pipeline.yaml", "data.root=/data/carvana"]
    )
    assert after.overrides == before.overrides == ["stage1.epochs=3", "data.root=/data/carvana"]
    assert after.config == before.config == "pipelines/pipeline.yaml"
    assert parse(["run", "p.yaml", "--force", "stage2_train", "stage2.epochs=1"]).overrides == ["stage2.epochs=1"]
    for bad in (["stage1", "train", "--bogus"], ["plot", "outputs/x", "stage1.epochs=3"]):
        with pytest.raises(SystemExit):
            parse(bad)
        assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage2.blend=soft", "'stage2.blend' must be one of mean, smooth; got 'soft'"),
        ("stage2.train_boxes=gt", "'stage2.train_boxes' must be one of truth, stage1"),
        ("stage1.optimizer=rmsprop", "'stage1.optimizer' must be one of adam, sgd"),
        ("stage1.augment=heavy", "'stage1.augment' must be one of full, flip, none"),
        ("stage2.schedule=linear", "'stage2.schedule' must be one of constant, step, cosine"),
        ("device=gpu", "'device' must be auto, cpu, cuda or cuda:N"),
        ("stage1.batch_size=0", "'stage1.batch_size' must be in [1, 1024]"),
        ("predict.threshold=1.5", "'predict.threshold' must be in"),
        ("stage1.beta2=1", "'stage1.beta2' must be in"),
        ("stage2.min_overlap=1024", "stage2.min_overlap=1024 must be at most half of stage2.tile=1024 (512)"),
        (
            "stage2.min_overlap=513",
            "stage2.min_overlap=513 must be at most half of stage2.tile=1024 (512): tiles start",
        ),
        ("predict.cluster=host:8786", "'predict.cluster' must be empty, local:N or a scheduler address"),
        ("stage2.context=46", "stage2.context=46 leaves stage2.patch=96 a centre of 4 px"),
        ("serve.max_pixels=200000000", "serve.max_pixels=200000000 must be at most serve.max_pixels_in_flight="),
    ],
)
def test_settings_with_fixed_values_fail_when_the_config_loads(override, message):
    """Checked at load, naming the allowed values: not minutes later, at first use."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_an_overlap_of_half_the_tile_is_allowed():
    assert load_config(None, ["stage2.tile=512", "stage2.min_overlap=256"]).stage2.min_overlap == 256


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    from pipelines import cli

    def broken(args):
        raise RuntimeError("chunks are not in submission order")

    monkeypatch.setattr(cli, "dispatch", broken)
    assert cli.main(["stage2", "predict"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: RuntimeError: chunks are not in submission order (run with --debug for the traceback)"
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "stage2", "predict"])


def _all_errors(cls):
    return [cls] + [sub for c in cls.__subclasses__() for sub in _all_errors(c)]


def test_every_error_class_ends_the_command_with_one_line_and_its_own_status(monkeypatch, capsys):
    """Whatever the project raises on purpose ends `carvana` with one line: status 2 for the mistakes a
    user fixes (`UserError` and below), 1 for every other failure, 130 for an interrupt. The commands
    that really fail this way are in tests/test_reliability.py (a setting 2, a full disk 1, an
    unreadable image 1)."""
    import errno

    from common import errors
    from pipelines import cli

    for cls in _all_errors(errors.CarvanaError):
        if issubclass(cls, errors.OutputError):
            error = cls(errno.ENOSPC, "cannot write out/x.csv: No space left on device")
        elif issubclass(cls, errors.ImageReadError):
            error = cls("photo.jpg", f"the {cls.__name__} text")
        else:
            error = cls(f"the {cls.__name__} text")
        monkeypatch.setattr(cli, "dispatch", lambda args, error=error: (_ for _ in ()).throw(error))
        assert cli.main(["stage2", "predict"]) == (2 if issubclass(cls, errors.UserError) else 1), cls
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1
            and err.startswith("error: ")
            and ("No space" in err or f"the {cls.__name__} text" in err)
        )

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "dispatch", interrupted)
    assert cli.main(["stage2", "predict"]) == 130


def test_cache_keys_name_each_setting_of_an_output_once():
    """Cache keys and fingerprints name a setting by its name within its section (`depends`), so two
    settings of one output must not share a name, or one would hide the other."""
    from common.config import DEPENDS

    for output, keys in DEPENDS.items():
        names = [key.rsplit(".", 1)[-1] for key in keys]
        assert len(set(names)) == len(names), f"two settings named alike change {output}: {keys}"


def test_config_command_prints_what_a_job_runs_with(capsys, tmp_path):
    from pipelines.cli import main

    demo = ROOT / "pipelines" / "demo.yaml"
    assert main(["config", "--config", str(demo), "stage1.epochs=3"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    assert load_config(tmp_path / "resolved.yaml") == load_config(demo, ["stage1.epochs=3"])
    assert yaml.safe_load(printed)["stage1"]["epochs"] == 3

    def keys(tree: dict, prefix: str = "") -> list[str]:
        return [
            k
            for name, value in tree.items()
            for k in (keys(value, f"{prefix}{name}.") if isinstance(value, dict) else [f"{prefix}{name}"])
        ]

    doc = (ROOT / "docs" / "configuration.md").read_text()
    printed_keys = keys(yaml.safe_load(printed))
    assert (
        len(printed_keys) > 60 and [k for k in printed_keys if f"| `{k}` |" not in doc] == []
    )  # the reference names each
    assert main(["config", "stage1.epoch=3"]) == 2 and "did you mean 'stage1.epochs'" in capsys.readouterr().err
