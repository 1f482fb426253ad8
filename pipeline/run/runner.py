"""Running a recipe: the stages a config lists, in order, into a run directory.

A run directory (`pipeline.io.rundir.RunDir` owns its layout) holds `config.yaml` (the resolved config),
`run.log`, `status.json` (status running/stopped/failed/completed, the stage, the owner's pid and host,
start and end, and for a run that ended early its last step and error), `metrics.jsonl` (every logged
training step, each once), one mask artifact per mask-producing stage under `artifacts/`, the last
checkpoints of each learning stage, `results.json` + `results.md` (`pipeline.run.results`), and `.lock`,
its owner. Paths in `results.json` are relative to the run directory.

`run` only orders the stages and records what they produced. What a stage is lives in its module of
`pipeline.stages`; a backend executes it by its placement: `LocalBackend` in this process,
`workers.backend.RayBackend` on Ray, so this module never imports Ray.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path

import torch

from maskpipe.pipeline import MaskpipeError, __version__
from maskpipe.pipeline.io import rundir
from maskpipe.pipeline.io.artifacts import write_json, write_text
from maskpipe.pipeline.config import Config, dump_config, with_absolute_paths
from maskpipe.pipeline.io.loggers import RUN_LOG_ONLY, log_results, logs_to, read_metrics
from maskpipe.pipeline.run.preflight import check_inputs, check_resumable
from maskpipe.pipeline.run.results import Results, StageRecord
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.stages import StageContext, StageKind, StageOutput, execute, kind_of

log = logging.getLogger("maskpipe")


class LocalBackend:
    """Every stage in this process, on one device, the model loaded once."""

    def __init__(self):
        self._session: Session | None = None

    def session(self, cfg: Config) -> Session:
        if self._session is None:
            torch.manual_seed(cfg.seed)
            self._session = Session(cfg.model)
        return self._session

    def execute(self, kind: StageKind, ctx: StageContext) -> StageOutput:
        ctx.session = self.session(ctx.cfg)
        try:
            return execute(kind, ctx)
        finally:
            ctx.session.forget_masks()


def stopped_step(run_dir: Path, stage: str | None) -> int | None:
    """The last step `stage` logged, if any (a stage stopped before its first step, or one without
    steps such as an evaluation, has none, whatever an earlier stage logged)."""
    steps = [m["step"] for m in read_metrics(RunDir(run_dir).metrics) if "step" in m and m.get("stage") == stage]
    return steps[-1] if steps else None


def stopped_where(run_dir: Path) -> str:
    """Where a stopped run stopped, as its status.json records it: " at step N of STAGE", " in STAGE" or ""."""
    try:
        status = json.loads(RunDir(run_dir).status.read_text())
    except (OSError, ValueError):
        return ""
    stage, step = status.get("stage"), status.get("step")
    return f" at step {step} of {stage}" if step is not None else f" in {stage}" if stage else ""


def run(cfg: Config, run_dir: Path | None = None, backend=None, lock_wait: float = 0.0) -> Path:
    """Run every stage of `cfg` in order with `backend` (default: `LocalBackend`); returns the run
    directory.

    Given the directory of an interrupted run of the same config, it resumes: finished stages are
    skipped and a learning stage continues from its latest checkpoint. The run directory is owned
    (`pipeline.io.rundir.RunLock`) for the whole run: a second writer is refused, after waiting
    `lock_wait` seconds for the owner to let go."""
    check_inputs(cfg)  # and the trackers' packages (loggers.require)
    # Absolute: Ray workers (whose working directory may be a packaged copy of the project) and the
    # paths the run records must not depend on this process's working directory.
    run_dir = Path(run_dir or rundir.new_run_dir(cfg.output_dir, cfg.name)).absolute()
    with rundir.RunLock(run_dir, wait=lock_wait):
        _run(cfg, RunDir(run_dir), backend or LocalBackend())
    return run_dir


def _run(cfg: Config, run: RunDir, backend) -> None:
    check_resumable(cfg, run.root)
    write_text(run.config, dump_config(with_absolute_paths(cfg)))  # resumable from any working directory
    status = {"status": "running", "stage": None, "maskpipe_version": __version__,
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **rundir.owner(run.root)}
    status.pop("heartbeat", None)
    write_json(run.status, status)
    results = Results.read(run.results)
    variants: dict[str, Variant] = {"dense": Variant("dense")}
    variants |= {name: Variant.from_record(name, rec.model_dump(exclude_unset=True), run.root)
                 for name, rec in results.stages.items()}
    with logs_to(run.root):
        try:
            for i, st in enumerate(cfg.stages):  # e.g. lm-eval tasks and their data, before any model work
                if st.name not in results.done:
                    kind_of(st).preflight(st, f"stages.{i}")
            for i, st in enumerate(cfg.stages, 1):
                if st.name in results.done:
                    log.info("[%d/%d] %s: already done in %s, skipped", i, len(cfg.stages), st.name, run.root)
                    continue
                # One line per stage on the driver: under Ray the stage's own progress is in its worker.
                log.info("[%d/%d] %s: %s stage started", i, len(cfg.stages), st.name, st.stage)
                t0 = time.perf_counter()
                status["stage"] = st.name
                write_json(run.status, status)
                kind = kind_of(st)
                out = backend.execute(kind, StageContext(cfg, st, run, dict(variants)))
                for v in out.variants:
                    variants[v.name] = v
                    results.stages[v.name] = StageRecord.model_validate(v.record(run.root))
                if kind.section is not None:
                    results.add(kind.section, out.rows)
                results.done.append(st.name)
                results.write(run.results)
                log.info("[%d/%d] %s: done in %.1f s", i, len(cfg.stages), st.name, time.perf_counter() - t0)
            tables = results.tables()
            if tables:
                write_text(run.results_md, tables)
            status["status"] = "completed"
        except KeyboardInterrupt:
            status.update(status="stopped", step=stopped_step(run.root, status["stage"]))
            raise
        except BaseException as e:
            # status.json says what failed in one line; run.log keeps the traceback of what is not ours.
            ours = isinstance(e, MaskpipeError)
            first = (str(e).splitlines() or [""])[0]
            status.update(status="failed", step=stopped_step(run.root, status["stage"]),
                          error=first if ours else f"{type(e).__name__}: {first}")
            # an error of ours is printed once on the console, by the command (`error: ...`): run.log only
            log.error("%s: failed: %s", status["stage"], status["error"], exc_info=not ours,
                      extra={RUN_LOG_ONLY: ours})
            raise
        finally:
            status["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            write_json(run.status, status)
            log_results(run.root, cfg.logging, results.dump(), status["status"], cfg.model_dump(mode="json"))
