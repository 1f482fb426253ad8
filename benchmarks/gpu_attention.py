"""The attention parts of `benchmarks/gpu_check.py` (see its docstring: `flex_prefill`, `dynamic_mask`) and
the model shapes every part shares. Each part takes gpu_check's `Context` and returns its rows and table."""

from __future__ import annotations

import math

import torch

# TinyLlama-1.1B's shape: 22 blocks, hidden 2048, MLP 5632, 32 query / 4 KV heads, 1.10B parameters.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=32768)
TOY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)


@torch.no_grad()
def part_flex_prefill(ctx) -> dict:
    from maskpipe.pipeline.attention.plans import kv_heads, plan_cost, planned, uniform_plan

    dims, lengths, (sink, window) = (TOY, [256], (16, 64)) if ctx.smoke else (LLAMA_1B, [8192, 32768], (128, 1024))
    model = ctx.random_llama(dims, torch.bfloat16)
    layers, kv, group = kv_heads(model)
    streaming = (torch.arange(kv) % 2 == 1).expand(layers, kv)  # every other KV head of every layer: 50%
    plan = uniform_plan((layers, kv), streaming, sink, window)
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    rows = []
    for length in lengths:
        x = torch.randint(0, dims["vocab_size"], (1, length), device=ctx.device)

        def forward():
            return model(input_ids=x, use_cache=False).logits[:, -1].float()

        dense = ctx.timed(forward, repeats=3)
        with planned(model, plan, backend="flex"):
            flex = ctx.timed(forward, repeats=3, warmup=2)  # the first call compiles FlexAttention on CUDA
            out_flex = forward()
        row = {"tokens": length, "dense_sdpa_s": dense, "flex_plan_s": flex, "speedup": dense / flex,
               **plan_cost(plan, length, head_dim, group)}
        if length == lengths[0]:  # the same plan through SDPA with an explicit mask: the reference
            with planned(model, plan, backend="sdpa"):
                row["max_abs_logit_diff_vs_sdpa_plan"] = (forward() - out_flex).abs().max().item()
        rows.append(row)
    table = [f"random LLaMA {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B, bf16, batch 1, "
             f"{int(streaming.sum())} of {layers * kv} KV heads streaming (sink {sink}, window {window})", "",
             "| tokens | dense SDPA s | FlexAttention plan s | speed-up | attention FLOPs | KV cache |",
             "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['tokens']} | {r['dense_sdpa_s']:.3f} | {r['flex_plan_s']:.3f} | {r['speedup']:.2f}x | "
              f"{r['attention_flops_fraction']:.0%} | {r['kv_cache_fraction']:.0%} |" for r in rows]
    if "max_abs_logit_diff_vs_sdpa_plan" in rows[0]:
        table.append(f"\nlast-token logits, FlexAttention vs the SDPA-masked plan at {rows[0]['tokens']} tokens: "
                     f"max abs diff {rows[0]['max_abs_logit_diff_vs_sdpa_plan']:.3g}")
    return {"rows": rows, "table": table}


