"""`retrieval`: greedy exact-match passkey, needle-in-a-haystack and multi-key retrieval of every variant."""

from __future__ import annotations

import logging
from pathlib import Path

from maskpipe.pipeline.io import rundir
from maskpipe.pipeline.io.artifacts import write_json
from maskpipe.pipeline.attention.plans import kv_heads, plan_cost, uniform_plan
from maskpipe.pipeline.config import Config, RetrievalStage
from maskpipe.pipeline.io.data import eval_text
from maskpipe.pipeline.eval.retrieval import (accuracy, multikey_samples, niah_heatmap, niah_samples, passkey_samples, score,
                                split_sentences)
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.stages import Evaluates, Placement, StageContext, StageOutput
from maskpipe.pipeline.stages.attention import head_geometry
from maskpipe.pipeline.core.vocab import RETRIEVAL_TASKS

log = logging.getLogger("maskpipe")

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
        plan = s.plan_of(v) or uniform_plan(kv_heads(s.model)[:2], False, 0, 0)
        results[v.name] = {"cost": {"length": longest, **plan_cost(plan, longest, *head_geometry(s.model))}}
        records = {}
        with s.running(v) as model:
            for task, (samples, by) in tasks.items():
                records[task] = score(model, s.tokenizer, samples, desc=f"{v.name}/{task}",
                                      batch_size=st.batch_size)
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
