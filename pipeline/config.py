"""Typed configs: YAML recipes validated into pydantic models.

Every error names the file and the key path, e.g.
``configs/x.yaml: sparsity.pattern: expected "N:M" with 0<N<M, got "4:2"``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError, field_validator,
                      model_validator)

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.vocab import (MODEL_DTYPES, ONESHOT_METHODS, SAMPLE_BY, STRATEGIES, Pattern, check_batch_split,
                            strategy_problem)
from maskpipe.pipeline.eval.zeroshot import DEFAULT_TASKS


class ConfigError(MaskpipeError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124; N:M patterns must stay strings."""


def _int_or_pattern(loader: yaml.SafeLoader, node: yaml.ScalarNode):
    value = loader.construct_scalar(node)
    return value if ":" in value else yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _int_or_pattern)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A `Pattern` in a config: written and dumped as "N:M" (the YAML loader keeps an unquoted 2:4 a string).
PatternField = Annotated[Pattern, PlainValidator(Pattern.parse), PlainSerializer(str, return_type=str)]


class SparsityConfig(Strict):
    pattern: PatternField = Pattern(2, 4)


class PruneTargets(Strict):
    """Glob patterns over module names. Only ``nn.Linear`` layers inside decoder blocks are ever
    candidates, so embeddings and ``lm_head`` can't be pruned by accident."""

    include: list[str] = ["*"]
    exclude: list[str] = []


class ModelConfig(Strict):
    name_or_path: str
    revision: str | None = None
    dtype: Literal[MODEL_DTYPES] = "bfloat16"
    trust_remote_code: bool = False
    device: str = "auto"
    # Keep the model in host memory: one-shot stages calibrate each decoder block on `device` in turn
    # (pipeline.nm.oneshot), for a model larger than the device; the other stages then run on the CPU.
    offload: bool = False
    prune: PruneTargets = PruneTargets()


class Source(Strict):
    """One corpus: a local file (.txt, .jsonl/.json, .parquet; a glob is fine) or a hub dataset id."""

    path: str
    name: str | None = None  # hub dataset config, e.g. "wikitext-2-raw-v1"
    revision: str | None = None
    split: str = "train"
    text_field: str = "text"
    # Local text files: one record per line, per blank-line paragraph, or the whole file.
    sample_by: Literal[SAMPLE_BY] = "line"


SHUFFLE_WINDOW_TOKENS = 2**21


class DataConfig(Strict):
    sources: list[Source] = Field(min_length=1)
    # Shares of the *tokens* each source contributes to the blend (normalised); equal when omitted.
    weights: list[float] | None = None
    # Records held per source in a shuffle buffer (`datasets`' IterableDataset.shuffle), 0 = file order.
    # Files are often stored in order (a book, a manual, a crawl by date); in file order a run learns
    # the head of its corpus only (150 x 8 x 512 tokens read the first 31% of kjv.train: docs/RESULTS.md).
    # A buffer at least the source's record count reads it in a random order.
    shuffle_buffer: int = Field(default=10_000, ge=0)
    # Blocks: the blend is emitted in seeded random order within windows of this many blocks (never more
    # than one epoch of every source), so that a batch, a calibration set and a whole short run are
    # spread over many documents; 0 = in order. Default: SHUFFLE_WINDOW_TOKENS / seqlen blocks. A window
    # of 512 x 256 tokens held about 10 of pydocs' 343 documents, and a 0.2M-token run learned a mask that
    # was 1 PPL worse on both valid corpora than one learned from the whole files (docs/RESULTS.md).
    shuffle_blocks: int | None = Field(default=None, ge=0)
    # What ends each record when records are packed into blocks: "eos" (the tokenizer's EOS token) or
    # any text, appended to the record before it is tokenized (e.g. "\n").
    separator: str = "eos"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # `data: {kjv: path/to/file.txt}` and `sources: [path, ...]` are shorthands.
        if isinstance(v, str):
            v = {"sources": [v]}
        if isinstance(v, dict) and isinstance(v.get("sources"), list):
            v = {**v, "sources": [{"path": s} if isinstance(s, str) else s for s in v["sources"]]}
        return v

    @model_validator(mode="after")
    def _weights(self) -> DataConfig:
        if self.weights is not None:
            if len(self.weights) != len(self.sources):
                raise ValueError(f"weights: {len(self.weights)} weights for {len(self.sources)} sources")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError("weights: must be non-negative with a positive sum")
        return self


