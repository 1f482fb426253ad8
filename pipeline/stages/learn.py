"""`learn`: MaskLLM mask learning (pipeline.nm.learn) on a data-parallel training group."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.models import base_weight, device_of, fingerprint
from maskpipe.pipeline.core.schema import (
    BatchSize,
    CheckpointEvery,
    KeepCheckpoints,
    LearningRate,
    LoopSettings,
    PatternField,
    SeqLen,
    Strict,
)
from maskpipe.pipeline.core.vocab import LEARNED_METHOD
from maskpipe.pipeline.io.artifacts import load_soft_logits, read_manifest, save_artifact
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.nm.learn import hard_mask, train_masks
from maskpipe.pipeline.stages import Placement, Ref, StageContext, StageKind, StageOutput, check_batch_split
from maskpipe.pipeline.stages.oneshot import shares
from maskpipe.pipeline.train.plan import model_shape, plan_report

if TYPE_CHECKING:  # the run-level schema imports this module through the stage registry
    from maskpipe.pipeline.config import Config

log = logging.getLogger("maskpipe")


class PriorConfig(Strict):
    """Where a learned mask starts: an earlier stage's mask, or any mask artifact (transfer)."""

    stage: str | None = None
    artifact: str | None = None
    # The prior candidate's logit margin is strength · init_std. MaskLLM's 3 suits its 2B-token runs,
    # where logits travel far past the margin; at a few hundred steps it lets Gumbel noise flip groups
    # before the gradient has any say (docs/RESULTS.md, "The default recipe").
    strength: float = Field(default=10.0, ge=0)
    # Start from the artifact's stored logits (its soft state) instead of the prior rule on its mask.
    soft: bool = False

    @model_validator(mode="after")
    def _one(self) -> PriorConfig:
        if (self.stage is None) == (self.artifact is None):
            raise ValueError("prior: give exactly one of stage or artifact")
        return self


# A learn stage's default lr is LR_MARGINS · margin / steps, kept between MIN_STEP_MARGIN · margin and
# MAX_STEP_MARGIN · margin (see LearnStage.lr).
LR_MARGINS = 3.0
MIN_STEP_MARGIN = 0.03
MAX_STEP_MARGIN = 0.1


