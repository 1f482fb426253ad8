"""`dynamic`: a content-aware dynamic attention mask (keys kept per KV head by score): DMA's learned key
scorer, or a training-free source at the same budget (H2O, SnapKV, key norm, random, the oracle).

The stage writes an artifact whose manifest carries the mask (`pipeline.attention.dynamic_masks`: method,
budget, and a learned scorer's tensors in `scorer.safetensors`), with the N:M masks of `masks:` if given;
`eval` and `retrieval` run it as any other variant. Learning runs the one training loop
(`pipeline.train.loop`, via `dynamic_learning.train_scorer`) and resumes from its checkpoints exactly.

Placement: learning trains on a training group, data-parallel over `workers.num_workers` as gate
learning does (every rank holds the whole frozen model and runs its share of each batch, `dynamic_learning.DMALearning`;
rank 0 writes the artifact); a training-free source needs one device.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator, model_validator

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.attention.dynamic import KeyScorer
from maskpipe.pipeline.attention.dynamic_learning import profile_shares, train_scorer
from maskpipe.pipeline.attention.dynamic_masks import DynamicMask, shares_text, window_text
from maskpipe.pipeline.attention.gates import gate_strategy, passkey_batch
from maskpipe.pipeline.attention.kv_scores import Budget
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
from maskpipe.pipeline.io.session import Variant
from maskpipe.pipeline.stages import Placement, Ref, StageContext, StageKind, StageOutput, check_batch_split

if TYPE_CHECKING:  # the run-level schema imports this module through the stage registry
    import torch

    from maskpipe.pipeline.config import Config

log = logging.getLogger("maskpipe")


class DynamicStage(LoopSettings):
    """A dynamic attention mask: per KV head and query, `sink` first keys + `window` recent keys + the
    best-scored others, `keep` in all (a fraction of the keys, or a count). `learned` trains DMA's key
    scorer over the frozen model (the loop settings below); the other methods train nothing."""

    stage: Literal["dynamic"]
    method: Literal["learned", "h2o", "snapkv", "key-norm", "random", "oracle"] = "learned"
    keep: float | int = 0.25  # a float in (0, 1]: fraction of the keys; an int >= 1: keys per KV head
    sink: int = Field(default=4, ge=0)
    window: int | None = Field(default=None, gt=0)  # recent keys, the query's own included; default `recent`
    # of the budget: a share, the same for every head (recent keys carry the language model, the top-k
    # retrieval, which needs few keys: 3/4 against H2O's even split took DMA's perplexity cost on tiny-llama
    # from +3.4% to +1.9% at 25%, passkey kept; `kv_scores.Budget`), or "profile": each (layer, KV head) its
    # own share, chosen after learning by what the rule costs that head's attention output on text and on
    # passkey answers (`dynamic_learning.profile_shares`). Default (null): profile for a learned scorer
    # (micro-llama at 72 keys: perplexity +2.0% -> +1.2%, the oracle's; at 48 keys passkey 0.75-0.92 ->
    # 1.00; docs/RESULTS.md), 3/4 for the training-free methods
    recent: float | Literal["profile"] | None = None
    profile_samples: int = Field(default=8, gt=0)  # profile: text windows and passkey prompts, each
    seed: int | None = None  # random: the draw; learned: the scorer's init (both default to the config's seed)
    obs_window: int = Field(default=32, gt=0)  # snapkv: queries that vote
    kernel: int = Field(default=7, gt=0)  # snapkv: pooling width along keys (odd)
    pool: Literal["max", "avg"] = "max"  # snapkv
    masks: str | None = None  # an earlier N:M stage: its masks stay on while learning and join the artifact
    data: str | None = None  # learned: haystack corpus of the synthetic passkey samples
    # tiny-llama's weak seed kept the passkey in 0.80 / 0.75 of the prompts after 100 steps (loss still
    # falling), 0.90 / 0.95 after 200, as the other two seeds (docs/RESULTS.md)
    steps: Steps = 200
    # Adam's first steps move every weight by about lr whatever its gradient: from step 0 at lr 0.1 the
    # factored scorer lost its init and tiny-llama's passkey fell from 0.85 to 0.60 (docs/RESULTS.md)
    warmup_steps: int = Field(default=10, ge=0)
    batch_size: BatchSize = 4
    seqlen: SeqLen = 512
    needles: int = Field(default=2, gt=0)  # passkeys per sample
    lr: LearningRate = 0.1
    # "attention": the scorer learns to rank first the keys the dense model's answers attend to (no
    # backward through the model); "hidden"/"kl": the masked model's distance to the dense one on the
    # answers, through a relaxed top-k (DuoAttention's objective; 0.45-0.55 passkey where "attention" has
    # 1.00 on micro-llama, docs/RESULTS.md)
    loss: Literal["attention", "hidden", "kl"] = "attention"
    general: float = Field(default=1.0, ge=0)  # attention: weight of every query's accumulated attention (H2O's)
    # DMA's dt_proj, each KV head scored from every KV head's values, at `rank` (None: full rank where that
    # costs under 0.1% of the model's parameters, else the largest rank that does:
    # `dynamic.KeyScorer.for_model`); mix_heads false: each head from its own values
    mix_heads: bool | None = None
    rank: int | None = Field(default=None, gt=0)
    relax: Literal["st", "sigmoid"] = "st"  # hidden/kl: straight-through hard top-k, or the sigmoid relaxation
    temperature: float = Field(default=1.0, gt=0)  # hidden/kl: of the relaxation
    checkpoint_every: CheckpointEvery = 50
    keep_checkpoints: KeepCheckpoints = 2

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: float | int) -> float | int:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"a fraction of the keys must be in (0, 1], got {v}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"a count of keys must be >= 1, got {v}")
        return v

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"expected an odd pooling width (a key's neighbours on both sides), got {v}")
        return v

    @field_validator("recent")
    @classmethod
    def _recent(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"a share of the budget in (0, 1], or profile, got {v}")
        return v

    @model_validator(mode="after")
    def _checks(self) -> DynamicStage:
        if self.recent == "profile" and (self.method != "learned" or self.window is not None):
            raise ValueError("recent: profile chooses a learned scorer's split per KV head: needs method learned "
                             "and no window")
        if self.method == "learned" and self.data is None:
            raise ValueError("data: learning a key scorer needs a haystack corpus")
        if self.rank is not None and self.mix_heads is False:
            raise ValueError("rank: factors the mixed-heads scorer; remove it or set mix_heads: true")
        return self

    @property
    def profiled(self) -> bool:
        """Whether each KV head's recent share comes from a profile (`recent`)."""
        return self.recent == "profile" or (self.recent is None and self.method == "learned" and self.window is None)

    @property
    def budget(self) -> Budget:
        """The budget the scorer learns under (a profiled split learns at the default share)."""
        share = self.recent if isinstance(self.recent, float) else Budget.recent
        return Budget(**({"fraction": float(self.keep)} if isinstance(self.keep, float) else {"keys": self.keep}),
                      sink=self.sink, window=self.window, recent=share)


