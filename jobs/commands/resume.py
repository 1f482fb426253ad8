"""`maskpipe resume`: submit a stopped or failed run again as a new Ray job, which continues from what its run
directory holds (see `jobs/ray_jobs.py`).
"""

from __future__ import annotations

from maskpipe.jobs.ray_jobs import ADDRESS_HELP, TERMINAL, _job_status, _read_json, _submit, run_args, run_dir_of
from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.rundir import RunDir


def add(sub) -> None:
    p = sub.add_parser("resume", help="submit a stopped or failed run again; it continues from its checkpoint")
    run_args(p)
    p.add_argument("--address", default=None, help=ADDRESS_HELP.replace("(default", "(default: the run's cluster, else"))
    p.set_defaults(fn=cmd_resume)


def cmd_resume(a) -> None:
    from maskpipe.cluster import job_client
    from maskpipe.pipeline.io import rundir

    run_dir = run_dir_of(a.run, a.runs_dir)
    status = _read_json(RunDir(run_dir).status).get("status")
    if status == "completed":
        print(f"{run_dir.name}: already completed")
        return
    with rundir.RunLock(run_dir):  # refused while a driver (foreground or a job's) owns the run
        job = _job_status(run_dir)
        if job is not None and job not in TERMINAL and job != "unreachable":
            raise MaskpipeError(f"{run_dir.name}: its job is still {job}; stop it first (`maskpipe stop {a.run}`)")
        client = job_client(a.address or _read_json(RunDir(run_dir).jobs).get("address"))
        job = _submit(run_dir, client)
    print(f"resumed run {run_dir.name} (Ray job {job})")
