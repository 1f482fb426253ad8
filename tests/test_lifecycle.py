"""The run lifecycle, driven through the CLI as a user and a careless operator would: a run directory
two processes cannot corrupt, a run that resumes from anywhere (another working directory, a moved
directory, a killed driver, a kill before the first checkpoint), output paths that never replace
what is not theirs, and one line (exit 2, nothing written) for every bad input."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from maskpipe.jobs.cli import main
from maskpipe.pipeline.io import rundir
from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, load_artifact
from maskpipe.pipeline.config import config_from_dict, load_config
from maskpipe.pipeline.io.loggers import read_metrics
from maskpipe.pipeline.run.preflight import check_resumable
from maskpipe.pipeline.run.runner import LocalBackend, run
from tests.conftest import MODEL_FLAGS, cli_fails, CORPORA, MICRO, ROOT, stop_at
from tests.test_ray import head  # noqa: F401 - the module's Ray head, for the tests marked slow at the end

MODEL = MODEL_FLAGS


def fails(argv: list[str], capsys, message: str, *absent) -> str:
    return cli_fails(argv, capsys, message, *absent, one_line=True)


def recipe(tmp_path: Path, steps: int = 2, checkpoint_every: int = 50, log_every: int = 2, **workers) -> dict:
    return {
        "name": "life", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(MICRO), "dtype": "float32", "device": "cpu"},
        "data": {"calib": {"sources": [str(CORPORA / "kjv.train.txt")]}},
        "stages": [{"stage": "oneshot", "method": "magnitude"},
                   {"stage": "learn", "name": "maskllm", "data": "calib", "prior": {"stage": "magnitude"},
                    "steps": steps, "batch_size": 2, "seqlen": 32, "log_every": log_every,
                    "checkpoint_every": checkpoint_every}],
        "workers": {"num_workers": 0, **workers},
    }


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


# ------------------------------------------------------------------------------ the run directory


def test_a_held_run_directory_is_refused_and_a_dead_owners_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "r"
    with rundir.RunLock(run_dir):
        owner = json.loads((run_dir / rundir.LOCK).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        assert rundir.alive(run_dir)
        with pytest.raises(Exception, match=rf"in use by pid {os.getpid()} on {re.escape(socket.gethostname())} since"):
            rundir.RunLock(run_dir).acquire()
        config = write_recipe(tmp_path / "c.yaml", recipe(tmp_path))
        fails(["run", str(config), "--run-dir", str(run_dir)], capsys, "run directory in use by pid")
        assert not (run_dir / "config.yaml").exists()
        shutil.copy(config, run_dir / "config.yaml")  # a run in progress: `resume` would submit a second driver
        fails(["resume", str(run_dir)], capsys, "run directory in use by pid", run_dir / "jobs.json")
    assert not rundir.alive(run_dir)
    # The lock of a process that died (here: a lock file no live process holds) is simply taken.
    (run_dir / rundir.LOCK).write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "started": "x"}))
    with rundir.RunLock(run_dir):
        assert json.loads((run_dir / rundir.LOCK).read_text())["pid"] == os.getpid()


def test_a_run_directory_that_is_a_file_is_refused(tmp_path, capsys):
    config = write_recipe(tmp_path / "c.yaml", recipe(tmp_path))
    (tmp_path / "file").write_text("mine")
    fails(["run", str(config), "--run-dir", str(tmp_path / "file")], capsys, "is a file, not a run directory")
    fails(["run", str(config), "--run-dir", str(tmp_path / "file" / "r")], capsys, "file is a file, not a directory")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.mark.slow
def test_a_run_resumes_after_a_move_from_another_directory_and_reads_old_paths(tmp_path, monkeypatch, capsys):
    raw = recipe(tmp_path)
    config = write_recipe(tmp_path / "c.yaml", raw)
    monkeypatch.chdir(tmp_path)

    with monkeypatch.context() as m:
        stop_at(m)
        assert main(["run", str(config), "--run-dir", "runs/x"]) == 130
    assert "stopped in maskllm; resume with: maskpipe run " in capsys.readouterr().err
    results = json.loads((tmp_path / "runs/x/results.json").read_text())
    assert results["done"] == ["magnitude"]
    assert results["stages"]["magnitude"]["artifact"] == "artifacts/magnitude"  # run-relative
    assert json.loads((tmp_path / "runs/x/status.json").read_text())["status"] == "stopped"
    # What an earlier version stored: the path relative to the directory the run was started from.
    results["stages"]["magnitude"]["artifact"] = "runs/x/artifacts/magnitude"
    (tmp_path / "runs/x/results.json").write_text(json.dumps(results))
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(tmp_path / "runs/x", moved)
    monkeypatch.chdir(moved.parent)  # neither the old directory nor the new one's parent is the old cwd
    assert main(["run", str(moved / "config.yaml"), "--run-dir", "moved"]) == 0
    results = json.loads((moved / "results.json").read_text())
    assert results["done"] == ["magnitude", "maskllm"]
    assert results["stages"]["maskllm"]["artifact"] == "artifacts/maskllm"
    _, manifest = load_artifact(moved / "artifacts/maskllm")
    assert manifest["method"]["prior"]["artifact"] == str(moved / "artifacts/magnitude")


@pytest.mark.slow
def test_a_resume_before_the_first_checkpoint_logs_each_step_once(tmp_path, monkeypatch):
    """A stage that died before its first checkpoint starts over: what it logged is dropped, not repeated."""
    raw = recipe(tmp_path, steps=3, log_every=1)
    run_dir = tmp_path / "r"
    cfg = config_from_dict(raw)
    original = LocalBackend.execute

    def dies_at_step_2(self, kind, ctx):
        from maskpipe.pipeline.io.loggers import MetricsLog

        real = MetricsLog.__call__

        def log(metrics, entry):
            real(metrics, entry)
            if entry.get("step") == 2:
                raise KeyboardInterrupt

        with monkeypatch.context() as m:
            if kind.name == "learn":
                m.setattr(MetricsLog, "__call__", log)
            return original(self, kind, ctx)

    with monkeypatch.context() as m:
        m.setattr(LocalBackend, "execute", dies_at_step_2)
        with pytest.raises(KeyboardInterrupt):
            run(cfg, run_dir)
    assert [e["step"] for e in read_metrics(run_dir / "metrics.jsonl")] == [1, 2]
    assert not (run_dir / "checkpoints" / "maskllm").exists() or not any((run_dir / "checkpoints" / "maskllm").iterdir())
    run(cfg, run_dir)
    assert [e["step"] for e in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_a_resume_may_change_how_a_run_runs_but_not_what_it_computes(tmp_path):
    raw = recipe(tmp_path)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_from_dict(raw).model_dump(mode="json")))
    moved_corpus = json.loads(json.dumps(raw))
    moved_corpus["data"]["calib"]["sources"] = ["tests/fixtures/corpora/kjv.train.txt"]
    for other in ({**raw, "workers": {"num_workers": 2, "max_failures": 0}}, {**raw, "output_dir": "/elsewhere"},
                  {**raw, "model": {**raw["model"], "device": "auto"}}, moved_corpus):
        check_resumable(config_from_dict(other), run_dir)
    with pytest.raises(Exception, match=r"holds a run of another config; .*differs in seed \(0 -> 1\)"):
        check_resumable(config_from_dict({**raw, "seed": 1}), run_dir)
    other_corpus = json.loads(json.dumps(raw))
    other_corpus["data"]["calib"]["sources"] = [str(CORPORA / "pydocs.train.txt")]
    with pytest.raises(Exception, match=r"differs in data.calib.sources.0.path"):
        check_resumable(config_from_dict(other_corpus), run_dir)


def test_status_of_a_run_whose_driver_died_says_died_and_how_to_resume(tmp_path, capsys):
    run_dir = tmp_path / "r"
    config = write_recipe(tmp_path / "c.yaml", recipe(tmp_path))
    run_dir.mkdir()
    shutil.copy(config, run_dir / "config.yaml")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"stage": "maskllm", "step": 40, "loss": 3.0}) + "\n")
    # What a driver killed with SIGKILL leaves: status "running", and a lock nobody holds.
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "stage": "maskllm", "pid": 999999,
                                                     "host": socket.gethostname()}))
    (run_dir / rundir.LOCK).write_text(json.dumps({"pid": 999999, "host": socket.gethostname(), "started": "t"}))
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"status: died", out) and re.search(r"step: 40", out), out
    assert f"resume: maskpipe run {run_dir / 'config.yaml'} --run-dir {run_dir}" in out
    assert main(["runs", "--runs-dir", str(tmp_path)]) == 0
    assert re.search(r"r\s+life\s+maskllm\s+40\s+died", capsys.readouterr().out)
    with rundir.RunLock(run_dir):  # a live owner: running
        assert main(["status", str(run_dir)]) == 0
        assert re.search(r"status: running", capsys.readouterr().out)


def test_submit_without_a_cluster_leaves_nothing(tmp_path, capsys):
    raw = recipe(tmp_path)
    raw["workers"]["num_workers"] = 1
    config = write_recipe(tmp_path / "c.yaml", raw)
    fails(["submit", str(config), "--address", "http://127.0.0.1:9", "--run-dir", str(tmp_path / "s")], capsys,
          "--address http://127.0.0.1:9: cannot reach the Ray cluster", tmp_path / "s")


# ------------------------------------------------------------------------------ output paths


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails the test: output paths are checked before any model work."""
    import maskpipe.pipeline.io.session; from maskpipe import pipeline

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline.io.session.Session, "__init__", refuse)