def dynamic_stage(ctx: StageContext) -> list[Variant]:
    """The stage's mask (learned from `ctx.store`'s latest checkpoint on, as `ctx.rank` of `ctx.world_size`
    data-parallel workers, or training-free), written by rank 0 as an artifact with the N:M masks of
    `st.masks`. Other ranks return nothing."""
    cfg: Config = ctx.cfg
    s, st, variants = ctx.session, ctx.st, ctx.variants
    seed = cfg.seed if st.seed is None else st.seed
    base = variants[st.masks] if st.masks else Variant("dense")
    if base.updated_weights is not None:
        raise MaskpipeError(f"{st.name}: masks: {st.masks} updated its weights; an artifact carries masks over "
                            "frozen weights only")
    masks, manifest = ({}, {}) if base.artifact is None else s.load_artifact(base.artifact)
    if "attention" in manifest or "dynamic" in manifest:
        raise MaskpipeError(f"{st.name}: masks: {st.masks} carries an attention mask; a dynamic mask joins N:M masks only")
    scorer, history, data_info = None, [], {}
    t0 = time.perf_counter()
    if st.method == "learned":
        stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed)
        data_info = {"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources],
                     "tokens": st.steps * st.batch_size * st.seqlen}
        log.info("%s: learning a key scorer (keep %s, sink %d, window %s), %d steps", st.name, st.keep, st.sink,
                 window_text(st.window, "profile" if st.profiled else st.budget.recent), st.steps)
        with s.running(base):
            scorer, history = train_scorer(s.model, s.tokenizer, st, stream, st.budget, seed=seed, store=ctx.store,
                                           on_log=ctx.on_log, relax=st.relax, temperature=st.temperature,
                                           loss=st.loss, general=st.general,
                                           scorer=KeyScorer.for_model(s.model, seed=seed, mix_heads=st.mix_heads, rank=st.rank),
                                           strategy=gate_strategy(cfg.workers.strategy))
    params = {"seed": seed} if st.method == "random" else (
        {"obs_window": st.obs_window, "kernel": st.kernel, "pool": st.pool} if st.method == "snapkv" else {})
    if ctx.rank != 0:
        return []
    budget = st.budget
    if st.profiled:
        with s.running(base):
            budget = profiled_budget(cfg, st, s.model, s.tokenizer, scorer, seed)
    mask = DynamicMask(st.method, budget, params, scorer)
    seconds = time.perf_counter() - t0
    cost = mask.cost(s.model, st.seqlen)
    artifact = save_artifact(
        ctx.run.artifact(st.name), masks, s.linears, base_model=s.base_model_info(), pattern=manifest.get("pattern"),
        method={"name": f"dynamic-{st.method}", "seconds": round(seconds, 2), "masks_from": manifest.get("method"),
                "params": st.model_dump(mode="json", exclude={"stage", "name", "data", "masks"}),
                "final": history[-1] if history else {}},
        data=data_info, metrics={f"at_{st.seqlen}_tokens": cost}, config=cfg.model_dump(mode="json"),
        dynamic=(mask.to_json(s.model, fingerprint=s.fingerprint), mask.tensors()),
    )
    log.info("%s: %s; KV cache %.0f%% of dense at %d tokens; artifact %s", st.name, mask.describe(),
             100 * cost["kv_cache_fraction"], st.seqlen, artifact)
    return [dynamic_variant(st, artifact)]


