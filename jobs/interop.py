"""`maskpipe import`, `maskpipe export` and `maskpipe lm-eval`: the formats and harness the field uses.

    maskpipe import maskllm FILE.npz --model M --out ARTIFACT [--pattern N:M]
    maskpipe import duo-attention DIR|FILE.tsv --model M (--sparsity S | --threshold T) [--sink K --recent W]
                    --out ARTIFACT
    maskpipe export maskllm ARTIFACT --out FILE.npz
    maskpipe export duo-attention ARTIFACT --out DIR
    maskpipe lm-eval --model M [--masks ARTIFACT ...] [--tasks T ...] [--include-path DIR] --out DIR

The logic lives in `pipeline.io.interop` and `pipeline.lm_eval`; these are recipes over it.
"""

from __future__ import annotations

from pathlib import Path

from maskpipe.pipeline import MaskpipeError


def cmd_import(a) -> None:
    from maskpipe.jobs.cli import _model_cfg
    from maskpipe.pipeline.attention.plans import AttentionPlan
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.io.interop import import_duo_attention, import_maskllm
    from maskpipe.pipeline.io.session import Session

    if not Path(a.file).exists():
        raise MaskpipeError(f"{a.file}: no such file")
    s = Session(ModelConfig(**_model_cfg(a)))
    if a.format == "maskllm":
        out = import_maskllm(a.file, s.model, s.linears, a.out, base_model=s.base_model_info(), pattern=a.pattern)
        masks, manifest = s.load_artifact(out)
        print(f"{a.file}: {len(masks)} layers at {manifest['pattern']} imported into {out}")
    else:
        out = import_duo_attention(a.file, s.model, s.linears, a.out, base_model=s.base_model_info(),
                                   sparsity=a.sparsity, threshold=a.threshold, sink=a.sink, recent=a.recent)
        _, manifest = s.load_artifact(out)
        plan = AttentionPlan.from_json(manifest["attention"])
        print(f"{a.file}: plan with {int(plan.streaming.sum())} of {plan.streaming.numel()} KV heads streaming "
              f"(sink {int(plan.sink.max())}, window {int(plan.window.max())}) imported into {out}")


def cmd_export(a) -> None:
    from maskpipe.pipeline.io.interop import export_duo_attention, export_maskllm

    out = export_maskllm(a.artifact, a.out) if a.format == "maskllm" else export_duo_attention(a.artifact, a.out)
    print(f"{a.artifact}: exported as {a.format} to {out}")


def cmd_lm_eval(a) -> None:
    from maskpipe.jobs.cli import _model_cfg, _variants, given
    from maskpipe.pipeline.io.artifacts import write_json, write_text
    from maskpipe.pipeline.config import config_from_dict
    from maskpipe.pipeline.run.results import zeroshot_table
    from maskpipe.pipeline.io.rundir import RunDir
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages.lm_eval import lm_eval_stage
    from maskpipe.pipeline.eval.zeroshot import check_tasks

    stage = given(stage="lm_eval", name="lm_eval", tasks=a.tasks, include_path=a.include_path,
                  num_fewshot=a.num_fewshot, batch_size=a.batch_size,
                  limit=int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit)
    cfg = config_from_dict(given(name="lm-eval", seed=a.seed, model=_model_cfg(a), stages=[stage]), "command line")
    st = cfg.stages[0]
    for p in a.masks:
        if not Path(p).is_dir():
            raise MaskpipeError(f"--masks: {p}: no such artifact directory")
    check_tasks(st.tasks, st.include_path, ("--tasks", "--include-path"))  # before the model loads
    results = lm_eval_stage(cfg, Session(cfg.model), st, _variants(a))
    table = zeroshot_table(results)
    print(table)
    out = RunDir(a.out)  # a run directory's results.json and results.md, lm-eval's section alone
    write_json(out.results, {"lm_eval": results})
    write_text(out.results_md, table)
    print(f"results.json and results.md in {a.out}")


def add_interop_commands(sub, model_args) -> None:
    """The `import` and `export` subcommands; `model_args` adds --model, --dtype, ... (from jobs.cli)."""
    imp = sub.add_parser("import", help="a maskpipe artifact from a published MaskLLM mask or DuoAttention plan")
    isub = imp.add_subparsers(dest="format", required=True)
    ml = isub.add_parser("maskllm", help="MaskLLM mask_compressed.npz (np.packbits of each keep-mask)")
    ml.add_argument("file", help="the mask_compressed.npz")
    model_args(ml)
    ml.add_argument("--pattern", default=None, help="N:M to check (default: inferred from the masks)")
    ml.add_argument("--out", required=True, help="artifact directory to write")
    duo = isub.add_parser("duo-attention", help="DuoAttention full_attention_heads.tsv (+ config.json)")
    duo.add_argument("file", help="full_attention_heads.tsv, or the directory holding it and config.json")
    model_args(duo)
    how = duo.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, help="fraction of KV heads to make streaming (lowest gates)")
    how.add_argument("--threshold", type=float, help="heads with gate below this stream")
    duo.add_argument("--sink", type=int, default=None, help="sink tokens (default: config.json sink_size)")
    duo.add_argument("--recent", type=int, default=None, help="recent-window tokens (default: config.json recent_size)")
    duo.add_argument("--out", required=True, help="artifact directory to write")
    for p in (ml, duo):
        p.set_defaults(fn=cmd_import)

    exp = sub.add_parser("export", help="an artifact in MaskLLM's or DuoAttention's own format")
    esub = exp.add_subparsers(dest="format", required=True)
    eml = esub.add_parser("maskllm", help="the artifact's N:M masks as a MaskLLM mask_compressed.npz")
    eml.add_argument("artifact")
    eml.add_argument("--out", required=True, help="the .npz file to write")
    eduo = esub.add_parser("duo-attention", help="the artifact's plan as full_attention_heads.tsv + config.json")
    eduo.add_argument("artifact")
    eduo.add_argument("--out", required=True, help="the directory to write")
    for p in (eml, eduo):
        p.set_defaults(fn=cmd_export)

    from maskpipe.jobs.cli import from_config

    le = sub.add_parser("lm-eval", help="zero-shot task accuracy (lm-evaluation-harness) of a model, dense and/or "
                                        "masked; needs the [lm-eval] extra")
    model_args(le)
    le.add_argument("--masks", nargs="*", default=[], help="artifacts to evaluate (N:M masks and/or attention plans)")
    le.add_argument("--dense", action="store_true", help="also evaluate the dense model when --masks is given")
    le.add_argument("--tasks", nargs="+", default=None, help=from_config("stages.lm_eval.LmEvalStage", "tasks", "lm-eval tasks"))
    le.add_argument("--include-path", default=None, help="a folder of task YAMLs, e.g. configs/lm_eval")
    le.add_argument("--num-fewshot", type=int, default=None, help=from_config("stages.lm_eval.LmEvalStage", "num_fewshot"))
    le.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    le.add_argument("--batch-size", type=int, default=None, help=from_config("stages.lm_eval.LmEvalStage", "batch_size"))
    le.add_argument("--seed", type=int, default=None, help=from_config("config.Config", "seed"))
    le.add_argument("--out", required=True, help="directory for results.json and results.md")
    le.set_defaults(fn=cmd_lm_eval)
