"""Sweeps over a learn stage's hyperparameters (`maskpipe tune`): the recipes and the result table.

A config's `tune` section (`pipeline.config.TuneConfig`) names a learn stage, a search space over its
keys and the perplexity that ranks the trials:

    tune:
      stage: maskllm                       # a learn stage of the config
      metric: {data: kjv, seqlen: 256}     # perplexity on this corpus (wikitext protocol), lower is better
      space:
        lr: {loguniform: [3.0e-4, 3.0e-3]} # also uniform, randint [low, high), choice [a, b, ...]
        prior.strength: [3, 10]            # a list is a grid, crossed with every other grid
        steps: 40                          # a plain value is fixed for every trial: the small budget
      num_samples: 2                       # draws of the random keys for every grid point
      max_concurrent: 2

Ray Tune (`workers.tune`) drives the trials; this module only builds what they run. First the stages the
tuned one depends on (its prior and what that prior refines) run once into the tune's run directory,
with an eval stage that scores the dense model and those masks on the metric corpus (the reference rows).
Then every trial is an ordinary run, in `tune/trials/<trial id>/`, of a two-stage config: the learn stage
with the trial's values (its `prior.stage` turned into that directory's artifact) and an eval stage on the
metric corpus: exactly what `maskpipe run` would do with it.

Files in the run directory: `tune/config.yaml` (the resolved config, tune section included),
`tune/results.json` ({"stage", "metric", "space", "reference": {variant: ppl}, "trials": [{"trial",
"params", "status", "ppl", "tokens", "seconds", "run_dir", "error"}], "best": trial or null}, trials
sorted best first) and `tune/results.md` (the same as a table, with the best stage as YAML).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from maskpipe.pipeline.io.artifacts import write_json, write_text
from maskpipe.pipeline.config import Config, config_from_dict, search_spec, set_keys
from maskpipe.pipeline.stages.learn import LearnStage
from maskpipe.pipeline.stages.oneshot import OneshotStage
from maskpipe.pipeline.run.results import Results
from maskpipe.pipeline.io.rundir import RunDir


def tuned_stage(cfg: Config) -> LearnStage:
    return next(s for s in cfg.stages if s.name == cfg.tune.stage)


def reference_config(cfg: Config) -> Config:
    """The stages the tuned stage depends on (its prior, and the mask that prior refines or learned
    from, transitively), in config order, and an eval stage of them and the dense model on the metric."""
    by_name = {s.name: s for s in cfg.stages}
    needed: set[str] = set()
    todo = [tuned_stage(cfg)]
    while todo:
        st = todo.pop()
        ref = (st.prior.stage if isinstance(st, LearnStage) and st.prior else
               st.mask_from if isinstance(st, OneshotStage) else None)
        if ref is not None and ref not in needed:
            needed.add(ref)
            todo.append(by_name[ref])
    raw = cfg.model_dump(mode="json")
    raw["tune"] = None
    raw["stages"] = [s.model_dump(mode="json") for s in cfg.stages if s.name in needed] + [_metric_eval(cfg, "all")]
    return config_from_dict(raw, f"tune reference of {cfg.name}")


def trial_config(cfg: Config, params: dict[str, Any], reference_dir: Path) -> Config:
    """One trial: the tuned learn stage with `params` (dotted keys) set, its prior read from the
    reference run's artifacts, then the perplexity of its mask on the metric corpus."""
    stage = set_keys(tuned_stage(cfg).model_dump(mode="json"), params)
    prior = stage.get("prior")
    if prior and prior.get("stage"):
        prior["artifact"], prior["stage"] = str(RunDir(reference_dir).artifact(prior["stage"])), None
    raw = cfg.model_dump(mode="json")
    raw.update(name=f"{cfg.name}-trial", tune=None, stages=[stage, _metric_eval(cfg, [stage["name"]])])
    return config_from_dict(raw, f"tune trial {params}")


def _metric_eval(cfg: Config, masks) -> dict:
    m = cfg.tune.metric
    return {"stage": "eval", "name": "tune-metric", "data": [m.data], "seqlen": m.seqlen,
            "batch_size": m.batch_size, "dense": masks == "all", "masks": masks}


def trial_record(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """A finished trial's perplexity on the metric corpus, its tokens and its learning time."""
    results = Results.read(RunDir(run_dir).results)
    name = tuned_stage(cfg).name
    info = results.stages[name].model_dump()
    return {"ppl": results.perplexity[name][cfg.tune.metric.data].ppl, "tokens": info.get("tokens"),
            "seconds": info.get("seconds")}


def reference_record(cfg: Config, run_dir: Path) -> dict[str, float]:
    """variant -> perplexity on the metric corpus, from the reference run."""
    results = Results.read(RunDir(run_dir).results)
    return {v: cells[cfg.tune.metric.data].ppl for v, cells in results.perplexity.items()}


def searched_keys(cfg: Config) -> list[str]:
    return [key for key, spec in cfg.tune.space.items() if search_spec(spec)[0] != "fixed"]


def summarize(cfg: Config, trials: list[dict[str, Any]], reference: dict[str, float]) -> dict[str, Any]:
    """The results.json document: trials sorted by perplexity (failed ones last), the best one."""
    ok = sorted((t for t in trials if t["status"] == "ok"), key=lambda t: t["ppl"])
    failed = [t for t in trials if t["status"] != "ok"]
    best = ok[0] if ok else None
    stage = None
    if best is not None:
        stage = set_keys(tuned_stage(cfg).model_dump(mode="json", exclude_none=True), best["params"])
    return {"stage": cfg.tune.stage, "metric": f"ppl {cfg.tune.metric.data}", "space": cfg.tune.space,
            "reference": reference, "trials": ok + failed, "best": best, "best_stage": stage}


def tune_table(summary: dict[str, Any], keys: list[str]) -> str:
    """Markdown: one row per trial, best first, with the reference rows (dense, prior) below."""
    metric = summary["metric"]
    lines = ["| trial | " + " | ".join(keys) + f" | {metric} | tokens | seconds |",
             "|" + " --- |" * (len(keys) + 4)]
    for t in summary["trials"]:
        cells = [_fmt(t["params"].get(k)) for k in keys]
        ppl = f"{t['ppl']:.2f}" if t["status"] == "ok" else f"failed: {t.get('error', '')}"[:80]
        mark = " (best)" if t is summary["best"] else ""
        lines.append(f"| {t['trial']}{mark} | " + " | ".join(cells)
                     + f" | {ppl} | {t.get('tokens') or ''} | {t.get('seconds') or ''} |")
    for variant, ppl in summary["reference"].items():
        lines.append(f"| {variant} (reference) | " + " | ".join("" for _ in keys) + f" | {ppl:.2f} | | |")
    fixed = {k: v for k, v in summary["space"].items() if k not in keys}
    text = "\n".join(lines) + "\n"
    if fixed:
        text += "\nFixed for every trial: " + ", ".join(f"{k}={_fmt(v)}" for k, v in fixed.items()) + ".\n"
    if summary["best_stage"] is not None:
        text += f"\nBest stage ({metric} {summary['best']['ppl']:.2f}):\n\n```yaml\n"
        text += yaml.safe_dump([summary["best_stage"]], sort_keys=False) + "```\n"
    return text


def write_results(run_dir: Path, cfg: Config, summary: dict[str, Any]) -> str:
    """Writes tune/results.json and tune/results.md; returns the Markdown."""
    text = tune_table(summary, searched_keys(cfg))
    write_json(RunDir(run_dir).tune_results, summary)
    write_text(RunDir(run_dir).tune_results_md, text)
    return text


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)
