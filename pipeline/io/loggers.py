"""Metric loggers behind one interface: `metrics.jsonl` always, TensorBoard, Weights & Biases and MLflow
when the config asks for them (`logging:`), each an optional dependency imported only then.

    logging:
      tensorboard: true                  # events under RUN_DIR/tensorboard/<stage>/ (`tensorboard: true` at
                                         # the top level of a config means the same)
      wandb: {project: maskpipe, entity: null, name: null, mode: null, tags: []}
      mlflow: {tracking_uri: null, experiment: maskpipe, run_name: null}

Files in the run directory:
  metrics.jsonl   one JSON object per logged step: {"stage": ..., "step": ..., <metric>: ...}; on a resume
                  the lines past the checkpoint's step are dropped (the resumed run logs them again)
  trackers.json   {"wandb": {"id": ...}, "mlflow": {"run_id": ..., "experiment_id": ...}}: the tracker
                  run that stands for this maskpipe run, so that every stage, every process (a Ray
                  worker) and a resumed run log into the same one

Each tracker gets the resolved config as params (`flatten`: dotted key paths), every logged step, and at
the end (`log_results`) the headline numbers, the final tables and every mask artifact of the run.

One maskpipe run is one W&B run and one MLflow run; a stage's metrics are named `<stage>/<metric>`,
against `<stage>/step` in W&B (each stage counts its own steps) and as the MLflow step. Only one
process per stage logs: the driver, or rank 0 of a Ray Train worker group (`workers.learn`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.artifacts import write_json, write_text
from maskpipe.pipeline.io.rundir import RunDir

log = logging.getLogger("maskpipe")


class MetricLogger(Protocol):
    """One destination of a stage's metrics."""

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    def __init__(self, run_dir: Path):
        self.path = RunDir(run_dir).metrics

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **metrics}) + "\n")

    def rewind(self, stage: str, step: int) -> None:
        """Drop the stage's lines past `step` (a resume from that step's checkpoint logs them again)."""
        lines = read_metrics(self.path)
        keep = [line for line in lines if line.get("stage") != stage or line.get("step", 0) <= step]
        cut = self.path.exists() and self.path.stat().st_size > 0 and not self.path.read_bytes().endswith(b"\n")
        if len(keep) < len(lines) or cut:  # a line cut short goes too, or the next one would join it
            write_text(self.path, "".join(json.dumps(line) + "\n" for line in keep))

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, run_dir: Path, stage: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(RunDir(run_dir).tensorboard(stage)))

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{stage}/{k}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """A resolved config as tracker params: dotted key paths (`stages.1.steps`, as overrides name them)
    to their values as text (JSON for numbers, booleans, null and empty containers)."""
    if isinstance(config, dict) and config:
        return {k: v for key, val in config.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    if isinstance(config, list) and config:
        return {k: v for i, val in enumerate(config) for k, v in flatten(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: config if isinstance(config, str) else json.dumps(config)}


def _trackers(run_dir: Path) -> dict[str, Any]:
    path = RunDir(run_dir).trackers
    return json.loads(path.read_text()) if path.exists() else {}


def _remember(run_dir: Path, kind: str, ids: dict[str, Any]) -> None:
    write_json(RunDir(run_dir).trackers, {**_trackers(run_dir), kind: ids})


def _optional(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MaskpipeError(f"logging.{extra}: the {module} package is not installed "
                            f"(pip install 'maskpipe[{extra}]')") from None


class WandbLogger:
    """A W&B run per maskpipe run, resumed by id by every stage and process. `mode` None leaves it to
    WANDB_MODE (offline writes under RUN_DIR/wandb/, for `wandb sync` later)."""

    def __init__(self, run_dir: Path, cfg, config: dict | None = None):
        os.environ.setdefault("WANDB_SILENT", "true")  # its banner would interleave with maskpipe's log
        wandb = _optional("wandb", "wandb")
        run_id = _trackers(run_dir).get("wandb", {}).get("id")
        if run_id is None:
            run_id = secrets.token_hex(6)  # W&B run ids: lowercase letters and digits
            _remember(run_dir, "wandb", {"id": run_id, "project": cfg.project})
        # Offline, every init writes a segment folder named by the second it started and the run id: two
        # stages (or the final summary) starting within one second would overwrite each other's records.
        segment = RunDir(run_dir).wandb_segments / f"{time.time_ns()}-{os.getpid()}"
        segment.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.name, id=run_id,
                              resume="allow", mode=cfg.mode, tags=cfg.tags or None, dir=str(segment),
                              config=flatten(config) if config is not None else None, reinit="create_new")
        self.defined: set[str] = set()

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if stage not in self.defined:  # each stage counts its own steps
            self.run.define_metric(f"{stage}/step")
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            self.defined.add(stage)
        self.run.log({f"{stage}/step": step, **{f"{stage}/{k}": v for k, v in metrics.items()}})

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def tables(self, results: dict[str, Any], markdown: str) -> None:
        """The final tables: one W&B Table of every number (section, variant, name, value)."""
        table = self.wandb.Table(columns=["section", "variant", "name", "value"], data=_rows(results))
        self.run.log({"results": table})

    def artifact(self, name: str, folder: Path) -> None:
        """A mask artifact as a W&B Artifact (type `mask`) named `<run>-<stage>`."""
        art = self.wandb.Artifact(name, type="mask", metadata=_manifest_summary(folder))
        art.add_dir(str(folder))
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()


class MLflowLogger:
    """An MLflow run per maskpipe run, through `MlflowClient` (no process-global active run), so every
    stage and process logs into the one whose id `trackers.json` holds."""

    def __init__(self, run_dir: Path, cfg, config: dict | None = None):
        _optional("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        from mlflow.exceptions import MlflowException

        self.client = MlflowClient(tracking_uri=cfg.tracking_uri)
        ids = _trackers(run_dir).get("mlflow")
        if ids is None:
            try:
                exp = self.client.get_experiment_by_name(cfg.experiment)
            except MlflowException as e:  # e.g. MLflow 3 refuses file: stores without MLFLOW_ALLOW_FILE_STORE=true
                raise MaskpipeError(f"logging.mlflow.tracking_uri: {cfg.tracking_uri}: {e.message.splitlines()[0]}") \
                    from None
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
            run = self.client.create_run(exp_id, run_name=cfg.run_name or run_dir.name,
                                         tags={"maskpipe.run_dir": str(run_dir.resolve())})
            ids = {"run_id": run.info.run_id, "experiment_id": exp_id, "tracking_uri": cfg.tracking_uri}
            _remember(run_dir, "mlflow", ids)
            if config is not None:  # params once, at creation: MLflow params never change
                from mlflow.entities import Param

                params = [Param(k, v[:6000]) for k, v in flatten(config).items()]  # MLflow's value limit
                for i in range(0, len(params), 100):  # log_batch takes 100 params at a time
                    self.client.log_batch(ids["run_id"], params=params[i:i + 100])
                self.client.log_dict(ids["run_id"], config, "config.json")
        self.run_id = ids["run_id"]

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        self.client.log_batch(self.run_id, metrics=[Metric(f"{stage}/{k}", v, now, step) for k, v in metrics.items()])

    def summary(self, values: dict[str, float]) -> None:
        self.log("results", 0, values)

    def tables(self, results: dict[str, Any], markdown: str) -> None:
        self.client.log_dict(self.run_id, results, "results.json")
        if markdown:
            self.client.log_text(self.run_id, markdown, "results.md")

    def artifact(self, name: str, folder: Path) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path=f"artifacts/{folder.name}")

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"completed": "FINISHED", "failed": "FAILED"}.get(status, "KILLED"))

    def close(self) -> None:
        pass


