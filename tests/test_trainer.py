import math

import pandas as pd
import pytest
import torch
from helpers import CONFIG, Blobs, blob_settings, blob_validator

from common.errors import CheckpointError
from common.model import UNet, load_checkpoint, load_net
from common.training.trainer import Run, plot_history, train, validator


@pytest.fixture(autouse=True)
def _seeded():
    """The nets' initial weights come from torch's global generator: seeded here, so a test's training does
    not depend on what the tests before it drew (test_serve before this one once left the loss at 0.75x)."""
    torch.manual_seed(0)


def test_loss_falls_and_outputs_are_written(tmp_path):
    data = Blobs()
    history = train(
        Run(blob_settings(epochs=6), tmp_path, CONFIG, torch.device("cpu")), UNet(3, 3, 8), data, blob_validator(data)
    )
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"]
    assert history[-1]["val_dice"] > history[0]["val_dice"]
    for name in ("last.pt", "best.pt", "history.csv", "learning_curves.png"):
        assert (tmp_path / name).is_file()
    frame = pd.read_csv(tmp_path / "history.csv")
    assert (
        list(frame.columns[:6]) == ["epoch", "train_loss", "val_loss", "val_dice", "lr", "seconds"] and len(frame) == 6
    )
    assert (frame.images == 16).all() and (frame.skipped_steps == 0).all()
    assert load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))["config"] == CONFIG.model_dump()


def test_resume_continues_exactly(tmp_path):
    data = Blobs()
    cpu = torch.device("cpu")
    s = blob_settings(
        schedule="constant", precision="fp32"
    )  # not auto: the two runs could time bf16 against fp32 differently
    full = train(
        Run(s.model_copy(update={"epochs": 4}), tmp_path / "a", CONFIG, cpu), UNet(3, 3, 8), data, blob_validator(data)
    )
    train(
        Run(s.model_copy(update={"epochs": 2}), tmp_path / "b", CONFIG, cpu), UNet(3, 3, 8), data, blob_validator(data)
    )
    stopped = load_checkpoint(tmp_path / "b" / "last.pt", cpu)
    assert stopped["epoch"] == 2 and stopped["optimizer"]["state"]
    resumed = train(
        Run(s.model_copy(update={"epochs": 4, "resume": True}), tmp_path / "b", CONFIG, cpu),
        UNet(3, 3, 8),
        data,
        blob_validator(data),
    )
    assert [h["epoch"] for h in resumed] == [1, 2, 3, 4]
    assert [round(h["train_loss"], 5) for h in resumed] == [round(h["train_loss"], 5) for h in full]


def test_a_run_saved_without_loss_scaling_resumes_with_it_and_back(tmp_path, caplog):
    """A run trained in bf16 (no loss scale saved) resumes on a card without bf16, in fp16 with loss
    scaling: it starts from the default scale instead of failing on the empty state; an fp16 run's scale
    is ignored by a run without scaling. A CPU GradScaler stands in for the card's (the same class)."""
    from common.training.trainer import _resume, build_optimizer

    data, cpu = Blobs(8), torch.device("cpu")
    s = blob_settings(epochs=1, precision="bf16")  # bf16 where this CPU has it, else fp32: no loss scale either way
    train(Run(s, tmp_path, CONFIG, cpu), UNet(3, 3, 8), data, blob_validator(data))
    saved = load_checkpoint(tmp_path / "last.pt", cpu)
    assert saved["scaler"] == {}
    model = UNet(3, 3, 8)
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    with caplog.at_level("INFO", logger="carvana"):
        epoch, _, history = _resume(tmp_path / "last.pt", model, build_optimizer(model, s), fp16, cpu)
    assert epoch == 1 and len(history) == 1 and fp16.get_scale() == 2.0**16
    assert "fp16 starts from the default scale" in caplog.text
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["model"][name], rtol=0, atol=0)
    # the other way: a scaled fp16 run's checkpoint resumed where no scaling runs
    torch.save(saved | {"scaler": fp16.state_dict() | {"scale": 1024.0}}, tmp_path / "fp16.pt")
    plain = torch.amp.GradScaler("cpu", enabled=False)
    assert _resume(tmp_path / "fp16.pt", model, build_optimizer(model, s), plain, cpu)[0] == 1


