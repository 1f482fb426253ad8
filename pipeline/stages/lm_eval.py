"""`lm_eval`: zero-/few-shot task accuracy of every chosen variant through lm-evaluation-harness."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from maskpipe.pipeline.core.schema import StageBase
from maskpipe.pipeline.eval.zeroshot import DEFAULT_TASKS, check_tasks, evaluate, primary
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.stages import Evaluates, Placement, StageContext, StageOutput

if TYPE_CHECKING:  # the run-level schema imports this module through the stage registry
    from maskpipe.pipeline.config import Config

log = logging.getLogger("maskpipe")


class LmEvalStage(StageBase):
    """Zero-/few-shot task accuracy of every variant through lm-evaluation-harness (`pipeline.eval.zeroshot`)."""

    stage: Literal["lm_eval"]
    tasks: list[str] = Field(default=DEFAULT_TASKS, min_length=1)  # lm-eval task (or group) names
    include_path: str | None = None  # a folder of task YAMLs to add to lm-eval's registry
    num_fewshot: int | None = Field(default=0, ge=0)  # None: each task's own default
    limit: int | float | None = Field(default=None, gt=0)  # documents per task (a fraction if < 1); None: all
    batch_size: int | str = 8  # a number, or "auto": the largest lm-eval finds fits
    log_samples: bool = False  # lm-eval's own results and per-sample files under RUN_DIR/lm_eval/<stage>/<variant>/
    bootstrap_iters: int = Field(default=1000, ge=0)  # for the standard errors; 0 skips them
    dense: bool = True
    masks: list[str] | Literal["all"] = "all"  # names of earlier stages whose artifacts to evaluate

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v):
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            return v
        raise ValueError(f"expected a positive number or auto, got {v!r}")


def lm_eval_stage(cfg: Config, s: Session, st: LmEvalStage, variants: list[Variant],
                  samples_dir: Path | None = None) -> dict[str, dict[str, dict]]:
    """Every variant on every task of `st` with session `s`: {variant: {task: {...}}}; with `samples_dir`,
    lm-eval's own results and samples files of each variant under `samples_dir/<variant>/`."""
    tm = check_tasks(st.tasks, st.include_path, (f"{st.name}.tasks", f"{st.name}.include_path"))
    results = {}
    for v in variants:
        with s.running(v) as model:
            results[v.name] = evaluate(model, s.tokenizer, st.tasks, tm, num_fewshot=st.num_fewshot, limit=st.limit,
                                       batch_size=st.batch_size, bootstrap_iters=st.bootstrap_iters, seed=cfg.seed,
                                       samples_dir=samples_dir / v.name if samples_dir is not None else None)
        log.info("%s: %s: %s", st.name, v.name, ", ".join(f"{t} {primary(r)[1]:.3f}" for t, r in results[v.name].items()
                                                          if primary(r)[1] is not None))
    return results


class LmEval(Evaluates):
    name, config, placement, section = "lm_eval", LmEvalStage, Placement.DEVICE, "lm_eval"

    def corpora(self, st: LmEvalStage) -> dict[str, str]:
        return {}  # lm-eval tasks bring their own data

    def preflight(self, st: LmEvalStage, where: str) -> None:
        check_tasks(st.tasks, st.include_path, (f"{where}.tasks", f"{where}.include_path"))

    def run(self, ctx: StageContext) -> StageOutput:
        samples = ctx.run.root / "lm_eval" / ctx.st.name if ctx.st.log_samples else None
        return StageOutput(rows=lm_eval_stage(ctx.cfg, ctx.session, ctx.st, ctx.chosen(), samples))


KIND = LmEval()
