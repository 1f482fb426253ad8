"""`RayBackend`: the stages of `pipeline.run.runner.run` on a Ray cluster, by their placement
(`pipeline.stages.Placement`), whatever their kind:

  DEVICE  one Ray task on one worker's resources, running exactly what `LocalBackend` runs in-process;
  CELLS   `workers.num_workers` actors, each holding the model once, that share out the stage's cells
          (an evaluation's variant x corpus);
  GROUP   a Ray Train worker group of `workers.num_workers` data-parallel ranks (`workers.learn`).

Every task and actor gets `resources_per_worker` (one GPU each with `use_gpu`), so cells fan out one
device each.
"""

from __future__ import annotations

import ray
from ray.util import ActorPool

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.config import Config
from maskpipe.pipeline.io.loggers import logs_to
from maskpipe.pipeline.run.runner import LocalBackend
from maskpipe.pipeline.io.session import Session
from maskpipe.pipeline.stages import Placement, StageContext, StageKind, StageOutput, kind_of
from maskpipe.workers.learn import check_resources, learn_on_ray, quiet_worker


def _on_one_worker(ctx: StageContext) -> StageOutput:
    quiet_worker()
    with logs_to(ctx.run.root):
        return LocalBackend().execute(kind_of(ctx.st), ctx)


def _raise_ours(e: Exception) -> None:
    """An error of ours inside a task or actor, as the driver would have raised it: one line."""
    cause = getattr(e, "cause", None) or getattr(e, "error", None)
    if isinstance(cause, MaskpipeError):
        raise MaskpipeError(str(cause)) from None


def _get(ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        _raise_ours(e)
        raise


@ray.remote
class CellWorker:
    """One device's share of a stage's cells: the model loaded once, the stage's setup done once, cells
    run in turn."""

    def __init__(self, ctx: StageContext):
        quiet_worker()
        self.kind, self.ctx = kind_of(ctx.st), ctx
        ctx.session = Session(ctx.cfg.model)
        self.state = self.kind.setup(ctx)

    def cell(self, cell):
        with logs_to(self.ctx.run.root):
            return cell, self.kind.cell(self.ctx, self.state, cell)


def worker_options(cfg: Config) -> dict:
    """The Ray task options of one worker: `workers.resources_per_worker`, one GPU each with `use_gpu`."""
    w = cfg.workers
    res = dict(w.resources_per_worker)
    options = {"num_cpus": res.pop("CPU", 1), "num_gpus": res.pop("GPU", 1 if w.use_gpu else 0)}
    if "memory" in res:
        options["memory"] = res.pop("memory")
    if res:
        options["resources"] = res
    return options


def check_fits(cfg: Config, total: dict[str, float] | None = None) -> None:
    """Refuse a run whose workers the cluster cannot hold (`check_resources`), before any stage: the
    learning group and the evaluation actors ask for this much at once. `total`: the cluster's
    resources, when this process is not connected to it (`submit` reads them from the dashboard)."""
    if cfg.workers.num_workers > 0 and not cfg.workers.autoscaling:
        check_resources(worker_options(cfg), cfg.workers.num_workers, "workers", total)


class RayBackend:
    def __init__(self, cfg: Config):
        self.options = worker_options(cfg)
        self.num_workers = cfg.workers.num_workers
        check_fits(cfg)

    def execute(self, kind: StageKind, ctx: StageContext) -> StageOutput:
        ctx = ctx.without_session()
        where = kind.where(ctx.st)
        if where is Placement.GROUP:
            return learn_on_ray(kind, ctx)
        if where is Placement.CELLS:
            return self._cells(kind, ctx)
        return _get(ray.remote(_on_one_worker).options(**self.options).remote(ctx))

    def _cells(self, kind: StageKind, ctx: StageContext) -> StageOutput:
        cells = kind.cells(ctx)
        actors = [CellWorker.options(**self.options).remote(ctx) for _ in range(min(self.num_workers, len(cells)))]
        try:
            done = list(ActorPool(actors).map_unordered(lambda a, c: a.cell.remote(c), cells))
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            _raise_ours(e)
            raise
        for a in actors:
            ray.kill(a)
        return kind.gather(ctx, done)