def trackers(run_dir: Path, cfg, config: dict | None = None) -> list[MetricLogger]:
    """The W&B / MLflow loggers that `cfg` (a `LoggingConfig`) asks for."""
    out = []
    if cfg is not None and cfg.wandb is not None:
        out.append(WandbLogger(run_dir, cfg.wandb, config))
    if cfg is not None and cfg.mlflow is not None:
        out.append(MLflowLogger(run_dir, cfg.mlflow, config))
    return out


def step_tokens(st) -> int:
    """Tokens a learning stage's optimizer step reads (`LoopSettings`; a learn stage's grad_accum too)."""
    return st.batch_size * st.seqlen * getattr(st, "grad_accum", 1)


class MetricsLog:
    """A learning stage's `on_log`: the run log, `metrics.jsonl` and whatever `logging` asks for (a
    `LoggingConfig`, or a bool for TensorBoard alone). At the stage's first entry, its JSONL lines past
    the step it starts from are dropped (past the checkpoint's step on a resume, `{"resumed_from_step":
    N}`; all of them on a start from scratch): an attempt that died before checkpointing them left them,
    and this one logs those steps again."""

    def __init__(self, run_dir: Path, stage: str, logging_cfg=False, *, tensorboard: bool = False,
                 config: dict | None = None, steps: int | None = None, tokens_per_step: int = 0):
        self.stage = stage
        # the console line's progress: steps done of `steps`, tokens/s and ETA since this stage started
        self.steps, self.tokens_per_step = steps, tokens_per_step
        self.t0, self.first_step = time.monotonic(), 0
        self.jsonl = JsonlLogger(run_dir)
        tb = tensorboard or (logging_cfg if isinstance(logging_cfg, bool) else logging_cfg.tensorboard)
        self.loggers: list[MetricLogger] = [self.jsonl] + ([TensorBoardLogger(run_dir, stage)] if tb else [])
        self.loggers += trackers(run_dir, None if isinstance(logging_cfg, bool) else logging_cfg, config)
        self.started = False

    def progress(self, step: int) -> str:
        """E.g. 'step 40/125 (32%), 5,120 tokens/s, ETA 1m12s': the rate over the steps this process ran."""
        if not self.steps:
            return f"step {step}"
        done, seconds = step - self.first_step, time.monotonic() - self.t0
        text = f"step {step}/{self.steps} ({step / self.steps:.0%})"
        if done > 0 and seconds > 0:
            rate = done / seconds
            if self.tokens_per_step:
                text += f", {rate * self.tokens_per_step:,.0f} tokens/s"
            eta = round((self.steps - step) / rate)
            hours, minutes, seconds = eta // 3600, eta % 3600 // 60, eta % 60
            text += f", ETA {hours}h{minutes:02d}m" if hours else f", ETA {minutes}m{seconds:02d}s"
        return text

    def __call__(self, entry: dict) -> None:
        if "resumed_from_step" in entry:
            self.t0, self.first_step = time.monotonic(), entry["resumed_from_step"]
        fields = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                          if k != "step")
        log.info("%s: %s", self.stage, f"{self.progress(entry['step'])} | {fields}" if "step" in entry else fields)
        if not self.started or "resumed_from_step" in entry:
            self.started = True
            self.jsonl.rewind(self.stage, entry.get("resumed_from_step", 0))
        if "resumed_from_step" in entry:
            return
        rest = {k: v for k, v in entry.items() if k != "step"}
        self.jsonl.log(self.stage, entry["step"], rest)  # the whole entry, as it came
        # trackers take numbers only, and W&B / MLflow reject NaN
        numbers = {k: v for k, v in rest.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not math.isnan(v)}
        for logger in self.loggers[1:]:
            logger.log(self.stage, entry["step"], numbers)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def require(cfg) -> None:
    """Refuse, before a run starts, a tracker whose package is missing (one line naming the key)."""
    if cfg is not None and cfg.tensorboard:
        _optional("tensorboard", "tensorboard")
    if cfg is not None and cfg.wandb is not None:
        _optional("wandb", "wandb")
    if cfg is not None and cfg.mlflow is not None:
        _optional("mlflow", "mlflow")


