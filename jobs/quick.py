"""What the quick commands share: their flags for the model and the data, and the one-stage config they build.

Every quick command (`oneshot`, `eval`, `retrieval`, `lm-eval`) builds a one-stage config and runs the same
stage function as `maskpipe run`, so there is one way of doing each thing; `apply` and `import` take the
same model flags. The commands themselves are in `jobs/commands/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maskpipe.pipeline.core.vocab import MODEL_DTYPES, SAMPLE_BY


def from_config(model: str, key: str, text: str = "") -> str:
    """The help of a flag that defaults to None, so that the config's default applies: says that default.
    `model`: a config class as `module.Class` under `maskpipe.pipeline` (e.g. `stages.eval.EvalStage`),
    `key` its field."""
    import importlib

    module, _, name = model.rpartition(".")
    default = getattr(importlib.import_module(f"maskpipe.pipeline.{module}"), name).model_fields[key].default
    shown = " ".join(map(str, default)) if isinstance(default, list) else default
    return f"{text}{' ' if text else ''}(default: {shown}, from the config)"


def given(**values) -> dict:
    """The flags a user gave (not None), as config keys: the config supplies every other default."""
    return {k: v for k, v in values.items() if v is not None}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model directory or hub id")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--dtype", default=None, choices=MODEL_DTYPES, help=from_config("core.schema.ModelConfig", "dtype"))
    p.add_argument("--device", default=None, help=from_config("core.schema.ModelConfig", "device", "auto, cpu, cuda, cuda:1, ..."))
    p.add_argument("--trust-remote-code", action="store_true")


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="local .txt/.jsonl/.parquet file (or glob) or hub dataset id")
    p.add_argument("--data-name", default=None, help="hub dataset config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default=None, help="dataset split (default: train; test for eval)")
    p.add_argument("--text-field", default=None, help=from_config("core.schema.Source", "text_field"))
    p.add_argument("--sample-by", default=None, choices=SAMPLE_BY,
                   help="local text files: one record per line, paragraph or the whole file")


def _model_cfg(a) -> dict:
    return given(name_or_path=a.model, revision=a.revision, dtype=a.dtype, device=a.device,
                 trust_remote_code=a.trust_remote_code)


def _data_cfg(a, split: str, sample_by: str) -> dict:
    return {"sources": [given(path=a.data, name=a.data_name, split=a.split or split, text_field=a.text_field,
                              sample_by=a.sample_by or sample_by)]}


# The quick commands' flags for the key paths of the one-stage config they build, so errors name them.
QUICK_FLAGS = {"stages.0.seqlen": "--seqlen", "stages.0.data": "--data", "stages.0.niah.data": "--data", "model.device": "--device", "model.name_or_path": "--model", "stages.0.passkey.lengths": "--passkey",
               "stages.0.niah.lengths": "--niah", "stages.0.multikey.lengths": "--multikey"}


def quick_config(raw: dict, a):
    """The one-stage config of a quick command; an invalid value is named by the flag that gave it
    (`--seqlen`, not `stages.0.seqlen`): a key of QUICK_FLAGS, else the flag of the key's last part."""
    from maskpipe.pipeline.config import ConfigError, config_from_dict

    try:
        return config_from_dict(raw, "command line")
    except ConfigError as e:
        lines = []
        for line in str(e).splitlines():
            _, key, msg = line.split(": ", 2) if line.count(": ") >= 2 else ("", "", line)
            last = key.rsplit(".", 1)[-1]
            flag = QUICK_FLAGS.get(key) or (f"--{last.replace('_', '-')}" if hasattr(a, last) else None)
            lines.append(f"{flag}: {msg}" if flag else line)
        raise ConfigError("\n".join(lines)) from None


def _one_stage(cfg, variants: list | None = None, run=None):
    """Run the one stage of a quick command's config in this process, as `maskpipe run` would run it
    (`pipeline.stages`); `variants` are those it evaluates, `run` where it writes."""
    from maskpipe.pipeline.io.rundir import RunDir
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages import StageContext, execute, kind_of

    st = cfg.stages[0]
    ctx = StageContext(cfg, st, run or RunDir("."), {v.name: v for v in variants or []}, session=Session(cfg.model))
    return execute(kind_of(st), ctx)


def _fetch_masks(a) -> None:
    """--masks given as Hub repo ids (`ORG/NAME[@REVISION]`) fetched into the Hugging Face cache, in place;
    `a.mask_names` keeps the names their variants take (the folder's, or the repo's)."""
    from maskpipe.pipeline.io.hub import artifact_name, fetch_artifact

    a.mask_names = [artifact_name(p) for p in a.masks]
    a.masks = [str(fetch_artifact(p)) for p in a.masks]


def _variants(a) -> list:
    """dense (with --dense, or without --masks) and one variant per --masks artifact, named by its folder
    (or its Hub repo)."""
    from maskpipe.pipeline.io.session import Variant

    names = getattr(a, "mask_names", None) or [Path(p).name for p in a.masks]
    return [Variant("dense")] * (a.dense or not a.masks) + [Variant(n, artifact=Path(p)) for n, p in zip(names, a.masks)]
