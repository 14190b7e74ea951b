"""Prediction on Dask distributed (predict.cluster): the bytes of a local run, on a LocalCluster
with a worker killed by SIGKILL mid-run (retried by Dask) and on a cluster started as users start
one (`dask scheduler`, `dask worker`); an unreachable scheduler refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from common.model_source import open_source
from pipelines.cli import main as cli
from stage1_lowres import predict as s1_predict
from stage2_fullres import predict as s2_predict

pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install '.[cluster]')")

OUTPUTS = ["bboxes.csv", "stage1_submission.csv.gz", "submission.csv.gz"]


def _config(tiny_run, out, *more):
    src = tiny_run.output.dir
    return tiny_config(
        tiny_run.data.root,
        out,
        f"stage1.checkpoint={src}/stage1/best.pt",
        f"stage2.checkpoint={src}/stage2/best.pt",
        "predict.chunk=8",
        "data.limit_test=8",
        *more,
    )


def _predict(cfg) -> dict[str, bytes]:
    assert s1_predict.main(cfg, open_source(cfg)) == 0 and s2_predict.main(cfg, open_source(cfg)) == 0
    return {name: (Path(cfg.output.dir) / name).read_bytes() for name in OUTPUTS}


@pytest.fixture(scope="module")
def local(tiny_run, tmp_path_factory) -> Path:
    """The output folder of a prediction in this process, without Dask."""
    cfg = _config(tiny_run, tmp_path_factory.mktemp("local"))
    _predict(cfg)
    return Path(cfg.output.dir)


def test_local_cluster_gives_the_bytes_of_a_local_run_even_when_a_worker_dies(
    tiny_run, local, tmp_path, monkeypatch, capsys
):
    import dask

    for key in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_"):  # unset, so a leak would show as a new value
        monkeypatch.delenv(key, raising=False)
    before = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")}
    # tests/faults.py, preloaded into every worker: the first one to reach chunk 2 (of stage 1: 7 chunks of 8)
    # dies by SIGKILL before writing it
    monkeypatch.setenv("CARVANA_FAULT", f"chunk:2:KILL:{tmp_path / 'killed-once'}")
    with dask.config.set({"distributed.worker.preload": [str(Path(__file__).with_name("faults.py"))]}):
        cluster = _predict(_config(tiny_run, tmp_path / "cluster", "predict.cluster=local:2"))
    assert (tmp_path / "killed-once").exists()  # a worker did die mid-run, and Dask retried its chunk
    assert cluster == {name: (local / name).read_bytes() for name in OUTPUTS}
    # the nannies' settings for their workers (OMP_NUM_THREADS=1, ...) did not stay in this process's
    # environment, where every later child process (a training run, a server) would inherit them
    assert {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")} == before
    assert dask.config.get("distributed.worker.daemon", True) is True  # the scoped daemon setting was undone
    printed = capsys.readouterr().out
    assert "on 2 Dask workers" in printed and "stage 1 predict" in printed


def test_a_cluster_started_with_the_dask_commands_gives_the_bytes_of_a_local_run(tiny_run, local, tmp_path):
    """`dask scheduler` and one `dask worker --nthreads 2`, as a user starts them: the worker runs two
    chunk tasks of `stage2 predict` at a time, yet builds the nets once and writes the local run's
    submission, byte for byte."""
    from distributed import Client

    dask_cli = Path(sys.executable).with_name("dask")
    address_file = tmp_path / "scheduler.json"
    worker_log = tmp_path / "worker.log"
    scheduler = subprocess.Popen(
        [dask_cli, "scheduler", "--scheduler-file", address_file, "--port", "0", "--no-dashboard"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(scheduler_file=str(address_file), timeout="60s") as client:  # waits for the file and the scheduler
            address = client.scheduler.address
            with worker_log.open("w") as log_file:
                worker = subprocess.Popen(
                    [
                        dask_cli,
                        "worker",
                        "--scheduler-file",
                        address_file,
                        "--nthreads",
                        "2",
                        "--nworkers",
                        "1",
                        "--no-dashboard",
                    ],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            try:
                client.wait_for_workers(1, timeout=120)
                cfg = _config(
                    tiny_run,
                    tmp_path / "cluster",
                    f"predict.cluster={address}",
                    "predict.chunk=2",
                    f"bboxes.path={local / 'bboxes.csv'}",
                )  # 4 tasks of 2 images
                assert s2_predict.main(cfg, open_source(cfg)) == 0
            finally:
                worker.terminate()
                worker.wait(60)
    finally:
        scheduler.terminate()
        scheduler.wait(60)
    assert (tmp_path / "cluster" / "submission.csv.gz").read_bytes() == (local / "submission.csv.gz").read_bytes()
    printed = worker_log.read_text()
    assert printed.count("stage 2 predict: nets loaded on cpu") == 1, printed[-3000:]


def test_unreachable_scheduler_is_one_line_exit_1_and_nothing_is_written(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    src = tiny_run.output.dir
    code = cli(
        [
            "stage2",
            "predict",
            f"data.root={tiny_run.data.root}",
            f"output.dir={out}",
            f"bboxes.path={src}/bboxes.csv",
            f"stage2.checkpoint={src}/stage2/best.pt",
            f"stage1.checkpoint={src}/stage1/best.pt",
            "stage1.size=64",
            "predict.cluster=tcp://127.0.0.1:9",
            "device=cpu",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1 and "cannot reach the Dask scheduler" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_worker_refuses_nets_that_are_not_the_ones_the_client_hashed(tiny_run, tmp_path):
    """The client hashes the refiner's checkpoint for the chunk key; the file is then replaced (another
    training writing it, say) before the workers load it: each task refuses it, naming the file, and no
    chunk is written with other nets than its key says."""
    import shutil

    import torch

    from common.errors import CheckpointError

    shutil.copytree(Path(tiny_run.output.dir) / "stage2", tmp_path / "stage2")
    cfg = _config(
        tiny_run,
        tmp_path / "cluster",
        "predict.cluster=local:1",
        f"stage2.checkpoint={tmp_path / 'stage2' / 'best.pt'}",
        f"bboxes.path={tiny_run.output.dir}/bboxes.csv",
    )
    source = open_source(cfg)
    source.hash("refiner")  # what the client's chunk key holds
    checkpoint = torch.load(tmp_path / "stage2" / "best.pt", weights_only=True)
    torch.save(checkpoint | {"epoch": checkpoint["epoch"] + 1}, tmp_path / "stage2" / "best.pt")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'stage2' / 'best.pt'}: changed since this run hashed it"):
        s2_predict.main(cfg, source)
    assert not list((tmp_path / "cluster").glob("stage2_chunks/*/part-*.csv"))
