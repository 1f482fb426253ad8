"""Runs on a Ray cluster: `maskpipe submit | status | logs | stop | resume | runs`.

A submitted run is a Ray job whose entrypoint is `maskpipe run RUN_DIR/config.yaml --run-dir RUN_DIR`,
with the project as the job's working directory. The run directory is created by `submit` before
anything runs, so it must be on storage that the cluster's nodes see at the same path (on one machine,
any local directory). It is the run's whole state: the resolved config, status, metrics, checkpoints,
artifacts and `jobs.json`, the run's Ray submissions, newest last. `resume` submits the same entrypoint
again, which continues from what the directory holds. `submit` and `resume` own the run directory
(`pipeline.io.rundir.RunLock`) while they set a job up, and the job's driver waits for them to let go, so a
second `submit`, `resume` or `run` on the same directory is refused while anything owns it. A run whose
status says running but whose owner is gone shows as `died`.

This module holds what those commands share: finding a run, its state and its Ray job, submitting it,
their common flags, and how a run (`run`, `tune`) ends when `stop` sends SIGTERM. Each command is in
`jobs/commands/<command>.py`.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# What a job needs of the project: the code and the vendored fixtures, not history or earlier runs.
EXCLUDES = [".git", ".ci", "runs", "docs", "benchmarks", "**/__pycache__", "*.egg-info", ".pytest_cache"]


def run_dir_of(run: str, runs_dir: str) -> Path:
    """RUN is a run directory or the id (directory name) of a run under `runs_dir`."""
    for path in (Path(run), Path(runs_dir) / run):
        if path.is_dir():
            if not RunDir(path).config.is_file():
                raise MaskpipeError(f"{path}: not a run directory (no config.yaml)")
            return path.resolve()
    raise MaskpipeError(f"no run {run!r}: neither a directory nor a run id under {runs_dir}/")


def _read_json(path: Path) -> dict:
    """A run's JSON record ({} if absent); one that is not a JSON object is named, one line."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise MaskpipeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise MaskpipeError(f"{path}: not a JSON object (holds a {type(value).__name__})")
    return value


def _latest_job(run_dir: Path):
    """(Jobs client of the run's cluster, id of its newest job)."""
    from maskpipe.cluster import job_client

    jobs = _read_json(RunDir(run_dir).jobs)
    if not jobs.get("submissions"):
        raise MaskpipeError(f"{run_dir}: was not submitted to a cluster (run in the foreground; see run.log)")
    return job_client(jobs["address"]), jobs["submissions"][-1]


# How long a job's driver waits for the `submit` or `resume` that launched it to let go of the run
# directory; a live run that owns it is still refused after that.
DRIVER_LOCK_WAIT_S = 60


def _submit(run_dir: Path, client) -> str:
    """Submit the run's entrypoint as a new Ray job of `client`'s cluster; the caller owns the run
    directory (`RunLock`) meanwhile."""
    from maskpipe.pipeline.io.artifacts import write_json

    paths = RunDir(run_dir)
    jobs = _read_json(paths.jobs)
    submissions = jobs.get("submissions", [])
    # `python` on the head node (the PATH Ray was started with), not this machine's sys.executable: the
    # job runs where the cluster is, and the submitting interpreter's path need not exist there (README).
    entrypoint = (f"python -m maskpipe.jobs.cli run {shlex.quote(str(paths.config))} "
                  f"--run-dir {shlex.quote(str(run_dir))} --wait-for-lock {DRIVER_LOCK_WAIT_S}")
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint,
            submission_id=f"{run_dir.name}-{len(submissions)}" if submissions else run_dir.name,
            runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES},
            metadata={"maskpipe_run": str(run_dir)},
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise MaskpipeError(f"{client.get_address()}: the cluster refused the job: {str(e).splitlines()[0]}") from None
    write_json(paths.jobs, {"address": client.get_address(), "submissions": submissions + [job_id]})
    return job_id


def _job_status(run_dir: Path) -> str | None:
    """The Ray status of the run's newest job; None if it never was a job, "unreachable" if the
    cluster does not answer."""
    if not _read_json(RunDir(run_dir).jobs).get("submissions"):
        return None
    try:
        client, job = _latest_job(run_dir)
        return str(client.get_job_status(job).value)
    except Exception:  # noqa: BLE001 - a cluster that is gone is a state to show, not an error
        return "unreachable"


def resume_hint(run_dir: Path) -> str:
    """The command that resumes a run, shell-quoted: it is pasted into a shell as it is printed."""
    q = shlex.quote
    if _read_json(RunDir(run_dir).jobs).get("submissions"):
        return f"maskpipe resume {q(str(run_dir))}"
    return f"maskpipe run {q(str(RunDir(run_dir).config))} --run-dir {q(str(run_dir))}"


def run_state(run_dir: Path, job: str | None = None) -> str:
    """What a run is doing: its status.json, corrected by what outlived it. A run whose status says
    running but whose owner is gone (killed, its machine lost) `died`; a job Ray ended without the
    run writing its end is `failed (job)` / `stopped (job)`."""
    from maskpipe.pipeline.io import rundir

    state = _read_json(RunDir(run_dir).status).get("status", "submitted")
    if state not in ("running", "submitted"):
        return state
    job = job or _job_status(run_dir)
    # A job killed outright never wrote its end; Ray knows it ended.
    if job in TERMINAL and job != "SUCCEEDED":
        return f"{job.lower()} (job)"
    if state == "running" and not rundir.alive(run_dir):
        return "died"
    return state


def run_summary(run_dir: Path, job: str | None = None) -> dict:
    """One row of `maskpipe runs`. The cluster is asked about the run's job (unless `job` already
    says) only while the run directory says it is running."""
    from maskpipe.pipeline.config import read_config_file
    from maskpipe.pipeline.io.loggers import read_metrics

    paths = RunDir(run_dir)
    name = read_config_file(paths.config).get("name", "")
    status = _read_json(paths.status)
    metrics = read_metrics(paths.metrics)
    last = metrics[-1] if metrics else {}
    state = run_state(run_dir, job)
    return {"run": run_dir.name, "config": name,
            "stage": status.get("stage") or "", "step": last.get("step", ""),
            "status": state, "last": f"loss {last['loss']:.4f}" if "loss" in last else ""}


ADDRESS_HELP = ("the Ray cluster: its dashboard http://HEAD:8265, or HEAD:6379 / auto as for `run` "
                "(default $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, then a cluster started on this machine)")


def runs_dir_arg(p) -> None:
    """--runs-dir: where a command looks run ids up."""
    from maskpipe.pipeline.config import Config

    p.add_argument("--runs-dir", default=Config.model_fields["output_dir"].default,
                   help="where run ids are looked up (a config's output_dir)")


def run_args(p) -> None:
    """RUN and --runs-dir, for the commands on one run (`status`, `logs`, `stop`, `resume`)."""
    p.add_argument("run", help="run directory or run id")
    runs_dir_arg(p)


def _interrupt(signum, frame):
    # `maskpipe stop` ends a Ray job with SIGTERM: finish as an interrupted run, which records "stopped".
    raise KeyboardInterrupt