class StageBase(Strict):
    name: str | None = None  # unique within a config; defaults to the stage's method or kind
    stage: str  # the kind: each stage's config narrows it to its Literal (the union's discriminator)


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
    # DSnoT only: the earlier oneshot or learn stage whose mask it refines, and at most how many
    # prune-and-grow swaps each output row makes.
    mask_from: str | None = None
    max_cycles: int = Field(default=50, gt=0)

    @model_validator(mode="after")
    def _checks(self) -> OneshotStage:
        if self.method != "magnitude" and self.data is None:
            raise ValueError(f"data: {self.method} needs a calibration corpus")
        if self.weight_update and self.method != "sparsegpt":
            raise ValueError("weight_update: only sparsegpt updates weights")
        if (self.method == "dsnot") != (self.mask_from is not None):
            raise ValueError("mask_from: dsnot refines the mask of an earlier stage named here, and only dsnot does")
        return self


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


class LmEvalStage(StageBase):
    """Zero-/few-shot task accuracy of every variant through lm-evaluation-harness (`pipeline.eval.zeroshot`)."""

    stage: Literal["lm_eval"]
    tasks: list[str] = Field(default=DEFAULT_TASKS, min_length=1)  # lm-eval task (or group) names
    include_path: str | None = None  # a folder of task YAMLs to add to lm-eval's registry
    num_fewshot: int | None = Field(default=0, ge=0)  # None: each task's own default
    limit: int | float | None = Field(default=None, gt=0)  # documents per task (a fraction if < 1); None: all
    batch_size: int = Field(default=8, gt=0)
    bootstrap_iters: int = Field(default=1000, ge=0)  # for the standard errors; 0 skips them
    dense: bool = True
    masks: list[str] | Literal["all"] = "all"  # names of earlier stages whose artifacts to evaluate


# The settings of the training loop (`pipeline.train.loop.train`), one type each: a learning stage's config
# extends `LoopSettings`, and sets its own default where its method needs another value.
Steps = Annotated[int, Field(gt=0)]
BatchSize = Annotated[int, Field(gt=0)]  # global: shared out over the workers
SeqLen = Annotated[int, Field(gt=1)]
LearningRate = Annotated[float, Field(gt=0)]  # the peak of the cosine schedule
CheckpointEvery = Annotated[int, Field(gt=0)]
KeepCheckpoints = Annotated[int, Field(gt=0)]


class LoopSettings(StageBase):
    """What every learning stage sets for the one training loop: its length, batch, lr schedule
    (linear warmup, then cosine to 0), and log and checkpoint cadence."""

    steps: Steps
    batch_size: BatchSize
    seqlen: SeqLen
    lr: LearningRate
    warmup_steps: int = Field(default=0, ge=0)
    log_every: int = Field(default=10, gt=0)  # a log entry averages the losses since the last one
    checkpoint_every: CheckpointEvery
    keep_checkpoints: KeepCheckpoints


class AttentionStage(LoopSettings):
    """A per-head attention plan: `learned` gates (DuoAttention) binarised at a target fraction of
    streaming KV heads (or a gate threshold), or a `random` plan with the same budget."""

    stage: Literal["attention"]
    method: Literal["learned", "random"] = "learned"
    streaming: float | None = Field(default=0.5, ge=0, le=1)  # fraction of KV heads that stream
    threshold: float | None = Field(default=None, ge=0, le=1)  # learned only: heads with gate < threshold stream
    sink: int | None = Field(default=None, gt=0)  # tokens; default seqlen/64
    window: int | None = Field(default=None, gt=0)  # recent tokens; default seqlen/8
    windows: list[int] | None = Field(default=None, min_length=1)  # MoA-style: streaming windows ranked by gate
    gates_from: str | None = None  # an earlier learned attention stage: re-binarise its gates, no training
    seed: int | None = None  # random: the draw (defaults to the config's seed)
    masks: str | None = None  # an earlier N:M stage: its masks stay on while learning and join the artifact
    data: str | None = None  # haystack corpus of the synthetic passkey samples (learned)
    steps: Steps = 100
    batch_size: BatchSize = 4
    seqlen: SeqLen = 512  # also the context the sink/window defaults scale with
    needles: int = Field(default=2, gt=0)  # passkeys per sample
    # Adam moves a gate by about lr per step, so lr ~ 2-4/steps lets an unneeded gate fall from 1 to 0.
    lr: LearningRate = 0.05
    # λ of λ·mean|α|; DuoAttention's 0.05·Σ|α| over 48 heads is λ = 2.4 here
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
        if self.method == "random":
            if self.threshold is not None or self.gates_from is not None:
                raise ValueError("method: a random plan takes a streaming fraction, no threshold or gates_from")
        elif self.gates_from is None and self.data is None:
            raise ValueError("data: learning gates needs a haystack corpus")
        return self


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


