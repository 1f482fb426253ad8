"""`oneshot`: N:M masks by magnitude, Wanda or SparseGPT, or DSnoT refining an earlier stage's mask."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator
from safetensors.torch import save_file

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.models import resolve_device
from maskpipe.pipeline.core.schema import KeyPathError, PatternField, StageBase
from maskpipe.pipeline.core.vocab import ONESHOT_METHODS, REFINING_METHODS
from maskpipe.pipeline.io.artifacts import save_artifact
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.nm.oneshot import oneshot_masks
from maskpipe.pipeline.stages import Placement, Ref, StageContext, StageKind, StageOutput

if TYPE_CHECKING:  # the run-level schema imports this module through the stage registry
    from maskpipe.pipeline.config import Config

log = logging.getLogger("maskpipe")


class OneshotStage(StageBase):
    stage: Literal["oneshot"]
    method: Literal[ONESHOT_METHODS]
    pattern: PatternField | None = None  # defaults to sparsity.pattern
    data: str | None = None  # calibration corpus, a key of `data`; magnitude needs none
    n_samples: int = Field(default=128, gt=0)
    seqlen: int = Field(default=2048, gt=1)
    batch_size: int = Field(default=8, gt=0)
    # SparseGPT only. With the update the base weights change, so the result is no longer a mask over
    # frozen weights: it is kept as the literature's baseline row, never as an artifact's weights.
    weight_update: bool = False
    blocksize: int = Field(default=128, gt=0)
    percdamp: float = Field(default=0.01, ge=0)
    # The refiners (dsnot, dsnot-exact: pipeline.nm.dsnot) only: the earlier oneshot or learn stage whose
    # mask they refine, and at most how many prune-and-grow swaps each output row makes.
    mask_from: str | None = None
    max_cycles: int = Field(default=50, gt=0)
    # dsnot only, the official code's options and defaults: a row stops once |ε| <= update_threshold
    # (ε on the official scale, Σ over a sequence's tokens); grow candidates are ranked by a / Var^p;
    # a swap must keep ε's sign; linears of the `skip_layer` kind (LLaMA's "mlp", "self_attn" or
    # "no_skip") keep their initial mask.
    update_threshold: float = Field(default=0.1, ge=0)
    pow_of_var_regrowing: float = Field(default=1.0, ge=0)
    same_sign: bool = True
    skip_layer: str = "mlp"

    def refine_options(self) -> dict:
        """The refiner's options, as `oneshot_masks(refine=...)` takes them ({} for the other methods)."""
        if self.method == "dsnot":
            return {"max_cycles": self.max_cycles, "update_threshold": self.update_threshold,
                    "pow_of_var_regrowing": self.pow_of_var_regrowing, "same_sign": self.same_sign,
                    "skip_layer": self.skip_layer}
        return {"max_cycles": self.max_cycles} if self.method == "dsnot-exact" else {}

    @model_validator(mode="after")
    def _checks(self) -> OneshotStage:
        if self.method != "magnitude" and self.data is None:
            raise ValueError(f"data: {self.method} needs a calibration corpus")
        if self.weight_update and self.method != "sparsegpt":
            raise ValueError("weight_update: only sparsegpt updates weights")
        if (self.method in REFINING_METHODS) != (self.mask_from is not None):
            raise ValueError(f"mask_from: {' and '.join(REFINING_METHODS)} refine the mask of an earlier stage named "
                             f"here, and only they do")
        return self


def shares(stream: TokenStream) -> str:
    return ", ".join(f"{Path(k).name} {v:.1%}" for k, v in stream.token_shares().items())


