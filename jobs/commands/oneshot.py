"""`maskpipe oneshot`: a one-shot N:M mask (magnitude, Wanda, SparseGPT) into an artifact, by a one-stage
config (`jobs/quick.py`).
"""

from __future__ import annotations

from pathlib import Path

from maskpipe.jobs.quick import (
    quick_config,
    QUICK_FLAGS,
    _data_args,
    _data_cfg,
    _model_args,
    _model_cfg,
    _one_stage,
    from_config,
    given,
)
from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.vocab import STANDALONE_METHODS


def add(sub) -> None:
    o = sub.add_parser("oneshot", help=f"one-shot N:M mask ({', '.join(STANDALONE_METHODS)}) into an artifact")
    _model_args(o)
    o.add_argument("--method", required=True, choices=STANDALONE_METHODS)
    o.add_argument("--pattern", default=None, metavar="N:M", help=from_config("config.SparsityConfig", "pattern"))
    _data_args(o, required=False)
    o.add_argument("--n-samples", type=int, default=None, help=from_config("stages.oneshot.OneshotStage", "n_samples"))
    o.add_argument("--seqlen", type=int, default=None, help=from_config("stages.oneshot.OneshotStage", "seqlen"))
    o.add_argument("--batch-size", type=int, default=None, help=from_config("stages.oneshot.OneshotStage", "batch_size"))
    o.add_argument("--weight-update", action="store_true", help="SparseGPT: also keep updated weights (baseline)")
    o.add_argument("--seed", type=int, default=None, help=from_config("config.Config", "seed"))
    o.add_argument("--out", required=True, help="artifact directory to write")
    o.set_defaults(fn=cmd_oneshot)


def cmd_oneshot(a) -> None:
    from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, check_replaceable, read_json_or_none
    from maskpipe.pipeline.config import SparsityConfig
    from maskpipe.pipeline.run.preflight import check_inputs
    from maskpipe.pipeline.io.rundir import RunDir

    # The stage names its pattern, the config's default unless --pattern, so that the artifact records it.
    pattern = a.pattern or str(SparsityConfig().pattern)
    stage = given(stage="oneshot", name=Path(a.out).name, method=a.method, pattern=pattern, n_samples=a.n_samples,
                  seqlen=a.seqlen, batch_size=a.batch_size, weight_update=a.weight_update)
    raw = given(name="oneshot", seed=a.seed, model=_model_cfg(a), stages=[stage])
    if a.data:
        raw["data"] = {"calib": _data_cfg(a, "train", "line")}
        stage["data"] = "calib"
    cfg = quick_config(raw, a)
    out = Path(a.out)
    check_replaceable(out, MANIFEST_FILE)
    if (out / MANIFEST_FILE).is_file():
        earlier = (read_json_or_none(out / MANIFEST_FILE) or {}).get("method", {}).get("name")
        if earlier != a.method:
            raise MaskpipeError(f"--out {out}: holds a {earlier} artifact; refusing to replace it with {a.method} "
                                "(choose a new directory)")
    check_inputs(cfg, "command line", QUICK_FLAGS)
    # The artifact goes where --out says; SparseGPT's updated weights, as ever, to ../baselines/ beside it.
    [variant] = _one_stage(cfg, run=RunDir(out.parent.parent, artifacts=out.parent)).variants
    print(f"mask artifact: {variant.artifact}")
    if variant.updated_weights:
        print(f"updated weights (baseline only, not an artifact): {variant.updated_weights}")