class WorkersConfig(Strict):
    """Where the stages run. With 0 workers every stage runs in the calling process and Ray is not
    used. With N ≥ 1, on a Ray cluster: a learning stage as a Ray Train worker group of N data-parallel
    workers (each its share of every batch), one-shot stages as a Ray task and evaluations as N actors
    that share out the (mask × corpus) cells, each worker holding `resources_per_worker`."""

    num_workers: int = Field(default=0, ge=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = {}  # e.g. {CPU: 8, GPU: 1}; Ray's default is one CPU
    max_failures: int = Field(default=3, ge=-1)  # worker-group restarts from the last checkpoint; -1 = no limit
    # Ray Train storage for the learning stages' checkpoints: a path every node sees, or a pyarrow URI
    # such as s3://bucket/prefix. Default: the run directory's `train/`.
    storage_path: str | None = None
    # How a learning stage spreads the model and the mask state over the workers (pipeline.train.shard):
    # ddp replicates everything, fsdp (FSDP2) and deepspeed (ZeRO `zero_stage` 2 or 3) shard it.
    # Gate learning (an attention stage) is data-parallel under every strategy, the model whole on each worker.
    strategy: Literal[STRATEGIES] = "ddp"
    zero_stage: Literal[2, 3] = 3
    activation_checkpointing: bool = False  # recompute each decoder block in the backward pass
    # fsdp only: shard within groups of this many workers (e.g. the GPUs of a node) and replicate
    # across groups (hybrid sharding), so that parameters are gathered over the fast links only.
    shard_group: int | None = Field(default=None, gt=0)
    # The cluster adds nodes on demand (cluster/aws.yaml, an autoscaling KubeRay cluster): requests the
    # current nodes cannot hold wait for new ones instead of being refused before the run starts.
    autoscaling: bool = False
    # Build the model on the meta device and let each rank read only its rows of the safetensors
    # checkpoint (pipeline.core.models), instead of a whole copy per worker. Default: on under fsdp.
    sharded_load: bool | None = None

    @property
    def loads_sharded(self) -> bool:
        return self.strategy == "fsdp" if self.sharded_load is None else self.sharded_load

    @model_validator(mode="after")
    def _strategy_fits(self) -> WorkersConfig:
        if self.sharded_load and self.strategy != "fsdp":
            raise _KeyError("workers.sharded_load", f"reading each rank's rows needs strategy fsdp, "
                                                    f"not {self.strategy}")
        problem = strategy_problem(self.strategy, self.num_workers, self.shard_group)
        if problem is not None:
            raise _KeyError(f"workers.{problem[0]}", problem[1])
        return self


SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


def search_spec(spec: Any) -> tuple[str, Any]:
    """One key of a tune search space, as (kind, argument): a list is a grid of its values; a mapping
    with one key out of SEARCH_KINDS is that search (`{loguniform: [1e-4, 1e-2]}`, `{choice: [a, b]}`);
    anything else is a value fixed for every trial (a list value, e.g. tau, is written `{grid: [[4, 0.05]]}`)."""
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS):
        return "fixed", spec
    kind, arg = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(arg, list) or not arg:
            raise ValueError(f"{kind} needs a non-empty list of values, got {arg!r}")
        return kind, arg
    numbers = isinstance(arg, list) and len(arg) == 2 and all(isinstance(x, (int, float)) for x in arg)
    if not numbers or not arg[0] < arg[1] or (kind == "loguniform" and arg[0] <= 0):
        bound = "0 < low < high" if kind == "loguniform" else "low < high"
        raise ValueError(f"{kind} needs [low, high] with {bound}, got {arg!r}")
    if kind == "randint" and not all(isinstance(x, int) for x in arg):
        raise ValueError(f"randint needs integers [low, high) , got {arg!r}")
    return kind, arg


