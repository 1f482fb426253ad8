"""The kept-key rule shared by every dynamic-mask method, and the sources of per-key scores it ranks.

Rule (per KV head; every query head of a GQA group follows its KV head). For a query at position i,
with keys at positions j <= i (causal), a budget of `sink + window + k` keys keeps

    sink    the first `sink` keys (j < sink, counted from the sequence's first real token),
    window  the `window` most recent keys (i - j < window; always includes the query's own key),
    top-k   the k best of the remaining candidates P_i = {sink <= j <= i - window} by score.

"Best" is a strict total order, so the rule is exact and reproducible: query-agnostic scores
(one per key) are ranked by (score descending, position ascending); query-dependent scores (the
oracle: one per query and key) by torch.topk.

Equivalence with eviction (tested in test_dynamic.py). For query-agnostic scores, P_i = P_{i-1} ∪
{i - window}, and top_k(A ∪ {x}) = top_k(top_k(A) ∪ {x}); so the keys the rule keeps for query i are
exactly what a cache of `budget` keys holds at step i if, whenever a new token arrives, it drops the
lowest-ranked key that is neither a sink key nor in the new window (ties: the latest position).
This is the whole of the equivalence: it needs scores that do not change once a key exists (true for
DMA's scores, a function of the key's value states; for key norms; for scores fixed at prefill)
and it fails for query-dependent scores (the oracle), which no fixed-size cache can reproduce.

Score sources: `KeyNormScores` (on the fly), `FixedScores` (from the prompt: H2O, SnapKV, random),
`OracleScores` (query-dependent), and `dynamic.KeyScorer` (DMA, learned). A source has
`query_agnostic` and `scores(layer, query, key, value, q_pos, k_pos, scaling)` returning [B, Hkv, Lk]
(agnostic; larger = keep) or [B, Hkv, Lq, Lk].

What a learned scorer is taught (`needed_keys`, `attention_target_loss`): the attention a set of
queries pays each key where the rule could drop it, and a cross-entropy of the scorer against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Budget:
    """Keys kept per KV head and query: `keys` (a count) or `fraction` of the keys in the forward
    (resolved per call against the key length; decoding resolves it once against the prompt), split as
    `sink` + `window` + top-k. window >= 1: a query always sees its own key. window None is `recent` of
    the budget (default 3/4). Recent keys carry the language model, the top-k its long-range retrieval,
    which needs few keys: on tiny-llama at 25% (512-token windows) DMA's perplexity cost went from +3.4%
    at H2O's even split to +1.9% at 3/4 with passkey unchanged (0.85/0.90 -> 0.90/0.90), at 72 keys
    from +6.9% to +4.0%; micro-llama +1.5% -> +0.9%, +3.6% -> +2.2% (docs/RESULTS.md, DMA section).

    `shares`, where given, is the recent share of each (layer, KV head) in place of `recent`
    (`dynamic_learning.profile_shares` picks them): every head keeps the same number of keys, but a head
    that retrieves spends more of them by score and one that does not keeps more recent ones. `resolve`
    then needs the layer and gives sink, window and k as LongTensors [kv_heads]."""

    keys: int | None = None
    fraction: float | None = None
    sink: int = 4
    window: int | None = None
    recent: float = 0.75
    shares: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self):
        if (self.keys is None) == (self.fraction is None):
            raise ValueError("Budget: give exactly one of keys or fraction")
        if (self.window is not None and self.window < 1) or self.sink < 0:
            raise ValueError(f"Budget: window must be >= 1 and sink >= 0, got {self.window}, {self.sink}")
        if not 0 < self.recent <= 1:
            raise ValueError(f"Budget: recent is a share of the budget in (0, 1], got {self.recent}")
        if self.shares is not None:
            if self.window is not None:
                raise ValueError("Budget: a window and per-head shares exclude each other")
            if not all(0 < x <= 1 for row in self.shares for x in row) or len({len(r) for r in self.shares}) != 1:
                raise ValueError(f"Budget: shares are one row per layer of shares in (0, 1], got {self.shares}")

    def count(self, length: int) -> int:
        return self.keys if self.keys is not None else max(round(self.fraction * length), 1)

    def resolve(self, length: int, layer: int | None = None):
        """(sink, window, k) for `length` keys: the sink and then the window shrink to fit the budget.
        Ints, or with `shares` LongTensors [kv_heads] of `layer`."""
        total = self.count(length)
        if self.shares is not None:
            if layer is None:
                raise ValueError("Budget: per-head shares resolve per layer")
            window = (torch.tensor(self.shares[layer], dtype=torch.float64) * total).long().clamp(1, total)
            sink = (total - window).clamp(max=self.sink)
            return sink, window, total - sink - window
        window = min(self.window if self.window is not None else max(int(total * self.recent), 1), total)
        sink = min(self.sink, total - window)
        return sink, window, total - sink - window

    def fixed(self, length: int) -> Budget:
        """This budget as a count resolved against `length` (what a decode keeps from its prompt on)."""
        return Budget(keys=self.count(length), sink=self.sink, window=self.window, recent=self.recent,
                      shares=self.shares)


def per_head(x, device, trailing: int = 2) -> int | torch.Tensor:
    """A budget part as `resolve` gives it, ready to broadcast over [B, H, ...] with `trailing` dimensions
    after H ([B, H, Lq, Lk] by default): an int as it is, a per-head tensor [H] as [1, H, 1, ...] on
    `device`."""
    return x.to(device).view(1, -1, *[1] * trailing) if isinstance(x, torch.Tensor) else x


def key_rank(scores: torch.Tensor) -> torch.Tensor:
    """Per key, its place in (score descending, position ascending): 0 is the best. [..., Lk] -> long."""
    order = torch.sort(-scores, dim=-1, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order).contiguous())


def regions(q_pos, k_pos, sink, window, start=None):
    """(causal, fixed, candidate) boolean masks over [B|1, 1|H, Lq, Lk]: fixed = sink or recent keys.
    sink and window: ints, or per-head tensors [H] (`Budget.resolve` with shares)."""
    q, k = q_pos[:, None], k_pos[None, :]
    start = torch.zeros(1, dtype=torch.long, device=k_pos.device) if start is None else start
    start = start.view(-1, 1, 1, 1)
    sink, window = per_head(sink, k_pos.device), per_head(window, k_pos.device)
    causal = ((k <= q)[None, None]) & (k[None, None] >= start)
    fixed = causal & (((k[None, None] - start) < sink) | ((q - k)[None, None] < window))
    return causal, fixed, causal & ~fixed


def _top_count(k, shape, device) -> tuple[int, torch.Tensor | None]:
    """(how many best candidates to rank, and where a head keeps fewer than that a [1, H, 1, n] mask of
    the ranks it keeps) for k an int or a per-head tensor."""
    if not isinstance(k, torch.Tensor):
        return min(k, shape[-1]), None
    n = min(int(k.max()), shape[-1])
    return n, torch.arange(n, device=device) < per_head(k, device)


def kept_mask(scores: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, sink, window, k,
              start: torch.Tensor | None = None) -> torch.Tensor:
    """The rule: [B, H, Lq, Lk] bool from scores [B, H, Lk] (query-agnostic) or [B, H, Lq, Lk]; sink,
    window and k ints or per-head tensors [H]."""
    _, fixed, cand = regions(q_pos, k_pos, sink, window, start)
    shape = (scores.shape[0], scores.shape[1], len(q_pos), len(k_pos))
    fixed, cand = fixed.expand(shape), cand.expand(shape)
    n, ranks = _top_count(k, shape, scores.device)
    if n == 0:
        return fixed.clone()
    if scores.dim() == 3:  # the strict order: ranks are distinct integers, exact in float32 below 2**24
        key = torch.where(cand, key_rank(scores.detach())[:, :, None, :].float(), math.inf)
    else:
        key = torch.where(cand, -scores.detach().float(), math.inf)
    vals, idx = key.topk(n, dim=-1, largest=False)
    taken = vals < math.inf if ranks is None else (vals < math.inf) & ranks
    return fixed | torch.zeros(shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, taken)


def soft_bias(scores: torch.Tensor, q_pos, k_pos, sink, window, k, temperature: float = 1.0,
              start=None) -> torch.Tensor:
    """The training relaxation of the rule, an additive attention bias [B, H, Lq, Lk]: 0 on sink and
    window keys, log σ((s_j − t_i)/T) on candidates, −inf on future keys; t_i sits halfway between the
    k-th and (k+1)-th best candidate scores of row i (no relaxation where all candidates fit). As
    T → 0 it is the hard rule; for far-dropped keys it is ≈ (s_j − t_i)/T, DMA's log-score bias."""
    causal, fixed, cand = regions(q_pos, k_pos, sink, window, start)
    shape = (scores.shape[0], scores.shape[1], len(q_pos), len(k_pos))
    cand = cand.expand(shape)
    s = scores[:, :, None, :]
    kh = k.to(scores.device) if isinstance(k, torch.Tensor) else torch.tensor([k], device=scores.device)
    n = min(int(kh.max()) + 1, len(k_pos))
    top = torch.where(cand, s.detach(), -math.inf).topk(n, dim=-1).values
    kh = kh.view(1, -1, 1, 1).expand(shape[0], shape[1], len(q_pos), 1)
    below, at = top.gather(-1, (kh - 1).clamp(0, n - 1)), top.gather(-1, kh.clamp(max=n - 1))
    thresh = torch.where(at > -math.inf, (below + at) / 2, -math.inf)
    thresh = torch.where(kh >= n, -math.inf, thresh)  # every candidate fits: no relaxation
    thresh = torch.where(kh == 0, top[..., :1], thresh)  # none fits: the best candidate sets the threshold
    bias = torch.where(cand, F.logsigmoid((s - thresh) / temperature), 0.0)
    return torch.where(causal.expand(shape), bias, -math.inf)


