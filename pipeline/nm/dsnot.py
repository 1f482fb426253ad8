"""DSnoT (Zhang et al. 2023, "Dynamic Sparse No Training", arXiv 2310.08915): refine an N:M mask
without training by swapping kept and pruned weights inside its groups, so the pattern always holds
and the weights never change. Two rules:

- `dsnot`: the published algorithm, as the official code (zyxxmu/DSnoT, `prune_DSnoT`) runs it:
  `refine_official` on `OfficialStats`, with its options (`max_cycles`, `update_threshold`,
  `pow_of_var_regrowing`, `same_sign`, `skip_layer`). It drives each row's output shift ε toward 0 by
  a fixed ranking of grow candidates and Wanda's order for pruning.
- `dsnot-exact`: maskpipe's variant, `refine_exact` on `ChannelMoments`: every swap of every group is
  scored by the exact change of D_i = ε_i² + Σ r² Var[x] (`dsnot_error`), and a row stops at the first
  swap that does not lower it.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelMoments:
    """DSnoT's statistics: mean E[x_j] and variance Var[x_j] of each input channel j over the calibration
    tokens. Sums are float64: Var = E[x²] − E[x]² cancels badly in float32 when |mean| ≫ std."""

    def __init__(self, linear: nn.Linear):
        self.sum = torch.zeros(linear.in_features, dtype=torch.float64, device=linear.weight.device)
        self.sq = torch.zeros_like(self.sum)
        self.tokens = 0

    def add_batch(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        self.sum += x.sum(0)
        self.sq += x.square().sum(0)
        self.tokens += x.shape[0]

    def channel_mean(self) -> torch.Tensor:
        return self.sum / self.tokens

    def channel_var(self) -> torch.Tensor:
        return (self.sq / self.tokens - self.channel_mean().square()).clamp_min(0)


def dsnot_error(weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """DSnoT's objective per output row i: the expected squared change of output i that pruning causes,
    for input channels taken as independent. With r = W_i ⊙ ¬M_i the pruned weights,
        D_i = (Σ_j r_j E[x_j])² + Σ_j r_j² Var[x_j]
    DSnoT's reconstruction error ε_i = Σ_j r_j E[x_j] (the mean shift of the output), squared, plus its
    variance term. Wanda minimises Σ_j r_j² E[x_j²], the same sum without the cross terms of ε_i², so what
    DSnoT adds is pruned weights whose mean contributions cancel. Float64, shape [out]."""
    r = weight.double() * ~mask
    return (r @ mean.double()).square() + r.square() @ var.double()


def refine_exact(weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 n: int, m: int, max_cycles: int = 50) -> torch.Tensor:
    """DSnoT inside N:M groups: each cycle, every output row makes the one swap (grow a pruned weight g,
    prune a kept weight p of the same group, so the row stays N:M) that lowers its `dsnot_error` most, if
    any does; rows with no improving swap are done. The weights are never changed. Unlike the official
    rule (`refine_official`), every (g, p) pair of every group is scored by the exact change of D_i, so
    D_i never rises."""
    out, cols = weight.shape
    W = weight.double()
    # Per weight, what pruning it adds to ε (a) and to the variance term (v).
    a = (W * mean.double()).reshape(out, -1, m)
    v = (W.square() * var.double()).reshape(out, -1, m)
    keep = mask.reshape(out, -1, m).clone()
    eps = (a * ~keep).sum((1, 2))
    err = dsnot_error(weight, mask, mean, var)
    rows = torch.arange(out, device=W.device)
    for _ in range(max_cycles):
        # Each group's positions with its M−N pruned ones first: pruned [..., :M−N], kept [..., M−N:].
        order = keep.to(torch.int8).argsort(dim=-1, stable=True)
        grow, prune = order[..., : m - n], order[..., m - n :]
        a_g, v_g, a_p, v_p = a.gather(-1, grow), v.gather(-1, grow), a.gather(-1, prune), v.gather(-1, prune)
        # After the swap ε becomes ε − a_g + a_p and the variance term loses v_g and gains v_p.
        new_eps = eps[:, None, None, None] - a_g[..., :, None] + a_p[..., None, :]  # [out, groups, M−N, N]
        delta = new_eps.square() - eps.square()[:, None, None, None] + v_p[..., None, :] - v_g[..., :, None]
        best, at = delta.reshape(out, -1).min(1)
        # A relative margin: a gain at rounding level could flip the same pair back and forth.
        better = best < -1e-9 * err.clamp_min(1e-30)
        if not better.any():
            break
        group, gi, pi = at // (n * (m - n)), at % (n * (m - n)) // n, at % n
        r, group, g, p = rows[better], group[better], grow[rows, group, gi][better], prune[rows, group, pi][better]
        keep[r, group, g], keep[r, group, p] = True, False
        eps[r] += a[r, group, p] - a[r, group, g]
        err[r] += best[better]
    return keep.reshape(out, cols)


class OfficialStats:
    """The statistics the official code (`WrappedGPT`) keeps of one linear's inputs, float32, one
    `add_sequence` per calibration sequence (the official code feeds one at a time), so the batch size
    does not matter:
      mean: Σ x_j over all tokens / sequences (= seqlen · E[x_j]: `update_threshold` is on this scale)
      var:  each sequence's population variance of x_j around its own mean, pooled over sequences by
            tokens (no between-sequence part, unlike `ChannelMoments.channel_var`)
      norm: sqrt(Σ x_j² over all tokens / sequences), Wanda's ‖x_j‖ up to a constant."""

    def __init__(self, linear: nn.Linear):
        cols, dev = linear.in_features, linear.weight.device
        self.sq, self.sum, self.var = (torch.zeros(cols, device=dev) for _ in range(3))
        self.sequences = self.tokens = 0

    def add_batch(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].detach()
        for seq in x if x.dim() == 3 else x[None]:
            self.add_sequence(seq.t().float())

    def add_sequence(self, x: torch.Tensor) -> None:  # [in, tokens]
        t = x.shape[1]
        v = torch.var(x, dim=1, unbiased=False)
        self.var = v if self.tokens == 0 else (self.var * self.tokens + v * t) / (self.tokens + t)
        self.tokens += t
        # running means over sequences, in the official order of operations
        self.sq *= self.sequences / (self.sequences + 1)
        self.sum *= self.sequences / (self.sequences + 1)
        self.sequences += 1
        self.sq += torch.norm(x, p=2, dim=1) ** 2 / self.sequences
        self.sum += x.sum(1) / self.sequences

    def mean(self) -> torch.Tensor:
        return self.sum

    def norm(self) -> torch.Tensor:
        return self.sq.sqrt()