def set_keys(raw: dict, values: dict[str, Any]) -> dict:
    """A copy of `raw` with each dotted key (`prior.strength`) set to its value."""
    raw = copy.deepcopy(raw)
    for key, value in values.items():
        node, *path = raw, *key.split(".")
        for p in path[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[path[-1]] = value
    return raw


class TuneMetric(Strict):
    data: str  # perplexity (wikitext protocol) on this corpus, a key of `data`; lower is better
    seqlen: int = Field(default=2048, gt=1)
    batch_size: int = Field(default=1, gt=0)


class TuneConfig(Strict):
    """`maskpipe tune`: a sweep over one learn stage's keys at a small budget (pipeline.run.tune)."""

    stage: str  # the learn stage to tune
    metric: TuneMetric
    # dotted keys of the learn stage -> a grid (list), {choice|uniform|loguniform|randint: ...}, or a fixed value
    space: dict[str, Any] = Field(min_length=1)
    num_samples: int = Field(default=1, gt=0)  # draws of the random keys, for every point of the grid
    max_concurrent: int | None = Field(default=None, gt=0)  # trials at once (default: as many as fit)

    @field_validator("space", mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> Any:
        # `prior: {strength: [3, 10]}` is `prior.strength: [3, 10]`, so that a command-line override
        # (tune.space.prior.strength=[3,10]) means what the dotted key in the YAML means.
        def flat(node: dict, prefix: str) -> dict:
            out = {}
            for key, spec in node.items():
                nested = isinstance(spec, dict) and spec and not (len(spec) == 1 and next(iter(spec)) in SEARCH_KINDS)
                out |= flat(spec, f"{prefix}{key}.") if nested else {f"{prefix}{key}": spec}
            return out

        return flat(v, "") if isinstance(v, dict) else v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, spec in v.items():
            if key.split(".")[0] in ("stage", "name"):
                raise ValueError(f"{key}: the stage's kind and name are not tunable")
            try:
                search_spec(spec)
            except ValueError as e:
                raise ValueError(f"{key}: {e}") from None
        return v

    def corners(self) -> list[dict[str, Any]]:
        """Points of the space that between them use every grid and choice value and both ends of every
        range: if each of them makes a valid stage, every trial does."""
        specs = {key: search_spec(spec) for key, spec in self.space.items()}
        width = max(len(arg) if kind != "fixed" else 1 for kind, arg in specs.values())
        return [{key: arg if kind == "fixed" else arg[min(i, len(arg) - 1)] for key, (kind, arg) in specs.items()}
                for i in range(width)]


class WandbConfig(Strict):
    """Weights & Biases (`pip install 'maskpipe[wandb]'`); credentials from `wandb login` or WANDB_API_KEY."""

    project: str
    entity: str | None = None
    name: str | None = None  # default: the run directory's name
    mode: Literal["online", "offline", "disabled"] | None = None  # default: WANDB_MODE, else online
    tags: list[str] = []


class MLflowConfig(Strict):
    """MLflow (`pip install 'maskpipe[mlflow]'`): a server URL or a local `file:` store."""

    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI, else MLflow's own default
    experiment: str = "maskpipe"
    run_name: str | None = None  # default: the run directory's name


class LoggingConfig(Strict):
    """Where learning metrics go besides `metrics.jsonl` (always written): see `pipeline.io.loggers`."""

    tensorboard: bool = False
    wandb: WandbConfig | None = None
    mlflow: MLflowConfig | None = None


# The stage configs; each kind's behaviour lives in its own module of `pipeline.stages`, whose
# registry is checked against this tuple (`pipeline.stages.check_registry`).
STAGE_CONFIGS = (OneshotStage, LearnStage, EvalStage, RetrievalStage, AttentionStage, LmEvalStage)
Stage = Annotated[Union[STAGE_CONFIGS], Field(discriminator="stage")]
STAGE_KINDS = tuple(c.model_fields["stage"].annotation.__args__[0] for c in STAGE_CONFIGS)


class Config(Strict):
    name: str
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig
    sparsity: SparsityConfig = SparsityConfig()
    data: dict[str, DataConfig] = {}
    stages: list[Stage] = Field(min_length=1)
    workers: WorkersConfig = WorkersConfig()
    tensorboard: bool = False  # the same as logging.tensorboard (kept for configs that say it here)
    logging: LoggingConfig = LoggingConfig()
    tune: TuneConfig | None = None  # `maskpipe tune` only; `maskpipe run` ignores it

    @model_validator(mode="before")
    @classmethod
    def _default_names(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("stages"), list):
            stages = []
            for s in v["stages"]:
                if isinstance(s, dict) and s.get("name") is None:
                    s = {**s, "name": s.get("method") or s.get("stage")}
                stages.append(s)
            v = {**v, "stages": stages}
        return v

    @model_validator(mode="before")
    @classmethod
    def _tensorboard(cls, v: Any) -> Any:
        # One home for the choice: a top-level `tensorboard: true` is `logging.tensorboard: true`.
        if isinstance(v, dict) and v.get("tensorboard") is True and isinstance(v.get("logging", {}), dict):
            v = {**v, "logging": {**(v.get("logging") or {}), "tensorboard": True}}
        return v

    @model_validator(mode="after")
    def _references(self) -> Config:
        from maskpipe.pipeline.stages import kind_of

        for i, st in enumerate(self.stages):
            where, earlier = f"stages.{i}", self.stages[:i]
            if any(s.name == st.name for s in earlier):
                raise _KeyError(f"{where}.name", f"duplicate stage name {st.name!r}")
            kind = kind_of(st)
            for key, ref in kind.corpora(st).items():
                if ref not in self.data:
                    raise _KeyError(f"{where}.{key}", f"no corpus named {ref!r} under data (have {sorted(self.data)})")
            for ref in kind.reads(st):
                if not any(s.name == ref.stage and (not ref.kinds or s.stage in ref.kinds) for s in earlier):
                    what = " or ".join(ref.kinds) + " stage" if ref.kinds else "stage"
                    raise _KeyError(f"{where}.{ref.key}", f"no earlier {what} named {ref.stage!r}")
            kind.check(self, st, where, earlier)
        if self.tune is not None:
            self._check_tune()
        return self

    def _check_tune(self) -> None:
        t = self.tune
        st = next((s for s in self.stages if s.name == t.stage), None)
        if not isinstance(st, LearnStage):
            raise _KeyError("tune.stage", f"no learn stage named {t.stage!r}")
        if t.metric.data not in self.data:
            raise _KeyError("tune.metric.data", f"no corpus named {t.metric.data!r} under data (have {sorted(self.data)})")
        raw = st.model_dump(mode="json", exclude_none=True)
        for point in t.corners():
            for key, value in point.items():
                try:
                    trial = LearnStage.model_validate(set_keys(raw, {key: value}))
                except ValidationError as e:
                    first = e.errors()[0]
                    msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
                    raise _KeyError(f"tune.space.{key}", f"{msg} (value {value!r})") from None
                earlier = [s.name for s in self.stages[: self.stages.index(st)]]
                if trial.prior is not None and trial.prior.stage is not None and trial.prior.stage not in earlier:
                    raise _KeyError(f"tune.space.{key}", f"no stage named {trial.prior.stage!r} before {st.name}")
                if trial.data not in self.data:
                    raise _KeyError(f"tune.space.{key}", f"no corpus named {trial.data!r} under data")
                try:
                    check_batch_split(trial.batch_size, self.workers.num_workers)
                except ValueError as e:
                    raise _KeyError(f"tune.space.{key}", str(e)) from None

    def stage_pattern(self, stage: OneshotStage | LearnStage) -> Pattern:
        return stage.pattern or self.sparsity.pattern


class _KeyError(ValueError):
    """A cross-reference error that knows its own key path (pydantic would report the model root)."""

    def __init__(self, loc: str, msg: str):
        super().__init__(msg)
        self.loc, self.msg = loc, msg


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in STAGE_KINDS)
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, _KeyError):
            loc, msg = ctx_err.loc, ctx_err.msg
        elif ctx_err is not None:
            msg = str(ctx_err)
            # Validators report "key: message" for a field they check from the model's side.
            head, sep, rest = msg.partition(": ")
            if sep and " " not in head:
                loc, msg = ".".join(filter(None, [loc, head])), rest
        else:
            msg = e["msg"]
            if e["type"] not in ("missing", "extra_forbidden"):
                msg += f", got {e['input']!r}"
            elif e["type"] == "extra_forbidden":
                msg = "unknown key"
        lines.append(f"{source}: {loc or '<root>'}: {msg}")
    return "\n".join(lines)


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Hydra/torchtune-style `key.path=value` overrides; values are parsed as YAML."""
    raw = copy.deepcopy(raw)
    for ov in overrides:
        key, sep, value = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: override {ov!r}: expected key.path=value")
        node: Any = raw
        parts = key.split(".")
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"{source}: override {key}: {'.'.join(parts[:i])} has no item {p}")
                p = int(p)
            elif not isinstance(node, dict):
                raise ConfigError(f"{source}: override {key}: {'.'.join(parts[:i])} is not a mapping")
            if last:
                node[p] = yaml_load(value)
            else:
                if isinstance(node, dict) and node.get(p) is None:
                    node[p] = {}
                node = node[p]
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    source = str(path)
    try:
        raw = yaml_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, list(overrides), source), source)


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