def test_adam_beta2_setting_reaches_the_optimizer_and_its_checkpoint(tmp_path):
    data = Blobs()
    train(
        Run(blob_settings(epochs=1, beta2=0.99, precision="fp32"), tmp_path, CONFIG, torch.device("cpu")),
        UNet(3, 3, 8),
        data,
        blob_validator(data),
    )
    group = load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))["optimizer"]["param_groups"][0]
    assert tuple(group["betas"]) == (0.9, 0.99)


def test_max_minutes_stops_in_time_and_keeps_best(tmp_path, monkeypatch):
    """On a clock the test sets (each optimizer step 1 s, each validation 2 s) and a budget of 15 s: epochs 1
    and 2 whole (4 steps each, 12 s with their validations), then epoch 3 stops after its 3rd step, the
    first at which 14 s spent and the 2 s of a validation would pass the budget; that epoch is validated
    and saved, and best.pt holds the best of the three."""
    from common.training import distributed, trainer

    now, clock, agree = [0.0], trainer.Clock, distributed.step_agreement
    monkeypatch.setattr(trainer, "Clock", lambda minutes: clock(minutes, lambda: now[0]))

    def step(*args):  # the optimizer step's one sync point: 1 s of work done
        decided = agree(*args)
        now[0] += 1
        return decided

    monkeypatch.setattr(distributed, "step_agreement", step)
    data = Blobs()
    validate = blob_validator(data)

    def validation(model):
        now[0] += 2
        return validate(model)

    settings = blob_settings(epochs=1000, max_minutes=0.25, precision="fp32")
    history = train(Run(settings, tmp_path, CONFIG, torch.device("cpu")), UNet(3, 3, 8), data, validation)
    assert [h["images"] for h in history] == [16, 16, 12] and now[0] == 17
    assert [h["seconds"] for h in history] == [6, 6, 5]  # on the run's clock
    saved = load_checkpoint(tmp_path / "best.pt", torch.device("cpu"))
    assert saved["best_dice"] == max(h["val_dice"] for h in history)
    assert load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))["epoch"] == 3


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    data = Blobs(n=4)
    train(
        Run(blob_settings(epochs=1), tmp_path, CONFIG, torch.device("cpu")), UNet(3, 3, 8), data, blob_validator(data)
    )
    with pytest.raises(CheckpointError, match="trained with"):
        load_net(tmp_path / "last.pt", torch.device("cpu"), expect=UNet(3, 4, 8).args)
    with pytest.raises(CheckpointError, match="trained with"):
        train(
            Run(blob_settings(epochs=2, resume=True), tmp_path, CONFIG, torch.device("cpu")),
            UNet(3, 4, 8),
            data,
            blob_validator(data),
        )
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt.*not a checkpoint"):
        load_net(tmp_path / "junk.pt", torch.device("cpu"))


def test_plot_command_redraws(tmp_path):
    from pipelines.cli import main

    data = Blobs(n=4)
    train(
        Run(blob_settings(epochs=1), tmp_path, CONFIG, torch.device("cpu")), UNet(3, 3, 8), data, blob_validator(data)
    )
    (tmp_path / "learning_curves.png").unlink()
    assert main(["plot", str(tmp_path)]) == 0 and (tmp_path / "learning_curves.png").is_file()
    assert plot_history(tmp_path).stat().st_size > 1000