def test_eval_out_never_replaces_an_unrelated_file(tmp_path, no_model, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"todo": "keep"}')
    fails(["eval", *MODEL, "--data", str(CORPORA / "kjv.valid.txt"), "--seqlen", "64", "--out", str(notes)], capsys,
          "notes.json: exists and is not an earlier `maskpipe eval --out` result; refusing to replace it")
    assert notes.read_text() == '{"todo": "keep"}'
    fails(["eval", *MODEL, "--data", str(CORPORA / "kjv.valid.txt"), "--seqlen", "64", "--out", str(tmp_path)],
          capsys, "is a directory; give a file path")


def test_retrieval_out_never_writes_into_an_unrelated_directory(tmp_path, no_model, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"done": []}')  # e.g. a run directory's
    fails(["retrieval", *MODEL, "--passkey", "64", "--out", str(mine)], capsys,
          "mine: exists and is not an earlier `maskpipe retrieval --out` directory")
    assert os.listdir(mine) == ["results.json"]


def test_oneshot_out_replaces_only_an_artifact_of_the_same_method(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["oneshot", *MODEL, "--method", "magnitude", "--out", str(out)]) == 0
    before = (out / MANIFEST_FILE).read_text()
    fails(["oneshot", *MODEL, "--method", "wanda", "--data", str(CORPORA / "kjv.train.txt"), "--n-samples", "2",
           "--seqlen", "32", "--out", str(out)], capsys, "holds a magnitude artifact; refusing to replace it with wanda")
    assert (out / MANIFEST_FILE).read_text() == before
    assert main(["oneshot", *MODEL, "--method", "magnitude", "--out", str(out)]) == 0  # its own earlier output