# ---------------------------------------------------------------------------------------------- sources


class KeyNormScores:
    """Keep low-norm keys (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV
    Cache Compression"): score = −‖k_j‖. RoPE rotates pairs of dimensions, so the norm of a cached
    (rotated) key is that of the raw key: position-free and query-agnostic."""

    query_agnostic = True

    def scores(self, layer, query, key, value, q_pos=None, k_pos=None, scaling=None):
        return -key.float().norm(dim=-1)


class FixedScores:
    """Scores fixed at prefill, one tensor [B, Hkv, L] per layer (H2O, SnapKV, random). Keys past the
    prompt (generated tokens) score +inf: never dropped before a prompt key, as SnapKV keeps every
    generated token (while the budget allows)."""

    query_agnostic = True

    def __init__(self, per_layer: list[torch.Tensor]):
        self.per_layer = per_layer

    def scores(self, layer, query, key, value, q_pos=None, k_pos=None, scaling=None):
        s = self.per_layer[layer].to(key.device)
        if k_pos is None:
            k_pos = torch.arange(key.shape[2], device=key.device)
        got = s[:, :, k_pos.clamp(max=s.shape[-1] - 1)]
        return torch.where(k_pos < s.shape[-1], got, math.inf)


class OracleScores:
    """The ceiling: for each query, the keys its own dense attention weights most (the softmax
    probabilities of the group's query heads, summed). Query-dependent: no fixed cache reproduces it."""

    query_agnostic = False

    def scores(self, layer, query, key, value, q_pos=None, k_pos=None, scaling=None):
        group = query.shape[1] // key.shape[1]
        logits = torch.einsum("bhgqd,bhkd->bhgqk", query.unflatten(1, (key.shape[1], group)).float(), key.float())
        logits = logits * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], -math.inf)
        return logits.softmax(-1).sum(2)


