"""`maskpipe runs`: a table of the runs under a runs directory (see `jobs/ray_jobs.py`)."""

from __future__ import annotations

from pathlib import Path

from maskpipe.jobs.ray_jobs import run_summary, runs_dir_arg
from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.rundir import RunDir


def add(sub) -> None:
    r = sub.add_parser("runs", help="a table of runs: id, config, stage, step, status, last metric")
    runs_dir_arg(r)
    r.set_defaults(fn=cmd_runs)


def _row(run_dir: Path) -> dict:
    """A run's row; a run directory whose records cannot be read is listed as unreadable, saying why."""
    try:
        return run_summary(run_dir)
    except MaskpipeError as e:
        return {"run": run_dir.name, "config": "", "stage": "", "step": "", "status": "unreadable", "last": str(e)}


def cmd_runs(a) -> None:
    root = Path(a.runs_dir)
    runs = sorted((p for p in root.iterdir() if RunDir(p).config.is_file()), key=lambda p: p.stat().st_mtime) \
        if root.is_dir() else []
    if not runs:
        print(f"no runs under {root}/")
        return
    rows = [_row(p) for p in runs]
    cols = ["run", "config", "stage", "step", "status", "last"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
