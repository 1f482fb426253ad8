"""`maskpipe import`, `maskpipe export` and `maskpipe lm-eval`: the formats and harness the field uses.

    maskpipe import maskllm FILE.npz --model M --out ARTIFACT [--pattern N:M]
    maskpipe import duo-attention DIR|FILE.tsv --model M (--sparsity S | --threshold T) [--sink K --recent W]
                    --out ARTIFACT
    maskpipe export maskllm ARTIFACT --out FILE.npz
    maskpipe export duo-attention ARTIFACT --out DIR
    maskpipe lm-eval --model M [--masks ARTIFACT ...] [--tasks T ...] [--include-path DIR] --out DIR

The logic lives in `pipeline.interop` and `pipeline.lm_eval`; these are recipes over it.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import MaskpipeError


def cmd_import(a) -> None:
    from jobs.cli import _model_cfg
    from pipeline.attention import AttentionPlan
    from pipeline.config import ModelConfig
    from pipeline.interop import import_duo_attention, import_maskllm
    from pipeline.run import Session

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
    from pipeline.interop import export_duo_attention, export_maskllm

    out = export_maskllm(a.artifact, a.out) if a.format == "maskllm" else export_duo_attention(a.artifact, a.out)
    print(f"{a.artifact}: exported as {a.format} to {out}")


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
