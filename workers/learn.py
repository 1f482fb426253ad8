"""A training-group stage (`Placement.GROUP`) as a Ray Train worker group: data-parallel ranks,
checkpoints through Ray.

Every worker loads the model, takes its share of each batch and runs the stage's body (for `learn`,
`pipeline.stages.learn.learn_stage`); DDP
averages the mask gradients over the group (gloo on CPU, NCCL on GPUs, as TorchTrainer sets up).
Checkpoints go to Ray Train's storage through `ray.train.report`, so when a worker dies Ray restarts
the group (up to `workers.max_failures` times) and every rank resumes from the last checkpoint; a new
trainer with the same storage path and name (a resumed run) finds it the same way. Errors a restart
would only repeat (a bad path, bad data, an error of ours) are not retried: every rank records its
error in `train/error-<stage>-rank<r>.json` (`RunDir.train_error`) and ends, and the driver raises the first one.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, write_json
from maskpipe.pipeline.train.checkpoint import Checkpoint, write_shard
from maskpipe.pipeline.config import Config
from maskpipe.pipeline.stages.learn import LearnStage
from maskpipe.pipeline.io.loggers import MetricsLog, logs_to, step_tokens
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.io.session import Session
from maskpipe.pipeline.stages import StageContext, StageKind, StageOutput, kind_of

log = logging.getLogger("maskpipe")


class RayCheckpoints:
    """A checkpoint store for `train_masks` on a Ray Train worker. Every rank writes the rows it owns
    into its own folder and reports it (`ray.train.report` is collective); Ray Train gathers the
    ranks' files into one checkpoint in its storage."""

    def __init__(self, rank: int):
        self.rank = rank

    @contextlib.contextmanager
    def latest(self):
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as path:
            yield Checkpoint(path)

    def save(self, step: int, tensors: dict, meta: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            write_shard(Path(tmp), step, tensors, meta, self.rank)
            ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def quiet_worker() -> None:
    """What a Ray worker prints goes to the driver's console, once per worker: no transformers progress
    bars ("Loading weights", whatever TQDM_DISABLE says: transformers reads its own switch), and not
    Ray Train's INFO line per `ray.train.report` ("Reporting training result N: TrainingReport(...)")."""
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    # Ray Train V2 names these module loggers by file path (logging.getLogger(__file__)): reach them by module.
    for module in ("context", "storage"):  # per report, and "Checkpoint successfully created at: ..."
        try:
            importlib.import_module(f"ray.train.v2._internal.execution.{module}").logger.setLevel(logging.WARNING)
        except (ImportError, AttributeError):  # another Ray version: its INFO lines show, nothing breaks
            pass


def _starts(path: Path) -> int:
    """How many times the worker group of this fit has started, as `path` counts them (0: never)."""
    try:
        return int(json.loads(path.read_text())["starts"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _started(path: Path) -> int:
    """Count one more start of a worker group in `path`; returns the count (1: the first start)."""
    write_json(path, {"starts": _starts(path) + 1})
    return _starts(path)


def learn_loop(config: dict) -> None:
    """Ray Train's per-worker function for one training-group stage."""
    quiet_worker()
    cfg: Config = config["cfg"]
    st = next(s for s in cfg.stages if s.name == config["stage"])
    run = RunDir(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    starts = _started(run.train_attempts(st.name)) if rank == 0 else 1
    torch.manual_seed(cfg.seed)
    # fsdp: each rank of a learn stage reads its rows only (gates and DMA's scorer train data-parallel over
    # whole models)
    session = Session(cfg.model, meta=isinstance(st, LearnStage) and cfg.workers.loads_sharded)
    # Metrics go to metrics.jsonl from rank 0 only; Ray Train hears from the group with checkpoints only
    # (`RayCheckpoints.save`). Its result queue holds one report, which its controller drains when it polls
    # the workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default):
    # a report per logged step held every such step until the next poll (micro-llama steps of ~25 ms took
    # 2 s each at log_every 1, 2026-12-04).
    metrics = (MetricsLog(run.root, st.name, cfg.logging, config=cfg.model_dump(mode="json"), steps=st.steps,
                          tokens_per_step=step_tokens(st)) if rank == 0 else None)

    with logs_to(run.root) if rank == 0 else contextlib.nullcontext():
        if starts > 1:  # Ray Train restarts the whole group when it loses a worker
            tries = "unlimited" if cfg.workers.max_failures < 0 else str(cfg.workers.max_failures)
            log.warning("%s: a worker of the group died or was lost; the group restarted (restart %d of %s, "
                        "workers.max_failures) and resumes from its last checkpoint", st.name, starts - 1, tries)
        try:
            kind_of(st).run(StageContext(cfg, st, run, config["variants"], session=session, store=RayCheckpoints(rank),
                                         on_log=metrics, rank=rank, world_size=world))
        except DETERMINISTIC as e:
            # Ray Train restarts a failed group up to max_failures times, which only replays a bad
            # path, bad data or an error of ours. Such errors happen on every rank at the same point
            # (they come from the config and the data, which all ranks share): each rank records it
            # and ends normally, and the driver raises it once the group is done.
            write_json(run.train_error(st.name, rank), {"rank": rank, "error": _one_line(e)})
        finally:
            if metrics is not None:
                metrics.close()


# Errors that a restart of the worker group would only repeat. Worker deaths are no exception inside
# a worker, and collective failures are RuntimeErrors: those restart the group.
DETERMINISTIC = (MaskpipeError, OSError, UnicodeError, ValueError)


def _one_line(e: BaseException) -> str:
    return str(e) if isinstance(e, MaskpipeError) else f"{type(e).__name__}: {e}".splitlines()[0]


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file `path` is: an artifact written anew is a new file (`atomic_dir` renames it in)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def train_run_name(run_dir: Path, stage: str) -> str:
    """Ray Train's run name for a stage: the run directory's name and the stage's where they are
    plain ASCII (as every earlier run's, so a resume finds its checkpoints), else an ASCII rendering
    with a hash of the original, since Ray Train cannot encode other names."""
    name = f"{run_dir.name}-{stage}"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return name if safe == name else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def check_resources(options: dict, workers: int, what: str, total: dict[str, float] | None = None) -> None:
    """Refuse a request no node set of the cluster can hold now, with the numbers, rather than wait
    forever (Ray retries an infeasible request without end). `options` are a Ray task's options;
    `total` the cluster's resources (default: those of the cluster this process is connected to)."""
    import ray

    total = ray.cluster_resources() if total is None else total
    asked = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    for res, per in asked.items():
        have = total.get(res, 0)
        if per and per * workers > have:
            raise MaskpipeError(f"{what}: asked {workers} worker(s) x {per:g} {res}, the Ray cluster has {have:g} {res} "
                                f"(workers.num_workers, workers.use_gpu, workers.resources_per_worker; "
                                f"set workers.autoscaling: true if the cluster adds nodes on demand)")


def learn_on_ray(kind: StageKind, ctx: StageContext) -> StageOutput:
    """Run a training-group stage on a Ray Train worker group; its output is what rank 0 left in the
    run directory (`kind.collect`)."""
    # Ray Train would move workers into its own directory; keeping Ray's worker directory (the job's
    # working_dir, or the driver's directory on a local instance) resolves a config's relative paths
    # the same way for every stage and every kind of worker.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    cfg, st, run = ctx.cfg, ctx.st, ctx.run
    w = cfg.workers
    for rank in range(w.num_workers):
        run.train_error(st.name, rank).unlink(missing_ok=True)
    run.train_attempts(st.name).unlink(missing_ok=True)  # this fit's starts: the first is not a restart
    trainer = TorchTrainer(
        learn_loop,
        train_loop_config={"cfg": cfg, "stage": st.name, "run_dir": str(run.root), "variants": ctx.variants},
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu,
                                     resources_per_worker=w.resources_per_worker or None),
        run_config=RunConfig(
            name=train_run_name(run.root, st.name),
            storage_path=w.storage_path or str(run.train.resolve()),
            failure_config=FailureConfig(max_failures=w.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=st.keep_checkpoints),
        ),
    )
    artifact = run.artifact(st.name)
    before = _identity(artifact / MANIFEST_FILE)
    try:
        trainer.fit()
    except SystemExit:
        raise KeyboardInterrupt from None  # Ray Train's SIGINT handler exits when its controller is gone
    restarts = _starts(run.train_attempts(st.name)) - 1
    if restarts > 0:
        log.warning("%s: the worker group was restarted %d time(s) after losing a worker (see run.log)", st.name,
                    restarts)
    errors = sorted(run.train.glob(run.train_error(glob.escape(st.name), "*").name))
    if errors:
        raise MaskpipeError(json.loads(errors[0].read_text())["error"])
    after = _identity(artifact / MANIFEST_FILE)
    if after is None or after == before:
        # Ray Train's SIGINT handler aborts the group, and fit() returns as if it had finished.
        raise KeyboardInterrupt
    return kind.collect(ctx)
