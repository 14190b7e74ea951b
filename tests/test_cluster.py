"""Prediction on Dask distributed (predict.cluster): the bytes of a local run, on a LocalCluster
with a worker killed by SIGKILL mid-run (retried by Dask) and on a cluster started as users start
one (`dask scheduler`, `dask worker`); an unreachable scheduler refused before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import closed_port, tiny_config, tiny_nets

from common.model_source import open_source
from pipelines.cli import main as cli
from stage1_lowres import predict as s1_predict
from stage2_fullres import predict as s2_predict

pytest.importorskip("distributed", reason="Dask distributed is not installed (pip install '.[cluster]')")

OUTPUTS = ["bboxes.csv", "stage1_submission.csv.gz", "submission.csv.gz"]


def _config(tiny_run, out, *more):
    return tiny_config(
        tiny_run.data.root,
        out,
        *tiny_nets(tiny_run),
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
    """A scheduler address on which nothing listens (a port this test holds, so nothing else can take it)."""
    out = tmp_path / "out"
    src = tiny_run.output.dir
    with closed_port() as port:
        code = cli(
            [
                "stage2",
                "predict",
                f"data.root={tiny_run.data.root}",
                f"output.dir={out}",
                f"bboxes.path={src}/bboxes.csv",
                *tiny_nets(tiny_run),
                f"predict.cluster=tcp://127.0.0.1:{port}",
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


def _place(name, address="tcp://10.0.0.5:4002", neighbours=None, visible=None, dask_cuda=False):
    from common.prediction.cluster import WorkerPlace

    return WorkerPlace(name, address, tuple(neighbours or [address]), visible, dask_cuda)


def test_a_worker_takes_its_own_gpu_from_the_surest_evidence_and_says_when_it_guesses():
    """Stand-ins for what a worker sees, one case for each way users start workers on a 4-GPU machine."""
    from common.prediction.cluster import worker_gpu

    host = [f"tcp://10.0.0.5:{port}" for port in (4001, 4002, 4003)]
    cases = [
        # CUDA_VISIBLE_DEVICES names one GPU (SLURM, `CUDA_VISIBLE_DEVICES=2 dask worker`): the only one it sees
        (_place("tcp://10.0.0.5:4002", neighbours=host, visible="2"), 1, 0, True),
        # dask-cuda: each worker's list starts with its own GPU, whatever its name
        (_place(3, neighbours=host, visible="3,0,1,2", dask_cuda=True), 4, 0, True),
        # a LocalCluster (predict.cluster=local:N): names 0..N-1
        (_place(1, neighbours=host), 4, 1, True),
        (_place("5", neighbours=host), 4, 1, False),  # more workers than GPUs: they share, and it says so
        # `dask worker --nworkers 3 --name box`: box-0, box-1, box-2
        (_place("box-2", neighbours=host), 4, 2, True),
        # a plain `dask worker --nworkers 3`: named by their addresses; their order on the host is a guess
        (_place("tcp://10.0.0.5:4002", neighbours=host), 4, 1, False),
        (_place("tcp://10.0.0.5:4002"), 4, 0, True),  # alone on its host: no one to share with
        # several GPUs listed without dask-cuda: the list is not the worker's own, so the name decides
        (_place(2, neighbours=host, visible="0,1,2,3"), 4, 2, True),
    ]
    for place, gpus, index, sure in cases:
        choice = worker_gpu(place, gpus)
        assert (choice.index, choice.sure) == (index, sure), (place, choice)
        assert choice.reason


def test_a_worker_that_guesses_its_gpu_says_so(monkeypatch, caplog):
    """device=auto on a plain `dask worker`'s process (stand-ins for CUDA with 4 GPUs and for the worker's
    place): the GPU of its place among its host's workers, and a warning that it is a guess."""
    import torch

    from common.prediction import cluster

    host = ("tcp://10.0.0.5:4001", "tcp://10.0.0.5:4002")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(cluster, "pick_device", torch.device)  # the real one would make it current
    monkeypatch.setattr(cluster.WorkerPlace, "here", classmethod(lambda cls: _place(host[1], host[1], host)))
    with caplog.at_level("WARNING", logger="carvana"):
        assert cluster.worker_device("auto") == torch.device("cuda:1")
    assert "cuda:1 chosen by its place 2 of 2 among its host's workers" in caplog.text
    caplog.clear()
    monkeypatch.setattr(cluster.WorkerPlace, "here", classmethod(lambda cls: _place(1, host[1], host)))
    with caplog.at_level("WARNING", logger="carvana"):
        assert cluster.worker_device("auto") == torch.device("cuda:1")
    assert not caplog.text  # a LocalCluster's worker 1 knows


def test_a_worker_finds_its_place_on_a_real_cluster():
    """On a LocalCluster of two workers (threads, this process), each worker reads its own name, address
    and its host's workers from the scheduler."""
    from distributed import Client, LocalCluster

    from common.prediction.cluster import WorkerPlace, worker_gpu

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        workers = sorted(client.scheduler_info()["workers"])
        places = {
            w: client.submit(WorkerPlace.here, workers=[w], pure=False, allow_other_workers=False).result()
            for w in workers
        }
    for address, place in places.items():
        assert place.address == address and place.neighbours == tuple(workers) and place.name in (0, 1)
    assert sorted(worker_gpu(p, 2).index for p in places.values()) == [0, 1]  # two workers, two GPUs
