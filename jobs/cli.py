"""The `maskpipe` command line: thin recipes over the `pipeline` library.

Every quick command (`oneshot`, `eval`) builds a one-stage config and runs the same stage function as
`maskpipe run`, so there is one way of doing each thing. `run` works in the foreground; `submit`
hands the same run to a Ray cluster as a Ray job whose entrypoint is `run` (see `jobs/submit.py`).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from jobs.submit import add_job_commands
from pipeline import MaskpipeError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local model directory or hub id")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--trust-remote-code", action="store_true")


def _data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="local .txt/.jsonl/.parquet file (or glob) or hub dataset id")
    p.add_argument("--data-name", default=None, help="hub dataset config, e.g. wikitext-2-raw-v1")
    p.add_argument("--split", default=None, help="dataset split (default: train; test for eval)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--sample-by", default=None, choices=["line", "paragraph", "document"],
                   help="local text files: one record per line, paragraph or the whole file")


def _model_cfg(a) -> dict:
    return {"name_or_path": a.model, "revision": a.revision, "dtype": a.dtype, "device": a.device,
            "trust_remote_code": a.trust_remote_code}


def _data_cfg(a, split: str, sample_by: str) -> dict:
    return {"sources": [{"path": a.data, "name": a.data_name, "split": a.split or split,
                         "text_field": a.text_field, "sample_by": a.sample_by or sample_by}]}


def _interrupt(signum, frame):
    # `maskpipe stop` ends a Ray job with SIGTERM: finish as an interrupted run, which records "stopped".
    raise KeyboardInterrupt


def cmd_run(a) -> None:
    from pipeline.config import load_config
    from pipeline.run import run

    cfg = load_config(a.config, a.overrides)
    backend = None
    if cfg.workers.num_workers > 0:
        from cluster import connect
        from workers.backend import RayBackend

        connect(a.address)
        backend = RayBackend(cfg)
    signal.signal(signal.SIGTERM, _interrupt)
    run_dir = run(cfg, a.run_dir, backend)
    table = run_dir / "results.md"
    if table.exists():
        print(table.read_text())
    print(f"run directory: {run_dir}")


def cmd_tune(a) -> None:
    from cluster import connect
    from pipeline.config import load_config
    from pipeline.run import new_run_dir
    from workers.tune import tune_run

    cfg = load_config(a.config, a.overrides)
    if cfg.tune is None:
        raise MaskpipeError(f"{a.config}: tune: no tune section (see README, \"Tuning a learn stage\")")
    connect(a.address)
    run_dir = Path(a.run_dir) if a.run_dir else new_run_dir(cfg)
    signal.signal(signal.SIGTERM, _interrupt)
    summary = tune_run(cfg, run_dir)
    print((run_dir / "tune" / "results.md").read_text())
    if summary["best"] is None:
        raise MaskpipeError(f"every trial failed; see {run_dir / 'tune' / 'results.json'}")
    print(f"best: {summary['best']['params']} ({summary['metric']} {summary['best']['ppl']:.2f})")
    print(f"run directory: {run_dir}")


def cmd_validate(a) -> None:
    from pipeline.config import dump_config, load_config

    cfg = load_config(a.config, a.overrides)
    if a.print:
        print(dump_config(cfg))
    print(f"{a.config}: ok ({len(cfg.stages)} stages: {', '.join(s.name for s in cfg.stages)})")


def cmd_oneshot(a) -> None:
    from pipeline.config import config_from_dict
    from pipeline.run import Session, oneshot_stage

    stage = {"stage": "oneshot", "name": Path(a.out).name, "method": a.method, "pattern": a.pattern,
             "n_samples": a.n_samples, "seqlen": a.seqlen, "batch_size": a.batch_size,
             "weight_update": a.weight_update}
    raw = {"name": "oneshot", "seed": a.seed, "model": _model_cfg(a), "stages": [stage]}
    if a.data:
        raw["data"] = {"calib": _data_cfg(a, "train", "line")}
        stage["data"] = "calib"
    cfg = config_from_dict(raw, "command line")
    out = Path(a.out)
    [variant] = oneshot_stage(cfg, Session(cfg.model), cfg.stages[0], out.parent)
    print(f"mask artifact: {variant.artifact}")
    if variant.updated_weights:
        print(f"updated weights (baseline only, not an artifact): {variant.updated_weights}")


def cmd_eval(a) -> None:
    from pipeline.artifacts import write_json
    from pipeline.config import config_from_dict
    from pipeline.run import Session, Variant, eval_stage, results_table

    raw = {"name": "eval", "model": _model_cfg(a), "data": {"eval": _data_cfg(a, "test", "document")},
           "stages": [{"stage": "eval", "data": ["eval"], "seqlen": a.seqlen, "stride": a.stride,
                       "batch_size": a.batch_size}]}
    cfg = config_from_dict(raw, "command line")
    variants = [Variant("dense")] if a.dense or not a.masks else []
    variants += [Variant(Path(p).name, artifact=Path(p)) for p in a.masks]
    results = eval_stage(cfg, Session(cfg.model), cfg.stages[0], variants)
    print(results_table(results, {v.name: v for v in variants}))
    if a.out:
        write_json(a.out, results)


def cmd_retrieval(a) -> None:
    from pipeline.artifacts import write_json
    from pipeline.config import config_from_dict
    from pipeline.run import Session, Variant, retrieval_stage, retrieval_table

    stage = {"stage": "retrieval", "name": "retrieval", "dense": a.dense or not a.masks}
    raw = {"name": "retrieval", "seed": a.seed, "model": _model_cfg(a), "stages": [stage], "data": {}}
    if a.passkey:
        stage["passkey"] = {"lengths": a.passkey, "samples": a.samples}
    if a.niah:
        if not a.data:
            raise MaskpipeError("retrieval: --niah needs --data, the haystack corpus")
        raw["data"]["haystack"] = _data_cfg(a, "test", "document")
        stage["niah"] = {"data": "haystack", "lengths": a.niah, "depths": a.depths, "samples": a.niah_samples}
    if a.multikey:
        stage["multikey"] = {"lengths": a.multikey, "samples": a.samples, "keys": a.keys, "values": a.values}
    cfg = config_from_dict(raw, "command line")
    variants = [Variant("dense")] if cfg.stages[0].dense else []
    variants += [Variant(Path(p).name, artifact=Path(p)) for p in a.masks]
    results = retrieval_stage(cfg, Session(cfg.model), cfg.stages[0], variants, Path(a.out))
    print(retrieval_table(results))
    write_json(Path(a.out) / "results.json", results)
    print(f"samples, NIAH heatmaps and results.json in {a.out}")


def cmd_apply(a) -> None:
    from pipeline.artifacts import materialize
    from pipeline.attention import AttentionPlan, plan_cost
    from pipeline.config import ModelConfig
    from pipeline.run import Session, head_geometry

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


def cmd_plan(a) -> None:
    from transformers import AutoConfig

    from pipeline.config import LearnStage, load_config
    from pipeline.plan import model_shape, parse_bytes, plan_report

    cfg = load_config(a.config, a.overrides)
    learn = [s for s in cfg.stages if isinstance(s, LearnStage) and (a.stage is None or s.name == a.stage)]
    if not learn:
        raise MaskpipeError(f"{a.config}: no learning stage" + (f" named {a.stage!r}" if a.stage else ""))
    source = a.hf_config or cfg.model.name_or_path
    try:
        hf = AutoConfig.from_pretrained(source, revision=None if a.hf_config else cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise MaskpipeError(f"{source}: cannot read the model's config ({e}); give --hf-config DIR") from None
    try:
        capacity = parse_bytes(a.gpu_memory)
    except ValueError as e:
        raise MaskpipeError(f"--gpu-memory: {e}") from None
    shape = model_shape(hf, cfg.model)
    for st in learn:
        print(plan_report(cfg, st, shape, a.gpus or max(cfg.workers.num_workers, 1), capacity))


def cmd_publish(a) -> None:
    from pipeline.artifacts import read_manifest
    from pipeline.publish import looks_like_hub_id, publish, push, resolve

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maskpipe", description="Learn sparsity masks over frozen LLM weights.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the stages of a config into a run directory")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. stages.0.n_samples=16")
    r.add_argument("--run-dir", default=None, help="run directory (default: OUTPUT_DIR/NAME-TIMESTAMP)")
    r.add_argument("--address", default=None,
                   help="Ray cluster for workers.num_workers > 0 (default $RAY_ADDRESS, else a local instance)")
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

    o = sub.add_parser("oneshot", help="one-shot N:M mask (magnitude, Wanda, SparseGPT) into an artifact")
    _model_args(o)
    o.add_argument("--method", required=True, choices=["magnitude", "wanda", "sparsegpt"])
    o.add_argument("--pattern", default="2:4")
    _data_args(o, required=False)
    o.add_argument("--n-samples", type=int, default=128)
    o.add_argument("--seqlen", type=int, default=2048)
    o.add_argument("--batch-size", type=int, default=8)
    o.add_argument("--weight-update", action="store_true", help="SparseGPT: also keep updated weights (baseline)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", required=True, help="artifact directory to write")
    o.set_defaults(fn=cmd_oneshot)

    e = sub.add_parser("eval", help="perplexity (wikitext-2 protocol) of a model, dense and/or masked")
    _model_args(e)
    e.add_argument("--masks", nargs="*", default=[], help="mask artifacts to evaluate")
    e.add_argument("--dense", action="store_true", help="also evaluate the dense model when --masks is given")
    _data_args(e)
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--stride", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--out", default=None, help="write the results as JSON here")
    e.set_defaults(fn=cmd_eval)

    rt = sub.add_parser("retrieval", help="passkey, needle-in-a-haystack and multi-key retrieval (greedy, exact match)")
    _model_args(rt)
    rt.add_argument("--masks", nargs="*", default=[], help="artifacts to evaluate (N:M masks and/or attention plans)")
    rt.add_argument("--dense", action="store_true", help="also evaluate the dense model when --masks is given")
    rt.add_argument("--passkey", type=int, nargs="*", default=[], metavar="LEN", help="passkey prompt lengths (tokens)")
    rt.add_argument("--samples", type=int, default=10, help="passkey and multi-key samples per length")
    rt.add_argument("--niah", type=int, nargs="*", default=[], metavar="LEN", help="NIAH context lengths (tokens)")
    rt.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="NIAH needle depths")
    rt.add_argument("--niah-samples", type=int, default=2, help="NIAH samples per cell")
    _data_args(rt, required=False)
    rt.add_argument("--multikey", type=int, nargs="*", default=[], metavar="LEN", help="multi-key prompt lengths")
    rt.add_argument("--keys", type=int, default=4, help="multi-key: keys in the haystack (1 asked, the rest distract)")
    rt.add_argument("--values", type=int, default=1, help="multi-key: values per key (all must be retrieved)")
    rt.add_argument("--seed", type=int, default=0)
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.fn(args)
    except MaskpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