def oneshot_stage(cfg: Config, s: Session, st: OneshotStage, run: RunDir) -> list[Variant]:
    """One-shot N:M masks; writes the artifact to `run.artifact(st.name)`. DSnoT refines the mask of the
    earlier stage `st.mask_from`, whose artifact lies beside it."""
    pattern = cfg.stage_pattern(st)
    n, m = pattern
    init_masks = None
    if st.mask_from is not None:
        init_masks, manifest = s.load_artifact(run.artifact(st.mask_from))
        if manifest["pattern"] != str(pattern):
            raise MaskpipeError(f"{st.name}: mask_from: {st.mask_from} is {manifest['pattern']}, "
                                f"the stage makes {pattern}")
    calib, data_info = None, {}
    if st.data is not None:
        stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed)
        calib = stream.next_batch(st.n_samples)
        data_info = {"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources],
                     "n_samples": st.n_samples, "seqlen": st.seqlen, "tokens": calib.numel(),
                     "token_shares": stream.token_shares()}
        log.info("%s: calibration on %d tokens, shares %s", st.name, calib.numel(), shares(stream))
    log.info("%s: %s %d:%d over %d linears", st.name, st.method, n, m, len(s.linears))
    t0 = time.perf_counter()
    masks, updated = oneshot_masks(
        s.model, s.linears, st.method, n, m, calib, batch_size=st.batch_size,
        weight_update=st.weight_update, blocksize=st.blocksize, percdamp=st.percdamp, init_masks=init_masks,
        refine=st.refine_options(), offload_to=resolve_device(cfg.model.device) if cfg.model.offload else None,
    )
    seconds = time.perf_counter() - t0
    refiner = {"mask_from", "max_cycles", "update_threshold", "pow_of_var_regrowing", "same_sign", "skip_layer"}
    kept = set(st.refine_options()) | ({"mask_from"} if st.mask_from else set())
    params = st.model_dump(exclude={"stage", "name", "data"} | (refiner - kept))
    artifact = save_artifact(
        run.artifact(st.name), masks, s.linears, base_model=s.base_model_info(), pattern=pattern,
        method={"name": st.method, "params": params, "seconds": round(seconds, 2)},
        data=data_info, config=cfg.model_dump(mode="json"),
    )
    log.info("%s: mask artifact written to %s (%.1f s)", st.name, artifact, seconds)
    info = {"method": st.method, "pattern": str(pattern), "seconds": round(seconds, 2),
            "tokens": data_info.get("tokens", 0), "token_shares": data_info.get("token_shares"),
            **({"prior": st.mask_from} if st.mask_from else {})}
    if updated is None:
        return [Variant(st.name, artifact=artifact, info=info)]
    # The weight update is a baseline row only: kept in the run directory, never in an artifact.
    weights = run.baseline_weights(st.name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in updated.items()}, str(weights))
    log.warning("%s: SparseGPT weight update changes the base weights; its perplexity is reported as a "
                "baseline row, and the artifact holds only the mask", st.name)
    return [Variant(st.name, artifact=artifact, updated_weights=weights,
                    info={**info, "weight_update": True, "note": "weights updated: not a mask over frozen weights"})]


class Oneshot(StageKind):
    name, config, placement = "oneshot", OneshotStage, Placement.DEVICE

    def reads(self, st: OneshotStage) -> list[Ref]:
        return [Ref("mask_from", st.mask_from, ("oneshot", "learn"))] if st.mask_from is not None else []

    def lengths(self, st: OneshotStage) -> dict[str, int]:
        return {} if st.data is None else {"seqlen": st.seqlen}  # magnitude reads no text

    def check(self, cfg: Config, st: OneshotStage, where: str, earlier: list) -> None:
        if st.mask_from is None:
            return
        source = next(s for s in earlier if s.name == st.mask_from)
        theirs, ours = (cfg.stage_pattern(x) for x in (source, st))
        if theirs != ours:
            raise KeyPathError(f"{where}.mask_from", f"{st.mask_from} makes {theirs} masks, this stage {ours}")

    def run(self, ctx: StageContext) -> StageOutput:
        return StageOutput(oneshot_stage(ctx.cfg, ctx.session, ctx.st, ctx.run))


KIND = Oneshot()
