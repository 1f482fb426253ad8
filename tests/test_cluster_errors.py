"""Nothing lost, ever (#27), where a Ray cluster is involved: an address where nothing listens is one line
within seconds in every command that takes one, a run the cluster cannot hold is refused before it is
submitted, and a run on a cluster keeps the console readable and says in run.log when its worker group lost
a worker and restarted. Every case goes through the command line."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.test_nothing_lost import learn_recipe


def free_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*argv, timeout=60):
    """`maskpipe ARGV` in a fresh process of this checkout: (exit code, stderr, seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    start = time.monotonic()
    try:
        out = subprocess.run([sys.executable, "-m", "maskpipe.jobs.cli", *map(str, argv)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"maskpipe {' '.join(map(str, argv))}: no answer in {timeout} s")
    return out.returncode, out.stderr, time.monotonic() - start


@pytest.mark.parametrize("command", ["run", "run ray://", "submit", "submit http://", "resume", "tune"])
def test_an_address_where_nothing_listens_is_one_line_within_seconds(command, tmp_path):
    port = free_port()
    name, _, scheme = command.partition(" ")
    address = f"{scheme}127.0.0.1:{port}"
    config = learn_recipe(tmp_path)
    run_dir = tmp_path / "r"
    argv = {"run": ["run", config, "workers.num_workers=1", "--run-dir", run_dir],
            "submit": ["submit", config, "--run-dir", run_dir],
            "resume": ["resume", run_dir],
            "tune": ["tune", ROOT / "configs" / "tiny-tune.yaml", "--run-dir", run_dir]}[name]
    if name == "resume":  # a stopped run that was never submitted
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(config.read_text())
    code, err, seconds = cli(*argv, "--address", address)
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--address {address}: cannot reach the Ray cluster (127.0.0.1:{port}" in errors[0], err
    assert "Traceback" not in err and seconds < 30, (seconds, err[-3000:])
    if name == "submit":
        assert not run_dir.exists()


@pytest.fixture(scope="module")
def small_head():
    """A Ray head of its own on loopback with 2 CPUs (`ray start --head --block`: ending that one process
    ends every process it started, and nobody else's cluster); yields (dashboard address, GCS address)."""
    from maskpipe.cluster import cluster_resources, head_env, job_client

    port, dash = free_port(), free_port()
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true",
                             f"--temp-dir=/tmp/mp-head-{os.getpid()}", "--disable-usage-stats"],
                            env=head_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address, deadline = f"http://127.0.0.1:{dash}", time.monotonic() + 180
        while True:  # the dashboard answers, and lists the head's resources
            try:
                if cluster_resources(job_client(address)):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(1)
        yield address, f"127.0.0.1:{port}"
    finally:
        head.terminate()
        head.wait(120)


def test_submit_of_more_workers_than_the_cluster_has_is_refused_before_submitting(small_head, tmp_path):
    config, run_dir = learn_recipe(tmp_path), tmp_path / "r"
    code, err, _ = cli("submit", config, "workers.num_workers=4", "stages.1.batch_size=4", "--run-dir", run_dir, "--address", small_head[0],
                       timeout=120)
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: workers: asked 4 worker(s) x 1 CPU, the Ray cluster has 2 CPU (workers.num_workers, "
                      "workers.use_gpu, workers.resources_per_worker; set workers.autoscaling: true if the cluster "
                      "adds nodes on demand)"], err
    assert not run_dir.exists()  # nothing submitted, nothing left behind


def test_a_run_on_ray_prints_no_report_dicts_or_loading_bars_and_logs_a_lost_worker_in_run_log(small_head, tmp_path):
    import signal

    import yaml
    from ray.util.state import list_actors

    from maskpipe.pipeline.run.runner import read_metrics

    dashboard, gcs = small_head
    raw = yaml.safe_load(learn_recipe(tmp_path, steps=40).read_text())
    raw["workers"] = {"num_workers": 1, "max_failures": 2}
    raw["stages"][1]["checkpoint_every"] = 5
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "r"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    driver = subprocess.Popen([sys.executable, "-m", "maskpipe.jobs.cli", "run", str(tmp_path / "c.yaml"), "--run-dir",
                               str(run_dir), "--address", gcs], cwd=ROOT, env={**env, "TQDM_DISABLE": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("step", 0) >= 10]:
            assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()[-3000:]
            time.sleep(0.2)
        workers = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"),
                                                         ("state", "=", "ALIVE")])
        assert workers
        os.kill(workers[-1].pid, signal.SIGKILL)
        console, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, console[-3000:]
    for noise in ("Reporting training result", "Checkpoint successfully created", "Loading weights"):
        assert noise not in console, console[-3000:]
    log = (run_dir / "run.log").read_text()
    assert "maskllm: a worker of the group died or was lost; the group restarted (restart 1 of 2" in log, log[-3000:]
    assert "maskllm: the worker group was restarted 1 time(s) after losing a worker" in console, console[-3000:]
