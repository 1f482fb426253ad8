"""What is checked before a run does any model work: its inputs (corpora, devices, sequence lengths
against the model's context) and, for a resumed run, that the config computes what the run computed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.config import Config
from maskpipe.pipeline.core.schema import ModelConfig
from maskpipe.pipeline.io.loggers import require
from maskpipe.pipeline.io.rundir import RunDir
from maskpipe.pipeline.eval.retrieval import require_matplotlib
from maskpipe.pipeline.train.shard import require_deepspeed

log = logging.getLogger("maskpipe")


def context_limit(model_cfg: ModelConfig) -> int | None:
    """The model's context (max_position_embeddings), read from its config without the network; None
    when it cannot be read here (a hub model not in the cache: the load reports that)."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision, local_files_only=True,
                                       trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - unreadable here is not an error yet; loading the model says why
        return None
    return getattr(c.get_text_config(), "max_position_embeddings", None)


# What a local model folder needs, each as any one of these files. A tokenizer is its vocabulary:
# tokenizer_config.json alone makes transformers ask to "install sentencepiece or tiktoken".
MODEL_FILES = {"config": ("config.json",),
               "weights": ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"),
               "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken",
                             "spiece.model", "sentencepiece.bpe.model")}


def check_model_folder(name_or_path: str, key: str = "model.name_or_path") -> None:
    """Refuse a local model folder that lacks its config, its weights or its tokenizer, naming what is
    missing (a hub id is the loader's to check)."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    missing = [what for what, globs in MODEL_FILES.items() if not any(any(folder.glob(g)) for g in globs)]
    if missing:
        raise MaskpipeError(f"{key}: {folder}: a model folder without its {' or '.join(missing)} (looked for "
                            + "; ".join(", ".join(MODEL_FILES[w]) for w in missing) + ")")


def _sniff(path: str) -> None:
    """Refuse a local corpus file whose head is not what its suffix says, naming the file: the
    streaming readers would fail mid-stage with a traceback. Reads at most the first MiB (and a
    parquet footer), so a fault further into a large file still surfaces only when it is read."""
    suffix = Path(path).suffix
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            if suffix == ".parquet":
                f.seek(max(0, Path(path).stat().st_size - 4))
                tail = f.read(4)
    except OSError as e:
        raise MaskpipeError(f"data source {path}: cannot read: {e.strerror}") from None
    if suffix == ".parquet":
        if not (head.startswith(b"PAR1") and tail == b"PAR1"):
            raise MaskpipeError(f"data source {path}: not a parquet file")
        return
    if b"\0" in head:
        raise MaskpipeError(f"data source {path}: a binary file, not text")
    import codecs

    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < 1 << 20)
    except UnicodeDecodeError as e:
        raise MaskpipeError(f"data source {path}: not UTF-8 text (byte {e.start})") from None
    if suffix in (".jsonl", ".json"):
        lines = text.splitlines()
        for i, line in enumerate(lines[:-1] if len(head) == 1 << 20 else lines, 1):
            if suffix == ".json" and i == 1 and line.lstrip().startswith("["):
                break  # one JSON array: read whole by the json reader
            try:
                if line.strip():
                    json.loads(line)
            except ValueError as e:
                raise MaskpipeError(f"data source {path}: line {i} is not JSON ({e})") from None


def check_device(device: str, key: str = "model.device", local: bool = True) -> None:
    """Refuse a device torch does not know, or (`local`: this process runs the model) one not here."""
    if device == "auto":
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise MaskpipeError(f"{key}: {device!r} is no device (auto, cpu, cuda, cuda:N, mps)") from None
    if not local:
        return  # the Ray workers' devices, not this process's
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise MaskpipeError(f"{key}: {device} asked for, but this machine has {torch.cuda.device_count()} CUDA devices")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise MaskpipeError(f"{key}: mps asked for, but this machine has no MPS device")
    if d.type not in ("cpu", "cuda", "mps"):
        raise MaskpipeError(f"{key}: {device!r} is not supported here (auto, cpu, cuda, cuda:N, mps)")


def check_inputs(cfg: Config, source: str = "", flags: dict[str, str] | None = None) -> None:
    """What can be checked before any model work, named by its key (or by the command-line flag in
    `flags`): every local corpus a stage reads exists and looks like its kind, and no stage asks for
    sequences longer than the model's context."""
    from maskpipe.pipeline.io.data import _local_files
    from maskpipe.pipeline.stages import kind_of

    flags = flags or {}
    where = f"{source}: " if source else ""
    require(cfg.logging)  # a tracker whose package is missing
    require_deepspeed(cfg.workers.strategy)  # deepspeed is an extra
    for i, st in enumerate(cfg.stages):  # so is matplotlib, for NIAH heatmaps
        if getattr(st, "niah", None):
            require_matplotlib(flags.get(f"stages.{i}.niah.lengths", f"stages.{i}.niah"))
    check_device(cfg.model.device, flags.get("model.device", "model.device"), local=cfg.workers.num_workers == 0)
    check_model_folder(cfg.model.name_or_path, flags.get("model.name_or_path", "model.name_or_path"))
    used = {ref for st in cfg.stages for ref in kind_of(st).corpora(st).values()}
    for name in sorted(used):
        for src in cfg.data[name].sources:
            for f in _local_files(src) or []:
                _sniff(f)
    limit = context_limit(cfg.model)
    for i, st in enumerate(cfg.stages if limit is not None else []):
        for key, n in kind_of(st).lengths(st).items():
            if n > limit:
                name = flags.get(f"stages.{i}.{key}", f"stages.{i}.{key}")
                raise MaskpipeError(f"{where}{name}: {n} tokens is beyond the context of {cfg.model.name_or_path} "
                                    f"(max_position_embeddings {limit})")
    check_corpora(cfg, where, flags)  # after the lengths: a seqlen beyond the model is the first thing to fix


