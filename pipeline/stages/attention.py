"""`attention`: a per-head attention plan (learned DuoAttention gates, re-binarised gates, MoA spans from a
profile, or random)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, model_validator

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.attention.gates import gate_strategy, train_gates
from maskpipe.pipeline.attention.moa import moa_plan, profile_spans
from maskpipe.pipeline.attention.plans import (
    AttentionPlan,
    binarize,
    default_sink_window,
    kv_heads,
    moa_windows,
    plan_cost,
    random_scores,
)
from maskpipe.pipeline.core.schema import (
    BatchSize,
    CheckpointEvery,
    KeepCheckpoints,
    LearningRate,
    LoopSettings,
    SeqLen,
    Steps,
)
from maskpipe.pipeline.io.artifacts import read_manifest, save_artifact
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.stages import Placement, Ref, StageContext, StageKind, StageOutput, check_batch_split

if TYPE_CHECKING:  # the run-level schema imports this module through the stage registry
    from maskpipe.pipeline.config import Config

log = logging.getLogger("maskpipe")


class AttentionStage(LoopSettings):
    """A per-head attention plan: `learned` gates (DuoAttention) binarised at a target fraction of
    streaming KV heads (or a gate threshold), `moa` spans (one window per head from `candidate_windows`,
    chosen from a profile of the dense model under the KV budget of that fraction of streaming heads),
    or a `random` plan with the same budget."""

    stage: Literal["attention"]
    method: Literal["learned", "moa", "random"] = "learned"
    streaming: float | None = Field(default=0.5, ge=0, le=1)  # fraction of KV heads that stream
    threshold: float | None = Field(default=None, ge=0, le=1)  # learned only: heads with gate < threshold stream
    sink: int | None = Field(default=None, gt=0)  # tokens; default seqlen/64
    window: int | None = Field(default=None, gt=0)  # recent tokens; default seqlen/8
    windows: list[int] | None = Field(default=None, min_length=1)  # MoA-style: streaming windows ranked by gate
    candidate_windows: list[int] | None = Field(default=None, min_length=1)  # moa; default seqlen/16 ... seqlen/2
    profile_batches: int = Field(default=4, gt=0)  # moa: passkey batches the dense model is profiled on
    gates_from: str | None = None  # an earlier learned attention stage: re-binarise its gates, no training
    seed: int | None = None  # random: the draw (defaults to the config's seed)
    masks: str | None = None  # an earlier N:M stage: its masks stay on while learning and join the artifact
    data: str | None = None  # haystack corpus of the synthetic passkey samples (learned)
    steps: Steps = 100
    batch_size: BatchSize = 4
    seqlen: SeqLen = 512  # also the context the sink/window defaults scale with
    needles: int = Field(default=2, gt=0)  # passkeys per sample
    # The most-pulled gate moves by lr per step (max-normalised step under a budget; AdamW's per-gate
    # normalisation with a threshold), so lr ~ 2-4/steps lets a gate cross [0, 1] and come back.
    lr: LearningRate = 0.05
    # threshold plans only (a budget needs no λ, pipeline.attention.gates): λ of λ·mean|α|;
    # DuoAttention's 0.05·Σ|α| over 48 heads is λ = 2.4 here
    reg: float = Field(default=2.0, ge=0)
    checkpoint_every: CheckpointEvery = 50
    keep_checkpoints: KeepCheckpoints = 2

    @property
    def learns_gates(self) -> bool:
        """Whether the stage trains gates (on a worker group, as a learn stage trains masks)."""
        return self.method == "learned" and self.gates_from is None

    @model_validator(mode="before")
    @classmethod
    def _threshold_replaces_fraction(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("threshold") is not None and "streaming" not in v:
            v = {**v, "streaming": None}
        return v

    @model_validator(mode="after")
    def _checks(self) -> AttentionStage:
        if (self.streaming is None) == (self.threshold is None):
            raise ValueError("streaming: give exactly one of streaming (a fraction of heads) or threshold")
        if self.method in ("random", "moa"):
            if self.threshold is not None or self.gates_from is not None:
                raise ValueError(f"method: a {self.method} plan takes a streaming fraction, no threshold or gates_from")
            if self.method == "moa" and self.data is None:
                raise ValueError("data: profiling MoA spans needs a haystack corpus")
        elif self.candidate_windows is not None:
            raise ValueError("candidate_windows: only method moa chooses among windows (learned plans take windows)")
        elif self.gates_from is None and self.data is None:
            raise ValueError("data: learning gates needs a haystack corpus")
        return self


def attention_stage(cfg: Config, s: Session, st: AttentionStage, run: RunDir, store, on_log,
                    variants: dict[str, Variant], rank: int = 0, world_size: int = 1) -> list[Variant]:
    """A per-head attention plan: learned gates (resuming from `store`; the caller's rank among
    `world_size` data-parallel workers), an earlier stage's gates re-binarised, or random scores;
    written by rank 0 as an artifact with the N:M masks of `st.masks`. Other ranks return nothing."""
    default_sink, default_window = default_sink_window(st.seqlen)
    sink, window = st.sink or default_sink, st.window or default_window
    shape = kv_heads(s.model)[:2]
    base = variants[st.masks] if st.masks else Variant("dense")
    if base.updated_weights is not None:
        raise MaskpipeError(f"{st.name}: masks: {st.masks} updated its weights; an artifact carries masks over "
                            "frozen weights only")
    masks, manifest = ({}, {}) if base.artifact is None else s.load_artifact(base.artifact)
    gates, history, tokens, data_info = None, [], 0, {}
    t0 = time.perf_counter()
    if st.method == "random":
        scores = random_scores(shape, cfg.seed if st.seed is None else st.seed)
    elif st.method == "moa":
        stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed)
        tokens = st.profile_batches * st.batch_size * st.seqlen
        data_info = {"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources], "tokens": tokens}
        with s.running(base):
            mass, windows = profile_spans(s.model, s.tokenizer, stream, sink=sink, batches=st.profile_batches,
                                          batch_size=st.batch_size, seqlen=st.seqlen, needles=st.needles,
                                          windows=st.candidate_windows, seed=cfg.seed)
    elif st.gates_from:
        scores = gates = s.plan_of(variants[st.gates_from]).gate
        if bool(gates.isnan().any()):
            raise MaskpipeError(f"{st.name}: gates_from: {st.gates_from} has no learned gates")
    else:
        stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed)
        tokens = st.steps * st.batch_size * st.seqlen
        data_info = {"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources], "tokens": tokens}
        log.info("%s: learning gates of %d x %d KV heads against streaming sink %d + window %d, %d steps",
                 st.name, *shape, sink, window, st.steps)
        with s.running(base):
            gates, history = train_gates(s.model, s.tokenizer, st, stream, sink=sink, window=window, seed=cfg.seed,
                                         store=store, on_log=on_log, strategy=gate_strategy(cfg.workers.strategy))
        scores = gates
    seconds = time.perf_counter() - t0
    if rank != 0:
        return []
    if st.method == "moa":  # the KV budget of `streaming` heads at sink + window, spent per head
        heads, streams = shape[0] * shape[1], round(st.streaming * shape[0] * shape[1])
        budget = streams * min(st.seqlen, sink + window) + (heads - streams) * st.seqlen
        plan = moa_plan(mass, windows, budget_tokens=budget, sink=sink, length=st.seqlen)
        streaming = plan.streaming
    else:
        streaming = binarize(scores, fraction=st.streaming, threshold=st.threshold)
        plan = AttentionPlan(streaming, torch.full(shape, sink),
                             moa_windows(scores, streaming, st.windows) if st.windows else torch.full(shape, window),
                             gates if gates is not None else torch.full(shape, float("nan")))
    cost = plan_cost(plan, st.seqlen, *head_geometry(s.model))
    params = st.model_dump(mode="json", exclude={"stage", "name", "data", "masks"}) | {"sink": sink, "window": window}
    artifact = save_artifact(
        run.artifact(st.name), masks, s.linears, base_model=s.base_model_info(), pattern=manifest.get("pattern"),
        method={"name": f"attention-{st.method}", "params": params, "seconds": round(seconds, 2),
                "masks_from": manifest.get("method"), "final": history[-1] if history else {}},
        data=data_info, metrics={f"at_{st.seqlen}_tokens": cost}, config=cfg.model_dump(mode="json"),
        attention=plan.to_json(s.model),
    )
    log.info("%s: %d of %d KV heads streaming (KV cache %.0f%% of dense at %d tokens); artifact %s",
             st.name, int(streaming.sum()), streaming.numel(), 100 * cost["kv_cache_fraction"], st.seqlen, artifact)
    return [attention_variant(st, artifact)]


def attention_variant(st: AttentionStage, artifact: Path) -> Variant:
    """An attention stage's row, read back from its artifact (all that a worker group leaves behind)."""
    manifest = read_manifest(artifact)
    method = manifest["method"]
    info = {"method": method["name"], "streaming": manifest["attention"]["streaming_fraction"],
            "sink": method["params"]["sink"], "window": st.windows or method["params"]["window"],
            "seconds": method["seconds"], "tokens": manifest["data"].get("tokens", 0), "prior": st.gates_from or None}
    return Variant(st.name, artifact=artifact, info=info)