def _rows(results: dict[str, Any]) -> list[list]:
    """Every headline number of a run: [section, variant, name, value] (perplexity per corpus, retrieval
    accuracy per task, lm-eval accuracy per task)."""
    rows = []
    for variant, corpora in results.get("perplexity", {}).items():
        rows += [["ppl", variant, c, r["ppl"]] for c, r in corpora.items()]
    for variant, tasks in results.get("retrieval", {}).items():
        rows += [["retrieval", variant, t, r["acc"]] for t, r in tasks.items() if isinstance(r, dict) and "acc" in r]
    for variant, tasks in results.get("lm_eval", {}).items():
        rows += [["lm_eval", variant, t, r["acc"]] for t, r in tasks.items() if r.get("acc") is not None]
    return rows


def _manifest_summary(folder: Path) -> dict[str, Any]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return {"pattern": manifest.get("pattern"), "method": (manifest.get("method") or {}).get("name"),
            "base_model": manifest.get("base_model")}


def _tensorboard_results(run_dir: Path, values: dict[str, float], config: dict | None, markdown: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    import yaml

    writer = SummaryWriter(str(RunDir(run_dir).tensorboard("results")))
    for k, v in values.items():
        writer.add_scalar(k, v, 0)
    if config is not None:  # TensorBoard renders text as Markdown: indented, it is a code block
        writer.add_text("config", "".join(f"    {line}\n" for line in yaml.safe_dump(config, sort_keys=False)
                                          .splitlines()), 0)
    if markdown:
        writer.add_text("results", markdown, 0)
    writer.close()


def log_results(run_dir: Path, cfg, results: dict[str, Any], status: str, config: dict | None = None) -> None:
    """At the end of a run: its headline numbers (perplexity, retrieval and lm-eval accuracy per variant)
    into the trackers' summaries, its final tables (results.json, results.md), every mask artifact of
    the run, and the MLflow run marked finished/failed; into TensorBoard the numbers and the config."""
    if cfg is None or (cfg.wandb is None and cfg.mlflow is None and not cfg.tensorboard):
        return
    values = {f"{section}/{variant}/{name}": value for section, variant, name, value in _rows(results)}
    md = RunDir(run_dir).results_md
    markdown = md.read_text() if md.exists() else ""
    folders = RunDir(run_dir).artifacts
    artifacts = sorted(d for d in folders.iterdir() if (d / "manifest.json").is_file()) if folders.is_dir() else []
    try:
        if cfg.tensorboard:
            _tensorboard_results(run_dir, values, config, markdown)
        for logger in trackers(run_dir, cfg, config):
            if values:
                logger.summary(values)
            logger.tables(results, markdown)
            for folder in artifacts:
                logger.artifact(f"{run_dir.name}-{folder.name}", folder)
            if isinstance(logger, MLflowLogger):
                logger.finish(status)
            logger.close()
    except Exception as e:  # the run's own outcome (maybe an exception in flight) matters more
        log.warning("could not send the results to the trackers: %s: %s", type(e).__name__, e)


def read_metrics(path: Path) -> list[dict]:
    """The entries of a `metrics.jsonl`. A last line cut short (its writer was killed mid-line) is dropped
    with a warning; any other line that is not a JSON object is an error that names it."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    entries = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            if i == len(lines):
                log.warning("%s: line %d is cut short; dropped", path, i)
                break
            raise MaskpipeError(f"{path}: line {i} is not a JSON object")
        entries.append(entry)
    return entries



# A log record with this attribute true goes to run.log only: the console has its own line for it.
RUN_LOG_ONLY = "maskpipe_run_log_only"


def not_run_log_only(record: logging.LogRecord) -> bool:
    """A console handler's filter: drops the records meant for run.log only."""
    return not getattr(record, RUN_LOG_ONLY, False)


@contextmanager
def logs_to(run_dir: Path):
    """The maskpipe log of this process, at INFO, also appended to the run's `run.log`: the driver's,
    and that of any Ray worker that runs one of the run's stages."""
    handler = logging.FileHandler(RunDir(run_dir).log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()
