"""`maskpipe lm-eval`: zero-shot task accuracy (lm-evaluation-harness) of a model, dense and/or masked; needs
the [lm-eval] extra.

    maskpipe lm-eval --model M [--masks ARTIFACT ...] [--tasks T ...] [--include-path DIR] --out DIR

It runs the `lm_eval` stage (`pipeline.stages.lm_eval`, over `pipeline.eval.zeroshot`) as a one-stage config
(`jobs/quick.py`), and writes a run directory's results.json and results.md.
"""

from __future__ import annotations

from pathlib import Path

from maskpipe.jobs.quick import _fetch_masks, _model_args, _model_cfg, _variants, from_config, given, quick_config
from maskpipe.pipeline import MaskpipeError


def add(sub) -> None:
    le = sub.add_parser("lm-eval", help="zero-shot task accuracy (lm-evaluation-harness) of a model, dense and/or "
                                        "masked; needs the [lm-eval] extra")
    _model_args(le)
    le.add_argument("--masks", nargs="*", default=[], help="artifacts to evaluate (N:M masks and/or attention plans)")
    le.add_argument("--dense", action="store_true", help="also evaluate the dense model when --masks is given")
    le.add_argument("--tasks", nargs="+", default=None, help=from_config("stages.lm_eval.LmEvalStage", "tasks", "lm-eval tasks"))
    le.add_argument("--include-path", default=None, help="a folder of task YAMLs, e.g. configs/lm_eval")
    le.add_argument("--num-fewshot", type=int, default=None, help=from_config("stages.lm_eval.LmEvalStage", "num_fewshot"))
    le.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    le.add_argument("--batch-size", type=_batch_size, default=None, metavar="N|auto",
                    help=from_config("stages.lm_eval.LmEvalStage", "batch_size", "a number, or auto"))
    le.add_argument("--log-samples", action="store_true",
                    help="also write lm-eval's own results and per-sample files, under OUT/lm_eval/<variant>/")
    le.add_argument("--seed", type=int, default=None, help=from_config("config.Config", "seed"))
    le.add_argument("--out", required=True, help="directory for results.json and results.md (and lm-eval's files)")
    le.set_defaults(fn=cmd_lm_eval)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        import argparse

        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


def cmd_lm_eval(a) -> None:
    from maskpipe.pipeline.io.artifacts import write_json, write_text
    from maskpipe.pipeline.run.results import zeroshot_table
    from maskpipe.pipeline.io.rundir import RunDir
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages.lm_eval import lm_eval_stage
    from maskpipe.pipeline.eval.zeroshot import check_tasks

    _fetch_masks(a)
    stage = given(stage="lm_eval", name="lm_eval", tasks=a.tasks, include_path=a.include_path,
                  num_fewshot=a.num_fewshot, batch_size=a.batch_size,
                  limit=int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit)
    cfg = quick_config(given(name="lm-eval", seed=a.seed, model=_model_cfg(a), stages=[stage]), a)
    st = cfg.stages[0]
    for p in a.masks:
        if not Path(p).is_dir():
            raise MaskpipeError(f"--masks: {p}: no such artifact directory")
    check_tasks(st.tasks, st.include_path, ("--tasks", "--include-path"))  # before the model loads
    samples = Path(a.out) / "lm_eval" if a.log_samples else None
    results = lm_eval_stage(cfg, Session(cfg.model), st, _variants(a), samples)
    table = zeroshot_table(results)
    print(table)
    out = RunDir(a.out)  # a run directory's results.json and results.md, lm-eval's section alone
    write_json(out.results, {"lm_eval": results})
    write_text(out.results_md, table)
    print(f"results.json and results.md in {a.out}")
