"""The `maskpipe` command line: thin recipes over the `pipeline` library.

Every quick command (`oneshot`, `eval`) builds a one-stage config and runs the same stage function as
`maskpipe run`, so there is one way of doing each thing. `run` works in the foreground; `submit`
hands the same run to a Ray cluster as a Ray job whose entrypoint is `run` (see `jobs/submit.py`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from maskpipe.jobs.interop import add_interop_commands
from maskpipe.jobs.submit import add_job_commands
from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.vocab import MODEL_DTYPES, SAMPLE_BY, STANDALONE_METHODS, check_batch_split


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
QUICK_FLAGS = {"stages.0.seqlen": "--seqlen", "model.device": "--device", "stages.0.passkey.lengths": "--passkey",
               "stages.0.niah.lengths": "--niah", "stages.0.multikey.lengths": "--multikey"}


def _one_stage(cfg, variants: list | None = None, run=None):
    """Run the one stage of a quick command's config in this process, as `maskpipe run` would run it
    (`pipeline.stages`); `variants` are those it evaluates, `run` where it writes."""
    from maskpipe.pipeline.io.rundir import RunDir
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages import StageContext, execute, kind_of

    st = cfg.stages[0]
    ctx = StageContext(cfg, st, run or RunDir("."), {v.name: v for v in variants or []}, session=Session(cfg.model))
    return execute(kind_of(st), ctx)


def _variants(a) -> list:
    """dense (with --dense, or without --masks) and one variant per --masks artifact, named by its folder."""
    from maskpipe.pipeline.io.session import Variant

    return [Variant("dense")] * (a.dense or not a.masks) + [Variant(Path(p).name, artifact=Path(p)) for p in a.masks]


def _interrupt(signum, frame):
    # `maskpipe stop` ends a Ray job with SIGTERM: finish as an interrupted run, which records "stopped".
    raise KeyboardInterrupt


def cmd_run(a) -> int:
    from maskpipe.pipeline.io import rundir
    from maskpipe.pipeline.config import load_config
    from maskpipe.pipeline.run.preflight import check_inputs
    from maskpipe.pipeline.run.runner import run, stopped_step

    cfg = load_config(a.config, a.overrides)
    run_dir = Path(a.run_dir or rundir.new_run_dir(cfg.output_dir, cfg.name)).absolute()
    # Everything that can be refused is refused before Ray starts; `run` takes the lock itself.
    check_inputs(cfg, a.config)
    rundir.check_run_dir(run_dir)
    if not a.wait_for_lock and rundir.alive(run_dir):
        raise MaskpipeError(f"{run_dir}: run directory in use by {rundir.describe(rundir.owner(run_dir))}")
    backend = None
    if cfg.workers.num_workers > 0:
        from maskpipe.cluster import connect
        from maskpipe.workers.backend import RayBackend

        connect(a.address, verbose=a.verbose)
        backend = RayBackend(cfg)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(cfg, run_dir, backend, lock_wait=a.wait_for_lock)
    except KeyboardInterrupt:
        step = stopped_step(run_dir)
        print(f"stopped{f' at step {step}' if step is not None else ''}; resume with: "
              f"maskpipe run {rundir.RunDir(run_dir).config} --run-dir {run_dir}", file=sys.stderr)
        return 130
    table = rundir.RunDir(run_dir).results_md
    if table.exists():
        print(table.read_text())
    print(f"run directory: {run_dir}")
    return 0


def cmd_tune(a) -> None:
    from maskpipe.cluster import connect
    from maskpipe.pipeline.config import load_config
    from maskpipe.pipeline.io.rundir import RunDir, new_run_dir
    from maskpipe.workers.tune import tune_run

    cfg = load_config(a.config, a.overrides)
    if cfg.tune is None:
        raise MaskpipeError(f"{a.config}: tune: no tune section (see README, \"Tuning a learn stage\")")
    connect(a.address)
    run_dir = Path(a.run_dir) if a.run_dir else new_run_dir(cfg.output_dir, cfg.name)
    signal.signal(signal.SIGTERM, _interrupt)
    summary = tune_run(cfg, run_dir)
    print(RunDir(run_dir).tune_results_md.read_text())
    if summary["best"] is None:
        raise MaskpipeError(f"every trial failed; see {RunDir(run_dir).tune_results}")
    print(f"best: {summary['best']['params']} ({summary['metric']} {summary['best']['ppl']:.2f})")
    print(f"run directory: {run_dir}")


def cmd_validate(a) -> None:
    from maskpipe.pipeline.config import dump_config, load_config
    from maskpipe.pipeline.run.preflight import check_inputs

    cfg = load_config(a.config, a.overrides)
    check_inputs(cfg, a.config)
    if a.print:
        print(dump_config(cfg))
    print(f"{a.config}: ok ({len(cfg.stages)} stages: {', '.join(s.name for s in cfg.stages)})")


def cmd_oneshot(a) -> None:
    from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, check_replaceable, read_json_or_none
    from maskpipe.pipeline.config import SparsityConfig, config_from_dict
    from maskpipe.pipeline.run.preflight import check_inputs
    from maskpipe.pipeline.io.rundir import RunDir

    # The stage names its pattern, the config's default unless --pattern, so that the artifact records it.
    pattern = a.pattern or str(SparsityConfig().pattern)
    stage = given(stage="oneshot", name=Path(a.out).name, method=a.method, pattern=pattern, n_samples=a.n_samples,
                  seqlen=a.seqlen, batch_size=a.batch_size, weight_update=a.weight_update)
    raw = given(name="oneshot", seed=a.seed, model=_model_cfg(a), stages=[stage])
    if a.data:
        raw["data"] = {"calib": _data_cfg(a, "train", "line")}
        stage["data"] = "calib"
    cfg = config_from_dict(raw, "command line")
    out = Path(a.out)
    check_replaceable(out, MANIFEST_FILE)
    if (out / MANIFEST_FILE).is_file():
        earlier = (read_json_or_none(out / MANIFEST_FILE) or {}).get("method", {}).get("name")
        if earlier != a.method:
            raise MaskpipeError(f"--out {out}: holds a {earlier} artifact; refusing to replace it with {a.method} "
                                "(choose a new directory)")
    check_inputs(cfg, "command line", QUICK_FLAGS)
    # The artifact goes where --out says; SparseGPT's updated weights, as ever, to ../baselines/ beside it.
    [variant] = _one_stage(cfg, run=RunDir(out.parent.parent, artifacts=out.parent)).variants
    print(f"mask artifact: {variant.artifact}")
    if variant.updated_weights:
        print(f"updated weights (baseline only, not an artifact): {variant.updated_weights}")


def _is_eval_output(path: Path) -> bool:
    """An earlier `eval --out`: {variant: {corpus: {ppl, tokens, ...}}}."""
    from maskpipe.pipeline.io.artifacts import read_json_or_none

    res = read_json_or_none(path)
    return isinstance(res, dict) and bool(res) and all(
        isinstance(row, dict) and row and all(isinstance(c, dict) and "ppl" in c for c in row.values())
        for row in res.values())


def _is_retrieval_output(path: Path) -> bool:
    """An earlier `retrieval --out` results.json: {variant: {cost, passkey/niah/multikey ...}}."""
    from maskpipe.pipeline.io.artifacts import read_json_or_none

    res = read_json_or_none(path)
    return isinstance(res, dict) and bool(res) and all(isinstance(r, dict) and "cost" in r for r in res.values())


def cmd_eval(a) -> None:
    from maskpipe.pipeline.io.artifacts import check_replaceable_file, write_json
    from maskpipe.pipeline.config import config_from_dict
    from maskpipe.pipeline.run.preflight import check_inputs
    from maskpipe.pipeline.run.results import perplexity_table

    raw = {"name": "eval", "model": _model_cfg(a), "data": {"eval": _data_cfg(a, "test", "document")},
           "stages": [given(stage="eval", data=["eval"], seqlen=a.seqlen, stride=a.stride, batch_size=a.batch_size,
                            dense=a.dense or not a.masks)]}
    cfg = config_from_dict(raw, "command line")
    if a.out:
        check_replaceable_file(a.out, _is_eval_output, "`maskpipe eval --out` result")
    check_inputs(cfg, "command line", QUICK_FLAGS)
    results = _one_stage(cfg, _variants(a)).rows
    print(perplexity_table(results))
    if a.out:
        write_json(a.out, results)


def cmd_retrieval(a) -> None:
    from maskpipe.pipeline.io.artifacts import atomic_dir, check_replaceable, write_json
    from maskpipe.pipeline.config import config_from_dict
    from maskpipe.pipeline.run.preflight import check_inputs
    from maskpipe.pipeline.run.results import retrieval_table
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages.retrieval import retrieval_stage

    stage = {"stage": "retrieval", "name": "retrieval", "dense": a.dense or not a.masks}
    raw = given(name="retrieval", seed=a.seed, model=_model_cfg(a), stages=[stage], data={})
    if a.passkey:
        stage["passkey"] = given(lengths=a.passkey, samples=a.samples)
    if a.niah:
        if not a.data:
            raise MaskpipeError("retrieval: --niah needs --data, the haystack corpus")
        raw["data"]["haystack"] = _data_cfg(a, "test", "document")
        stage["niah"] = given(data="haystack", lengths=a.niah, depths=a.depths, samples=a.niah_samples)
    if a.multikey:
        stage["multikey"] = given(lengths=a.multikey, samples=a.samples, keys=a.keys, values=a.values)
    cfg = config_from_dict(raw, "command line")
    check_inputs(cfg, "command line", QUICK_FLAGS)
    check_replaceable(a.out, "results.json", _is_retrieval_output, "`maskpipe retrieval --out` directory")
    # Written whole or not at all, like an artifact: the model work happens inside.
    with atomic_dir(a.out) as tmp:
        st = cfg.stages[0]
        results = retrieval_stage(cfg, Session(cfg.model), st, _variants(a), tmp / st.name, tmp)
        write_json(tmp / "results.json", results)
    print(retrieval_table(results))
    print(f"samples, NIAH heatmaps and results.json in {a.out}")


def cmd_apply(a) -> None:
    from maskpipe.pipeline.io.artifacts import materialize
    from maskpipe.pipeline.attention.plans import AttentionPlan, plan_cost
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages.attention import head_geometry

    session = Session(ModelConfig(**_model_cfg(a)))
    masks, manifests = session.load_artifacts([Path(p) for p in a.masks])
    for path, manifest in manifests.items():
        if manifest["layers"]:
            kept = sum(int(masks[k].sum()) for k in manifest["layers"])
            total = sum(masks[k].numel() for k in manifest["layers"])
            print(f"{path}: fits {a.model}: {len(manifest['layers'])} layers at {manifest['pattern']}, "
                  f"{1 - kept / total:.2%} of their weights masked")
        if "attention" in manifest:
            p = AttentionPlan.from_json(manifest["attention"])
            length = session.model.config.get_text_config().max_position_embeddings
            cost = plan_cost(p, length, *head_geometry(session.model))
            print(f"{path}: fits {a.model}: attention plan with {int(p.streaming.sum())} of {p.streaming.numel()} KV "
                  f"heads streaming; at {length} tokens the KV cache is {cost['kv_cache_fraction']:.1%} and "
                  f"attention FLOPs {cost['attention_flops_fraction']:.1%} of dense")
    if len(manifests) > 1:
        print(f"together: {len(masks)} of {len(session.linears)} prunable layers masked"
              + (", with an attention plan" if any("attention" in m for m in manifests.values()) else ""))
    if a.out:
        # The plan travels in maskpipe.json: running it needs maskpipe's attention implementation.
        plan = next((m["attention"] for m in manifests.values() if "attention" in m), None)
        provenance = {"base_model": a.model, "revision": a.revision, "attention": plan,
                      "artifacts": [{"path": str(p), "pattern": m["pattern"], "method": m["method"].get("name"),
                                     "fingerprint": m["base_model"]["fingerprint"], "layers": sorted(m["layers"])}
                                    for p, m in manifests.items()]}
        patterns = {layer: m["pattern"] for m in manifests.values() for layer in m["layers"]}
        out = materialize(session.model, session.tokenizer, session.linears, masks, a.out, provenance, patterns)
        print(f"materialized model written to {out}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all: offline, huggingface_hub retries for half a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def cmd_plan(a) -> None:
    from transformers import AutoConfig

    from maskpipe.pipeline.config import load_config
    from maskpipe.pipeline.stages.learn import LearnStage
    from maskpipe.pipeline.train.plan import model_shape, parse_bytes, plan_report, stage_plan, what_fits

    cfg = load_config(a.config, a.overrides)
    learn = [s for s in cfg.stages if isinstance(s, LearnStage) and (a.stage is None or s.name == a.stage)]
    if not learn:
        raise MaskpipeError(f"{a.config}: no learning stage" + (f" named {a.stage!r}" if a.stage else ""))
    if a.gpus is not None and a.gpus < 1:
        raise MaskpipeError(f"--gpus: at least 1 device, got {a.gpus}")
    world = a.gpus or max(cfg.workers.num_workers, 1)
    if not any(c.isalpha() for c in a.gpu_memory):
        raise MaskpipeError(f"--gpu-memory: {a.gpu_memory!r} has no unit; write e.g. {a.gpu_memory}GiB")
    try:
        capacity = parse_bytes(a.gpu_memory)
    except ValueError as e:
        raise MaskpipeError(f"--gpu-memory: {e}") from None
    for st in learn:
        try:
            check_batch_split(st.batch_size, world)
        except ValueError as e:
            raise MaskpipeError(f"--gpus {world}: stage {st.name!r}: {e}") from None
    source = a.hf_config or cfg.model.name_or_path
    shipped = sorted(str(p.parent.relative_to(Path.cwd()) if p.is_relative_to(Path.cwd()) else p.parent)
                     for p in (Path(__file__).resolve().parents[1] / "configs" / "hf").glob("*/config.json"))
    try:
        try:  # the cache or a local directory first: offline, the hub would be retried for half a minute
            hf = AutoConfig.from_pretrained(source, revision=None if a.hf_config else cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code, local_files_only=True)
        except (OSError, ValueError):
            if a.hf_config or Path(source).exists() or not _hub_reachable():
                raise
            hf = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise MaskpipeError(f"{source}: cannot read the model's config ({str(e).splitlines()[0]}); give --hf-config "
                            f"DIR (shipped: {', '.join(shipped)})") from None
    shape = model_shape(hf, cfg.model)
    for st in learn:
        print(plan_report(cfg, st, shape, world, capacity))
        if sum(stage_plan(cfg, st, shape, world).values()) > capacity:
            print("what would fit:\n" + "\n".join(what_fits(cfg, st, shape, world, capacity)))


def cmd_publish(a) -> None:
    from maskpipe.pipeline.io.artifacts import read_manifest
    from maskpipe.pipeline.run.publish import looks_like_hub_id, publish, push, resolve

    artifact, run = resolve(a.source, a.stage)
    out = publish(artifact, run, a.out, repo=a.push, base_model=a.base_model, license=a.license)
    print(f"{artifact}{f' (run {run})' if run else ''}: published to {out}")
    base = a.base_model or read_manifest(artifact)["base_model"]["name_or_path"]
    if not looks_like_hub_id(base):
        print(f"warning: the base model {base!r} is no hub id, so the card has no base_model; name it with "
              "--base-model ORG/NAME", file=sys.stderr)
    if a.push:
        files = push(out, a.push, dry_run=a.dry_run)
        verb = "would upload" if a.dry_run else "uploaded"
        print(f"{verb} to https://huggingface.co/{a.push}: " + ", ".join(files))


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none worth saying."""

    def _get_help_string(self, action):
        text = (action.help or "").strip("\u200b ")
        if ("default" not in text and action.default not in (None, False, [], argparse.SUPPRESS)
                and action.option_strings and action.nargs != 0):
            text += f"{' ' if text else ''}(default: {' '.join(map(str, action.default)) if isinstance(action.default, list) else action.default})"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        if args and args[0].startswith("-") and not kwargs.get("help") and kwargs.get("default") not in (None, False):
            kwargs["help"] = "\u200b"  # argparse formats no help line, and so no default, for an option without help
        return super().add_argument(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from maskpipe.pipeline import __version__

    p = _Parser(prog="maskpipe", description="Learn sparsity masks over frozen LLM weights.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and Ray's own console output")
    p.add_argument("--version", action="version", version=f"maskpipe {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = sub.add_parser("run", help="run the stages of a config into a run directory")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages.0.n_samples=16 (also after "
                                                "the options)")
    r.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    r.add_argument("--address", default=None,
                   help="the Ray cluster, for workers.num_workers > 0: HEAD:6379 or auto (default $RAY_ADDRESS, "
                        "else a local instance)")
    r.add_argument("--wait-for-lock", type=float, default=0, metavar="SECONDS",
                   help="wait this long for another process to release the run directory (a submitted job's "
                        "driver waits for the `submit` or `resume` that launched it)")
    r.set_defaults(fn=cmd_run)
    add_job_commands(sub)

    tu = sub.add_parser("tune", help="sweep a learn stage's hyperparameters on Ray Tune (the config's tune section)")
    tu.add_argument("config")
    tu.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. tune.num_samples=4")
    tu.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    tu.add_argument("--address", default=None, help="Ray cluster (default $RAY_ADDRESS, else a local instance)")
    tu.set_defaults(fn=cmd_tune)

    v = sub.add_parser("validate", help="check a config without running it")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*")
    v.add_argument("--print", action="store_true", help="print the resolved config")
    v.set_defaults(fn=cmd_validate)

    o = sub.add_parser("oneshot", help=f"one-shot N:M mask ({', '.join(STANDALONE_METHODS)}) into an artifact")
    _model_args(o)
    o.add_argument("--method", required=True, choices=STANDALONE_METHODS)
    o.add_argument("--pattern", default=None, metavar="N:M", help=from_config("config.SparsityConfig", "pattern"))
    _data_args(o, required=False)
    o.add_argument("--n-samples", type=int, default=None, help=from_config("stages.oneshot.OneshotStage", "n_samples"))
    o.add_argument("--seqlen", type=int, default=None, help=from_config("stages.oneshot.OneshotStage", "seqlen"))
    o.add_argument("--batch-size", type=int, default=None, help=from_config("stages.oneshot.OneshotStage", "batch_size"))
    o.add_argument("--weight-update", action="store_true", help="SparseGPT: also keep updated weights (baseline)")
    o.add_argument("--seed", type=int, default=None, help=from_config("config.Config", "seed"))
    o.add_argument("--out", required=True, help="artifact directory to write")
    o.set_defaults(fn=cmd_oneshot)

    e = sub.add_parser("eval", help="perplexity (wikitext-2 protocol) of a model, dense and/or masked")
    _model_args(e)
    e.add_argument("--masks", nargs="*", default=[], help="mask artifacts to evaluate")
    e.add_argument("--dense", action="store_true", help="also evaluate the dense model when --masks is given")
    _data_args(e)
    e.add_argument("--seqlen", type=int, default=None, help=from_config("stages.eval.EvalStage", "seqlen"))
    e.add_argument("--stride", type=int, default=None, help="sliding-window evaluation when < seqlen (default: none)")
    e.add_argument("--batch-size", type=int, default=None, help=from_config("stages.eval.EvalStage", "batch_size"))
    e.add_argument("--out", default=None, help="write the results as JSON here")
    e.set_defaults(fn=cmd_eval)

    rt = sub.add_parser("retrieval", help="passkey, needle-in-a-haystack and multi-key retrieval (greedy, exact match)")
    _model_args(rt)
    rt.add_argument("--masks", nargs="*", default=[], help="artifacts to evaluate (N:M masks and/or attention plans)")
    rt.add_argument("--dense", action="store_true", help="also evaluate the dense model when --masks is given")
    rt.add_argument("--passkey", type=int, nargs="*", default=[], metavar="LEN", help="passkey prompt lengths (tokens)")
    rt.add_argument("--samples", type=int, default=None,
                    help=from_config("stages.retrieval.PasskeyTask", "samples", "passkey and multi-key samples per length"))
    rt.add_argument("--niah", type=int, nargs="*", default=[], metavar="LEN", help="NIAH context lengths (tokens)")
    rt.add_argument("--depths", type=float, nargs="+", default=None, help=from_config("stages.retrieval.NiahTask", "depths",
                                                                                       "NIAH needle depths"))
    rt.add_argument("--niah-samples", type=int, default=None,
                    help=from_config("stages.retrieval.NiahTask", "samples", "NIAH samples per cell"))
    _data_args(rt, required=False)
    rt.add_argument("--multikey", type=int, nargs="*", default=[], metavar="LEN", help="multi-key prompt lengths")
    rt.add_argument("--keys", type=int, default=None, help=from_config(
        "stages.retrieval.MultiKeyTask", "keys", "multi-key: keys in the haystack (1 asked, the rest distract)"))
    rt.add_argument("--values", type=int, default=None,
                    help=from_config("stages.retrieval.MultiKeyTask", "values", "multi-key: values per key (all must be retrieved)"))
    rt.add_argument("--seed", type=int, default=None, help=from_config("config.Config", "seed"))
    rt.add_argument("--out", required=True, help="directory for results.json, per-sample records and heatmaps")
    rt.set_defaults(fn=cmd_retrieval)

    pl = sub.add_parser("plan", help="per-device memory of a config's learning stages, for every strategy")
    pl.add_argument("config")
    pl.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. workers.strategy=fsdp")
    pl.add_argument("--gpus", type=int, default=None, help="devices (default workers.num_workers)")
    pl.add_argument("--gpu-memory", default="80GiB", help="memory per device, e.g. 80GiB")
    pl.add_argument("--hf-config", default=None,
                    help="directory or file with the model's config.json (default: the config's model)")
    pl.add_argument("--stage", default=None, help="only this learning stage")
    pl.set_defaults(fn=cmd_plan)

    ap = sub.add_parser("apply", help="check artifacts (N:M masks and/or an attention plan) against a model; "
                                      "optionally write the masked model")
    _model_args(ap)
    ap.add_argument("--masks", required=True, nargs="+",
                    help="artifact directories, applied together: each masks its own layers, at most one plan")
    ap.add_argument("--out", default=None, help="write a materialized model directory (weights ⊙ mask)")
    ap.set_defaults(fn=cmd_apply)

    pb = sub.add_parser("publish", help="a folder ready for the Hugging Face Hub: an artifact and its model card")
    pb.add_argument("source", help="a run directory (its learned artifact, or --stage) or an artifact directory")
    pb.add_argument("--out", required=True, help="the folder to write (replaced if it holds an earlier publish)")
    pb.add_argument("--stage", default=None, help="the run's stage whose artifact to publish")
    pb.add_argument("--base-model", default=None,
                    help="hub id of the base model for the card (default: the artifact's model name)")
    pb.add_argument("--license", default="other", help="license of the card's front matter (default: other)")
    pb.add_argument("--push", default=None, metavar="REPO",
                    help="upload the folder to this Hub model repo (token from HF_TOKEN or a saved login)")
    pb.add_argument("--dry-run", action="store_true", help="with --push: list what would be uploaded, upload nothing")
    pb.set_defaults(fn=cmd_publish)
    add_interop_commands(sub, _model_args)
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Options and `key=value` overrides in any order: what follows an option is an override when
    the command takes overrides and it has the form key.path=value."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help()
        sys.exit(0)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.fn(args) or 0
    except MaskpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A file the command could not read or write (read-only output directory, a file where a
        # directory should be, a full disk): the file and the reason are all a user needs.
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
