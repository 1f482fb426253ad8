"""Stage kinds: what each `stage:` of a config is, in one place each, and the registry that finds them.

A stage kind (`StageKind`) declares
  - `config`: its config class, defined beside it in the kind's module, whose `stage` literal names the
    kind (`pipeline.config` joins them into the `Stage` union);
  - what it reads: earlier stages (`reads`), corpora (`corpora`), sequence lengths (`lengths`), and the
    checks a config must pass beyond those (`check`, `preflight`);
  - where it runs (`placement`): on one device (`DEVICE`), as independent cells shared out over workers
    (`CELLS`: `cells`, `setup`, `cell`, `gather`) or as a data-parallel training group (`GROUP`);
  - its body (`run`), and what it leaves in `results.json`: variants (artifacts) and/or rows of one
    results section (`section`).

`pipeline.run.runner` orders the stages; a backend runs each one by its placement (`execute` here, in
process; `workers.backend.RayBackend` on Ray: a task, an actor pool, a Ray Train worker group).
Adding a stage kind: one file here defining its config class and `KIND`, and one line in `_registry`
below. Stage modules import `pipeline.config` for annotations only (the config imports this registry).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from maskpipe.pipeline.core.schema import KeyPathError
from maskpipe.pipeline.core.vocab import check_batch_split as split_batch
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.io.session import Session, Variant


class Placement(enum.Enum):
    DEVICE = "device"  # one process holding the model: in-process, or one Ray task
    CELLS = "cells"  # independent cells (e.g. variant x corpus), shared out over workers that load the model once
    GROUP = "group"  # a data-parallel training group: one Ray Train worker group, every rank a share of each batch


class Ref(NamedTuple):
    """An earlier stage a stage reads: the key path within the stage that names it, its name, and the
    kinds it must be of (any when empty)."""

    key: str
    stage: str
    kinds: tuple[str, ...] = ()


@dataclass
class StageContext:
    """What a stage runs with: the config, the stage, the run's paths, every variant made so far, and
    what the backend provides (the model session; for training stages a checkpoint store, a metrics
    callback and this worker's rank among `world_size`)."""

    cfg: Any  # pipeline.config.Config
    st: Any  # the stage's config
    run: RunDir
    variants: dict[str, Variant]
    session: Session | None = None
    store: Any = None
    on_log: Callable[[dict], None] | None = None
    rank: int = 0
    world_size: int = 1

    def chosen(self) -> list[Variant]:
        """The variants an evaluating stage runs: dense (if `st.dense`), then those of `st.masks`."""
        st = self.st
        picked = [v for name, v in self.variants.items()
                  if name != "dense" and (st.masks == "all" or name in st.masks)]
        return ([self.variants["dense"]] if st.dense else []) + picked

    def without_session(self) -> StageContext:
        """This context as it travels to another process, which loads its own model."""
        return StageContext(self.cfg, self.st, self.run, self.variants)


@dataclass
class StageOutput:
    variants: list[Variant] = field(default_factory=list)  # what the stage made (each a row of results.stages)
    rows: dict[str, Any] = field(default_factory=dict)  # {variant: ...} for the kind's results section


class StageKind:
    name: str  # the `stage:` value
    config: type
    placement: Placement = Placement.DEVICE
    section: str | None = None  # the results.json section `rows` go to (perplexity, retrieval, lm_eval)
    trains: bool = False  # checkpoints and logs steps: the backend gives it a store and a metrics log

    def where(self, st) -> Placement:
        """Where this stage runs: the kind's `placement`, unless a kind decides per stage (e.g. an
        attention stage that learns gates trains, one that draws a random plan does not)."""
        return self.placement

    # -- what a stage reads (config validation and `check_inputs`)
    def reads(self, st) -> list[Ref]:
        """Every earlier stage it reads."""
        return []

    def corpora(self, st) -> dict[str, str]:
        """key path (within the stage) -> corpus name, for every corpus it reads."""
        data = getattr(st, "data", None)
        return {"data": data} if data is not None else {}

    def lengths(self, st) -> dict[str, int]:
        """key path (within the stage) -> tokens one sequence of the stage holds."""
        seqlen = getattr(st, "seqlen", None)
        return {"seqlen": seqlen} if seqlen is not None else {}

    def check(self, cfg, st, where: str, earlier: list) -> None:
        """Checks of a config beyond its references (which `reads` declares and the config checks);
        `earlier` are the stages before this one. Raise `pipeline.core.schema.KeyPathError`."""

    def preflight(self, st, where: str) -> None:
        """Checks before any model work of a run (e.g. that lm-eval knows the tasks)."""

    # -- the body
    def run(self, ctx: StageContext) -> StageOutput:
        raise NotImplementedError

    def collect(self, ctx: StageContext) -> StageOutput:
        """GROUP: the stage's output read back from the run directory once its worker group is done."""
        raise NotImplementedError

    def setup(self, ctx: StageContext) -> Any:
        """CELLS: what every worker prepares once (e.g. tokenized corpora)."""

    def cells(self, ctx: StageContext) -> list:
        raise NotImplementedError

    def cell(self, ctx: StageContext, state: Any, cell) -> Any:
        raise NotImplementedError

    def gather(self, ctx: StageContext, done: list[tuple[Any, Any]]) -> StageOutput:
        """CELLS: the output from (cell, value) pairs, in any order."""
        raise NotImplementedError


def check_batch_split(cfg, st, where: str) -> None:
    """A training group's batch splits evenly over its workers (each its share of every batch)."""
    try:
        split_batch(st.batch_size, cfg.workers.num_workers)
    except ValueError as e:
        raise KeyPathError(f"{where}.batch_size", f"{e} (workers.num_workers)") from None


class Evaluates(StageKind):
    """A kind that runs the variants made so far (`dense` and `masks` of its config: `ctx.chosen()`)."""

    def reads(self, st) -> list[Ref]:
        return [] if st.masks == "all" else [Ref("masks", name) for name in st.masks]


def execute(kind: StageKind, ctx: StageContext) -> StageOutput:
    """Run a stage in this process with `ctx.session`, whatever its placement."""
    if kind.where(ctx.st) is Placement.CELLS:
        state = kind.setup(ctx)
        return kind.gather(ctx, [(c, kind.cell(ctx, state, c)) for c in kind.cells(ctx)])
    if not kind.trains or ctx.store is not None:
        return kind.run(ctx)
    from maskpipe.pipeline.io.loggers import MetricsLog, step_tokens
    from maskpipe.pipeline.train.checkpoint import CheckpointDir

    st = ctx.st
    ctx.store = CheckpointDir(ctx.run.checkpoints(st.name), st.keep_checkpoints)
    ctx.on_log = MetricsLog(ctx.run.root, st.name, ctx.cfg.logging, config=ctx.cfg.model_dump(mode="json"),
                            steps=st.steps, tokens_per_step=step_tokens(st))
    try:
        return kind.run(ctx)
    finally:
        ctx.on_log.close()


def _registry() -> dict[str, StageKind]:
    from maskpipe.pipeline.stages import attention, dynamic, eval, learn, lm_eval, oneshot, retrieval

    # The registry: one line per stage kind.
    kinds = [oneshot.KIND, learn.KIND, eval.KIND, retrieval.KIND, attention.KIND, dynamic.KIND, lm_eval.KIND]
    return {k.name: k for k in kinds}


KINDS: dict[str, StageKind] = _registry()


def kind_of(st) -> StageKind:
    return KINDS[st.stage]


def check_registry() -> None:
    """Every kind's config class is defined in the kind's own module and names the kind in its `stage`."""
    for name, kind in KINDS.items():
        literal = kind.config.model_fields["stage"].annotation.__args__[0]
        if literal != name or kind.config.__module__ != type(kind).__module__:
            raise RuntimeError(f"stage kind {name}: config {kind.config.__module__}.{kind.config.__name__} "
                               f"(stage {literal!r}) is not defined beside it in {type(kind).__module__}")


check_registry()