def test_non_finite_steps_are_skipped_counted_and_never_reach_best(tmp_path, monkeypatch):
    import math

    import common.training.trainer as trainer
    from common.training.losses import bce_dice_loss

    data = Blobs()
    train(
        Run(blob_settings(epochs=1), tmp_path, CONFIG, torch.device("cpu")), UNet(3, 3, 8), data, blob_validator(data)
    )
    calls = []

    def sometimes_nan(logits, target, edge_weight=0.0):
        calls.append(1)
        loss = bce_dice_loss(logits, target, edge_weight)
        return loss * math.nan if len(calls) % 2 else loss  # every other step overflows

    monkeypatch.setattr(trainer, "bce_dice_loss", sometimes_nan)
    history = train(
        Run(blob_settings(epochs=2, resume=True), tmp_path, CONFIG, torch.device("cpu")),
        UNet(3, 3, 8),
        data,
        blob_validator(data),
    )
    assert history[-1]["skipped_steps"] == 2 and math.isfinite(history[-1]["train_loss"])
    assert all(
        torch.isfinite(p).all() for p in load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))["model"].values()
    )

    # with accumulation, one non-finite micro-step spoils the whole optimizer step: skipped, weights untouched
    calls.clear()
    before = {k: v.clone() for k, v in load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))["model"].items()}
    accum = train(
        Run(blob_settings(epochs=3, resume=True, accum=2), tmp_path, CONFIG, torch.device("cpu")),
        UNet(3, 3, 8),
        data,
        blob_validator(data),
    )
    assert accum[-1]["skipped_steps"] == 2  # 4 micro-steps, 2 optimizer steps, each with one NaN half
    after = load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))["model"]
    assert all(torch.equal(before[k], after[k]) for k in before if "running" not in k and "num_batches" not in k)

    monkeypatch.setattr(trainer, "bce_dice_loss", lambda logits, target, edge_weight=0.0: logits.sum() * math.nan)
    with pytest.raises(trainer.TrainingError, match="3 optimizer steps in a row had a non-finite loss"):
        train(
            Run(blob_settings(epochs=4, resume=True, max_bad_steps=3), tmp_path, CONFIG, torch.device("cpu")),
            UNet(3, 3, 8),
            data,
            blob_validator(data),
        )
    saved = load_checkpoint(tmp_path / "best.pt", torch.device("cpu"))
    assert math.isfinite(saved["best_dice"]) and all(torch.isfinite(p).all() for p in saved["model"].values())
    assert load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))["epoch"] == 3  # the diverged epoch wrote nothing


def test_epochs_auto_fits_the_schedule_to_the_budget_and_resume_keeps_the_count(tmp_path, monkeypatch):
    import common.training.trainer as trainer

    now = [100.0]  # the clock the test sets: no race with the machine's pace
    clock = trainer.Clock(1.0, now=lambda: now[0])  # a 60 s budget
    now[0] += 10  # whose first epoch took 10 s: 58.2 s of it usable, 48.2 left, room for 4 more such epochs
    assert trainer.planned_epochs(clock, 1, 10.0) == 5
    now[0] += 6  # a second epoch of 6 s: 42.2 s left at the steady pace holds 7 more
    assert trainer.planned_epochs(clock, 2, 6.0) == 9
    now[0] += 60  # the budget spent: no more epochs than done
    assert trainer.planned_epochs(clock, 2, 6.0) == 2 and clock.late()

    monkeypatch.setattr(trainer, "planned_epochs", lambda *a: 3)
    data = Blobs()
    s = blob_settings(epochs="auto", max_minutes=10.0, precision="fp32")  # fp32: the two runs below compare bit for bit
    torch.manual_seed(0)
    history = train(Run(s, tmp_path / "a", CONFIG, torch.device("cpu")), UNet(3, 3, 8), data, blob_validator(data))
    assert [h["planned_epochs"] for h in history] == [3, 3, 3]
    # the peak until the count is fixed after epoch 2, then the cosine's end, not a cut-off half
    assert [round(h["lr"] / s.lr, 4) for h in history] == [1.0, 1.0, 0.25]

    # epoch 1's plan is provisional (set-up and warm-up slow it): a rerun whose first epoch timed otherwise but
    # that fixed the same count after epoch 2 trains alike
    monkeypatch.setattr(trainer, "planned_epochs", lambda clock, done, *a: 7 if done == 1 else 3)
    torch.manual_seed(0)
    rerun = train(Run(s, tmp_path / "a2", CONFIG, torch.device("cpu")), UNet(3, 3, 8), data, blob_validator(data))
    assert [h["planned_epochs"] for h in rerun] == [7, 3, 3]
    assert [(h["lr"], h["train_loss"], h["val_dice"]) for h in rerun] == [
        (h["lr"], h["train_loss"], h["val_dice"]) for h in history
    ]
    monkeypatch.setattr(trainer, "planned_epochs", lambda *a: 3)

    class Killed(Exception):
        pass

    save_epoch = trainer.save_epoch

    def save_then_die_after_epoch_2(run_dir, model, opt, scaler, history, *rest):
        best = save_epoch(run_dir, model, opt, scaler, history, *rest)
        if history[-1]["epoch"] == 2:
            raise Killed  # as SIGKILL right after epoch 2's checkpoints are written (the count is fixed by then)
        return best

    monkeypatch.setattr(trainer, "save_epoch", save_then_die_after_epoch_2)
    with pytest.raises(Killed):
        train(Run(s, tmp_path / "b", CONFIG, torch.device("cpu")), UNet(3, 3, 8), data, blob_validator(data))
    monkeypatch.setattr(trainer, "save_epoch", save_epoch)
    monkeypatch.setattr(trainer, "planned_epochs", lambda *a: pytest.fail("a resumed run must keep its recorded count"))
    resumed = train(
        Run(s.model_copy(update={"resume": True}), tmp_path / "b", CONFIG, torch.device("cpu")),
        UNet(3, 3, 8),
        data,
        blob_validator(data),
    )
    assert [h["epoch"] for h in resumed] == [1, 2, 3] and [h["lr"] for h in resumed] == [h["lr"] for h in history]


