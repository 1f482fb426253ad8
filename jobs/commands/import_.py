"""`maskpipe import`: a maskpipe artifact from a published MaskLLM mask or DuoAttention plan.

    maskpipe import maskllm FILE.npz|REPO_ID[@REVISION] --model M --out ARTIFACT [--pattern N:M]
    maskpipe import duo-attention DIR|FILE.tsv|REPO_ID[@REVISION] --model M (--sparsity S | --threshold T) [--sink K --recent W]
                    --out ARTIFACT

The logic lives in `pipeline.io.interop`; this is a recipe over it (`export` is the way back).
"""

from __future__ import annotations


from maskpipe.jobs.quick import _model_args, _model_cfg
from maskpipe.pipeline import MaskpipeError


def add(sub) -> None:
    imp = sub.add_parser("import", help="a maskpipe artifact from a published MaskLLM mask or DuoAttention plan")
    isub = imp.add_subparsers(dest="format", required=True)
    ml = isub.add_parser("maskllm", help="MaskLLM mask_compressed.npz (np.packbits of each keep-mask)")
    ml.add_argument("file", help="the mask_compressed.npz, or a Hub repo holding one: OWNER/NAME[@REVISION]")
    _model_args(ml)
    ml.add_argument("--pattern", default=None, help="N:M to check (default: inferred from the masks)")
    ml.add_argument("--out", required=True, help="artifact directory to write")
    duo = isub.add_parser("duo-attention", help="DuoAttention full_attention_heads.tsv (+ config.json)")
    duo.add_argument("file", help="full_attention_heads.tsv, the directory holding it and config.json, or a Hub repo "
                                  "holding them: OWNER/NAME[@REVISION]")
    _model_args(duo)
    how = duo.add_mutually_exclusive_group(required=True)
    how.add_argument("--sparsity", type=float, help="fraction of KV heads to make streaming (lowest gates)")
    how.add_argument("--threshold", type=float, help="heads with gate below this stream")
    duo.add_argument("--sink", type=int, default=None, help="sink tokens (default: config.json sink_size)")
    duo.add_argument("--recent", type=int, default=None, help="recent-window tokens (default: config.json recent_size)")
    duo.add_argument("--ties", choices=("upstream", "head-order"), default="upstream",
                     help="how equal gates are split: upstream (DuoAttention's noise, numpy seeded 42: the plan its "
                          "own code makes; the default) or head-order (no noise)")
    duo.add_argument("--out", required=True, help="artifact directory to write")
    for p in (ml, duo):
        p.set_defaults(fn=cmd_import)


def cmd_import(a) -> None:
    from maskpipe.pipeline.attention.plans import AttentionPlan
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.io.interop import import_duo_attention, import_maskllm
    from maskpipe.pipeline.io.session import Session

    from maskpipe.pipeline.io.hub import DUO_FILES, MASKLLM_FILE, fetch_dir, fetch_file

    source = (fetch_file(a.file, MASKLLM_FILE, "MaskLLM mask") if a.format == "maskllm"
              else fetch_dir(a.file, DUO_FILES, "DuoAttention plan"))  # a local path, or a Hub repo id
    if not source.exists():
        raise MaskpipeError(f"{a.file}: no such file")
    s = Session(ModelConfig(**_model_cfg(a)))
    if a.format == "maskllm":
        out = import_maskllm(source, s.model, s.linears, a.out, base_model=s.base_model_info(), pattern=a.pattern)
        masks, manifest = s.load_artifact(out)
        print(f"{a.file}: {len(masks)} layers at {manifest['pattern']} imported into {out}")
    else:
        out = import_duo_attention(source, s.model, s.linears, a.out, base_model=s.base_model_info(),
                                   sparsity=a.sparsity, threshold=a.threshold, sink=a.sink, recent=a.recent,
                                   ties=a.ties)
        _, manifest = s.load_artifact(out)
        plan = AttentionPlan.from_json(manifest["attention"])
        print(f"{a.file}: plan with {int(plan.streaming.sum())} of {plan.streaming.numel()} KV heads streaming "
              f"(sink {int(plan.sink.max())}, window {int(plan.window.max())}, ties {a.ties}) imported into {out}")
