"""Zero-shot (and few-shot) task accuracy through lm-evaluation-harness, the table pruning papers print.

Every variant of a run (dense, each mask, each plan) is scored by lm-eval's `HFLM` wrapped around the
in-memory model exactly as that variant runs it (`Session.running`: masks as parametrizations over the
frozen weights, the attention plan as maskpipe's attention implementation), so what is scored is what
`apply` exports. lm-eval is an optional dependency (`pip install 'maskpipe[lm-eval]'`), imported only
here and only when a stage or `maskpipe lm-eval` asks for it.

Tasks are lm-eval task names; `include_path` adds a folder of task YAMLs (for example
`configs/lm_eval/`, whose tasks read local JSONL through `dataset_path: json`). A relative path in a
task's `dataset_kwargs.data_files` is read against the YAML's own folder (lm-eval would read it against
the working directory): the registry is built from a copy of the folder's YAMLs whose data_files are
made absolute (`resolve_include_path`). Every task is resolved
and its data loaded before any model work, so an unknown task or data that cannot be fetched (no hub,
a missing file) is one error naming the task, and nothing is half-written.

Results, per variant and task (`results.json` under `lm_eval`):
  {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "acc_norm_stderr": ..., "n": <documents scored>,
   "num_fewshot": ...}
metric names are lm-eval's, with its filter appended when it is not "none" (`exact_match,strict-match`).
With `samples_dir`, lm-eval's own EvaluationTracker also writes its results_<date>.json and
samples_<task>_<date>.jsonl files there (`--log-samples`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import tempfile
from pathlib import Path
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


def _absolute(value: Any, folder: Path) -> Any:
    """data_files (a path, a list, or a split -> paths mapping) with relative local paths made absolute
    against `folder`; URLs, hub paths and paths that only exist from the working directory (YAMLs written
    for it) are kept."""
    if isinstance(value, dict):
        return {k: _absolute(v, folder) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, folder) for v in value]
    if not isinstance(value, str) or "://" in value or Path(value).is_absolute():
        return value
    beside = folder / value
    return str(beside.resolve()) if beside.exists() or not Path(value).exists() else value


@functools.lru_cache(maxsize=8)
def resolve_include_path(include_path: str) -> str:
    """A folder lm-eval can read from any working directory: a temporary copy of `include_path`'s task
    YAMLs (and Python helpers) whose relative data_files point into `include_path`. A YAML that plain
    YAML cannot read (lm-eval's `!function` tags) is copied as it is."""
    import yaml

    src = Path(include_path).resolve()
    dst = Path(tempfile.mkdtemp(prefix="maskpipe-lm-eval-tasks-"))
    atexit.register(shutil.rmtree, dst, True)
    for f in src.rglob("*"):
        if f.suffix not in (".yaml", ".yml", ".py") or not f.is_file():
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = f.read_text()
        try:
            doc = yaml.safe_load(text) if f.suffix != ".py" else None
        except yaml.YAMLError:
            doc = None
        files = doc.get("dataset_kwargs", {}).get("data_files") if isinstance(doc, dict) and isinstance(
            doc.get("dataset_kwargs"), dict) else None
        if files is not None:
            doc["dataset_kwargs"]["data_files"] = _absolute(files, f.parent)
            text = yaml.safe_dump(doc, sort_keys=False)
        target.write_text(text)
    return str(dst)


@functools.lru_cache(maxsize=8)
def task_manager(include_path: str | None, include_defaults: bool = True):
    """lm-eval's task registry, with the task YAMLs under `include_path` added (indexing lm-eval's own
    thousands of task YAMLs takes tens of seconds on a slow CPU, hence the cache and `include_defaults`)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=resolve_include_path(include_path) if include_path else None,
                       include_defaults=include_defaults)


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
             batch_size: int | str, bootstrap_iters: int, seed: int,
             samples_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """{task: {metric: value, "n": documents, "num_fewshot": k}} of `model` as it runs now. `batch_size`
    "auto" lets lm-eval find the largest that fits; with `samples_dir`, lm-eval's EvaluationTracker
    writes its own results and per-sample files there."""
    lm_eval = _lm_eval()
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    tracker = EvaluationTracker(output_path=str(samples_dir)) if samples_dir is not None else None
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=tracker is not None, evaluation_tracker=tracker,
                                  bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
                                  torch_random_seed=seed, fewshot_random_seed=seed)
    if tracker is not None:
        samples = out.pop("samples")
        tracker.save_results_aggregated(results=out, samples=samples)
        for task in out["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
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
    """The metric a table shows for a task: length-normalised accuracy (`acc_norm`) where the task has
    it (hellaswag, arc, openbookqa: as the pruning papers report them), else accuracy, else its first metric."""
    for metric in ("acc_norm", "acc"):
        if metric in row:
            return metric, row[metric]
    for k, v in row.items():
        if k not in ("n", "num_fewshot") and not k.endswith("_stderr") and "_stderr," not in k:
            return k, v
    return None, None
