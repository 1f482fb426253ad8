"""`maskpipe logs`: a submitted run's output, as its Ray job printed it (see `jobs/ray_jobs.py`)."""

from __future__ import annotations

import asyncio

from maskpipe.jobs.ray_jobs import _latest_job, run_args, run_dir_of


def add(sub) -> None:
    p = sub.add_parser("logs", help="a submitted run's output")
    run_args(p)
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    p.set_defaults(fn=cmd_logs)


def cmd_logs(a) -> None:
    client, job = _latest_job(run_dir_of(a.run, a.runs_dir))
    if not a.follow:
        print(client.get_job_logs(job), end="")
        return

    async def tail() -> None:
        async for lines in client.tail_job_logs(job):
            print(lines, end="", flush=True)

    asyncio.run(tail())