def skipped(name: str, skip_layer: str) -> bool:
    """Whether the official code leaves this linear's initial mask alone: `skip_layer` names the
    sub-module kind it skips ("mlp" by default, so on LLaMA only attention is refined; "no_skip")."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-2] == skip_layer


@torch.no_grad()
def refine_official(weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    norm: torch.Tensor, n: int, m: int, *, max_cycles: int = 50, update_threshold: float = 0.1,
                    pow_of_var_regrowing: float = 1.0, same_sign: bool = True) -> torch.Tensor:
    """DSnoT as the official N:M code runs it (`prune_DSnoT`); statistics from `OfficialStats`.

    Per output row, with a_j = W_j·mean_j (what pruning weight j adds to the row's output shift),
    ε = Σ a_j over the pruned weights. Before the first cycle the columns are ranked once by
    a_j / var_j^p for the initially pruned ones (0 for the kept ones). Each cycle every live row:
      grow   g = the next column from the top of the ranking when ε > 0, from the bottom otherwise
             (each end has its own cursor, which moves every cycle);
      prune  p = in g's group, the weight with the least Wanda score |W|·norm among those the initial
             mask kept and no swap has pruned yet;
      and makes the swap if |ε| > update_threshold and, with `same_sign`, ε keeps the sign it had
      before the first cycle; otherwise the row stops. ε becomes ε + a_p − a_g.
    So |ε| may rise while its sign holds (the official rule; `refine_exact` never raises its objective).
    Where the official cursors walk off the columns it can use (a grown weight already kept, a group
    with no unused kept weight, the end of the row: narrow layers, in_features ~ 4·max_cycles), the
    official code corrupts the mask or fails; here that step ends the row instead. Float32, as there."""
    out, cols = weight.shape
    dev = weight.device
    keep = mask.to(dev).clone()
    if max_cycles <= 0:
        return keep
    W = weight.float()
    a = W * mean.to(dev).float()
    grow_score = torch.where(mask, torch.zeros_like(a), a)
    eps = grow_score.sum(1)
    sign0 = torch.sign(eps)
    if pow_of_var_regrowing:
        grow_score = grow_score / var.to(dev).float().pow(pow_of_var_regrowing)
    ranking = torch.sort(grow_score, dim=1, stable=True).indices
    # Finite: kept by the initial mask and not yet pruned by a swap, the only weights it may prune.
    prunable = torch.where(mask, W.abs() * norm.to(dev).float(), torch.full_like(a, float("inf")))
    rows, offsets = torch.arange(out, device=dev), torch.arange(m, device=dev)
    lo, hi = torch.zeros(out, dtype=torch.long, device=dev), torch.full((out,), cols - 1, device=dev)
    live = torch.ones(out, dtype=torch.bool, device=dev)
    for _ in range(max_cycles):
        if not live.any():
            break
        up = eps > 0
        at = torch.where(up, hi, lo)
        ok = (at >= 0) & (at < cols)
        g = ranking[rows, at.clamp(0, cols - 1)]
        hi, lo = hi - up.long(), lo + (~up).long()
        ok &= ~keep[rows, g]
        start = g - g % m
        group = prunable.gather(1, start[:, None] + offsets)
        least = group.argmin(1)  # ties: the lowest column
        ok &= torch.isfinite(group[rows, least])
        p = start + least
        after = eps + a[rows, p] - a[rows, g]
        live = live & ok & (eps.abs() > update_threshold)
        if same_sign:
            live &= torch.sign(after) == sign0
        r = rows[live]
        keep[r, p[live]], keep[r, g[live]] = False, True
        prunable[r, p[live]] = float("inf")
        eps = torch.where(live, after, eps)
    return keep
