"""Perplexity with the standard wikitext-2 protocol.

The evaluation text is the corpus joined with "\\n\\n", tokenized once, cut into non-overlapping windows
of `seqlen` tokens with the trailing partial window dropped (SparseGPT / Wanda / MaskLLM). With a
`stride` < seqlen, windows start every `stride` tokens and each scores only the tokens no earlier
window scored (the sliding-window protocol of the transformers perplexity guide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from maskpipe.pipeline import MaskpipeError


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token
    tokens: int  # tokens scored
    windows: int


def windows(n_tokens: int, seqlen: int, stride: int | None, check: bool = False) -> list[tuple[int, int, int]]:
    """(start, end, first scored position within the window) for every evaluation window; with `check`,
    a text too short for a single one is refused."""
    if check and not windows(n_tokens, seqlen, stride):
        raise MaskpipeError(f"evaluation text has {n_tokens} tokens, fewer than one window of {seqlen}")
    if stride is None or stride == seqlen:
        return [(s, s + seqlen, 1) for s in range(0, n_tokens - seqlen + 1, seqlen)]
    out, scored_until = [], 0
    for start in range(0, n_tokens - 1, stride):
        end = min(start + seqlen, n_tokens)
        out.append((start, end, max(scored_until - start, 1)))
        scored_until = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, seqlen: int, stride: int | None = None, batch_size: int = 1,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity of `model` over the 1-D token tensor `ids`; batch size never changes the number."""
    spans = windows(len(ids), seqlen, stride, check=True)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    # Windows of one length batch together; only the last sliding window can be shorter.
    by_len: dict[int, list[tuple[int, int, int]]] = {}
    for span in spans:
        by_len.setdefault(span[1] - span[0], []).append(span)
    bar = tqdm(total=len(spans), desc=desc, leave=False, disable=None)  # no bar when not a terminal
    for group in by_len.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = torch.stack([ids[s:e] for s, e, _ in chunk]).to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
            for row, (_, _, first) in zip(nll, chunk):
                total_nll += row[first - 1 :].double().sum().item()
                total_tokens += row.numel() - (first - 1)
            bar.update(len(chunk))
    bar.close()
    mean = total_nll / total_tokens
    return Perplexity(ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=len(spans))
