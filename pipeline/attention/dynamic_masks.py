"""A dynamic attention mask as something a run keeps and runs: its method and budget, its learned
scorer (if any), how it decodes and what its KV cache costs, and its form in a mask artifact.

Methods: `learned` (DMA's value-state scorer, `dynamic.KeyScorer`), `h2o` and `snapkv` (scores from
the prompt's own attention), `key-norm`, `random` (no information, same budget), `oracle` (each query's
own dense attention: the ceiling, which no fixed-size cache can reproduce). Only `learned` has
parameters; the others are the rule of `kv_scores` with a score source and no trained state.

How each runs:
  decoding (retrieval)  query-agnostic sources decode with a cache evicted to the budget
                        (`dynamic.evict_decode`): learned, key norm and random score keys as they are
                        written; H2O and SnapKV score the prompt in one dense pass, the prefill runs
                        masked by those scores, then the cache is evicted as decoding goes on. The
                        oracle is query-dependent: masked decoding with the full cache
                        (`dynamic.masked_decode`), so its KV cache is dense.
  a whole window (perplexity)  `dynamic.dynamic` over each forward. H2O and SnapKV read causally there:
                        query i ranks keys by the attention of queries <= i (H2O: accumulated since the
                        start; SnapKV: over the last `obs_window` of them, pooled along keys), each
                        layer's own attention, so no token's mask depends on tokens after it.

Artifact format (manifest key `dynamic`, beside an artifact's N:M masks; `pipeline.io.artifacts`):
  method       one of METHODS
  budget       {"keys": int|null, "fraction": float|null, "sink": int, "window": int|null, "recent": float,
               "shares": [[float] * kv_heads] * layers | null} (`kv_scores.Budget`: shares, where given, are
               each KV head's recent share in place of `recent`; an artifact without "recent" was made when
               a window of null meant half the budget, and is read so)
  params       the method's own: `seed` (random), `obs_window`, `kernel`, `pool` (snapkv)
  shape        [layers, kv_heads, head_dim] of the base model it was made for
  fingerprint  `core.models.fingerprint` of the base model's decoder linears (as an attention plan's)
  scorer       learned only: {"file": "scorer.safetensors", "parameters": n, "fraction": n / model params,
               "tensors": {name: {"shape", "dtype", "sha256" of the tensor's raw bytes}}}
The scorer file (learned only) is a safetensors file of `KeyScorer`'s float32 parameters: `A` [layers,
kv_heads] and either `w`, [layers, kv_heads, kv_heads, head_dim] in DMA's form (each head scored from
every KV head's values) or [layers, kv_heads, head_dim] (each head from its own), or DMA's form
factored at rank r: `w_in` [layers, kv_heads, head_dim, r] and `w_out` [layers, kv_heads, r]. A mask
made for another base model is refused: shape first, then the fingerprint.
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.attention.dynamic import KeyScorer, dynamic, evict_decode, masked_decode, param_fraction, prompt_scores
from maskpipe.pipeline.attention.dynamic import cache_bytes as _cache_bytes
from maskpipe.pipeline.attention.kv_scores import Budget, KeyNormScores, OracleScores, random_scores
from maskpipe.pipeline.attention.plans import attended_keys, check_fingerprint, kv_heads
from maskpipe.pipeline.core.models import decoder_linears, fingerprint

METHODS = ("learned", "h2o", "snapkv", "key-norm", "random", "oracle")
SCORER_FILE = "scorer.safetensors"
UNRECORDED_RECENT = 0.5  # an artifact without `recent` dates from when a derived window was half


def geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim): what a scorer's shape must match."""
    c = model.config.get_text_config()
    layers, kv, _ = kv_heads(model)
    return layers, kv, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass
class DynamicMask:
    """A dynamic mask: `method` (METHODS), `budget`, the method's `params` and, for `learned`, its scorer."""

    method: str
    budget: Budget
    params: dict[str, Any] = field(default_factory=dict)
    scorer: KeyScorer | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise MaskpipeError(f"dynamic mask: unknown method {self.method!r} (one of {', '.join(METHODS)})")
        if (self.method == "learned") != (self.scorer is not None):
            raise MaskpipeError(f"dynamic mask: method {self.method} {'needs' if self.scorer is None else 'has no'} "
                                "learned scorer")

    # -------------------------------------------------------------------------------------- artifact form

    def tensors(self) -> dict[str, torch.Tensor]:
        """What the scorer file holds (empty without a scorer)."""
        return {} if self.scorer is None else {k: v.detach().float().cpu().contiguous()
                                               for k, v in self.scorer.state_dict().items()}

    def to_json(self, model: nn.Module, fingerprint=fingerprint) -> dict[str, Any]:
        out = {"method": self.method,
               "budget": {"keys": self.budget.keys, "fraction": self.budget.fraction, "sink": self.budget.sink,
                          "window": self.budget.window, "recent": self.budget.recent,
                          "shares": None if self.budget.shares is None else [list(r) for r in self.budget.shares]},
               "params": self.params, "shape": list(geometry(model)),
               "fingerprint": fingerprint(decoder_linears(model))}
        if self.scorer is not None:
            n, frac = param_fraction(self.scorer, model)
            out["scorer"] = {"file": SCORER_FILE, "parameters": n, "fraction": frac,
                             "tensors": {k: {"shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1],
                                             "sha256": _sha256(t)} for k, t in self.tensors().items()}}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], folder: Path | None, source: str) -> DynamicMask:
        """The mask of an artifact (`folder` holds its scorer file), every scorer tensor checked against
        the sha256 and shape its manifest lists."""
        try:
            b = obj["budget"]
            shares = b.get("shares")
            budget = Budget(keys=b["keys"], fraction=b["fraction"], sink=b["sink"], window=b["window"],
                            recent=b.get("recent", UNRECORDED_RECENT),
                            shares=None if shares is None else tuple(tuple(float(x) for x in r) for r in shares))
            method, params = obj["method"], dict(obj.get("params") or {})
            if shares is not None and [len(shares), len(shares[0])] != list(obj["shape"][:2]):
                raise ValueError(f"shares for {len(shares)} x {len(shares[0])} heads, shape {obj['shape']}")
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise MaskpipeError(f"{source}: malformed dynamic mask ({type(e).__name__}: {e})") from None
        scorer = None
        if method == "learned":
            scorer = _read_scorer(obj, folder, source)
        try:
            return cls(method, budget, params, scorer)
        except MaskpipeError as e:
            raise MaskpipeError(f"{source}: {e}") from None

    # -------------------------------------------------------------------------------------- running

    @contextmanager
    def running(self, model: nn.Module):
        """`model` masked by the rule in every forward (perplexity, or any whole-window use)."""
        with dynamic(model, self._window_source(model), self.budget):
            yield model

    def _window_source(self, model: nn.Module):
        if self.scorer is not None:
            self.scorer.to(next(model.parameters()).device)
            return self.scorer
        if self.method in ("h2o", "snapkv"):
            return CausalAttentionScores(self.method, **self.params)
        return {"key-norm": KeyNormScores, "oracle": OracleScores}.get(self.method, lambda: RandomKeys(**self.params))()

    def decode(self, model: nn.Module, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding of one prompt ids [1, L] under the mask (see the module's docstring)."""
        if self.method == "oracle":
            return masked_decode(model, OracleScores(), self.budget, ids, max_new_tokens)
        if self.method in ("h2o", "snapkv"):
            snap = {k: v for k, v in self.params.items() if k in ("obs_window", "kernel", "pool")}
            source = prompt_scores(model, ids, **snap)[self.method]
        elif self.method == "random":
            layers, kv, _ = geometry(model)
            source = random_scores(ids.shape[1], layers, kv, self.params.get("seed", 0), ids.shape[0])
        else:
            source = self._window_source(model)
        return evict_decode(model, source, self.budget, ids, max_new_tokens)

    def cost(self, model: nn.Module, length: int) -> dict[str, float]:
        """KV cache after a prefill of `length` tokens (`dynamic.cache_bytes`; the oracle keeps the full
        cache) and the attention FLOPs of that prefill (each query attends to at most its budget of keys),
        beside dense: the keys of the retrieval cost summary, as `plans.plan_cost` gives a static plan."""
        layers, kv, head_dim = geometry(model)
        group = kv_heads(model)[2]
        kept = min(self.budget.count(length), length)
        out = _cache_bytes(model, length, self.budget)
        if self.method == "oracle":
            out |= {"kv_cache_bytes": out["dense_kv_cache_bytes"], "kv_cache_fraction": 1.0, "keys_per_head": length}
        q = torch.arange(1, length + 1)
        flops = 4 * head_dim * group * layers * kv * int(q.clamp(max=kept).sum())
        full = 4 * head_dim * group * layers * kv * attended_keys(length, 0, None)
        return out | {"attention_flops": flops, "attention_flops_fraction": flops / full}

    def describe(self) -> str:
        b = self.budget
        keep = f"{b.fraction:.0%} of the keys" if b.fraction is not None else f"{b.keys} keys"
        return f"dynamic {self.method}: {keep} per KV head (sink {b.sink}, window {window_text(b.window, b.recent, b.shares)})"


def _read_scorer(obj: dict[str, Any], folder: Path | None, source: str) -> KeyScorer:
    info = obj.get("scorer")
    shape = obj.get("shape")
    if not isinstance(info, dict) or not isinstance(shape, list) or len(shape) != 3 or folder is None:
        raise MaskpipeError(f"{source}: malformed dynamic mask (a learned one lists its scorer and shape)")
    path = Path(folder) / info.get("file", SCORER_FILE)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise MaskpipeError(f"{path}: unreadable ({e})") from None
    listed = info.get("tensors", {})
    if set(tensors) != set(listed) or set(listed) not in ({"w", "A"}, {"w_in", "w_out", "A"}):
        raise MaskpipeError(f"{path}: holds tensors {sorted(tensors)}, the manifest lists {sorted(listed)}")
    for name, t in tensors.items():
        if list(t.shape) != listed[name]["shape"] or _sha256(t) != listed[name]["sha256"]:
            raise MaskpipeError(f"{path}: {name}: checksum or shape mismatch (corrupted artifact)")
    try:
        rank = tensors["w_in"].shape[-1] if "w_in" in tensors else None
        scorer = KeyScorer(*shape, mix_heads=rank is not None or tensors["w"].dim() == 4, rank=rank)
        scorer.load_state_dict({k: t.float() for k, t in tensors.items()})
    except RuntimeError as e:
        raise MaskpipeError(f"{path}: does not fit its manifest's shape {shape}: {str(e).splitlines()[0]}") from None
    except (ValueError, IndexError) as e:  # a rank-0 factor, a tensor of too few dimensions
        raise MaskpipeError(f"{path}: malformed scorer tensors: {e}") from None
    return scorer


def check_dynamic(obj: dict[str, Any], model: nn.Module, source: str, fingerprint=fingerprint) -> None:
    """Refuse a dynamic mask made for another base model: its shape (layers x KV heads x head_dim), then
    the fingerprint of the model's decoder linears."""
    ours = list(geometry(model))
    if obj.get("shape") != ours:
        raise MaskpipeError(f"{source}: dynamic mask is for layers x KV heads x head_dim {obj.get('shape')}, "
                            f"the model has {ours}")
    check_fingerprint(obj.get("fingerprint"), model, source, "dynamic mask", fingerprint)


def window_text(window: int | None, recent: float | str, shares=None) -> str:
    if window is not None:
        return str(window)
    if shares is not None or recent == "profile":
        return "a share of the budget per KV head, from a profile"
    return f"{recent:.0%} of the budget"


def shares_text(shares) -> str:
    """Per-head recent shares as one line: layers separated by ";", a layer's KV heads by spaces."""
    return "; ".join(" ".join(f"{x:g}" for x in row) for row in shares)


def card_lines(obj: dict[str, Any]) -> list[str]:
    """What a model card says of an artifact's dynamic mask: method, budget, scorer size."""
    b = obj["budget"]
    keep = f"{b['fraction']:.0%} of the keys" if b.get("fraction") is not None else f"{b['keys']} keys"
    lines = [f"- method: `{obj['method']}`",
             f"- budget: {keep} per KV head and query (sink {b['sink']}, window {window_text(b['window'], b.get('recent', UNRECORDED_RECENT), b.get('shares'))}, "
             "the rest top-k by score)"]
    if b.get("shares"):
        lines.append(f"- recent share of the budget, per layer (KV heads in order): {shares_text(b['shares'])}")
    s = obj.get("scorer")
    lines.append(f"- scorer: {s['parameters']:,} parameters ({100 * s['fraction']:.4f}% of the model), in "
                 f"`{s['file']}`" if s else "- scorer: none (training-free: no parameters)")
    return lines


# ---------------------------------------------------------------------------------------------- sources


class RandomKeys:
    """Uniform random scores per (layer, KV head, key) drawn anew for each forward's length."""

    query_agnostic = True

    def __init__(self, seed: int = 0, **_):
        self.seed = seed

    def scores(self, layer, query, key, value, q_pos=None, k_pos=None, scaling=None):
        g = torch.Generator().manual_seed(self.seed * 7919 + layer)
        b, h, n, _ = key.shape
        return torch.rand(b, h, n, generator=g).to(key.device)


class CausalAttentionScores:
    """H2O and SnapKV in a whole-window forward, read causally: query i ranks keys by the attention
    its layer's queries <= i paid them (summed over the group's query heads), H2O over all of them,
    SnapKV over the last `obs_window` and max/avg-pooled along keys. Query-dependent [B, Hkv, Lq, Lk]."""

    query_agnostic = False

    def __init__(self, method: str, obs_window: int = 32, kernel: int = 7, pool: str = "max", **_):
        self.method, self.obs_window, self.kernel, self.pool = method, obs_window, kernel, pool

    def scores(self, layer, query, key, value, q_pos=None, k_pos=None, scaling=None):
        kvh, group = key.shape[1], query.shape[1] // key.shape[1]
        k = key.float().repeat_interleave(group, dim=1)
        logits = (query.float() @ k.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        probs = logits.masked_fill(k_pos[None, :] > q_pos[:, None], -math.inf).softmax(-1)
        probs = probs.unflatten(1, (kvh, group)).sum(2)  # [B, Hkv, Lq, Lk]
        acc = probs.cumsum(2)
        if self.method == "h2o":
            return acc
        w = self.obs_window
        votes = acc - F.pad(acc, (0, 0, w, 0))[:, :, : acc.shape[2]]  # rows i-w+1..i
        b, h, lq, lk = votes.shape
        pool = F.max_pool1d if self.pool == "max" else F.avg_pool1d
        pooled = pool(votes.reshape(b * h * lq, 1, lk), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.reshape(b, h, lq, lk)