def profile_data(data, tokenizer, samples: int, seqlen: int, needles: int, seed: int,
                 text_seqlen: int | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """What `profile_shares` reads from a haystack corpus (`data`, a DataConfig), each from a stream of its
    own: `samples` text windows of `text_seqlen` (default `seqlen`) tokens, and `samples` passkey prompts of
    `seqlen` tokens with `needles` passkeys each (`gates.passkey_batch`)."""
    windows = TokenStream(data, tokenizer, text_seqlen or seqlen, seed).next_batch(samples)
    prompts = passkey_batch(random.Random(seed + 1), TokenStream(data, tokenizer, seqlen, seed + 1), tokenizer,
                            samples, seqlen, needles)
    return windows, prompts


def profiled_budget(cfg: Config, st: DynamicStage, model, tokenizer, scorer: KeyScorer, seed: int) -> Budget:
    """The stage's budget with a recent share per (layer, KV head) from a profile of the learned scorer on
    `profile_samples` text windows and passkey prompts of the haystack corpus (streams of their own)."""
    windows, prompts = profile_data(cfg.data[st.data], tokenizer, st.profile_samples, st.seqlen, st.needles, seed)
    shares, _ = profile_shares(model, scorer, st.budget, windows, prompts)
    log.info("%s: recent share per layer and KV head, from a profile: %s", st.name, shares_text(shares))
    return dataclasses.replace(st.budget, shares=shares)


def dynamic_variant(st: DynamicStage, artifact: Path) -> Variant:
    """A dynamic stage's row, read back from its artifact."""
    manifest = read_manifest(artifact)
    dyn, method = manifest["dynamic"], manifest["method"]
    scorer = dyn.get("scorer") or {}
    info = {"method": method["name"], "keep": st.keep, "sink": st.sink, "window": st.window,
            "seconds": method["seconds"], "tokens": manifest["data"].get("tokens", 0), "prior": st.masks,
            "scorer_parameters": scorer.get("parameters", 0), "scorer_fraction": scorer.get("fraction", 0.0)}
    return Variant(st.name, artifact=artifact, info=info)


class Dynamic(StageKind):
    """Learning a scorer trains on a training group, as gate learning does; a training-free source needs
    one device."""

    name, config, placement, trains = "dynamic", DynamicStage, Placement.DEVICE, True

    def where(self, st: DynamicStage) -> Placement:
        return Placement.GROUP if st.method == "learned" else Placement.DEVICE

    def reads(self, st: DynamicStage) -> list[Ref]:
        return [Ref("masks", st.masks, ("oneshot", "learn"))] if st.masks is not None else []

    def corpora(self, st: DynamicStage) -> dict[str, str]:
        return {"data": st.data} if st.method == "learned" and st.data is not None else {}

    def check(self, cfg: Config, st: DynamicStage, where: str, earlier: list) -> None:
        if st.method == "learned":
            check_batch_split(cfg, st, where)

    def lengths(self, st: DynamicStage) -> dict[str, int]:
        return {"seqlen": st.seqlen}

    def run(self, ctx: StageContext) -> StageOutput:
        return StageOutput(dynamic_stage(ctx))

    def collect(self, ctx: StageContext) -> StageOutput:
        return StageOutput([dynamic_variant(ctx.st, ctx.run.artifact(ctx.st.name))])


KIND = Dynamic()
