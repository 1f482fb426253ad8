"""`maskpipe retrieval`: passkey, needle-in-a-haystack and multi-key retrieval of a model, dense and/or
masked, by a one-stage config (`jobs/quick.py`).
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
    _variants,
    from_config,
    given,
)
from maskpipe.pipeline import MaskpipeError


def add(sub) -> None:
    rt = sub.add_parser("retrieval", help="passkey, needle-in-a-haystack and multi-key retrieval (greedy, exact match)")
    _model_args(rt)
    rt.add_argument("--masks", nargs="*", default=[], help="artifacts to evaluate (N:M masks and/or attention plans)")
    rt.add_argument("--dense", action="store_true", help="also evaluate the dense model when --masks is given")
    rt.add_argument("--passkey", type=int, nargs="*", default=[], metavar="LEN", help="passkey prompt lengths (tokens)")
    rt.add_argument("--samples", type=int, default=None,
                    help=from_config("stages.retrieval.PasskeyTask", "samples", "passkey and multi-key samples per length"))
    rt.add_argument("--niah", type=int, nargs="*", default=[], metavar="LEN", help="NIAH context lengths (tokens)")
    rt.add_argument("--depths", type=float, nargs="+", default=None, help=from_config("stages.retrieval.NiahTask", "depths",
                                                                                       "NIAH needle depths"))
    rt.add_argument("--niah-samples", type=int, default=None,
                    help=from_config("stages.retrieval.NiahTask", "samples", "NIAH samples per cell"))
    _data_args(rt, required=False)
    rt.add_argument("--multikey", type=int, nargs="*", default=[], metavar="LEN", help="multi-key prompt lengths")
    rt.add_argument("--keys", type=int, default=None, help=from_config(
        "stages.retrieval.MultiKeyTask", "keys", "multi-key: keys in the haystack (1 asked, the rest distract)"))
    rt.add_argument("--values", type=int, default=None,
                    help=from_config("stages.retrieval.MultiKeyTask", "values", "multi-key: values per key (all must be retrieved)"))
    rt.add_argument("--seed", type=int, default=None, help=from_config("config.Config", "seed"))
    rt.add_argument("--out", required=True, help="directory for results.json, per-sample records and heatmaps")
    rt.set_defaults(fn=cmd_retrieval)


def _is_retrieval_output(path: Path) -> bool:
    """An earlier `retrieval --out` results.json: {variant: {cost, passkey/niah/multikey ...}}."""
    from maskpipe.pipeline.io.artifacts import read_json_or_none

    res = read_json_or_none(path)
    return isinstance(res, dict) and bool(res) and all(isinstance(r, dict) and "cost" in r for r in res.values())


def cmd_retrieval(a) -> None:
    from maskpipe.pipeline.io.artifacts import atomic_dir, check_replaceable, write_json
    from maskpipe.pipeline.run.preflight import check_inputs
    from maskpipe.pipeline.run.results import retrieval_table
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages.retrieval import retrieval_stage

    _fetch_masks(a)
    stage = {"stage": "retrieval", "name": "retrieval", "dense": a.dense or not a.masks}
    raw = given(name="retrieval", seed=a.seed, model=_model_cfg(a), stages=[stage], data={})
    if a.passkey:
        stage["passkey"] = given(lengths=a.passkey, samples=a.samples)
    if a.niah:
        if not a.data:
            raise MaskpipeError("retrieval: --niah needs --data, the haystack corpus")
        raw["data"]["haystack"] = _data_cfg(a, "test", "document")
        stage["niah"] = given(data="haystack", lengths=a.niah, depths=a.depths, samples=a.niah_samples)
    if a.multikey:
        stage["multikey"] = given(lengths=a.multikey, samples=a.samples, keys=a.keys, values=a.values)
    cfg = quick_config(raw, a)
    check_inputs(cfg, "command line", QUICK_FLAGS)
    check_replaceable(a.out, "results.json", _is_retrieval_output, "`maskpipe retrieval --out` directory")
    # Written whole or not at all, like an artifact: the model work happens inside.
    with atomic_dir(a.out) as tmp:
        st = cfg.stages[0]
        results = retrieval_stage(cfg, Session(cfg.model), st, _variants(a), tmp / st.name, tmp)
        write_json(tmp / "results.json", results)
    print(retrieval_table(results))
    print(f"samples, NIAH heatmaps and results.json in {a.out}")
