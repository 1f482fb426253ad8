"""`maskpipe apply`: check artifacts (N:M masks and/or an attention plan or dynamic attention mask) against a model, and optionally
write the masked model.
"""

from __future__ import annotations

from pathlib import Path

from maskpipe.jobs.quick import _fetch_masks, _model_args, _model_cfg


def add(sub) -> None:
    ap = sub.add_parser("apply", help="check artifacts (N:M masks, an attention plan or dynamic mask) against a model; "
                                      "optionally write the masked model")
    _model_args(ap)
    ap.add_argument("--masks", required=True, nargs="+",
                    help="artifact directories, applied together: each masks its own layers, at most one attention "
                         "plan or dynamic attention mask")
    ap.add_argument("--out", default=None, help="write a materialized model directory (weights ⊙ mask), in the base "
                                                "model's dtype unless --dtype says otherwise")
    ap.set_defaults(fn=cmd_apply)


def cmd_apply(a) -> None:
    from maskpipe.pipeline.io.artifacts import materialize
    from maskpipe.pipeline.attention.dynamic_masks import SCORER_FILE, DynamicMask
    from maskpipe.pipeline.attention.plans import AttentionPlan, plan_cost
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages.attention import head_geometry

    _fetch_masks(a)
    model_cfg = _model_cfg(a)
    if a.out and a.dtype is None:  # the export keeps the checkpoint's dtype (a bf16 load of fp32 would round it)
        from maskpipe.pipeline.core.models import checkpoint_dtype

        model_cfg["dtype"] = checkpoint_dtype(a.model, a.revision, a.trust_remote_code)
    session = Session(ModelConfig(**model_cfg))
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
        if "dynamic" in manifest:
            dyn = DynamicMask.from_json(manifest["dynamic"], Path(path), str(path))
            length = session.model.config.get_text_config().max_position_embeddings
            cost = dyn.cost(session.model, length)
            scorer = manifest["dynamic"].get("scorer")
            print(f"{path}: fits {a.model}: {dyn.describe()}; " + (
                f"a learned scorer of {scorer['parameters']:,} parameters ({100 * scorer['fraction']:.4f}% of the "
                "model)" if scorer else "no trained parameters") + f"; at {length} tokens the KV cache is "
                f"{cost['kv_cache_fraction']:.1%} and attention FLOPs {cost['attention_flops_fraction']:.1%} of dense")
    if len(manifests) > 1:
        print(f"together: {len(masks)} of {len(session.linears)} prunable layers masked"
              + (", with an attention plan" if any("attention" in m for m in manifests.values()) else "")
              + (", with a dynamic attention mask" if any("dynamic" in m for m in manifests.values()) else ""))
    if a.out:
        # The plan or dynamic mask travels in maskpipe.json (a learned scorer's tensors beside it): running
        # either needs maskpipe's attention implementations.
        plan = next((m["attention"] for m in manifests.values() if "attention" in m), None)
        dynamic = next(((p, m["dynamic"]) for p, m in manifests.items() if "dynamic" in m), None)
        scorer = {SCORER_FILE: Path(dynamic[0]) / SCORER_FILE} if dynamic and "scorer" in dynamic[1] else {}
        provenance = {"base_model": a.model, "revision": a.revision, "attention": plan,
                      "dynamic": dynamic[1] if dynamic else None,
                      "artifacts": [{"path": str(p), "pattern": m["pattern"], "method": m["method"].get("name"),
                                     "fingerprint": m["base_model"]["fingerprint"], "layers": sorted(m["layers"])}
                                    for p, m in manifests.items()]}
        patterns = {layer: m["pattern"] for m in manifests.values() for layer in m["layers"]}
        out = materialize(session.model, session.tokenizer, session.linears, masks, a.out, provenance, patterns,
                          extra=scorer)
        print(f"materialized model written to {out}")
