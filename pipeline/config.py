"""The run-level schema: a YAML recipe validated into a typed `Config`.

`Config` joins the model, the corpora, the sparsity pattern, the stages, the workers, the loggers and
an optional tune sweep. Each stage kind's own config class lives beside its body in
`pipeline/stages/<kind>.py`; the `Stage` union and `STAGE_KINDS` are built from the stage registry
(`pipeline.stages.KINDS`), so a new kind is one new file and one registry line. The building blocks
(`Strict`, `ModelConfig`, `DataConfig`, ...) are `pipeline.core.schema`'s.

Every error names the file and the key path, e.g.
``configs/x.yaml: sparsity.pattern: expected "N:M" with 0<N<M, got "4:2"``.
"""

from __future__ import annotations

import copy
import glob
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from maskpipe.pipeline.core.schema import (ConfigError, DataConfig, KeyPathError, ModelConfig, PatternField, Strict,
                                           yaml_load)
from maskpipe.pipeline.core.vocab import STRATEGIES, Pattern, check_batch_split, strategy_problem
from maskpipe.pipeline.stages import KINDS
from maskpipe.pipeline.stages.learn import LearnStage
from maskpipe.pipeline.stages.oneshot import OneshotStage


class SparsityConfig(Strict):
    pattern: PatternField = Pattern(2, 4)


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
            raise KeyPathError("workers.sharded_load", f"reading each rank's rows needs strategy fsdp, "
                                                    f"not {self.strategy}")
        problem = strategy_problem(self.strategy, self.num_workers, self.shard_group)
        if problem is not None:
            raise KeyPathError(f"workers.{problem[0]}", problem[1])
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


# The stage configs, one per kind of the registry, in its order; the union is discriminated by `stage`.
STAGE_CONFIGS = tuple(kind.config for kind in KINDS.values())
Stage = Annotated[Union[STAGE_CONFIGS], Field(discriminator="stage")]
STAGE_KINDS = tuple(KINDS)


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
                    s = {**s, "name": _item_name(s)}
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
                raise KeyPathError(f"{where}.name", f"duplicate stage name {st.name!r}")
            kind = kind_of(st)
            for key, ref in kind.corpora(st).items():
                if ref not in self.data:
                    raise KeyPathError(f"{where}.{key}", f"no corpus named {ref!r} under data (have {sorted(self.data)})")
            for ref in kind.reads(st):
                if not any(s.name == ref.stage and (not ref.kinds or s.stage in ref.kinds) for s in earlier):
                    what = " or ".join(ref.kinds) + " stage" if ref.kinds else "stage"
                    raise KeyPathError(f"{where}.{ref.key}", f"no earlier {what} named {ref.stage!r}")
            kind.check(self, st, where, earlier)
        if self.tune is not None:
            self._check_tune()
        return self

    def _check_tune(self) -> None:
        t = self.tune
        st = next((s for s in self.stages if s.name == t.stage), None)
        if not isinstance(st, LearnStage):
            raise KeyPathError("tune.stage", f"no learn stage named {t.stage!r}")
        if t.metric.data not in self.data:
            raise KeyPathError("tune.metric.data", f"no corpus named {t.metric.data!r} under data (have {sorted(self.data)})")
        raw = st.model_dump(mode="json", exclude_none=True)
        for point in t.corners():
            for key, value in point.items():
                try:
                    trial = LearnStage.model_validate(set_keys(raw, {key: value}))
                except ValidationError as e:
                    first = e.errors()[0]
                    msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
                    raise KeyPathError(f"tune.space.{key}", f"{msg} (value {value!r})") from None
                earlier = [s.name for s in self.stages[: self.stages.index(st)]]
                if trial.prior is not None and trial.prior.stage is not None and trial.prior.stage not in earlier:
                    raise KeyPathError(f"tune.space.{key}", f"no stage named {trial.prior.stage!r} before {st.name}")
                if trial.data not in self.data:
                    raise KeyPathError(f"tune.space.{key}", f"no corpus named {trial.data!r} under data")
                try:
                    check_batch_split(trial.batch_size, self.workers.num_workers)
                except ValueError as e:
                    raise KeyPathError(f"tune.space.{key}", str(e)) from None

    def stage_pattern(self, stage: OneshotStage | LearnStage) -> Pattern:
        return stage.pattern or self.sparsity.pattern


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in STAGE_KINDS)
        ctx_err = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_err, KeyPathError):
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


def _item_name(item: Any) -> Any:
    """A stage's name: its `name`, else its method, else its kind (what Config._default_names fills in)."""
    if not isinstance(item, dict):
        return None
    return item.get("name") or item.get("method") or item.get("stage")


def _list_index(node: list, p: str, where: str, key: str, source: str) -> int:
    """A list item by position (`stages.1`) or by its name (`stages.maskllm`)."""
    if p.isdigit():
        if int(p) < len(node):
            return int(p)
        raise ConfigError(f"{source}: override {key}: {where} has no item {p}")
    names = [_item_name(it) for it in node]
    if p in names:
        return names.index(p)
    have = ", ".join(str(n) for n in names if n is not None) or "none"
    raise ConfigError(f"{source}: override {key}: {where} has no item named {p!r} (names: {have})")


def apply_overrides(raw: dict, overrides: list[str], source: str) -> dict:
    """Hydra/torchtune-style `key.path=value` overrides; values are parsed as YAML. A list item is
    addressed by position or by name (`stages.maskllm.steps=3`: the stage named, or defaulting to, maskllm)."""
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
                p = _list_index(node, p, ".".join(parts[:i]), key, source)
            elif not isinstance(node, dict):
                raise ConfigError(f"{source}: override {key}: {'.'.join(parts[:i])} is not a mapping")
            if last:
                try:
                    node[p] = yaml_load(value)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{source}: override {ov!r}: not valid YAML ({yaml_problem(e)})") from None
            else:
                if isinstance(node, dict) and node.get(p) is None:
                    node[p] = {}
                node = node[p]
    return raw


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def read_config_file(path: str | Path) -> dict:
    """The mapping a config file holds; a missing, unreadable, non-YAML or non-mapping file is one line."""
    path = Path(path)
    try:
        raw = yaml_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <root>: expected a mapping of keys, got "
                          f"{'an empty file' if raw is None else type(raw).__name__}")
    return raw


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    raw = read_config_file(path)
    return config_from_dict(apply_overrides(raw, list(overrides), str(path)), str(path))


def with_absolute_paths(cfg: Config) -> Config:
    """`cfg` with its local paths (model directory, corpus files and globs, prior artifacts) made absolute
    against the current directory, as a run records them in its config.yaml: the run then resumes from
    any working directory. Hub ids and paths that name nothing here are left as they are."""
    raw = cfg.model_dump(mode="json")

    def absolute(path: str, exists) -> str:
        full = os.path.expanduser(path)
        return os.path.abspath(full) if not os.path.isabs(full) and exists(full) else path

    raw["model"]["name_or_path"] = absolute(raw["model"]["name_or_path"], os.path.isdir)
    for data in raw.get("data", {}).values():
        for src in data.get("sources", []):
            src["path"] = absolute(src["path"], lambda f: bool(glob.glob(f)))
    for st in raw.get("stages", []):
        prior = st.get("prior") if isinstance(st, dict) else None
        if isinstance(prior, dict) and prior.get("artifact"):
            prior["artifact"] = absolute(prior["artifact"], os.path.isdir)
    return config_from_dict(raw)


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
