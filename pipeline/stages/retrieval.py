"""`retrieval`: greedy exact-match passkey, needle-in-a-haystack and multi-key retrieval of every variant."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator, model_validator

from maskpipe.pipeline.attention.plans import kv_heads, plan_cost, uniform_plan
from maskpipe.pipeline.core.schema import StageBase, Strict
from maskpipe.pipeline.core.vocab import RETRIEVAL_TASKS
from maskpipe.pipeline.eval.retrieval import (
    accuracy,
    multikey_samples,
    niah_heatmap,
    niah_samples,
    passkey_samples,
    score,
    split_sentences,
)
from maskpipe.pipeline.io import rundir
from maskpipe.pipeline.io.artifacts import write_json
from maskpipe.pipeline.io.data import eval_text
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.stages import Evaluates, Placement, StageContext, StageOutput
from maskpipe.pipeline.stages.attention import head_geometry

if TYPE_CHECKING:  # the run-level schema imports this module through the stage registry
    from maskpipe.pipeline.config import Config

log = logging.getLogger("maskpipe")

class PasskeyTask(Strict):
    """Passkey retrieval in the standard filler, the needle at uniformly random depths."""

    lengths: list[int] = Field(min_length=1)  # prompt lengths in tokens of the model's tokenizer
    samples: int = Field(default=10, gt=0)  # per length


class NiahTask(Strict):
    """Needle in a haystack: the passkey needle at every depth of every length, in a corpus haystack."""

    data: str  # the haystack corpus, a key of `data` (read whole, cut into sentences)
    lengths: list[int] = Field(min_length=1)
    depths: list[float] = Field(default=[0.0, 0.25, 0.5, 0.75, 1.0], min_length=1)
    samples: int = Field(default=2, gt=0)  # per cell

    @field_validator("depths")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if any(not 0 <= d <= 1 for d in v):
            raise ValueError(f"expected fractions in [0, 1], got {v}")
        return v


class MultiKeyTask(Strict):
    """RULER multi-key (distractor keys) / multi-value (several values per key) retrieval."""

    lengths: list[int] = Field(min_length=1)
    samples: int = Field(default=10, gt=0)
    keys: int = Field(default=4, gt=0)
    values: int = Field(default=1, gt=0)
    data: str | None = None  # haystack corpus; the standard filler when omitted


class RetrievalStage(StageBase):
    """Greedy exact-match retrieval of every variant (dense, masks, attention plans)."""

    stage: Literal["retrieval"]
    passkey: PasskeyTask | None = None
    niah: NiahTask | None = None
    multikey: MultiKeyTask | None = None
    batch_size: int | None = Field(default=None, gt=0)  # prompts decoded together; None: all of a length
    dense: bool = True
    masks: list[str] | Literal["all"] = "all"  # names of earlier stages whose artifacts to evaluate

    @model_validator(mode="after")
    def _some_task(self) -> RetrievalStage:
        if self.passkey is None and self.niah is None and self.multikey is None:
            raise ValueError("passkey: give at least one of passkey, niah, multikey")
        return self


def retrieval_stage(cfg: Config, s: Session, st: RetrievalStage, variants: list[Variant], folder: Path,
                    root: Path) -> dict[str, dict[str, dict]]:
    """Retrieval accuracy of every variant: {variant: {task: {acc, n, cells}}}; every sample's record
    goes to `folder / <variant>.json`, and each NIAH grid to a heatmap PNG beside it, recorded relative
    to `root` (the run directory)."""
    def sentences(key: str | None) -> list[str] | None:
        return None if key is None else split_sentences(eval_text(cfg.data[key]))

    tasks = {}
    if st.passkey:
        tasks["passkey"] = (passkey_samples(s.tokenizer, st.passkey.lengths, st.passkey.samples, cfg.seed), ("length",))
    if st.niah:
        tasks["niah"] = (niah_samples(s.tokenizer, sentences(st.niah.data), st.niah.lengths, st.niah.depths,
                                      st.niah.samples, cfg.seed), ("length", "depth"))
    if st.multikey:
        mk = st.multikey
        tasks["multikey"] = (multikey_samples(s.tokenizer, mk.lengths, mk.samples, cfg.seed, mk.keys, mk.values,
                                              sentences(mk.data)), ("length",))
    longest = max(sample.length for samples, _ in tasks.values() for sample in samples)
    results: dict[str, dict[str, dict]] = {}
    for v in variants:
        dyn = s.dynamic_of(v)
        if dyn is not None:  # KV cache of the kept keys only (`DynamicMask.cost`)
            results[v.name] = {"cost": {"length": longest, **dyn.cost(s.model, longest)}}
        else:
            plan = s.plan_of(v) or uniform_plan(kv_heads(s.model)[:2], False, 0, 0)
            results[v.name] = {"cost": {"length": longest, **plan_cost(plan, longest, *head_geometry(s.model))}}
        records = {}
        with s.running(v, dynamic=False) as model:  # a dynamic mask decodes with its own evicting cache
            for task, (samples, by) in tasks.items():
                records[task] = score(model, s.tokenizer, samples, desc=f"{v.name}/{task}",
                                      batch_size=st.batch_size, decode=None if dyn is None else dynamic_decode(dyn))
                results[v.name][task] = {**accuracy(records[task]), **accuracy(records[task], by)}
                log.info("%s: %s %s: exact match %.3f over %d samples", st.name, v.name, task,
                         results[v.name][task]["acc"], len(samples))
        summary = results[v.name]
        if "niah" in summary:
            png = niah_heatmap(summary["niah"]["cells"], folder / f"{v.name}-niah.png",
                               f"{v.name}: needle in a haystack, exact match")
            summary["niah"]["heatmap"] = str(png)
        write_json(folder / f"{v.name}.json", {"summary": summary, "samples": records})
        if "niah" in summary:
            summary["niah"]["heatmap"] = rundir.relative(root, png)
    return results


def dynamic_decode(dyn):
    """`score`'s decode for a dynamic mask: prompt by prompt (an evicting cache holds unpadded rows)."""
    def decode(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int) -> list[list[int]]:
        device = next(model.parameters()).device
        return [dyn.decode(model, torch.tensor([p], device=device), max_new_tokens)[0].tolist() for p in prompts]
    return decode


class Retrieval(Evaluates):
    name, config, placement, section = "retrieval", RetrievalStage, Placement.DEVICE, "retrieval"

    def corpora(self, st: RetrievalStage) -> dict[str, str]:
        return {f"{task}.data": getattr(st, task).data for task in ("niah", "multikey")
                if getattr(st, task) is not None and getattr(st, task).data is not None}

    def lengths(self, st: RetrievalStage) -> dict[str, int]:
        return {f"{task}.lengths": max(getattr(st, task).lengths) for task in RETRIEVAL_TASKS if getattr(st, task) is not None}

    def run(self, ctx: StageContext) -> StageOutput:
        st = ctx.st
        return StageOutput(rows=retrieval_stage(ctx.cfg, ctx.session, st, ctx.chosen(), ctx.run.retrieval(st.name),
                                                ctx.run.root))


KIND = Retrieval()
