"""The building blocks of every config, and the schemas of the inputs every layer reads.

- `Strict` (a frozen pydantic model that refuses unknown keys), `PatternField` (an N:M pattern written
  "N:M"), `yaml_load` (YAML that keeps an unquoted 2:4 a string), `ConfigError` and `KeyPathError` (a
  validator's error that knows its key path);
- `ModelConfig` and `DataConfig`: what a model and a corpus are;
- `StageBase` and `LoopSettings`: what every stage's config, and every learning stage's, extends.

A stage kind's own config lives beside its body in `pipeline/stages/<kind>.py`; the run-level schema
that joins them (`Config`) is `pipeline/config.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, model_validator

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.vocab import MODEL_DTYPES, SAMPLE_BY, Pattern


class ConfigError(MaskpipeError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124; N:M patterns must stay strings."""


def _int_or_pattern(loader: yaml.SafeLoader, node: yaml.ScalarNode):
    value = loader.construct_scalar(node)
    return value if ":" in value else yaml.SafeLoader.construct_yaml_int(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:int", _int_or_pattern)


def where_relative(path: str) -> str:
    """What an error about a missing local path adds when the path is relative: where it was looked for."""
    import os

    return "" if os.path.isabs(os.path.expanduser(path)) else \
        f" (a relative path, resolved against the current directory {os.getcwd()})"


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# A `Pattern` in a config: written and dumped as "N:M" (the YAML loader keeps an unquoted 2:4 a string).
PatternField = Annotated[Pattern, PlainValidator(Pattern.parse), PlainSerializer(str, return_type=str)]


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


class KeyPathError(ValueError):
    """A cross-reference error that knows its own key path (pydantic would report the model root)."""

    def __init__(self, loc: str, msg: str):
        super().__init__(msg)
        self.loc, self.msg = loc, msg