class LearnStage(LoopSettings):
    """MaskLLM: Gumbel-softmax over each group's candidate masks, only the logits trained."""

    stage: Literal["learn"]
    pattern: PatternField | None = None  # defaults to sparsity.pattern
    data: str
    prior: PriorConfig | None = None
    batch_size: BatchSize = 8
    seqlen: SeqLen = 2048
    grad_accum: int = Field(default=1, gt=0)
    # Omitted: scaled to the budget so that Adam can move a logit (about lr·steps/2 under the cosine
    # schedule) LR_MARGINS/2 times the prior's margin, strength · init_std (init_std alone without a
    # prior): enough to flip a group whose gradient agrees step after step, too little for noise. From
    # 100 steps on, the per-step move stays at MIN_STEP_MARGIN of the margin instead of shrinking, so a
    # longer run moves logits further (a fixed total move made every budget past 0.2M tokens plateau:
    # docs/RESULTS.md, "Tokens to closure").
    lr: LearningRate = Field(default=None, validate_default=False)
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float | None = Field(default=1.0, gt=0)
    tau: tuple[float, float] = (4.0, 0.05)  # Gumbel temperature, annealed linearly start -> end
    kappa: tuple[float, float] = (100.0, 500.0)  # logit scale, annealed linearly start -> end
    sparse_reg: float = Field(default=1e-5, ge=0)  # λ of −λ·Σ‖W⊙M̃‖², decays linearly to 0; 0 = off
    init_std: float = Field(default=0.01, gt=0)
    checkpoint_every: CheckpointEvery = 100
    keep_checkpoints: KeepCheckpoints = 3
    save_logits: Literal["bfloat16", "float16", "float32"] | None = "bfloat16"
    # Leaner mask state (see pipeline.nm.learn.GumbelNMMask and docs/RESULTS.md): "positions" keeps M
    # logits per group instead of C(M,N); bfloat16 logits also keep AdamW's moments in bfloat16.
    logits_per_group: Literal["candidates", "positions"] = "candidates"
    logits_dtype: Literal["float32", "bfloat16"] = "float32"

    @model_validator(mode="before")
    @classmethod
    def _budget_scaled_lr(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("lr") is None:
            try:
                prior, steps = v.get("prior"), int(v["steps"])
                init_std = float(v.get("init_std", 0.01))
                strength = (prior.strength if isinstance(prior, PriorConfig) else
                            float((prior or {}).get("strength", PriorConfig.model_fields["strength"].default)))
                margin = init_std * (strength if prior is not None else 1.0)
                # Adam's first steps move every logit by about lr whatever its gradient, so a flip
                # must take at least 1 / MAX_STEP_MARGIN agreeing steps, however short the run.
                per_step = min(max(LR_MARGINS / max(steps, 1), MIN_STEP_MARGIN), MAX_STEP_MARGIN)
                v = {**v, "lr": float(f"{per_step * margin:.3g}")}
            except (KeyError, TypeError, ValueError, AttributeError):
                pass  # the field validators report the bad key
        return v

    @field_validator("tau", "kappa")
    @classmethod
    def _positive(cls, v: tuple[float, float]) -> tuple[float, float]:
        if min(v) <= 0:
            raise ValueError(f"expected two positive numbers [start, end], got {list(v)}")
        return v


def learn_stage(cfg: Config, s: Session, st: LearnStage, run: RunDir, prior: Path | None, store, on_log,
                rank: int = 0, world_size: int = 1) -> list[Variant]:
    """MaskLLM mask learning from `prior` (an artifact, or None), resuming from `store`; the caller's
    rank among `world_size` data-parallel workers (each its share of every batch). Rank 0 writes the
    artifact to `run.artifact(st.name)` and returns its variant; other ranks return nothing."""
    pattern = cfg.stage_pattern(st)
    n, m = pattern
    priors = init_logits = None
    prior_info: dict[str, Any] = {}
    if prior is not None:
        priors, manifest = s.load_artifact(prior)
        if manifest["pattern"] != str(pattern):
            raise MaskpipeError(f"{st.name}: prior {prior} is {manifest['pattern']}, the stage learns {pattern}")
        if st.prior.soft:
            init_logits, priors = load_soft_logits(prior), None
        prior_info = {"artifact": str(prior), "method": manifest["method"].get("name"),
                      "strength": st.prior.strength, "soft": st.prior.soft}
    stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed, rank, world_size)
    tokens = st.steps * st.grad_accum * st.batch_size * st.seqlen
    log.info("%s: learning %d:%d masks for %d linears, %d steps, %d tokens on %d worker(s)", st.name, n, m,
             len(s.linears), st.steps, tokens, world_size)
    if rank == 0:
        device = device_of(base_weight(next(iter(s.linears.values()))))
        cuda = device.type == "cuda"
        capacity = torch.cuda.get_device_properties(device).total_memory if cuda else None
        log.info("%s: memory plan\n%s", st.name,
                 plan_report(cfg, st, model_shape(s.model.config, cfg.model), world_size, capacity, cuda))
    # Read before training: a sharded strategy leaves the model's weights partitioned. Only rank 0
    # writes the artifact, so only rank 0 hashes the weights.
    shapes = {k: base_weight(lin).shape for k, lin in s.linears.items()}
    base_model = {**s.base_model_info(), "fingerprint": fingerprint(s.linears)} if rank == 0 else None
    w = cfg.workers
    t0 = time.perf_counter()
    logits, history = train_masks(s.model, s.linears, st, n, m, stream, seed=cfg.seed, store=store, priors=priors,
                                  init_logits=init_logits, on_log=on_log, strategy=w.strategy,
                                  zero_stage=w.zero_stage, activation_checkpointing=w.activation_checkpointing,
                                  shard_group=w.shard_group)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return []
    log.info("%s: learned on %d tokens, shares %s", st.name, stream.tokens(), shares(stream))
    masks = {k: hard_mask(v, n, m).reshape(shapes[k]) for k, v in logits.items()}
    soft = {k: v.to(getattr(torch, st.save_logits)) for k, v in logits.items()} if st.save_logits else None
    artifact = save_artifact(
        run.artifact(st.name), masks, s.linears, base_model=base_model, pattern=pattern,
        method={"name": LEARNED_METHOD, "params": st.model_dump(mode="json", exclude={"stage", "name", "data"}),
                "prior": prior_info, "seconds": round(seconds, 2), "workers": world_size,
                "final": history[-1] if history else {}},
        data={"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources], "tokens": tokens,
              "token_shares": stream.token_shares()},
        config=cfg.model_dump(mode="json"), soft_logits=soft,
    )
    log.info("%s: mask artifact written to %s (%.1f s)", st.name, artifact, seconds)
    return [learned_variant(st, artifact)]


def learned_variant(st: LearnStage, artifact: Path) -> Variant:
    """A learning stage's row, read back from its artifact (all that a worker group leaves behind)."""
    manifest = read_manifest(artifact)
    method = manifest["method"]
    info = {"method": LEARNED_METHOD, "pattern": manifest["pattern"], "seconds": method["seconds"],
            "tokens": manifest["data"]["tokens"], "token_shares": manifest["data"].get("token_shares"),
            "workers": method["workers"],
            "prior": st.prior and (st.prior.stage or Path(st.prior.artifact).name)}
    return Variant(st.name, artifact=artifact, info=info)


def prior_source(st: LearnStage, variants: dict[str, Variant]) -> Path | None:
    if st.prior is None:
        return None
    return variants[st.prior.stage].artifact if st.prior.stage else Path(st.prior.artifact)


class Learn(StageKind):
    name, config, placement, trains = "learn", LearnStage, Placement.GROUP, True

    def reads(self, st: LearnStage) -> list[Ref]:
        return [Ref("prior.stage", st.prior.stage)] if st.prior is not None and st.prior.stage is not None else []

    def check(self, cfg: Config, st: LearnStage, where: str, earlier: list) -> None:
        check_batch_split(cfg, st, where)

    def run(self, ctx: StageContext) -> StageOutput:
        return StageOutput(learn_stage(ctx.cfg, ctx.session, ctx.st, ctx.run, prior_source(ctx.st, ctx.variants),
                                       ctx.store, ctx.on_log, ctx.rank, ctx.world_size))

    def collect(self, ctx: StageContext) -> StageOutput:
        return StageOutput([learned_variant(ctx.st, ctx.run.artifact(ctx.st.name))])


KIND = Learn()
