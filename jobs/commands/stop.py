"""`maskpipe stop`: stop a submitted run's Ray job; the run records 'stopped' and can be resumed (see
`jobs/ray_jobs.py`).
"""

from __future__ import annotations

import time

from maskpipe.jobs.ray_jobs import TERMINAL, _latest_job, run_args, run_dir_of


def add(sub) -> None:
    p = sub.add_parser("stop", help="stop a submitted run (resumable)")
    run_args(p)
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the job to end")
    p.set_defaults(fn=cmd_stop)


def cmd_stop(a) -> None:
    run_dir = run_dir_of(a.run, a.runs_dir)
    client, job = _latest_job(run_dir)
    client.stop_job(job)
    deadline = time.monotonic() + a.timeout
    while (state := str(client.get_job_status(job).value)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"{run_dir.name}: job {job} {state.lower()}; continue it with `maskpipe resume {a.run}`")
