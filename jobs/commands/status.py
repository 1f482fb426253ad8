"""`maskpipe status`: a run's stage, step, status and Ray job (see `jobs/ray_jobs.py`)."""

from __future__ import annotations

from maskpipe.jobs.ray_jobs import _job_status, _read_json, resume_hint, run_args, run_dir_of, run_summary
from maskpipe.pipeline.io.rundir import RunDir


def add(sub) -> None:
    p = sub.add_parser("status", help="a run's stage, step, status and job")
    run_args(p)
    p.set_defaults(fn=cmd_status)


def cmd_status(a) -> None:
    from maskpipe.pipeline.io import rundir

    run_dir = run_dir_of(a.run, a.runs_dir)
    job = _job_status(run_dir)
    summary = run_summary(run_dir, job)
    status = _read_json(RunDir(run_dir).status)
    jobs = _read_json(RunDir(run_dir).jobs)
    owner = rundir.owner(run_dir)
    summary |= {"job": jobs.get("submissions", [None])[-1], "job status": job,
                "started": status.get("started"), "finished": status.get("finished"), "error": status.get("error"),
                "owner": f"pid {owner['pid']} on {owner['host']}, heartbeat {owner.get('heartbeat')}"
                if owner.get("pid") and summary["status"] in ("running", "died") else None,
                "directory": str(run_dir)}
    if summary["status"] not in ("completed", "running", "submitted"):
        summary["resume"] = resume_hint(run_dir)
    for k, v in summary.items():
        if v not in (None, ""):
            print(f"{k:>10}: {v}")
