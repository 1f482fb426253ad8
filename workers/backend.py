"""`RayBackend`: the stages of `pipeline.run.run` on a Ray cluster.

A learning stage (masks, or an attention stage's gates) runs as a Ray Train worker group
(`workers.learn`); an evaluation as `workers.num_workers` actors, each holding the model once, that
share out the (variant × corpus) cells; one-shot, other attention (random plans, re-binarised gates),
retrieval and lm-eval stages as one Ray task each, on one worker's resources,
running exactly what `LocalBackend` runs in-process. Every task and actor gets `resources_per_worker`
(one GPU each with `use_gpu`), so evaluations fan out one device each.
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray.util import ActorPool

from pipeline import MaskpipeError
from pipeline.config import AttentionStage, Config, EvalStage, LearnStage, LmEvalStage, OneshotStage, RetrievalStage
from pipeline.run import LocalBackend, Session, Variant, eval_cell, eval_texts, logs_to
from workers.learn import check_resources, learn_on_ray


def _on_one_worker(kind: str, cfg: Config, st, run_dir: Path, *args):
    with logs_to(run_dir):
        return getattr(LocalBackend(), kind)(cfg, st, run_dir, *args)


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
class Evaluator:
    """One device's share of an evaluation stage: the model loaded once, cells evaluated in turn."""

    def __init__(self, cfg: Config, st: EvalStage, run_dir: Path):
        self.session, self.st, self.run_dir = Session(cfg.model), st, run_dir
        self.texts = eval_texts(cfg, st, self.session.tokenizer)

    def cell(self, v: Variant, key: str) -> tuple[str, str, dict]:
        with logs_to(self.run_dir):
            return v.name, key, eval_cell(self.session, self.st, v, key, self.texts[key])


class RayBackend:
    def __init__(self, cfg: Config):
        w = cfg.workers
        res = dict(w.resources_per_worker)
        self.options = {"num_cpus": res.pop("CPU", 1), "num_gpus": res.pop("GPU", 1 if w.use_gpu else 0)}
        if "memory" in res:
            self.options["memory"] = res.pop("memory")
        if res:
            self.options["resources"] = res
        self.num_workers = w.num_workers
        if not w.autoscaling:
            # Before any stage: the learning group and the evaluation actors ask for this much at once.
            check_resources(self.options, w.num_workers, "workers")

    def _task(self, kind: str, cfg: Config, st, run_dir: Path, *args):
        return _get(ray.remote(_on_one_worker).options(**self.options).remote(kind, cfg, st, run_dir, *args))

    def oneshot(self, cfg: Config, st: OneshotStage, run_dir: Path) -> list[Variant]:
        return self._task("oneshot", cfg, st, run_dir)

    def attention(self, cfg: Config, st: AttentionStage, run_dir: Path, variants: dict[str, Variant]) -> list[Variant]:
        if st.learns_gates:
            return learn_on_ray(cfg, st, run_dir, variants=variants)
        return self._task("attention", cfg, st, run_dir, variants)

    def retrieval(self, cfg: Config, st: RetrievalStage, run_dir: Path, variants: list[Variant]) -> dict[str, dict]:
        return self._task("retrieval", cfg, st, run_dir, variants)

    def lm_eval(self, cfg: Config, st: LmEvalStage, run_dir: Path, variants: list[Variant]) -> dict[str, dict]:
        return self._task("lm_eval", cfg, st, run_dir, variants)

    def learn(self, cfg: Config, st: LearnStage, run_dir: Path, prior: Path | None) -> list[Variant]:
        return learn_on_ray(cfg, st, run_dir, prior=prior)

    def evaluate(self, cfg: Config, st: EvalStage, run_dir: Path, variants: list[Variant]) -> dict[str, dict[str, dict]]:
        cells = [(v, key) for v in variants for key in st.data]
        actors = [Evaluator.options(**self.options).remote(cfg, st, run_dir)
                  for _ in range(min(self.num_workers, len(cells)))]
        results: dict[str, dict[str, dict]] = {v.name: {} for v in variants}
        try:
            for name, key, res in ActorPool(actors).map_unordered(lambda a, c: a.cell.remote(*c), cells):
                results[name][key] = res
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            _raise_ours(e)
            raise
        for a in actors:
            ray.kill(a)
        return {name: {key: r[key] for key in st.data} for name, r in results.items()}
