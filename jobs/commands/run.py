"""`maskpipe run`: the stages of a config, in the foreground, into a run directory (also the entrypoint of
a submitted run's Ray job, see `jobs/ray_jobs.py`).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from maskpipe.jobs.ray_jobs import _interrupt, resume_hint
from maskpipe.pipeline import MaskpipeError


def add(sub) -> None:
    r = sub.add_parser("run", help="run the stages of a config into a run directory")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages.0.n_samples=16 (also after "
                                                "the options)")
    r.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    r.add_argument("--address", default=None,
                   help="the Ray cluster, for workers.num_workers > 0: HEAD:6379 or auto (default $RAY_ADDRESS, "
                        "else a local instance)")
    r.add_argument("--wait-for-lock", type=float, default=0, metavar="SECONDS",
                   help="wait this long for another process to release the run directory (a submitted job's "
                        "driver waits for the `submit` or `resume` that launched it)")
    r.set_defaults(fn=cmd_run)


def cmd_run(a) -> int:
    from maskpipe.pipeline.io import rundir
    from maskpipe.pipeline.config import load_config
    from maskpipe.pipeline.run.preflight import check_inputs
    from maskpipe.pipeline.run.runner import run, stopped_where

    cfg = load_config(a.config, a.overrides)
    run_dir = Path(a.run_dir or rundir.new_run_dir(cfg.output_dir, cfg.name)).absolute()
    # Everything that can be refused is refused before Ray starts; `run` takes the lock itself.
    check_inputs(cfg, a.config)
    rundir.check_run_dir(run_dir)
    if not a.wait_for_lock and rundir.alive(run_dir):
        raise MaskpipeError(f"{run_dir}: run directory in use by {rundir.describe(rundir.owner(run_dir))}")
    backend = None
    if cfg.workers.num_workers > 0:
        from maskpipe.cluster import connect
        from maskpipe.workers.backend import RayBackend

        connect(a.address, verbose=a.verbose)
        backend = RayBackend(cfg)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(cfg, run_dir, backend, lock_wait=a.wait_for_lock)
    except KeyboardInterrupt:
        print(f"stopped{stopped_where(run_dir)}; resume with: {resume_hint(run_dir)}", file=sys.stderr)
        return 130
    table = rundir.RunDir(run_dir).results_md
    if table.exists():
        print(table.read_text())
    print(f"run directory: {run_dir}")
    return 0
