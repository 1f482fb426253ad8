"""`maskpipe import`: a maskpipe artifact from a published MaskLLM mask or DuoAttention plan.

    maskpipe import maskllm FILE.npz --model M --out ARTIFACT [--pattern N:M]
    maskpipe import duo-attention DIR|FILE.tsv --model M (--sparsity S | --threshold T) [--sink K --recent W]
                    --out ARTIFACT

The logic lives in `pipeline.io.interop`; this is a recipe over it (`export` is the way back).
"""

from __future__ import annotations

from pathlib import Path

from maskpipe.jobs.quick import _model_args, _model_cfg
from maskpipe.pipeline import MaskpipeError


def add(sub) -> None:
    imp = sub.add_parser("import", help="a maskpipe artifact from a published MaskLLM mask or DuoAttention plan")
    isub = imp.add_subparsers(dest="format", required=True)
    ml = isub.add_parser("maskllm", help="MaskLLM mask_compressed.npz (np.packbits of each keep-mask)")
    ml.add_argument("file", help="the mask_compressed.npz")
    _model_args(ml)
    ml.add_argument("--pattern", default=None, help="N:M to check (default: inferred from the masks)")
    ml.add_argument("--out", required=True, help="artifact directory to write")
    duo = isub.add_parser("duo-attention", help="DuoAttention full_attention_heads.tsv (+ config.json)")
    duo.add_argument("file", help="full_attention_heads.tsv, or the directory holding it and config.json")
    _model_args(duo)
    how = duo.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, help="fraction of KV heads to make streaming (lowest gates)")
    how.add_argument("--threshold", type=float, help="heads with gate below this stream")
    duo.add_argument("--sink", type=int, default=None, help="sink tokens (default: config.json sink_size)")
    duo.add_argument("--recent", type=int, default=None, help="recent-window tokens (default: config.json recent_size)")
    duo.add_argument("--out", required=True, help="artifact directory to write")
    for p in (ml, duo):
        p.set_defaults(fn=cmd_import)


def cmd_import(a) -> None:
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
