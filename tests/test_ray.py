"""Runs on a real local Ray cluster (a head started on loopback, token authentication on): data-parallel
worker groups, a worker killed mid-run, stop and resume through the CLI, and `maskpipe submit`."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from maskpipe.cluster import connect, head_env
from maskpipe.jobs.cli import main
from maskpipe.jobs.ray_jobs import TERMINAL, _job_status
from maskpipe.pipeline.io.artifacts import load_soft_logits, read_manifest
from maskpipe.pipeline.config import config_from_dict
from maskpipe.pipeline.run.runner import read_metrics, run
from tests.conftest import CORPORA, MICRO, ROOT

pytestmark = pytest.mark.slow
STEPS = 80


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head` on loopback; yields the dashboard (jobs) address. Ray's token is kept."""
    import ray

    port, dash = _free_port(), _free_port()
    env = head_env()
    temp = Path(f"/tmp/maskpipe-ray-{os.getpid()}")
    started = subprocess.run(["ray", "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1",
                              f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true",
                              f"--temp-dir={temp}", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        # The head binds the node's own address, which `ray start` prints for other nodes to join.
        connect(re.search(r"ray start --address='([^']+)'", started.stdout + started.stderr).group(1))
        yield f"http://127.0.0.1:{dash}"
    finally:
        ray.shutdown()
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True)


def learn_config(tmp_path: Path, workers: int, strategy: str = "ddp") -> dict:
    """A learning-only recipe long enough to be interrupted; float32 logits are compared across runs."""
    return {
        "name": "dp", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(MICRO), "dtype": "float32", "device": "cpu"},
        "data": {"calib": {"sources": [str(CORPORA / "kjv.train.txt"), str(CORPORA / "pydocs.train.txt")],
                           "shuffle_buffer": 16}},
        "stages": [{"stage": "learn", "name": "maskllm", "data": "calib", "steps": STEPS, "batch_size": 4,
                    "seqlen": 64, "lr": 1e-2, "log_every": 5, "checkpoint_every": 10, "save_logits": "float32"}],
        "workers": {"num_workers": workers, "max_failures": 2, "strategy": strategy},
    }


def learned_logits(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_soft_logits(run_dir / "artifacts" / "maskllm")


def wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if "step" in m]
        if steps and steps[-1] >= step:
            return steps[-1]
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir}: step {step} not reached")


def wait_for_ray_checkpoint(run_dir: Path, timeout: float = 60) -> None:
    """Until Ray Train's controller has taken a checkpoint: a worker's report waits in a queue until
    the controller polls (every 2 s), and a run stopped before then resumes from the start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for snap in (run_dir / "train").glob("*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(snap.read_text()).get("latest_checkpoint_result"):
                    return
            except (OSError, ValueError):  # being written
                pass
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir}: Ray Train took no checkpoint")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, no Ray."""
    tmp = tmp_path_factory.mktemp("single")
    return learned_logits(run(config_from_dict(learn_config(tmp, 0)), tmp / "run"))


