"""The dynamic mask through FlexAttention: the rule of `kv_scores` as a block-sparse mask, so that
blocks of keys that no query of a block keeps are never computed.

Drop positions. For query-agnostic scores a key, once out of the kept set, never returns (the eviction
equivalence of `kv_scores`), so each key j has a first query position drop[j] from which it is not
kept, and the rule is one comparison per (query, key):

    kept(i, j) = j <= i < drop[j]

Sink keys are never dropped (drop >= L). A candidate j (j >= sink) is kept at query i >= j + window
while fewer than k candidates of P_i = {sink <= j' <= i - window} rank above it. With T(p) the k-th
best rank among the candidates at positions <= p (non-increasing in p: the set only grows), j is kept
at i iff rank[j] <= T(i - window), so drop[j] = window + max(j, first p with T(p) < rank[j]); the
window (i - j < window) is included, as drop[j] >= j + window. `drop_positions` computes T with a scan
over blocks of keys (each block one sort and one count, vectorised: O(L · (k + block)) work in L / block
steps) and the first p with a binary search, on the scores' device.

What it saves: a key block is skipped for a query block only when no query of that block keeps any of
its keys. Kept keys spread over the whole prefix (more kept keys than blocks of positions, as top-k
keys of unclustered scores are) leave most blocks partially kept, and those are computed in full.
"""

from __future__ import annotations

import torch

from maskpipe.pipeline.attention.kv_scores import key_rank, per_head
from maskpipe.pipeline.attention.plans import _compiled

SCAN_ELEMENTS = 2**25  # the scan's counts per block, B · H · block · (k + block): about 10 bytes each at peak


def running_kth(values: torch.Tensor, k) -> torch.Tensor:
    """values [B, H, L] long in [0, L], L standing for none: T[..., p] = the k-th smallest of
    values[..., :p + 1] (k >= 1, an int or per head [H]), L while fewer than k of them are below L."""
    b, h, length = values.shape
    kh = per_head(k, values.device)
    k = int(k.max()) if isinstance(k, torch.Tensor) else k
    carry = values.new_full((b, h, k), length)  # the k smallest so far, ascending
    block = length
    while block > 64 and b * h * block * (k + block) > SCAN_ELEMENTS:
        block //= 2
    out = []
    for s0 in range(0, length, block):
        chunk = values[..., s0:s0 + block]
        n = chunk.shape[-1]
        merged, order = torch.cat([carry, chunk], -1).sort(-1)
        # Row s of the block holds the carry and the block's first s + 1 values: count, in sorted order,
        # the entries row s holds; its k-th smallest is where the count reaches k.
        born = order - k  # the block index each sorted entry came from (negative: the carry)
        held = born[..., None, :] <= torch.arange(n, device=values.device)[:, None]
        first = (held.cumsum(-1, dtype=torch.int32) >= kh).int().argmax(-1)
        out.append(merged.gather(-1, first))
        carry = merged[..., :k]
    return torch.cat(out, -1)


def drop_positions(scores: torch.Tensor, sink, window, k) -> torch.Tensor:
    """Per key, the first query position that no longer keeps it under the rule (`kv_scores.kept_mask`
    with query-agnostic scores [B, H, L], no padding; sink, window, k ints or per head [H]); at least L
    for keys never dropped. -> long."""
    b, h, length = scores.shape
    pos = torch.arange(length, device=scores.device)
    sink, window, k = (torch.as_tensor(per_head(x, scores.device, 1)) for x in (sink, window, k))
    if bool((k >= length - sink).all()):  # every candidate fits: the rule keeps every causal key
        return torch.full((b, h, length), length, device=scores.device)
    rank = key_rank(scores.detach())
    first = torch.zeros_like(rank)
    if bool((k > 0).any()):
        threshold = running_kth(torch.where(pos >= sink, rank, length), k.clamp_min(1).flatten())
        # the first p with T(p) < rank[j] (-T is non-decreasing), L where there is none
        first = torch.where(k > 0, torch.searchsorted(-threshold, (-rank).contiguous(), right=True), first)
    dropped = torch.where(pos < sink, length, torch.maximum(first, pos) + window)
    return torch.where(k >= length - sink, length, dropped)  # heads whose candidates all fit


def kept(drop: torch.Tensor, b, h, q_pos, k_pos) -> torch.Tensor:
    """The rule from drop positions [B, H, L] at (batch b, KV head h, query q_pos, key k_pos): broadcasts
    over tensors, and runs per element as a FlexAttention mask_mod."""
    return (k_pos <= q_pos) & (q_pos < drop[b, h, k_pos])


def block_mask(drop: torch.Tensor, heads: int, q_len: int, block_size: int = 128):
    """The FlexAttention BlockMask of the rule for the last `q_len` of the L keys (a prefill with a
    cache before it has q_len < L) and `heads` query heads, each following its KV head of `drop`."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    b, kv, length = drop.shape
    group, offset = heads // kv, length - q_len

    def per_kv_head(b, h, q_idx, kv_idx):
        return kept(drop, b, h, q_idx + offset, kv_idx)

    def per_query_head(b, h, q_idx, kv_idx):
        return kept(drop, b, h // group, q_idx + offset, kv_idx)

    # Eager create_block_mask materialises the [B, H, Lq, Lk] mask; compiled, it goes block by block.
    make = create_block_mask if drop.device.type == "cpu" else _compiled(create_block_mask)
    # The blocks are evaluated once per KV head and shared by the query heads of its group.
    mask = make(per_kv_head, b, kv, q_len, length, device=drop.device, BLOCK_SIZE=block_size)
    blocks = (mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices)
    return BlockMask.from_kv_blocks(*(t.repeat_interleave(group, 1) for t in blocks), BLOCK_SIZE=mask.BLOCK_SIZE,
                                    mask_mod=per_query_head, seq_lengths=(q_len, length))


def flex_dynamic_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scores: torch.Tensor,
                           sink: int, window: int, k: int, scaling: float | None,
                           block_size: int = 128) -> torch.Tensor:
    """Attention under the rule with query-agnostic scores [B, Hkv, Lk]: query [B, Hq, Lq, D], key/value
    [B, Hkv, Lk, D] (query i at position Lk − Lq + i), no padding. Returns [B, Hq, Lq, D]. Compiled on
    CUDA; eager elsewhere (exact, unfused: for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = block_mask(drop_positions(scores, sink, window, k), query.shape[1], query.shape[2], block_size)
    run = flex_attention if query.device.type == "cpu" else _compiled(flex_attention)
    return run(query, key, value, block_mask=mask, scale=scaling, enable_gqa=query.shape[1] > key.shape[1])