@pytest.mark.parametrize("native", [True, False])
def test_cpu_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    """precision=bf16 trains in bf16 on CPUs with native bf16 and in fp32 elsewhere (emulated bf16 is
    slower than fp32), and auto considers bf16 only there; fp16 is CUDA-only; fp32 always turns autocast off.
    Prediction follows the same policy."""
    from common import model
    from common.prediction.step import predict_dtype

    monkeypatch.setattr(model, "cpu_has_bf16", lambda: native)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native else None
    assert [model.amp_dtype(p, cpu) for p in ("auto", "bf16", "fp16", "fp32")] == [expected, expected, None, None]
    assert predict_dtype(cpu) == expected


@pytest.mark.parametrize("bf16_seconds,picked", [(0.5, "bf16"), (2.0, "fp32"), (0.95, "fp32")])
def test_cpu_precision_auto_trains_in_bf16_only_when_clearly_faster_and_resume_keeps_it(
    tmp_path, monkeypatch, capsys, bf16_seconds, picked
):
    """On a CPU with native bf16, precision=auto times both on this net and trains in bf16 only if
    it is clearly (10%) faster (it measured 1.5x faster on one such CPU and slower on another; a near
    tie stays fp32, so reruns agree); the pick is in history.csv and a resumed run keeps it without
    timing again; an explicit bf16 is never second-guessed."""
    from common import model
    from common.training import trainer

    monkeypatch.setattr(model, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(trainer, "step_seconds", lambda model, s, dtypes: {torch.bfloat16: bf16_seconds, None: 1.0})
    data, cpu = Blobs(), torch.device("cpu")
    history = train(Run(blob_settings(epochs=1), tmp_path, CONFIG, cpu), UNet(3, 3, 8), data, blob_validator(data))
    assert history[0]["precision"] == picked and f"training in {picked}" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / "history.csv").precision.tolist() == [picked]
    monkeypatch.setattr(
        trainer, "step_seconds", lambda *a: pytest.fail("a resumed run must keep its recorded precision")
    )
    resumed = train(
        Run(blob_settings(epochs=2, resume=True), tmp_path, CONFIG, cpu), UNet(3, 3, 8), data, blob_validator(data)
    )
    assert [h["precision"] for h in resumed] == [picked, picked]
    explicit = train(
        Run(blob_settings(epochs=1, precision="bf16"), tmp_path / "b", CONFIG, cpu),
        UNet(3, 3, 8),
        data,
        blob_validator(data),
    )
    assert explicit[0]["precision"] == "bf16"


