"""`maskpipe tune` on Ray Tune: one trial per point of a learn stage's search space.

The recipes come from `pipeline.run.tune`: the reference stages (the tuned stage's prior) run once into the
run directory, then each Ray Tune trial runs `pipeline.run.runner.run` on its trial config in
`tune/trials/<trial id>/` and reports the perplexity of its mask on the metric corpus; Ray Tune ranks
the trials by it (mode min). With `workers.num_workers: 0` a trial learns in its own Ray worker (one
`resources_per_worker`, default one CPU) and trials run side by side as the cluster allows; with N ≥ 1
each trial drives a Ray Train worker group of N, as `maskpipe run` does. Random draws are seeded by the
config's `seed`. Ray Tune's own files go to `tune/ray/`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.config import Config, dump_config, search_spec
from maskpipe.pipeline.run.runner import run
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.run.tune import reference_config, reference_record, summarize, trial_config, trial_record, write_results

log = logging.getLogger("maskpipe")

_SEARCH = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda a: tune.uniform(*a),
           "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}


def param_space(cfg: Config) -> dict[str, Any]:
    """The config's search space as Ray Tune's, keyed by the dotted keys of the learn stage."""
    space = {}
    for key, spec in cfg.tune.space.items():
        kind, arg = search_spec(spec)
        space[key] = arg if kind == "fixed" else _SEARCH[kind](arg)
    return space


def _backend(cfg: Config):
    if cfg.workers.num_workers == 0:
        return None  # pipeline.run.runner's LocalBackend, in this process
    from maskpipe.workers.backend import RayBackend

    return RayBackend(cfg)


def _trial(params: dict[str, Any], cfg: Config, run_dir: str) -> None:
    """One Ray Tune trial: an ordinary run of the trial config, its perplexity reported."""
    trial_id = tune.get_context().get_trial_id()
    tcfg = trial_config(cfg, params, Path(run_dir))
    trial_dir = run(tcfg, RunDir(run_dir).tune_trial(trial_id), _backend(tcfg))
    tune.report({**trial_record(cfg, trial_dir), "run_dir": str(trial_dir)})


def _trial_resources(cfg: Config) -> dict[str, float]:
    w = cfg.workers
    if w.num_workers > 0:
        return {"cpu": 0}  # the trial only drives its Ray Train worker group, which holds the resources
    res = {k.lower() if k in ("CPU", "GPU") else k: v for k, v in w.resources_per_worker.items()}
    res.setdefault("cpu", 1)
    if w.use_gpu:
        res.setdefault("gpu", 1)
    return res


def tune_run(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """Runs the sweep of `cfg.tune` into `run_dir` (on the Ray cluster this process is connected to);
    returns the summary written to tune/results.json."""
    if cfg.tune is None:
        raise MaskpipeError(f"{cfg.name}: the config has no tune section")
    run_dir = Path(run_dir).resolve()
    ref = reference_config(cfg)
    run(ref, run_dir, _backend(ref))
    paths = RunDir(run_dir)
    paths.tune.mkdir(parents=True, exist_ok=True)
    paths.tune_config.write_text(dump_config(cfg))
    # Trials resolve the config's relative paths from Ray's worker directory, as every stage does
    # (Ray Tune would otherwise move each trial into its own folder). Tune passes this on to trials.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    trainable = tune.with_resources(tune.with_parameters(_trial, cfg=cfg, run_dir=str(run_dir)),
                                    _trial_resources(cfg))
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric="ppl", mode="min", num_samples=cfg.tune.num_samples,
                                    max_concurrent_trials=cfg.tune.max_concurrent,
                                    search_alg=BasicVariantGenerator(random_state=cfg.seed)),
        run_config=tune.RunConfig(name="ray", storage_path=str(paths.tune), verbose=0),
    )
    grid = tuner.fit()
    trials = []
    for result in grid:
        metrics = result.metrics or {}
        record = {"trial": metrics.get("trial_id") or Path(result.path).name, "params": result.config,
                  "status": "ok" if result.error is None else "error", "ppl": metrics.get("ppl"),
                  "tokens": metrics.get("tokens"), "seconds": metrics.get("seconds"), "run_dir": metrics.get("run_dir")}
        if result.error is not None:
            record["error"] = str(result.error).strip().splitlines()[-1]
        trials.append(record)
    summary = summarize(cfg, trials, reference_record(cfg, run_dir))
    write_results(run_dir, cfg, summary)
    return summary