@torch.no_grad()
def part_dynamic_mask(ctx) -> dict:
    from maskpipe.pipeline.attention.dynamic import KeyScorer, dynamic, evict_decode
    from maskpipe.pipeline.attention.dynamic_flex import block_mask, drop_positions
    from maskpipe.pipeline.attention.kv_scores import Budget
    from maskpipe.pipeline.attention.plans import attended_keys

    dims, lengths, new = (TOY, [256], 4) if ctx.smoke else (LLAMA_1B, [8192, 32768], 64)
    model = ctx.random_llama(dims, torch.bfloat16)
    scorer = KeyScorer.for_model(model, seed=0)
    budget = Budget(fraction=1 / 8, sink=4)
    heads, head_dim = dims["num_attention_heads"], dims["hidden_size"] // dims["num_attention_heads"]
    rows = []
    for length in lengths:
        x = torch.randint(0, dims["vocab_size"], (1, length), device=ctx.device)
        sink, window, k = budget.resolve(length)

        def prefill():
            return model(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1].float()

        def dense_decode():
            out, pos = model(input_ids=x, use_cache=True), length
            for _ in range(new - 1):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True,
                            position_ids=torch.tensor([[pos]], device=ctx.device))
                pos += 1
            return out.cache

        dense = ctx.timed(prefill, repeats=3)
        # FlexAttention even on the smoke's CPU (eagerly), so that the code path is the GPU's
        with dynamic(model, scorer, budget, backend="flex"):
            flex = ctx.timed(prefill, repeats=3, warmup=2)  # the first call compiles FlexAttention on CUDA
            out_flex = prefill()
        # The blocks layer 0 computes: its values are those of the embeddings (RoPE touches keys only).
        attn, block0 = model.model.layers[0].self_attn, model.model.layers[0]
        values = attn.v_proj(block0.input_layernorm(model.model.embed_tokens(x)))
        values = values.view(1, length, -1, head_dim).transpose(1, 2)
        mask = block_mask(drop_positions(scorer(0, values), sink, window, k), heads, length)
        blocks = int((mask.kv_num_blocks + mask.full_kv_num_blocks).sum())
        causal_blocks = heads * sum(range(1, math.ceil(length / mask.BLOCK_SIZE[0]) + 1))
        # Decoding: the prefill and `new` greedy tokens, minus the prefill alone, over the new - 1 decode steps
        t_dense = ctx.timed(dense_decode, repeats=1)
        t_evict = ctx.timed(lambda: evict_decode(model, scorer, budget, x, new), repeats=1)
        t_dense_prefill = ctx.timed(lambda: model(input_ids=x, use_cache=True), repeats=1)
        t_evict_prefill = ctx.timed(lambda: evict_decode(model, scorer, budget, x, 1), repeats=1)
        _, cache = evict_decode(model, scorer, budget, x, new, return_cache=True)
        kv = {name: sum(layer.keys.nbytes + layer.values.nbytes for layer in c.layers)
              for name, c in (("dense", dense_decode()), ("evicted", cache))}
        row = {"tokens": length, "budget_keys": budget.count(length), "sink": sink, "window": window, "top_k": k,
               "dense_prefill_s": dense, "flex_prefill_s": flex, "prefill_speedup": dense / flex,
               "layer0_blocks_computed_fraction": blocks / causal_blocks,
               "attended_keys_fraction": attended_keys(length, 0, budget.count(length))
               / attended_keys(length, 0, None),
               "dense_decode_tokens_per_s": (new - 1) / max(t_dense - t_dense_prefill, 1e-9),
               "evict_decode_tokens_per_s": (new - 1) / max(t_evict - t_evict_prefill, 1e-9),
               "dense_kv_bytes": kv["dense"], "evicted_kv_bytes": kv["evicted"],
               "kv_fraction": kv["evicted"] / kv["dense"]}
        if length == lengths[0]:  # the same mask through SDPA with the explicit boolean mask: the reference
            with dynamic(model, scorer, budget, backend="sdpa"):
                row["max_abs_logit_diff_vs_sdpa"] = (prefill() - out_flex).abs().max().item()
        rows.append(row)
    table = [f"random LLaMA {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B, bf16, batch 1; DMA's key "
             f"scorer at its random init, 1/8 of the keys (sink {budget.sink}, {budget.recent:.0%} of the budget recent); decoding "
             f"{new} greedy tokens, tokens/s of the {new - 1} steps after the prefill", "",
             "| tokens | keys kept | dense SDPA prefill s | dynamic flex prefill s | speed-up | layer 0 blocks "
             "computed | keys attended | dense decode tok/s | evicting decode tok/s | dense KV MiB | evicted KV MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['tokens']} | {r['budget_keys']} | {r['dense_prefill_s']:.3f} | {r['flex_prefill_s']:.3f} | "
              f"{r['prefill_speedup']:.2f}x | {r['layer0_blocks_computed_fraction']:.0%} | "
              f"{r['attended_keys_fraction']:.0%} | {r['dense_decode_tokens_per_s']:.1f} | "
              f"{r['evict_decode_tokens_per_s']:.1f} | {r['dense_kv_bytes'] / 2**20:.1f} | "
              f"{r['evicted_kv_bytes'] / 2**20:.1f} |" for r in rows]
    table.append(f"\nlast-token logits, FlexAttention vs the SDPA-masked model at {rows[0]['tokens']} tokens: "
                 f"max abs diff {rows[0]['max_abs_logit_diff_vs_sdpa']:.3g}")
    return {"rows": rows, "table": table}
