"""`maskpipe export`: an artifact in MaskLLM's or DuoAttention's own format.

    maskpipe export maskllm ARTIFACT --out FILE.npz
    maskpipe export duo-attention ARTIFACT --out DIR

The logic lives in `pipeline.io.interop`; this is a recipe over it (`import` is the way in).
"""

from __future__ import annotations


def add(sub) -> None:
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


def cmd_export(a) -> None:
    from maskpipe.pipeline.io.hub import fetch_artifact
    from maskpipe.pipeline.io.interop import export_duo_attention, export_maskllm

    a.artifact = str(fetch_artifact(a.artifact))  # a local artifact, or a Hub repo id
    out = export_maskllm(a.artifact, a.out) if a.format == "maskllm" else export_duo_attention(a.artifact, a.out)
    print(f"{a.artifact}: exported as {a.format} to {out}")
