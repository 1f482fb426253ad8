"""`maskpipe tune`: sweep a learn stage's hyperparameters on Ray Tune (the config's tune section)."""

from __future__ import annotations

import signal
from pathlib import Path

from maskpipe.jobs.ray_jobs import _interrupt
from maskpipe.pipeline import MaskpipeError


def add(sub) -> None:
    tu = sub.add_parser("tune", help="sweep a learn stage's hyperparameters on Ray Tune (the config's tune section)")
    tu.add_argument("config")
    tu.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. tune.num_samples=4")
    tu.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    tu.add_argument("--address", default=None, help="Ray cluster (default $RAY_ADDRESS, else a local instance)")
    tu.set_defaults(fn=cmd_tune)


def cmd_tune(a) -> None:
    from maskpipe.cluster import connect
    from maskpipe.pipeline.config import load_config
    from maskpipe.pipeline.io.rundir import RunDir, new_run_dir
    from maskpipe.workers.tune import tune_run

    cfg = load_config(a.config, a.overrides)
    if cfg.tune is None:
        raise MaskpipeError(f"{a.config}: tune: no tune section (see README, \"Tuning a learn stage\")")
    connect(a.address)
    run_dir = Path(a.run_dir) if a.run_dir else new_run_dir(cfg.output_dir, cfg.name)
    signal.signal(signal.SIGTERM, _interrupt)
    summary = tune_run(cfg, run_dir)
    print(RunDir(run_dir).tune_results_md.read_text())
    if summary["best"] is None:
        raise MaskpipeError(f"every trial failed; see {RunDir(run_dir).tune_results}")
    print(f"best: {summary['best']['params']} ({summary['metric']} {summary['best']['ppl']:.2f})")
    print(f"run directory: {run_dir}")
