"""MoA's elastic spans (Fu et al. 2024, "MoA: Mixture of Sparse Attention", arXiv 2406.14909): each KV
head gets its own window, chosen from a candidate set by a profile of the dense model, under a total
KV-cache budget.

1. Profile (`profile_spans`): on synthetic passkey samples (`pipeline.attention.gates.passkey_batch`),
   for each KV head and candidate window, the summed influence of the attention entries outside sink +
   window. The influence (`measure="gradient"`, MoA's) is the first-order change of the loss on the answer
   digits when an entry is masked: |A ⊙ (∂L/∂A − Σ_k A ∂L/∂A)|, the gradient with respect to the entry's
   attention score. `measure="mass"` is the attention mass itself at the answer positions, which needs no
   backward pass but counts the diffuse attention of early layers as if it mattered (on micro-llama it
   streamed the one retrieval head, docs/static_plans.md).
2. Optimise (`choose_spans`): one candidate per head, minimising the summed lost mass subject to the
   summed KV tokens ≤ budget: a multiple-choice knapsack, solved greedily by the best lost mass saved per
   extra cached token (every head starts at its cheapest candidate), as MoA's own solver ranks
   configurations by predicted loss per cost.

The last candidate is always full attention (lost mass 0, the whole context cached), so a head whose
needle can lie anywhere can keep it.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.attention.plans import AttentionPlan, kv_heads


def default_candidates(context: int) -> list[int]:
    """Windows 1/16, 1/8, 1/4 and 1/2 of the context (32 ... 256 at 512 tokens); full attention is added
    by `profile_spans`. The middle one is the streaming default's window (`default_sink_window`)."""
    return sorted({max(context // d, 1) for d in (16, 8, 4, 2)})


def outside(weight: torch.Tensor, sink: int, windows: list[int]) -> torch.Tensor:
    """weight [Hq, L, L] (query, key) of one sequence: per query head and window, the sum of the causal
    entries outside the first `sink` keys and the `w` most recent."""
    L = weight.shape[-1]
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    total = (weight * (k <= q)).sum((-2, -1))
    return torch.stack([total - (weight * (((k < sink) | (q - k < w)) & (k <= q))).sum((-2, -1)) for w in windows],
                       -1)  # [Hq, len(windows)]


def influence(attentions, logits: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    """Per layer [B, Hq, L, L]: |A ⊙ (G − Σ_k A G)| with G = ∂L/∂A, L the cross-entropy of the tokens that
    follow the `targets` positions (the answer digits)."""
    labels = ids[:, 1:][targets[:, :-1]]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][targets[:, :-1]].float(), labels, reduction="sum")
    grads = torch.autograd.grad(loss, attentions)
    return [(a * (g - (a * g).sum(-1, keepdim=True))).abs().detach() for a, g in zip(attentions, grads)]


def profile_spans(model: nn.Module, tokenizer, stream, *, sink: int, batches: int, batch_size: int, seqlen: int,
                  needles: int, windows: list[int] | None = None, seed: int = 0, measure: str = "gradient"
                  ) -> tuple[torch.Tensor, list[int]]:
    """The dense model's influence outside each candidate window per (layer, KV head) on `batches`
    synthetic passkey batches (summed over a KV head's query heads, averaged over samples; module doc).
    Returns (influence [layers, kv_heads, C], windows), the last window being `seqlen`, i.e. full attention
    (influence 0)."""
    if measure not in ("gradient", "mass"):
        raise MaskpipeError(f"profile_spans: measure is gradient or mass, not {measure!r}")
    from maskpipe.pipeline.attention.gates import passkey_batch  # gates imports plans, as this module does

    windows = sorted(set(windows or default_candidates(seqlen)) - {seqlen}) + [seqlen]
    layers, kv, group = kv_heads(model)
    rng, total, count = random.Random(seed), torch.zeros(layers, kv, len(windows)), 0
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns attention weights
    try:
        for _ in range(batches):
            ids, targets = passkey_batch(rng, stream, tokenizer, batch_size, seqlen, needles)
            device = next(model.parameters()).device
            ids, targets = ids.to(device), targets.to(device)
            with torch.enable_grad():  # a leaf that needs grad makes every attention map part of the graph
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(measure == "gradient")
                out = model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
                if measure == "gradient":
                    weights = influence(out.attentions, out.logits, ids, targets)
                else:  # attention at the answer positions, each answer's row summing to 1 / answers
                    rows = targets[:, None, :, None] / targets.sum(-1)[:, None, None, None]
                    weights = [a.detach() * rows for a in out.attentions]
            for b in range(ids.shape[0]):
                for layer, w in enumerate(weights):
                    total[layer] += outside(w[b].float().cpu(), sink, windows).view(kv, group, -1).sum(1)
                count += 1
    finally:
        model.set_attn_implementation(previous)
    return (total / count).clamp(min=0), windows


def choose_spans(mass: torch.Tensor, costs: list[int], budget: float) -> torch.Tensor:
    """One candidate per head ([H, C] lost mass, `costs` [C] cached tokens, increasing) minimising the
    summed mass with summed cost ≤ `budget`: every head starts at candidate 0, then the upgrade with the
    most mass saved per extra token that still fits is taken, until none fits or saves anything. Returns
    the chosen index per head [H]."""
    heads = mass.shape[0]
    choice = torch.zeros(heads, dtype=torch.long)
    spent = heads * costs[0]
    if spent > budget:
        raise MaskpipeError(f"attention budget of {budget:.0f} KV tokens is below the smallest spans "
                            f"({heads} heads x {costs[0]} tokens)")
    while True:
        best, best_ratio = None, 0.0
        for h in range(heads):
            c = int(choice[h])
            for n in range(c + 1, len(costs)):
                extra, saved = costs[n] - costs[c], float(mass[h, c] - mass[h, n])
                if spent + extra <= budget and saved > 0 and saved / extra > best_ratio:
                    best, best_ratio = (h, n, extra), saved / extra
        if best is None:
            return choice
        h, n, extra = best
        choice[h], spent = n, spent + extra


def moa_plan(mass: torch.Tensor, windows: list[int], *, budget_tokens: float, sink: int, length: int
             ) -> AttentionPlan:
    """The plan of `choose_spans` for a `length`-token context: mass [layers, kv_heads, C] from
    `profile_spans`, whose last candidate is full attention. `budget_tokens` counts KV tokens over all
    heads at `length` (dense: heads · length)."""
    shape = tuple(mass.shape[:2])
    costs = [min(length, sink + w) for w in windows[:-1]] + [length]
    chosen = choose_spans(mass.reshape(-1, len(windows)), costs, budget_tokens).view(shape)
    window = torch.tensor(windows)[chosen]
    return AttentionPlan(streaming=chosen < len(windows) - 1, sink=torch.full(shape, sink), window=window,
                         gate=torch.full(shape, float("nan")))