def random_scores(lengths: int, layers: int, kv_heads: int, seed: int, batch: int = 1) -> FixedScores:
    """Keys kept at random (the same budget, no information): uniform scores per (layer, head, key)."""
    g = torch.Generator().manual_seed(seed)
    return FixedScores([torch.rand(batch, kv_heads, lengths, generator=g) for _ in range(layers)])


def h2o_reduce(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """H2O (Zhang et al. 2023): the attention each key received, summed over every query of the prompt
    and over the group's query heads. probs [B, Hq, L, L] -> [B, Hkv, L]."""
    return probs.sum(2).unflatten(1, (kv_heads, -1)).sum(2)


def snapkv_reduce(probs: torch.Tensor, kv_heads: int, obs_window: int = 32, kernel: int = 7,
                  pool: str = "max") -> torch.Tensor:
    """SnapKV (Li et al. 2024): the attention from the last `obs_window` queries, pooled along keys
    with a stride-1 1D max/avg pool of width `kernel` (neighbours of a hit are kept too), summed over
    the group's query heads. probs [B, Hq, L, L] -> [B, Hkv, L]."""
    votes = probs[:, :, -obs_window:].sum(2)
    b, h, n = votes.shape
    pooled = (F.max_pool1d if pool == "max" else F.avg_pool1d)(votes.reshape(b * h, 1, n), kernel, stride=1,
                                                                 padding=kernel // 2)
    return pooled.reshape(b, h, n).unflatten(1, (kv_heads, -1)).sum(2)


def needed_keys(probs: torch.Tensor, kv: int, queries: torch.Tensor, q_pos, k_pos, sink, window,
                reduce: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """What the rule must keep for the `queries` [B, Lq] bool: per key, the attention they pay it from
    the KV head's group of heads, where it is a candidate (neither sink nor in the query's window: those
    are kept anyway), reduced over queries and heads by `reduce`: "max" (the most any one of them pays)
    or "sum" (H2O's accumulated attention). probs [B, Hq, Lq, Lk] -> (need [B, Hkv, Lk], candidate
    [B, 1|Hkv, Lk] bool: a candidate for at least one of the queries)."""
    _, _, cand = regions(q_pos, k_pos, sink, window)  # [1, 1|Hkv, Lq, Lk]
    cand = cand & queries[:, None, :, None]
    per_query_head = cand.repeat_interleave(probs.shape[1] // kv, 1) if cand.shape[1] > 1 else cand
    paid = torch.where(per_query_head, probs, 0.0).unflatten(1, (kv, -1))
    need = paid.amax(2).amax(2) if reduce == "max" else paid.sum((2, 3))
    return need, cand.any(2)


def attention_target_loss(log_scores: torch.Tensor, need: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the scorer's softmax over the candidate keys against the needed attention,
    normalised per (row, KV head): the keys the answer queries use must outrank the rest."""
    target = need / need.sum(-1, keepdim=True).clamp_min(1e-12)
    logp = torch.where(candidate, log_scores, -math.inf).log_softmax(-1)
    return -torch.where(candidate, target * logp, 0.0).sum(-1).mean()