def head_geometry(model) -> tuple[int, int, int]:
    """(head_dim, query heads per KV head, bytes per cached element) for KV-cache and FLOP counts."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return head_dim, kv_heads(model)[2], next(model.parameters()).element_size()


class Attention(StageKind):
    """Learning gates trains on a training group, as a learn stage trains masks; a random plan or
    re-binarised gates need one device."""

    name, config, placement, trains = "attention", AttentionStage, Placement.DEVICE, True

    def where(self, st: AttentionStage) -> Placement:
        return Placement.GROUP if st.learns_gates else Placement.DEVICE

    def reads(self, st: AttentionStage) -> list[Ref]:
        return [Ref(key, getattr(st, key)) for key in ("gates_from", "masks") if getattr(st, key) is not None]

    def check(self, cfg: Config, st: AttentionStage, where: str, earlier: list) -> None:
        if st.learns_gates:
            check_batch_split(cfg, st, where)

    def run(self, ctx: StageContext) -> StageOutput:
        return StageOutput(attention_stage(ctx.cfg, ctx.session, ctx.st, ctx.run, ctx.store, ctx.on_log,
                                           ctx.variants, ctx.rank, ctx.world_size))

    def collect(self, ctx: StageContext) -> StageOutput:
        return StageOutput([attention_variant(ctx.st, ctx.run.artifact(ctx.st.name))])


KIND = Attention()
