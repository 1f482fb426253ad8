"""Content-aware dynamic attention masks learned over frozen weights: DMA (Shi et al. 2025, "Trainable
Dynamic Mask Attention", arXiv 2508.02124; code SmallDoges/flash-dmattn), with training-free baselines
(H2O, SnapKV, key norm, random, the oracle: `kv_scores`) under one kept-key rule (`kv_scores`).

DMA scores each key from its value states, per KV head h of layer l:
    log score_j = A_{l,h} · softplus(w_{l,h} · v_j)      (DMA's dt = exp(A · softplus(v W_dt)), in log space)
where v_j is the key's value in every KV head (DMA's `dt_proj` over the concatenated heads; `mix_heads`,
factored at a rank where the full form would cost over 0.1% of the model) or in head h only. Scores are
query-agnostic, so a key's fate is decided once, when it is cached.

Differences from DMA, on purpose. DMA trains the whole model with the log-score added to the logits of
the kept keys; here the weights are frozen and only the scorer trains (`dynamic_learning`: it learns the
dense model's own attention). Inference applies the hard kept-key mask and no bias, so a 100% budget is
the dense model exactly and an evicted cache needs no extra state.

Execution: an AttentionInterface function (`IMPLEMENTATION`) with a `backend`. On CUDA ("auto") a
forward of more than one query with query-agnostic scores and no padding runs FlexAttention with a
block mask of the rule (`dynamic_flex`: each key's drop position, so key blocks that no query of a
block keeps are not computed). Everything else runs SDPA with the explicit boolean mask (exact, but
dense compute): the CPU ("auto"), the oracle's query-dependent scores, left-padded batches, one-token
decoding steps, capture passes and training through the relaxation. backend="flex" runs FlexAttention
on the CPU too, eagerly (exact, unfused: for tests). Decoding with a cache that really holds `budget`
keys per KV head: `evict_decode`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from maskpipe.pipeline.attention.dynamic_flex import flex_dynamic_attention
from maskpipe.pipeline.attention.kv_scores import (
    Budget,
    FixedScores,
    h2o_reduce,
    kept_mask,
    needed_keys,
    per_head,
    snapkv_reduce,
    soft_bias,
)
from maskpipe.pipeline.attention.plans import attention_modules, kv_heads

IMPLEMENTATION = "maskpipe_dynamic"
MAX_FRACTION = 1e-3  # what a learned scorer may cost, as a share of the model's parameters


class KeyScorer(nn.Module):
    """DMA's key scorer for every (layer, KV head), A [layers, kv_heads] and a projection of the values,
    the only trained parameters; also a score source for `dynamic` (query-agnostic). Three forms of the
    projection, from each head's score read from:
      its own values          w [layers, kv_heads, head_dim]                       (mix_heads False)
      every KV head's values  w [layers, kv_out, kv_in, head_dim]: DMA's dt_proj   (mix_heads, rank None)
      the same, factored      w_in [layers, kv_in, head_dim, rank], w_out [layers, kv_out, rank]  (rank r)
    The factored form is dt_proj at rank r: w[h, i, d] = Σ_r w_out[h, r] w_in[i, d, r]."""

    query_agnostic = True

    def __init__(self, layers: int, kv: int, head_dim: int, seed: int = 0, a_init: float = 1.0,
                 mix_heads: bool = False, rank: int | None = None):
        super().__init__()
        if rank is not None and (not mix_heads or rank < 1):
            raise ValueError(f"KeyScorer: a rank (got {rank}) factors the mixed form: needs mix_heads and rank >= 1")
        g = torch.Generator().manual_seed(seed)
        if rank is not None:
            self.w_in = nn.Parameter(torch.randn(layers, kv, head_dim, rank, generator=g) / math.sqrt(kv * head_dim))
            self.w_out = nn.Parameter(torch.randn(layers, kv, rank, generator=g) / math.sqrt(rank))
        else:
            shape = (layers, kv, kv, head_dim) if mix_heads else (layers, kv, head_dim)
            self.w = nn.Parameter(torch.randn(*shape, generator=g) / math.sqrt(head_dim * (kv if mix_heads else 1)))
        self.A = nn.Parameter(torch.full((layers, kv), a_init))

    @classmethod
    def for_model(cls, model: nn.Module, mix_heads: bool | None = None, rank: int | None = None,
                  **kw) -> KeyScorer:
        """mix_heads None: DMA's mixed form, at full rank where it costs under MAX_FRACTION of the model's
        parameters (any real LLM: 0.06% for LLaMA-2-7B's 32 KV heads), else factored at the largest rank
        that does (tiny-llama's 8 heads of 32 in 7.2M parameters: 0.17% at full rank, 0.088% at rank 4).
        Each head from its own values only where asked (mix_heads False). On tiny-llama at 25% of the
        keys the passkey survived in 0.10 of the prompts from each head's own values, 0.50 from the full
        form and 0.85 (dense: 0.85) at rank 4 (docs/RESULTS.md, DMA section)."""
        c = model.config.get_text_config()
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        layers, kv, _ = kv_heads(model)
        if mix_heads is None and rank is None:
            allowed = MAX_FRACTION * sum(p.numel() for p in model.parameters()) / layers - kv  # less A
            if kv * kv * head_dim >= allowed:
                rank = max(int(allowed // (kv * head_dim + kv)), 1)
        mix = mix_heads if mix_heads is not None else True
        return cls(layers, kv, head_dim, mix_heads=mix, rank=rank, **kw).to(next(model.parameters()).device)

    @property
    def form(self) -> str:
        if hasattr(self, "w_in"):
            return f"every KV head's values, rank {self.w_in.shape[-1]}"
        return "every KV head's values" if self.w.dim() == 4 else "its own values"

    def forward(self, layer: int, value: torch.Tensor) -> torch.Tensor:
        """Log-scores [B, Hkv, L] of values [B, Hkv, L, D]. Each key's score is computed from its own
        values only, so it does not depend on how many keys are scored with it: prefill and decode agree
        bit for bit (test_dynamic's eviction tests)."""
        v = value.float()
        if hasattr(self, "w_in"):
            z = torch.einsum("bilr,hr->bhl", torch.einsum("bild,idr->bilr", v, self.w_in[layer]), self.w_out[layer])
        elif self.w.dim() == 4:  # [H_out, H_in, D]
            z = torch.einsum("bild,hid->bhl", v, self.w[layer])
        else:
            z = (v * self.w[layer][None, :, None, :]).sum(-1)
        return self.A[layer][None, :, None] * F.softplus(z)

    def scores(self, layer, query, key, value, q_pos=None, k_pos=None, scaling=None):
        return self(layer, value)


def param_fraction(scorer: nn.Module, model: nn.Module) -> tuple[int, float]:
    n = sum(p.numel() for p in scorer.parameters())
    return n, n / sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- execution


@dataclass
class LayerDynamic:
    """What one attention module runs under `dynamic`: the score source, the budget, the relaxation
    (None, "sigmoid" or "st"), for a capture pass where to put the layer's attention reductions, and
    the backend of the masked attention ("auto", "sdpa" or "flex": the module docstring)."""

    source: object
    budget: Budget | None
    relax: str | None = None
    temperature: float = 1.0
    capture: dict | None = None
    backend: str = "auto"


def _sdpa(query, key, value, mask, scaling, group):
    kv = [t.repeat_interleave(group, dim=1) if group > 1 else t for t in (key, value)]
    mask = mask.repeat_interleave(group, dim=1) if mask.shape[1] > 1 and group > 1 else mask
    return F.scaled_dot_product_attention(query, *kv, attn_mask=mask, scale=scaling)


def dynamic_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] (the cache
    included: query i sits at position Lk − Lq + i). Returns ([B, Lq, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st: LayerDynamic | None = getattr(module, "maskpipe_dynamic", None)
    if st is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer, group = module.layer_idx, query.shape[1] // key.shape[1]
    lq, lk = query.shape[2], key.shape[2]
    q_pos = torch.arange(lq, device=query.device) + (lk - lq)
    k_pos = torch.arange(lk, device=query.device)
    start = None
    if attention_mask is not None:  # left padding: the last row (a real token) sees exactly the real keys
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"{IMPLEMENTATION}: expected a boolean attention mask, got {attention_mask.dtype}")
        start = attention_mask[:, 0, -1, :].int().argmax(-1)
    if st.capture is not None:
        return _capture(st, layer, query, key, value, q_pos, k_pos, scaling, group)
    sink, window, k = st.budget.resolve(lk, layer)
    scores = st.source.scores(layer, query, key, value, q_pos, k_pos, scaling)
    relaxing = st.relax and torch.is_grad_enabled() and scores.requires_grad
    # A one-query decoding step takes SDPA: its mask is one row, not worth a block mask per step. So
    # does training through the relaxation, whose soft pass is dense anyway.
    if (st.backend == "flex" or (st.backend == "auto" and query.is_cuda)) and scores.dim() == 3 \
            and attention_mask is None and lq > 1 and not relaxing:
        out = flex_dynamic_attention(query, key, value, scores, sink, window, k, scaling)
    else:
        mask = kept_mask(scores, q_pos, k_pos, sink, window, k, start)
        if attention_mask is not None:
            mask = mask & attention_mask
            mask = mask | ~mask.any(-1, keepdim=True)  # padding queries: no NaNs into the next layer
        out = _sdpa(query, key, value, mask, scaling, group)
    if relaxing:
        bias = soft_bias(scores, q_pos, k_pos, sink, window, k, st.temperature, start).to(query.dtype)
        if attention_mask is not None:  # padding keys out; padding query rows see everything (unused)
            bias = bias.masked_fill(~attention_mask, -math.inf)
            bias = torch.where(attention_mask.any(-1, keepdim=True), bias, 0.0)
        soft = _sdpa(query, key, value, bias, scaling, group)
        out = soft if st.relax == "sigmoid" else out.detach() + (soft - soft.detach())  # forward: exactly `out`
    return out.transpose(1, 2).contiguous(), None


def _capture(st, layer, query, key, value, q_pos, k_pos, scaling, group):
    """A dense forward that records what `st.capture` asks of this layer's attention: H2O's and SnapKV's
    reductions ("snapkv_args", `prompt_scores`), the scorer's targets ("queries", `dynamic_learning`), or
    anything a "hook" takes from (layer, query, key, value, probs, q_pos, k_pos, scaling)."""
    k, v = (t.repeat_interleave(group, dim=1) for t in (key, value))
    logits = (query @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    probs = logits.masked_fill(k_pos[None, :] > q_pos[:, None], -math.inf).softmax(-1)
    kv = key.shape[1]
    if "hook" in st.capture:  # a profile of the layer's dense attention (`dynamic_learning.profile_shares`)
        st.capture["hook"](layer, query, key, value, probs, q_pos, k_pos, scaling)
    if "snapkv_args" in st.capture:
        st.capture.setdefault("h2o", {})[layer] = h2o_reduce(probs, kv)
        st.capture.setdefault("snapkv", {})[layer] = snapkv_reduce(probs, kv, **st.capture["snapkv_args"])
    if "queries" in st.capture:  # the scorer's attention targets (`dynamic_learning`, loss="attention")
        sink, window, _ = st.capture["budget"].resolve(len(k_pos), layer)
        st.capture.setdefault("needed", {})[layer] = (value.detach(), {
            name: needed_keys(probs, kv, queries, q_pos, k_pos, sink, window, reduce)
            for name, (queries, reduce) in st.capture["queries"].items()})
    return (probs @ v).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make IMPLEMENTATION a transformers attention implementation (masks built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, dynamic_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def dynamic(model: nn.Module, source, budget: Budget | None, relax: str | None = None, temperature: float = 1.0,
            capture: dict | None = None, backend: str = "auto"):
    """Run `model` with each KV head keeping `budget` keys per query, chosen by `source` (a KeyScorer
    or a `kv_scores` source). `relax` ("st" or "sigmoid") makes the mask differentiable in the scores
    while grad is enabled. `backend`: "auto" (FlexAttention on CUDA, SDPA elsewhere), "sdpa" or "flex"
    (where it applies: the module docstring). Restores the model on exit."""
    if relax not in (None, "st", "sigmoid"):
        raise ValueError(f"relax must be None, 'st' or 'sigmoid', got {relax!r}")
    if backend not in ("auto", "sdpa", "flex"):
        raise ValueError(f"backend must be 'auto', 'sdpa' or 'flex', got {backend!r}")
    modules = attention_modules(model)
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        for mod in modules:
            mod.maskpipe_dynamic = LayerDynamic(source, budget, relax, temperature, capture, backend)
        yield model
    finally:
        for mod in modules:
            mod.__dict__.pop("maskpipe_dynamic", None)
        model.set_attn_implementation(previous)


@torch.no_grad()
def prompt_scores(model: nn.Module, ids: torch.Tensor, obs_window: int = 32, kernel: int = 7,
                  pool: str = "max") -> dict[str, FixedScores]:
    """H2O and SnapKV scores of a prompt [B, L] from one dense forward: {"h2o": ..., "snapkv": ...}."""
    cap = {"snapkv_args": {"obs_window": obs_window, "kernel": kernel, "pool": pool}}
    with dynamic(model, None, None, capture=cap):
        model.base_model(input_ids=ids, use_cache=False)
    layers = kv_heads(model)[0]
    return {name: FixedScores([cap[name][i] for i in range(layers)]) for name in ("h2o", "snapkv")}


# ---------------------------------------------------------------------------------------------- eviction


class EvictingLayer(DynamicLayer):
    """One layer's cache holding at most `budget` keys per KV head: keys/values [B, Hkv, n, D] gathered
    per head, with each entry's position and score [B, Hkv, n] (heads keep different positions, all
    keep the same number). Prefill returns the whole prompt to attention (which masks it by the rule)
    and keeps what the rule keeps for the last prompt token; each decoded token is appended and the
    lowest-ranked key that is neither a sink key nor in the new window is dropped (`kv_scores`)."""

    is_croppable = False

    def __init__(self, layer: int, source, budget: Budget):
        super().__init__()
        self.layer, self.source, self.budget = layer, source, budget
        self.pos = self.score = None

    def _score(self, key, value, k_pos):
        with torch.no_grad():
            return self.source.scores(self.layer, None, key, value, None, k_pos, None).float()

    def update(self, key_states, value_states, *args, **kwargs):
        b, h, lq, _ = key_states.shape
        sink, window, k = self.budget.resolve(lq, self.layer)
        if self.keys is None:  # prefill
            k_pos = torch.arange(lq, device=key_states.device)
            score = self._score(key_states, value_states, k_pos).expand(b, h, lq)
            keep = kept_mask(score, k_pos[-1:], k_pos, sink, window, k)[:, :, 0]  # [B, H, L], same count per row
            idx = torch.sort(torch.where(keep, k_pos, lq), dim=-1).values[..., : int(keep[0, 0].sum())]
            self.pos, self.score = idx, score.gather(-1, idx)
            self.keys, self.values = (t.gather(2, idx[..., None].expand(-1, -1, -1, t.shape[-1]))
                                      for t in (key_states, value_states))
            self.is_initialized = True
            return key_states, value_states
        if lq != 1:
            raise ValueError("EvictingLayer decodes one token at a time")
        new_pos = int(self.pos.max()) + 1
        pos = torch.full((b, h, 1), new_pos, device=key_states.device)
        score = self._score(key_states, value_states, pos[0, 0]).expand(b, h, 1)
        self.keys, self.values = torch.cat([self.keys, key_states], 2), torch.cat([self.values, value_states], 2)
        self.pos, self.score = torch.cat([self.pos, pos], -1), torch.cat([self.score, score], -1)
        if self.pos.shape[-1] > self.budget.keys:
            sink, window = (per_head(x, self.pos.device, 1) for x in (sink, window))
            cand = (self.pos >= sink) & (new_pos - self.pos >= window)
            low = torch.where(cand, self.score, math.inf).amin(-1, keepdim=True)
            victim = torch.where(cand & (self.score == low), self.pos, -1).argmax(-1, keepdim=True)
            keep = torch.ones_like(self.pos, dtype=torch.bool).scatter_(-1, victim, False)
            n = self.pos.shape[-1] - 1
            self.pos, self.score = self.pos[keep].view(b, h, n), self.score[keep].view(b, h, n)
            self.keys, self.values = (t[keep].view(b, h, n, t.shape[-1]) for t in (self.keys, self.values))
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        n = self.get_seq_length()
        return (query_length if n == 0 else min(n + query_length, self.budget.keys)), 0

    def get_max_length(self) -> int:
        return self.budget.keys


def evicting_cache(model: nn.Module, source, budget: Budget):
    """A transformers Cache of `EvictingLayer`s (budget: a count, `Budget.fixed`)."""
    if budget.keys is None or not getattr(source, "query_agnostic", False):
        raise ValueError("an evicting cache needs a count budget and query-agnostic scores")
    return Cache(layers=[EvictingLayer(i, source, budget) for i in range(kv_heads(model)[0])])


@torch.no_grad()
def evict_decode(model: nn.Module, source, budget: Budget, ids: torch.Tensor, max_new_tokens: int,
                 return_cache: bool = False):
    """Greedy decoding of prompts ids [B, L] (equal lengths, no padding) with a cache that holds
    `budget` keys per KV head: the prompt runs under the rule (`dynamic`), then the cache keeps what
    the rule keeps and evicts as it decodes. Equals `masked_decode` (same budget, source) token for
    token: see `kv_scores` for why. Returns the new tokens [B, max_new_tokens] (and the cache)."""
    budget = budget.fixed(ids.shape[1])
    cache = evicting_cache(model, source, budget)
    with dynamic(model, source, budget):
        out = model(input_ids=ids, cache=cache, use_cache=True)
    new, pos = [], ids.shape[1]
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
        if step == max_new_tokens - 1:
            break
        out = model(input_ids=token[:, None], position_ids=torch.full((ids.shape[0], 1), pos, device=ids.device),
                    cache=cache, use_cache=True)
        pos += 1
    tokens = torch.stack(new, 1)
    return (tokens, cache) if return_cache else tokens


@torch.no_grad()
def masked_decode(model: nn.Module, source, budget: Budget, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding under the rule with the model's ordinary (full) cache: nothing is evicted, each
    query is masked. The budget is resolved once against the prompt, as `evict_decode` does."""
    budget = budget.fixed(ids.shape[1])
    new = []
    with dynamic(model, source, budget):
        out = model(input_ids=ids, use_cache=True)
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            new.append(token)
            if step == max_new_tokens - 1:
                break
            out = model(input_ids=token[:, None], cache=out.cache, use_cache=True)
    return torch.stack(new, 1)


def cache_bytes(model: nn.Module, length: int, budget: Budget, batch: int = 1, dtype_bytes: int | None = None,
                index_bytes: int = 8) -> dict[str, float]:
    """KV-cache size after a prefill of `length` tokens under `budget` (K and V of every layer and KV
    head), beside dense; `index_bytes` per kept key for its position and score (4 + 4)."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layers, kv, _ = kv_heads(model)
    elem = dtype_bytes or next(model.parameters()).element_size()
    kept = min(budget.count(length), length)
    per_key = 2 * head_dim * elem
    return {"kv_cache_bytes": batch * layers * kv * kept * (per_key + index_bytes),
            "dense_kv_cache_bytes": batch * layers * kv * length * per_key,
            "kv_cache_fraction": kept * (per_key + index_bytes) / (length * per_key), "keys_per_head": kept}
