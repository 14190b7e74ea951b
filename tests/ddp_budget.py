"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU): `carvana ARGS` with
each rank's training clock set by the test instead of the machine's. Rank 0's clock moves 1 s at each
optimizer step; rank 1's says the budget was spent as soon as its clock started, so a rank that followed
its own clock would stop after its first step."""

import itertools
import os
import sys

from common.training import distributed, trainer
from pipelines.cli import main

steps, readings = [0], itertools.count()
clock, agree = trainer.Clock, distributed.step_agreement


def step(*args):
    decided = agree(*args)
    steps[0] += 1
    return decided


def rank_0_time() -> float:
    return float(steps[0])


def rank_1_time() -> float:
    return 0.0 if next(readings) == 0 else 1e9  # the clock's start, then long past any budget


trainer.Clock = lambda minutes: clock(minutes, rank_0_time if os.environ["RANK"] == "0" else rank_1_time)
distributed.step_agreement = step
sys.exit(main(sys.argv[1:]))