# ------------------------------------------------------------------------------ bad input, one line


def test_corpus_files_that_are_not_what_they_say_are_refused_by_validate(tmp_path, capsys):
    cases = {"latin1.txt": ("Caf\xe9 au lait\n".encode("latin-1"), "not UTF-8 text (byte 3)"),
             "blob.txt": (bytes(range(256)), "a binary file, not text"),
             "bad.jsonl": (b'{"text": "ok"}\n{"text": broken\n', "line 2 is not JSON"),
             "fake.parquet": (b"text,not,parquet\n", "not a parquet file"),
             "missing.txt": (None, "no files match")}
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        raw = recipe(tmp_path)
        raw["data"]["calib"] = {"sources": [str(tmp_path / name)]}
        config = write_recipe(tmp_path / "c.yaml", raw)
        err = fails(["validate", str(config)], capsys, message)
        assert name in err
        fails(["run", str(config), "--run-dir", str(tmp_path / "r")], capsys, message, tmp_path / "r")
        fails(["eval", *MODEL, "--data", str(tmp_path / name), "--out", str(tmp_path / "e.json")], capsys, message,
              tmp_path / "e.json")


def test_sequences_beyond_the_models_context_are_refused(tmp_path, no_model, capsys):
    raw = recipe(tmp_path)
    raw["stages"][1]["seqlen"] = 4096
    config = write_recipe(tmp_path / "c.yaml", raw)
    fails(["validate", str(config)], capsys,
          "stages.1.seqlen: 4096 tokens is beyond the context of")
    err = fails(["eval", *MODEL, "--data", str(CORPORA / "kjv.valid.txt"), "--seqlen", "4096"], capsys,
                "--seqlen: 4096 tokens is beyond the context")
    assert "(max_position_embeddings 2048)" in err
    fails(["retrieval", *MODEL, "--passkey", "3000", "--out", str(tmp_path / "o")], capsys,
          "--passkey: 3000 tokens is beyond the context", tmp_path / "o")


