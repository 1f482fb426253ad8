"""`maskpipe eval`: perplexity (wikitext-2 protocol) of a model, dense and/or masked, by a one-stage config
(`jobs/quick.py`).
"""

from __future__ import annotations

from pathlib import Path

from maskpipe.jobs.quick import (
    quick_config,
    _fetch_masks,
    QUICK_FLAGS,
    _data_args,
    _data_cfg,
    _model_args,
    _model_cfg,
    _one_stage,
    _variants,
    from_config,
    given,
)


def add(sub) -> None:
    e = sub.add_parser("eval", help="perplexity (wikitext-2 protocol) of a model, dense and/or masked")
    _model_args(e)
    e.add_argument("--masks", nargs="*", default=[], help="mask artifacts to evaluate")
    e.add_argument("--dense", action="store_true", help="also evaluate the dense model when --masks is given")
    _data_args(e)
    e.add_argument("--seqlen", type=int, default=None, help=from_config("stages.eval.EvalStage", "seqlen"))
    e.add_argument("--stride", type=int, default=None, help="sliding-window evaluation when < seqlen (default: none)")
    e.add_argument("--batch-size", type=int, default=None, help=from_config("stages.eval.EvalStage", "batch_size"))
    e.add_argument("--out", default=None, help="write the results as JSON here")
    e.set_defaults(fn=cmd_eval)


def _is_eval_output(path: Path) -> bool:
    """An earlier `eval --out`: {variant: {corpus: {ppl, tokens, ...}}}."""
    from maskpipe.pipeline.io.artifacts import read_json_or_none

    res = read_json_or_none(path)
    return isinstance(res, dict) and bool(res) and all(
        isinstance(row, dict) and row and all(isinstance(c, dict) and "ppl" in c for c in row.values())
        for row in res.values())


def cmd_eval(a) -> None:
    from maskpipe.pipeline.io.artifacts import check_replaceable_file, write_json
    from maskpipe.pipeline.run.preflight import check_inputs
    from maskpipe.pipeline.run.results import perplexity_table

    _fetch_masks(a)
    raw = {"name": "eval", "model": _model_cfg(a), "data": {"eval": _data_cfg(a, "test", "document")},
           "stages": [given(stage="eval", data=["eval"], seqlen=a.seqlen, stride=a.stride, batch_size=a.batch_size,
                            dense=a.dense or not a.masks)]}
    cfg = quick_config(raw, a)
    if a.out:
        check_replaceable_file(a.out, _is_eval_output, "`maskpipe eval --out` result")
    check_inputs(cfg, "command line", QUICK_FLAGS)
    results = _one_stage(cfg, _variants(a)).rows
    print(perplexity_table(results))
    if a.out:
        write_json(a.out, results)
