"""`maskpipe stop`: stop a submitted run's Ray job, or a run in the foreground on this machine (SIGTERM to
its driver, as Ctrl-C stops it); the run records 'stopped' and can be resumed (see `jobs/ray_jobs.py`).
"""

from __future__ import annotations

import time

from maskpipe.jobs.ray_jobs import TERMINAL, _latest_job, _read_json, resume_hint, run_args, run_dir_of
from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.rundir import RunDir


def add(sub) -> None:
    p = sub.add_parser("stop", help="stop a submitted run (resumable)")
    run_args(p)
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the job to end")
    p.set_defaults(fn=cmd_stop)


def cmd_stop(a) -> None:
    run_dir = run_dir_of(a.run, a.runs_dir)
    if not _read_json(RunDir(run_dir).jobs).get("submissions"):
        return _stop_foreground(run_dir, a.timeout)
    client, job = _latest_job(run_dir)
    client.stop_job(job)
    deadline = time.monotonic() + a.timeout
    while (state := str(client.get_job_status(job).value)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"{run_dir.name}: job {job} {state.lower()}; continue it with `maskpipe resume {a.run}`")


def _stop_foreground(run_dir, timeout: float) -> None:
    """A run that was never submitted: its driver is the process that owns the run directory. On this
    host it gets SIGTERM, which a run takes as Ctrl-C (it records 'stopped' and prints its resume line)."""
    import os
    import signal
    import socket

    from maskpipe.pipeline.io import rundir

    if not rundir.alive(run_dir):
        print(f"{run_dir.name}: not running; continue it with: {resume_hint(run_dir)}")
        return
    owner = rundir.owner(run_dir)
    if not owner.get("pid") or owner.get("host") != socket.gethostname():
        raise MaskpipeError(f"{run_dir}: runs in the foreground as {rundir.describe(owner)}: stop it there "
                            "(Ctrl-C, or `maskpipe stop` on that host)")
    os.kill(int(owner["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while rundir.alive(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    if rundir.alive(run_dir):
        raise MaskpipeError(f"{run_dir}: pid {owner['pid']} was sent SIGTERM but still runs after {timeout:g} s")
    print(f"{run_dir.name}: stopped (pid {owner['pid']}); continue it with: {resume_hint(run_dir)}")