@pytest.mark.parametrize("device,message", [("tpu9", "--device: 'tpu9' is no device"),
                                            ("cuda", "--device: cuda asked for, but this machine has 0 CUDA devices")])
def test_a_device_that_is_not_here_is_refused(device, message, tmp_path, no_model, capsys):
    argv = ["eval", "--model", str(MICRO), "--device", device, "--data", str(CORPORA / "kjv.valid.txt"),
            "--seqlen", "64", "--out", str(tmp_path / "e.json")]
    fails(argv, capsys, message, tmp_path / "e.json")


def test_an_unwritable_output_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    fails(["oneshot", *MODEL, "--method", "magnitude", "--out", str(tmp_path / "file" / "a")], capsys,
          f"{tmp_path / 'file'}")


def test_a_corrupted_model_is_one_line(tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(MICRO, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    fails(["eval", "--model", str(broken), "--device", "cpu", "--data", str(CORPORA / "kjv.valid.txt"),
           "--seqlen", "64"], capsys, f"model {str(broken)!r}: cannot load")


# ------------------------------------------------------------------------------ the command line


def test_the_command_line_helps_and_takes_overrides_after_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 0 and "usage: maskpipe" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert re.match(r"maskpipe \d+\.\d+", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 2048, from the config)" in capsys.readouterr().out
    config = write_recipe(tmp_path / "c.yaml", recipe(tmp_path))
    assert main(["validate", str(config), "--print", "seed=7", "stages.1.steps=3"]) == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out and "steps: 3" in out
    with pytest.raises(SystemExit):
        main(["validate", str(config), "--print", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# ------------------------------------------------------------------------------ real processes


def cli(*args: str, **kw) -> subprocess.Popen:
    # SIGINT at its default in the driver, as in a terminal: a suite started in the background by a
    # non-interactive shell ignores SIGINT, the driver would inherit that and shrug off the test's Ctrl-C
    return subprocess.Popen([sys.executable, "-m", "maskpipe.jobs.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kw)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if "step" in m]
        if steps and steps[-1] >= step:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise TimeoutError(f"{run_dir}: step {step} not reached")


@pytest.mark.slow
def test_two_drivers_ctrl_c_and_a_killed_driver(tmp_path, capsys):
    """A second `maskpipe run` on a live run is refused; Ctrl-C says where to resume; a driver killed
    with SIGKILL before its first checkpoint shows as died, and its resume logs every step once."""
    # long enough that each driver is still learning when the test acts on it (30 steps take about a second)
    steps = 300
    config = write_recipe(tmp_path / "c.yaml", recipe(tmp_path, steps=steps, checkpoint_every=1000))
    run_dir = tmp_path / "r"
    first = cli("run", str(config), "--run-dir", str(run_dir))
    try:
        wait_for_step(run_dir, 4, first)
        fails(["run", str(config), "--run-dir", str(run_dir)], capsys,
              f"run directory in use by pid {first.pid} on {socket.gethostname()} since")
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130, f"exit {first.returncode}: {err[-3000:]}"  # -2: died of the SIGINT
    assert re.search(rf"stopped at step \d+ of \S+; resume with: maskpipe run {re.escape(str(run_dir))}/config.yaml "
                     rf"--run-dir {re.escape(str(run_dir))}", err) and "Traceback" not in err, err[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "stopped"

    second = cli("run", str(run_dir / "config.yaml"), "--run-dir", str(run_dir))
    try:
        deadline = time.monotonic() + 300
        while (run_dir / "run.log").read_text().count("maskllm: learning") < 2:
            assert second.poll() is None and time.monotonic() < deadline, second.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(1)
        second.kill()  # SIGKILL: no handler runs, status.json still says running
        second.communicate(timeout=60)
    finally:
        second.kill()
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    assert "status: died" in capsys.readouterr().out
    run(load_config(run_dir / "config.yaml"), run_dir)
    assert [m["step"] for m in read_metrics(run_dir / "metrics.jsonl")] == list(range(2, steps + 1, 2))


# ------------------------------------------------------------------------------ a real local Ray


@pytest.fixture(scope="module")
def local_ray(head):
    """tests/test_ray.py's head (`ray start --head` on loopback, 4 CPUs), this process connected."""
    import ray

    return ray.cluster_resources()


@pytest.mark.slow
def test_impossible_resources_are_refused_with_the_numbers(local_ray, tmp_path, capsys):
    cpus = int(local_ray["CPU"])
    raw = recipe(tmp_path)
    raw["workers"] = {"num_workers": 64, "max_failures": 0}
    raw["stages"][1]["batch_size"] = 64
    fails(["run", str(write_recipe(tmp_path / "a.yaml", raw)), "--run-dir", str(tmp_path / "a")], capsys,
          f"workers: asked 64 worker(s) x 1 CPU, the Ray cluster has {cpus} CPU", tmp_path / "a")
    raw["workers"] = {"num_workers": 1, "use_gpu": True}
    fails(["run", str(write_recipe(tmp_path / "b.yaml", raw)), "--run-dir", str(tmp_path / "b")], capsys,
          "workers: asked 1 worker(s) x 1 GPU, the Ray cluster has 0 GPU", tmp_path / "b")


@pytest.mark.slow
def test_an_error_of_ours_in_a_worker_group_is_one_line_and_a_non_ascii_run_directory_works(local_ray, tmp_path,
                                                                                              capsys):
    """The group's error ends the run at once (no restarts: the driver raises the workers' own
    message), under a run directory whose name Ray Train could not encode."""
    prior = tmp_path / "prior"
    assert main(["oneshot", *MODEL, "--method", "magnitude", "--out", str(prior)]) == 0
    raw = recipe(tmp_path)
    raw["stages"] = [{"stage": "learn", "name": "maskllm", "data": "calib", "pattern": "4:8",
                      "prior": {"artifact": str(prior)}, "steps": 2, "batch_size": 2, "seqlen": 32}]
    raw["workers"] = {"num_workers": 1, "max_failures": 3}
    run_dir = tmp_path / "rün-α"
    capsys.readouterr()
    assert main(["run", str(write_recipe(tmp_path / "c.yaml", raw)), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    # the last line; above it, what Ray itself prints on the console
    assert err.strip().splitlines()[-1] == f"error: maskllm: prior {prior} is 2:4, the stage learns 4:8", err[-3000:]
    assert "TrainingFailedError" not in err and "ascii" not in err, err[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "is 2:4, the stage learns 4:8" in status["error"]
    assert "ascii" not in (run_dir / "run.log").read_text()
