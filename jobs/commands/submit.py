"""`maskpipe submit`: a run handed to a Ray cluster as a Ray job (see `jobs/ray_jobs.py`); prints the run id."""

from __future__ import annotations

from pathlib import Path

from maskpipe.jobs.ray_jobs import ADDRESS_HELP, _submit
from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.rundir import RunDir


def add(sub) -> None:
    s = sub.add_parser("submit", help="submit a run to a Ray cluster as a Ray job; prints the run id")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*", help="key.path=value overrides")
    s.add_argument("--address", default=None, help=ADDRESS_HELP)
    s.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    s.set_defaults(fn=cmd_submit)


def cmd_submit(a) -> None:
    import shutil

    from maskpipe.cluster import cluster_resources, job_client
    from maskpipe.pipeline.io import rundir
    from maskpipe.pipeline.io.artifacts import write_text
    from maskpipe.pipeline.config import dump_config, load_config
    from maskpipe.pipeline.run.preflight import check_inputs

    cfg = load_config(a.config, a.overrides)
    check_inputs(cfg, a.config)
    run_dir = Path(a.run_dir or rundir.new_run_dir(cfg.output_dir, cfg.name)).resolve()
    paths = RunDir(run_dir)
    rundir.check_run_dir(run_dir)
    if rundir.alive(run_dir):  # a live run is not one to resume either: the same line as `run` gives
        raise MaskpipeError(f"{run_dir}: run directory in use by {rundir.describe(rundir.owner(run_dir))}")
    if paths.config.exists():
        raise MaskpipeError(f"{run_dir}: already holds a run; continue it with `maskpipe resume {run_dir}`")
    client = job_client(a.address)  # a cluster that does not answer leaves nothing behind
    if cfg.workers.num_workers > 0:  # refused here, as `run` refuses it, not by the job 15 s later
        from maskpipe.workers.backend import check_fits

        total = cluster_resources(client)
        if total is not None:
            check_fits(cfg, total)
    wrote = False
    try:
        with rundir.RunLock(run_dir):
            if paths.config.exists():  # another submit got here first
                raise MaskpipeError(f"{run_dir}: already holds a run; continue it with `maskpipe resume {run_dir}`")
            write_text(paths.config, dump_config(cfg))
            wrote = True
            job = _submit(run_dir, client)
    except BaseException:
        if wrote and not paths.jobs.exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # ours alone, and no job runs in it
        raise
    print(f"submitted run {run_dir.name} (Ray job {job})\nrun directory: {run_dir}")
