"""`eval`: perplexity (wikitext-2 protocol) of every chosen variant on every corpus, one cell each."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from maskpipe.pipeline.core.schema import StageBase
from maskpipe.pipeline.eval.perplexity import Perplexity, perplexity
from maskpipe.pipeline.io.data import eval_text
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.stages import Evaluates, Placement, StageContext, StageOutput

if TYPE_CHECKING:  # the run-level schema imports this module through the stage registry
    from maskpipe.pipeline.config import Config

log = logging.getLogger("maskpipe")


class EvalStage(StageBase):
    stage: Literal["eval"]
    data: list[str] = Field(min_length=1)  # keys of `data`, each evaluated with the wikitext protocol
    seqlen: int = Field(default=2048, gt=1)
    stride: int | None = Field(default=None, gt=0)  # sliding-window evaluation when < seqlen
    batch_size: int = Field(default=1, gt=0)
    dense: bool = True
    masks: list[str] | Literal["all"] = "all"  # names of earlier stages whose masks to evaluate

    @model_validator(mode="after")
    def _stride(self) -> EvalStage:
        if self.stride is not None and self.stride > self.seqlen:
            raise ValueError(f"stride: must be <= seqlen ({self.seqlen}), got {self.stride}")
        return self


def eval_texts(cfg: Config, st: EvalStage, tokenizer) -> dict[str, torch.Tensor]:
    texts = {}
    for key in st.data:
        texts[key] = tokenizer(eval_text(cfg.data[key]), return_tensors="pt").input_ids[0]
        log.info("%s: corpus %s has %d tokens", st.name, key, len(texts[key]))
    return texts


def eval_cell(s: Session, st: EvalStage, v: Variant, key: str, ids: torch.Tensor) -> dict:
    """Perplexity of one variant on one corpus."""
    with s.running(v) as model:
        p: Perplexity = perplexity(model, ids, st.seqlen, st.stride, st.batch_size, desc=f"{v.name}/{key}")
    log.info("%s: %s on %s: ppl %.3f over %d tokens", st.name, v.name, key, p.ppl, p.tokens)
    return {"ppl": p.ppl, "nll": p.nll, "tokens": p.tokens, "windows": p.windows, "seqlen": st.seqlen,
            "stride": st.stride}


class Eval(Evaluates):
    """Cells: (variant, corpus), variant by variant, so a worker's model runs one artifact for a while."""

    name, config, placement, section = "eval", EvalStage, Placement.CELLS, "perplexity"

    def corpora(self, st: EvalStage) -> dict[str, str]:
        return {"data": st.data[0]} if len(st.data) == 1 else {f"data.{i}": r for i, r in enumerate(st.data)}

    def setup(self, ctx: StageContext) -> dict[str, torch.Tensor]:
        return eval_texts(ctx.cfg, ctx.st, ctx.session.tokenizer)

    def cells(self, ctx: StageContext) -> list[tuple[Variant, str]]:
        return [(v, key) for v in ctx.chosen() for key in ctx.st.data]

    def cell(self, ctx: StageContext, texts: dict[str, torch.Tensor], cell: tuple[Variant, str]) -> dict:
        v, key = cell
        return eval_cell(ctx.session, ctx.st, v, key, texts[key])

    def gather(self, ctx: StageContext, done: list) -> StageOutput:
        found = {(v.name, key): res for (v, key), res in done}
        return StageOutput(rows={v.name: {key: found[v.name, key] for key in ctx.st.data} for v in ctx.chosen()})


KIND = Eval()
