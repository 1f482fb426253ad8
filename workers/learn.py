"""A learning stage as a Ray Train worker group: data-parallel ranks, checkpoints through Ray.

Every worker loads the model, takes its share of each batch and runs `pipeline.run.learn_stage`; DDP
averages the mask gradients over the group (gloo on CPU, NCCL on GPUs, as TorchTrainer sets up).
Checkpoints go to Ray Train's storage through `ray.train.report`, so when a worker dies Ray restarts
the group (up to `workers.max_failures` times) and every rank resumes from the last checkpoint; a new
trainer with the same storage path and name (a resumed run) finds it the same way.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline.checkpoint import Checkpoint, write_shard
from pipeline.config import Config, LearnStage
from pipeline.run import MetricsLog, Session, Variant, learn_stage, learned_variant, logs_to


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


def learn_loop(config: dict) -> None:
    """Ray Train's per-worker function for one learning stage."""
    cfg: Config = config["cfg"]
    st: LearnStage = next(s for s in cfg.stages if s.name == config["stage"])
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    session = Session(cfg.model, meta=cfg.workers.loads_sharded)  # fsdp: each rank reads its rows only
    metrics = MetricsLog(run_dir, st.name, cfg.tensorboard) if rank == 0 else None

    def on_log(entry: dict) -> None:
        if metrics is not None:
            metrics(entry)
        if "loss" in entry:  # every rank logs the same steps, as the collective report needs
            ray.train.report({"stage": st.name, **entry})

    with logs_to(run_dir) if rank == 0 else contextlib.nullcontext():
        learn_stage(cfg, session, st, run_dir / "artifacts", config["prior"], RayCheckpoints(rank), on_log, rank,
                    world)


def learn_on_ray(cfg: Config, st: LearnStage, run_dir: Path, prior: Path | None) -> list[Variant]:
    # Ray Train would move workers into its own directory; keeping Ray's worker directory (the job's
    # working_dir, or the driver's directory on a local instance) resolves a config's relative paths
    # the same way for every stage and every kind of worker.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    w = cfg.workers
    trainer = TorchTrainer(
        learn_loop,
        train_loop_config={"cfg": cfg, "stage": st.name, "run_dir": str(run_dir), "prior": prior},
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu,
                                     resources_per_worker=w.resources_per_worker or None),
        run_config=RunConfig(
            name=f"{run_dir.name}-{st.name}",
            storage_path=w.storage_path or str((run_dir / "train").resolve()),
            failure_config=FailureConfig(max_failures=w.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=st.keep_checkpoints),
        ),
    )
    trainer.fit()
    return [learned_variant(st, run_dir / "artifacts" / st.name)]