def local_tokenizer(model_cfg: ModelConfig):
    """The model's tokenizer if it can be read here without the network, else None (the load says why)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision, local_files_only=True,
                                             trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - as in context_limit: not readable here is not an error yet
        return None


def check_corpora(cfg: Config, where: str = "", flags: dict[str, str] | None = None) -> None:
    """Refuse a local corpus that a stage cannot read a single sequence from, naming the stage's key (or
    flag) and the file: one that is empty, a record without its text field, fewer tokens than one
    block of the stage's seqlen (learning and calibration pack each source into blocks, every source
    on its own), or, for perplexity, fewer than one evaluation window. Reads each corpus only as far as
    one sequence, with the tokenizer when it is here (a hub model not in the cache: not checked)."""
    from maskpipe.pipeline.eval.perplexity import windows
    from maskpipe.pipeline.io.data import _local_files, check_source, eval_tokens
    from maskpipe.pipeline.stages import kind_of

    flags = flags or {}
    tokenizer, done = None, set()
    for i, st in enumerate(cfg.stages):
        kind = kind_of(st)
        for key, name in kind.corpora(st).items():
            data = cfg.data[name]
            if not all(_local_files(src) for src in data.sources):
                continue  # a hub dataset is read where it is served
            tokenizer = tokenizer or local_tokenizer(cfg.model)
            if tokenizer is None:
                return
            # one sequence of the stage: perplexity windows are cut from the whole text (with the
            # tokenizer's BOS), every other stage's from blocks of each source (1: retrieval fills any length)
            seqlen = kind.lengths(st).get("seqlen", 1)
            label = flags.get(f"stages.{i}.{key}", f"stages.{i}.{key}")
            if (name, seqlen, kind.name == "eval") in done:
                continue
            done.add((name, seqlen, kind.name == "eval"))
            try:
                if kind.name == "eval":
                    try:
                        windows(eval_tokens(data, tokenizer, seqlen), seqlen, st.stride, check=True)
                    except MaskpipeError as e:  # perplexity's own words, with the files they are about
                        raise MaskpipeError(f"corpus {[s.path for s in data.sources]}: {e}") from None
                else:
                    weights = data.weights or [1.0] * len(data.sources)
                    for src in (s for s, w in zip(data.sources, weights) if w > 0):
                        check_source(data, src, tokenizer, seqlen)
            except MaskpipeError as e:
                raise MaskpipeError(f"{where}{label} ({name}): {e}") from None


# What a resume may change: where and how the stages run, never what they compute (every strategy
# and worker count learns the same mask on the same global batch; see README).
NOT_RESULT = ("output_dir", "tensorboard", "logging", "workers", "model.device")


def _result_keys(raw: dict) -> dict[str, Any]:
    """A config flattened to the key paths that change a run's result. A local corpus counts by its
    file name: a path fixed or re-rooted (another working directory, a moved checkout) is the same corpus."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if prefix in NOT_RESULT:
            return
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        else:
            flat[prefix] = v

    walk("", raw)
    for key in [k for k in flat if k.startswith("data.") and k.endswith(".path")]:
        flat[key] = Path(str(flat[key])).name
    return flat


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to continue the run in `run_dir` under a config that would change its result, naming
    the keys that differ; log the keys that changed without changing it (e.g. workers.num_workers)."""
    path = RunDir(run_dir).config
    if not path.exists():
        return
    from maskpipe.pipeline.config import config_from_dict, read_config_file, with_absolute_paths

    raw = read_config_file(path)  # a damaged config.yaml is named as such
    try:
        # an earlier version stored paths relative to where the run started: here is the best guess
        old = with_absolute_paths(config_from_dict(raw, str(path))).model_dump(mode="json")
    except (MaskpipeError, ValueError) as e:
        # not "resume it with its own config.yaml": that file is what is broken
        raise MaskpipeError(f"{path}: the run's own config does not validate ({str(e).splitlines()[0]}); fix it to "
                            "resume the run, or start a new run directory") from None
    new = with_absolute_paths(cfg).model_dump(mode="json")
    a, b = _result_keys(old), _result_keys(new)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in differ[:3]) + (" ..." if len(differ) > 3 else "")
        raise MaskpipeError(f"{run_dir}: holds a run of another config; resume it with its own config.yaml "
                            f"(differs in {shown})")
    if old != new:
        log.info("resuming %s with changed keys that do not change the result: %s", run_dir,
                 ", ".join(sorted(k for k in NOT_RESULT if _get(old, k) != _get(new, k))))


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d