def test_timing_the_precision_leaves_the_weights_and_the_random_stream_alone():
    """The bf16/fp32 probe works on a copy with its own generator: a seeded run trains the same
    weights on the same data order whichever precision the timing picks."""
    from common.training.trainer import step_seconds

    model = UNet(3, 3, 8)
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.random.get_rng_state()
    assert all(t > 0 for t in step_seconds(model, blob_settings(size=32), (torch.bfloat16, None)).values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())


def test_the_loop_reads_the_device_once_per_optimizer_step(monkeypatch):
    """The step's decisions (finite loss, rank 0's clock, the progress numbers) reach the host in one
    read per optimizer step: 8 batches at accum 2 make 4 reads, and no tensor is turned into a bool."""
    from common.training import distributed, trainer

    reads = []
    agree = distributed.step_agreement
    monkeypatch.setattr(distributed, "step_agreement", lambda *a: reads.append(1) or agree(*a))
    model = UNet(3, 3, 8)
    s = blob_settings(accum=2, augment="full")
    opt = trainer.build_optimizer(model, s)
    scaler = torch.amp.GradScaler("cuda", enabled=False)

    def no_bool(self):
        raise AssertionError("a tensor was turned into a bool: a host sync on a GPU")

    monkeypatch.setattr(torch.Tensor, "__bool__", no_bool)
    loop = trainer.Loop(model, opt, scaler, s, torch.device("cpu"), None, trainer.Clock(0))
    stats = trainer.train_one_epoch(loop, Blobs(32), 0)
    assert len(reads) == 4 and stats.images == 32 and stats.skipped == 0


class _Touch(torch.utils.data.Dataset):
    """Writes one file per item read, as the crop dataset fills the mask cache."""

    def __init__(self, folder):
        self.folder = folder

    def __len__(self):
        return 64

    def __getitem__(self, key):
        i, _ = key
        (self.folder / f"{i}.done").write_text("")
        return torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)


def test_a_loop_that_stops_early_leaves_no_worker_writing(tmp_path):
    import multiprocessing

    from common.training.batches import LoaderBatches

    before = set(multiprocessing.active_children())  # children other tests may have left are not this loader's
    with LoaderBatches(_Touch(tmp_path), 2, 2, torch.device("cpu")) as data:
        batches = data.epoch(0)
        next(batches)  # a loop that stops after one batch and keeps its iterator; the workers have more in flight
        workers = set(multiprocessing.active_children()) - before
        assert len(workers) == 2
    assert not workers & set(
        multiprocessing.active_children()
    )  # joined: nothing writes into a folder about to be removed
    assert len(list(tmp_path.iterdir())) < 64  # it did stop early


def test_validation_scores_each_prediction_against_its_own_truth_and_names_an_unreadable_image():
    """The shared validator pairs predictions with truths by index, whatever order the predictor
    yields them in; an image the predictor could not read stops validation with its error."""
    from common.errors import DataError, Failure

    truths = [torch.zeros(8, 8, dtype=torch.bool), torch.ones(8, 8, dtype=torch.bool)]
    truths[0][2:5, 2:5] = True
    perfect_and_empty = lambda model: iter([(1, torch.zeros(8, 8)), (0, truths[0].float())])  # noqa: E731
    scores = validator(perfect_and_empty, truths, 0.5)(None)
    assert scores.dice == 0.5 and scores.loss > 0
    assert math.isnan(validator(lambda model: iter([]), [], 0.5)(None).dice)  # no images: no score, never best.pt
    with pytest.raises(DataError, match="b.jpg: truncated"):
        validator(lambda model: iter([(0, Failure("b.jpg", "truncated"))]), truths, 0.5)(None)
