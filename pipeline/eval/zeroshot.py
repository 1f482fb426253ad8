"""Zero-shot (and few-shot) task accuracy through lm-evaluation-harness, the table pruning papers print.

Every variant of a run (dense, each mask, each plan) is scored by lm-eval's `HFLM` wrapped around the
in-memory model exactly as that variant runs it (`Session.running`: masks as parametrizations over the
frozen weights, the attention plan as maskpipe's attention implementation), so what is scored is what
`apply` exports. lm-eval is an optional dependency (`pip install 'maskpipe[lm-eval]'`), imported only
here and only when a stage or `maskpipe lm-eval` asks for it.

Tasks are lm-eval task names; `include_path` adds a folder of task YAMLs (for example
`configs/lm_eval/`, whose tasks read local JSONL through `dataset_path: json`). Every task is resolved
and its data loaded before any model work, so an unknown task or data that cannot be fetched (no hub,
a missing file) is one error naming the task, and nothing is half-written.

Results, per variant and task (`results.json` under `lm_eval`):
  {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ..., "n": <documents scored>,
   "num_fewshot": ...}
metric names are lm-eval's, with its filter appended when it is not "none" (`exact_match,strict-match`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from maskpipe.pipeline import MaskpipeError

log = logging.getLogger("maskpipe")

# The seven tasks of the Wanda / SparseGPT / MaskLLM / DSnoT zero-shot tables.
DEFAULT_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise MaskpipeError("lm_eval: the lm-eval package is not installed (pip install 'maskpipe[lm-eval]')") from None
    for name in ("lm-eval", "lm_eval"):  # its INFO lines would drown maskpipe's log
        logging.getLogger(name).setLevel(logging.WARNING)
    return lm_eval


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None, include_defaults: bool = True):
    """lm-eval's task registry, with the task YAMLs under `include_path` added (indexing lm-eval's own
    thousands of task YAMLs takes tens of seconds on a slow CPU, hence the cache and `include_defaults`)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _registry(tasks: list[str], include_path: str | None):
    """The include path alone when it defines every task, else it and lm-eval's own tasks."""
    if include_path is not None:
        local = task_manager(include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return task_manager(include_path)


def check_tasks(tasks: list[str], include_path: str | None, keys: tuple[str, str] = ("tasks", "include_path")):
    """Resolve every task and load its data now; returns the task manager. A task that is unknown or
    whose data cannot be loaded is a MaskpipeError naming it and `keys` (the config keys or flags of
    the tasks and the include path)."""
    from pathlib import Path

    where, path_key = keys
    if include_path is not None and not Path(include_path).is_dir():
        raise MaskpipeError(f"{path_key}: {include_path}: no such directory")
    tm = _registry(list(tasks), include_path)
    for task in tasks:
        if task not in tm.all_tasks:
            hint = f" or under {include_path}" if include_path else " (add a folder of task YAMLs with include_path)"
            raise MaskpipeError(f"{where}: {task}: no such lm-eval task in its registry{hint}")
        try:
            tm.load([task])  # builds the task, which downloads (or reads) its dataset
        except Exception as e:  # datasets raises many kinds; all mean the same thing to the user
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MaskpipeError(f"{where}: {task}: its data cannot be loaded ({type(e).__name__}: {first})") from None
    return tm


def evaluate(model, tokenizer, tasks: list[str], tm, *, num_fewshot: int | None, limit: int | float | None,
             batch_size: int, bootstrap_iters: int, seed: int) -> dict[str, dict[str, Any]]:
    """{task: {metric: value, "n": documents, "num_fewshot": k}} of `model` as it runs now."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=False, bootstrap_iters=bootstrap_iters,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    results = {}
    for task, row in out["results"].items():
        metrics = {}
        for key, value in row.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue  # name, alias, sample_len
            metric, filt = key.split(",", 1)
            metrics[metric if filt == "none" else key] = float(value)
        n = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = {**metrics, "n": n, "num_fewshot": out.get("n-shot", {}).get(task, num_fewshot)}
    return results


def primary(row: dict[str, Any]) -> tuple[str | None, float | None]:
    """The metric a table shows for a task: accuracy (`acc`) where the task has it, else its first metric."""
    if "acc" in row:
        return "acc", row["acc"]
    for k, v in row.items():
        if k not in ("n", "num_fewshot") and not k.endswith("_stderr") and "_stderr," not in k:
            return k, v
    return None, None