@pytest.fixture(scope="module")
def single_on_one_thread(tmp_path_factory):
    """The reference on the thread count of a one-CPU Ray worker (Ray sets OMP_NUM_THREADS to its CPUs):
    CPU kernels split their reductions by thread count, so only the same count gives the same bits."""
    tmp = tmp_path_factory.mktemp("single1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return learned_logits(run(config_from_dict(learn_config(tmp, 0)), tmp / "run"))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_workers(head, tmp_path_factory):
    """Two Ray Train workers sharding the model and the mask state with FSDP2."""
    from maskpipe.workers.backend import RayBackend

    tmp = tmp_path_factory.mktemp("two")
    cfg = config_from_dict(learn_config(tmp, 2, "fsdp"))
    run_dir = run(cfg, tmp / "run", RayBackend(cfg))
    return run_dir, learned_logits(run_dir)


def test_two_workers_learn_what_one_process_learns(single, two_workers):
    run_dir, logits = two_workers
    assert json.loads((run_dir / "results.json").read_text())["stages"]["maskllm"]["workers"] == 2
    # Same blocks and Gumbel noise per step; only the order of float additions differs (the
    # reduce-scattered average of two half-batch gradients against one whole-batch gradient). After 80 Adam steps at lr 1e-2
    # (logits travel ~1) a few logits differ by up to ~5e-3: the stated tolerance is 1e-2.
    for k in single:
        torch.testing.assert_close(logits[k], single[k], atol=1e-2, rtol=0)
    agree = sum(int((logits[k].argmax(-1) == single[k].argmax(-1)).sum()) for k in single)
    assert agree / sum(v[..., 0].numel() for v in single.values()) > 0.999


def test_two_workers_learn_the_gates_one_process_learns(head, tmp_path):
    """A learned attention stage runs on a Ray Train group as a learn stage does, each worker half of
    every batch of passkey samples (`pipeline.attention.gates.GateLearning`)."""
    from maskpipe.workers.backend import RayBackend

    def gates(workers: int) -> torch.Tensor:
        raw = learn_config(tmp_path / str(workers), workers)
        raw["stages"] = [{"stage": "attention", "name": "duo", "data": "calib", "steps": 4, "batch_size": 2,
                          "seqlen": 128, "lr": 0.1, "log_every": 2, "checkpoint_every": 2}]
        cfg = config_from_dict(raw)
        run_dir = run(cfg, tmp_path / str(workers) / "run", RayBackend(cfg) if workers else None)
        plan = read_manifest(run_dir / "artifacts" / "duo")["attention"]
        return torch.tensor([[h["gate"] for h in layer] for layer in plan["layers"]])

    torch.testing.assert_close(gates(2), gates(0), atol=1e-4, rtol=0)


def test_a_killed_worker_restarts_from_the_last_checkpoint_and_ends_with_the_same_mask(head, two_workers, tmp_path):
    from ray.util.state import list_actors

    from maskpipe.workers.backend import RayBackend

    cfg = config_from_dict(learn_config(tmp_path, 2, "fsdp"))
    run_dir = tmp_path / "run"
    errors = []

    def learn() -> None:
        try:
            run(cfg, run_dir, RayBackend(cfg))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    thread = threading.Thread(target=learn)
    thread.start()
    # Step 30 is logged after step 20's checkpoint report, which waits until Ray Train has taken step 10's:
    # a checkpoint to resume from exists when the worker dies (the kill lands a few steps later)
    wait_for_step(run_dir, 30)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers
    os.kill(workers[-1].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and not errors
    resumed = [int(x) for x in re.findall(r"resumed_from_step=(\d+)", (run_dir / "run.log").read_text())]
    assert resumed and 10 <= resumed[0] < STEPS  # restarted, from a checkpoint, not from the start
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(range(5, STEPS + 1, 5))
    reference = two_workers[1]
    for k, v in learned_logits(run_dir).items():
        assert torch.equal(v, reference[k]), k


def cli(*args: str) -> str:
    """`maskpipe ARGS` in a fresh process (as a user types it), from the repository root."""
    out = subprocess.run([sys.executable, "-m", "maskpipe.jobs.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "RAY_AUTH_MODE": "token"}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def wait_for_status(run_dir: Path, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        if status.get("status") in ("completed", "failed"):
            return status
        time.sleep(0.5)
    raise TimeoutError(f"{run_dir} did not finish")


def test_stop_then_resume_continues_from_the_checkpoint(head, single_on_one_thread, tmp_path, capsys):
    config = tmp_path / "learn.yaml"
    config.write_text(yaml.safe_dump(learn_config(tmp_path, 1)))
    run_dir = Path(re.search(r"run directory: (.+)", cli("submit", str(config), "--address", head)).group(1))
    wait_for_step(run_dir, 20)
    wait_for_ray_checkpoint(run_dir)
    # In this process: a fresh one spends seconds importing Ray, and the run could end meanwhile.
    assert main(["stop", str(run_dir)]) == 0
    assert "stopped" in capsys.readouterr().out
    steps = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")]
    assert steps[-1] < STEPS
    assert "resumed run" in cli("resume", str(run_dir))
    assert wait_for_status(run_dir)["status"] == "completed"
    assert re.search(r"resumed_from_step=\d+", (run_dir / "run.log").read_text())
    # Every step logged once, in order: no batch seen twice or skipped ...
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(range(5, STEPS + 1, 5))
    # ... and the logits are, bit for bit, the ones an uninterrupted run learns on the worker's thread
    # count. (Against the 2-thread in-process reference they differed by up to 1.2e-3: the thread count,
    # not the resume; issue #27 item 5.)
    learned = learned_logits(run_dir)
    assert set(learned) == set(single_on_one_thread)
    assert all(torch.equal(learned[k], single_on_one_thread[k]) for k in learned)
    assert len(json.loads((run_dir / "jobs.json").read_text())["submissions"]) == 2


def test_submit_tiny_yaml_to_a_ray_head(head, tmp_path):
    """The README's cluster path: the embedded default config, submitted as a Ray job."""
    # A shorter learn stage than the README's: the main command's quality is test_cli's to check; this
    # test is about the job's lifecycle (submit, status, logs, runs) on a Ray head.
    steps = 30
    out = cli("submit", "configs/tiny.yaml", f"output_dir={tmp_path}", f"stages.3.steps={steps}", "--address", head)
    run_id = re.search(r"submitted run (\S+)", out).group(1)
    run_dir = tmp_path / run_id
    assert wait_for_status(run_dir)["status"] == "completed"
    # The driver writes its last status just before its process, and so the Ray job, ends.
    deadline = time.monotonic() + 60
    while _job_status(run_dir) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    status = cli("status", run_id, "--runs-dir", str(tmp_path))
    assert re.search(r"status: completed", status) and "job status: SUCCEEDED" in status
    logs = cli("logs", run_id, "--runs-dir", str(tmp_path))
    assert "| maskllm |" in logs and f"run directory: {run_dir}" in logs
    table = cli("runs", "--runs-dir", str(tmp_path))
    assert re.search(rf"{run_id}\s+tiny\s+eval\s+{steps}\s+completed\s+loss", table)

    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"]["maskllm"]["workers"] == 2
    # the learned mask beats its own one-shot prior, on both corpora
    for corpus in ("kjv", "pydocs"):
        assert results["perplexity"]["maskllm"][corpus]["ppl"] < results["perplexity"]["sparsegpt"][corpus]["ppl"]
