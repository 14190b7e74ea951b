"""DDP under torchrun, for real: two CPU processes with the gloo backend."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch
from helpers import ROOT, TINY, Blobs
from torch.utils.data import DistributedSampler

from common.model import UNet
from common.training.losses import bce_dice_loss

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
HERE = Path(__file__).parent


def _torchrun(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=env, timeout=600, **kw)


def test_gradients_are_averaged_over_ranks(tmp_path):
    """After one step under DDP both ranks hold the same parameters, equal to one process taking
    the step with the mean of the two shards' gradients (each shard with its own batch statistics,
    as DDP without SyncBatchNorm computes them)."""
    proc = _torchrun([str(HERE / "ddp_step.py"), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    weights = [
        k for k in rank0 if "running_" not in k and "num_batches" not in k
    ]  # BN running stats stay per rank until
    for name in weights:  # DDP broadcasts rank 0's at the next forward
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)

    data = Blobs(n=8)
    x, y = data.tensors
    x = (x * 255).round().byte().float() / 255  # what the uint8 set gives back
    torch.manual_seed(0)
    model = UNet(3, 3, 8).to(memory_format=torch.channels_last).train()
    before = copy.deepcopy(model.state_dict())
    loss = 0
    for r in (0, 1):
        sampler = DistributedSampler(range(8), num_replicas=2, rank=r, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(0)
        idx = torch.tensor(list(sampler))
        loss = loss + bce_dice_loss(model(x[idx].contiguous(memory_format=torch.channels_last)), y[idx]) / 2
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    expected = model.state_dict()
    changed = [k for k in expected if expected[k].is_floating_point() and not torch.equal(expected[k], before[k])]
    assert len(changed) > 10
    for name in weights:
        torch.testing.assert_close(rank0[name], expected[name], rtol=1e-4, atol=1e-5)


def test_torchrun_stage1_train_writes_one_loadable_checkpoint(sample_root, tmp_path):
    out = tmp_path / "out"
    stage1_train = ["-m", "stage1_lowres", "train", f"data.root={sample_root}", f"output.dir={out}", *TINY]
    proc = _torchrun([*stage1_train, "stage1.epochs=2", "stage1.max_minutes=5"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("stage1 done") == 1 and "2 ranks" in proc.stdout  # rank 0 alone prints
    history = pd.read_csv(out / "stage1" / "history.csv")
    assert list(history.epoch) == [1, 2] and (history.images == 2 * (36 // 2 // 8) * 8).all()  # each rank its own shard
    from common.model import load_net

    model, ckpt = load_net(out / "stage1" / "best.pt", torch.device("cpu"))
    assert ckpt["epoch"] in (1, 2) and sorted(p.name for p in (out / "stage1").iterdir() if p.suffix == ".pt") == [
        "best.pt",
        "last.pt",
    ]
    # resume under torchrun: one more epoch from last.pt
    proc = _torchrun([*stage1_train, "stage1.epochs=3", "stage1.resume=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "after epoch 2" in proc.stdout
    assert list(pd.read_csv(out / "stage1" / "history.csv").epoch) == [1, 2, 3]


def test_torchrun_stage2_train_stops_every_rank_after_the_step_rank_0s_clock_ends(tiny_run, tmp_path):
    """`carvana stage2 train` on two ranks with a budget of 1.5 s, on clocks the test sets
    (tests/ddp_budget.py): rank 0's moves 1 s a step, rank 1's says the budget is spent from the start.
    Both ranks stop after the same step, rank 0's third (2 s spent): 3 steps of 4 crops on each rank, not 1
    (rank 1's clock) or 4 (the epoch's end), and the job ends with one epoch written."""
    src, out = tiny_run.output.dir, tmp_path / "out"
    stage1 = [f"stage1.checkpoint={src}/stage1/best.pt", f"bboxes.path={src}/bboxes.csv"]  # the tiny run's boxes
    budget = ["stage2.epochs=5", "stage2.max_minutes=0.025", "stage2.precision=fp32"]
    args = ["stage2", "train", f"data.root={tiny_run.data.root}", f"output.dir={out}", *TINY, *stage1, *budget]
    proc = _torchrun([str(HERE / "ddp_budget.py"), *args])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks" in proc.stdout and "time budget of 0.025 min spent; stopping after epoch 1" in proc.stdout
    history = pd.read_csv(out / "stage2" / "history.csv")
    assert history.images.tolist() == [2 * 3 * 4]


def test_a_ddp_run_ends_its_process_group_before_the_process_exits(tmp_path):
    """Each rank destroys its process group at exit (NCCL warns, and may drop queued work, when the group
    is left to its destructor). A handler registered before joining runs after the project's own and
    prints whether a group is still there."""
    script = tmp_path / "join.py"
    script.write_text(
        "import atexit, sys, torch.distributed as dist\n"
        "from common.training import distributed\n"
        "say = lambda line: sys.stdout.write(line + '\\n') and sys.stdout.flush()  # one write: ranks share the pipe\n"
        "atexit.register(lambda: say(f'group at exit: {dist.is_initialized()}'))\n"
        "ranks, device = distributed.init('cpu')\n"
        "distributed.barrier()\n"
        "say(f'joined {ranks.rank} {dist.is_initialized()}')\n"
    )
    proc = _torchrun([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(line for line in proc.stdout.splitlines() if line.startswith("joined")) == [
        "joined 0 True",
        "joined 1 True",
    ]
    assert proc.stdout.count("group at exit: False") == 2 and "group at exit: True" not in proc.stdout
