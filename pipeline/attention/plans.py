"""Per-head attention plans: each KV head keeps full causal attention or becomes a streaming head
(the first `sink` tokens plus a window of the `window` most recent ones), as in DuoAttention (Xiao et
al. 2024, arXiv 2410.10819); streaming heads may get windows of different sizes, as in MoA (Fu et al.
2024, arXiv 2406.14909).

Under grouped-query attention a plan is per KV head, and every query head of a group follows it, so
a streaming head's KV cache really is `sink + window` tokens. Plans run inside any Hugging Face model
that dispatches attention through transformers' AttentionInterface: on CUDA through FlexAttention
(a block mask from a per-head `mask_mod`, so masked blocks are never computed), elsewhere through
SDPA with an explicit boolean mask (exact, but dense compute).

Learning the gates that choose a plan (DuoAttention) is in `pipeline.attention.gates`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.models import decoder_blocks, decoder_linears, fingerprint

IMPLEMENTATION = "maskpipe_heads"  # the name the plans run under in transformers' AttentionInterface
FULL, STREAMING = "full", "streaming"


# ---------------------------------------------------------------------------------------------- plans


@dataclass
class AttentionPlan:
    """Per (layer, KV head): streaming or full, its sink and window (ignored for full heads), and the
    learned gate it was chosen by (NaN for plans that were not learned). Tensors are [layers, kv_heads]."""

    streaming: torch.Tensor  # bool
    sink: torch.Tensor  # long
    window: torch.Tensor  # long
    gate: torch.Tensor  # float

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.streaming.shape)

    def streaming_fraction(self) -> float:
        return self.streaming.float().mean().item()

    def to_json(self, model: nn.Module | None = None) -> dict[str, Any]:
        layers = [[{"pattern": STREAMING if s else FULL, "sink": int(k), "window": int(w),
                    "gate": None if math.isnan(g) else round(float(g), 6)}
                   for s, k, w, g in zip(*(t[i].tolist() for t in (self.streaming, self.sink, self.window, self.gate)))]
                  for i in range(self.shape[0])]
        out = {"layers": layers, "kv_heads": self.shape[1], "streaming_fraction": self.streaming_fraction()}
        if model is not None:
            out["fingerprint"] = fingerprint(decoder_linears(model))
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], source: str = "attention plan") -> AttentionPlan:
        try:
            heads = [[(h["pattern"], h["sink"], h["window"], h["gate"]) for h in layer] for layer in obj["layers"]]
            patterns = {p for layer in heads for p, *_ in layer}
        except (KeyError, TypeError) as e:
            raise MaskpipeError(f"{source}: malformed attention plan ({type(e).__name__}: {e})") from None
        if patterns - {FULL, STREAMING} or len({len(layer) for layer in heads}) != 1:
            raise MaskpipeError(f"{source}: malformed attention plan (patterns {sorted(patterns)}, "
                                f"heads per layer {sorted({len(layer) for layer in heads})})")
        return cls(
            streaming=torch.tensor([[p == STREAMING for p, *_ in layer] for layer in heads]),
            sink=torch.tensor([[k for _, k, _, _ in layer] for layer in heads]),
            window=torch.tensor([[w for _, _, w, _ in layer] for layer in heads]),
            gate=torch.tensor([[math.nan if g is None else g for *_, g in layer] for layer in heads]),
        )


def kv_heads(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads per layer, query heads per KV head) of a decoder-only model."""
    c = model.config.get_text_config()
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_hidden_layers, kv, c.num_attention_heads // kv


def default_sink_window(context: int) -> tuple[int, int]:
    """Streaming defaults scaled to the context: sink 1/64 and window 1/8 of it (8 + 64 at 512 tokens).
    The window is DuoAttention's 256 recent tokens at a 2k context; the sink is smaller than its 128, as
    a few first tokens already absorb the attention sink (StreamingLLM keeps 4)."""
    return max(context // 64, 1), max(context // 8, 1)


def uniform_plan(shape: tuple[int, int], streaming: torch.Tensor | bool, sink: int, window: int,
                 gate: torch.Tensor | None = None) -> AttentionPlan:
    """A plan whose streaming heads (a [layers, kv_heads] mask, or True/False for all) share one sink and window."""
    streaming = torch.as_tensor(streaming, dtype=torch.bool).expand(shape).clone()
    return AttentionPlan(streaming, torch.full(shape, sink), torch.full(shape, window),
                         torch.full(shape, math.nan) if gate is None else gate.detach().float().cpu().clone())


def binarize(gates: torch.Tensor, *, fraction: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Streaming heads from gates: the round(fraction · heads) lowest gates (ties broken by head order),
    or every head whose gate is below `threshold`."""
    if (fraction is None) == (threshold is None):
        raise MaskpipeError("binarize: give exactly one of fraction or threshold")
    if threshold is not None:
        return gates < threshold
    order = torch.sort(gates.flatten(), stable=True).indices
    streaming = torch.zeros(gates.numel(), dtype=torch.bool)
    streaming[order[: round(fraction * gates.numel())]] = True
    return streaming.reshape(gates.shape)


def random_scores(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Stand-ins for gates, uniform at random: binarised at a learned plan's fraction they give the
    random baseline with the same budget."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def moa_windows(gates: torch.Tensor, streaming: torch.Tensor, windows: list[int]) -> torch.Tensor:
    """MoA-style heterogeneous windows: the streaming heads, ranked by gate, split into len(windows)
    equal groups; the lower a head's gate (the less it needs far context), the smaller its window."""
    out = torch.zeros(gates.shape, dtype=torch.long)
    idx = streaming.flatten().nonzero().flatten()
    ranked = idx[torch.sort(gates.flatten()[idx], stable=True).indices]
    for group, w in zip(torch.tensor_split(ranked, len(windows)), sorted(windows)):
        out.view(-1)[group] = w
    return out


# ---------------------------------------------------------------------------------------------- cost


def attended_keys(length: int, sink: int, window: int | None) -> int:
    """Query-key pairs a causal head computes over a prefill of `length` tokens (window None: full)."""
    q = torch.arange(1, length + 1)  # keys visible to each query under causal attention
    if window is None:
        return int(q.sum())
    recent = q.clamp(max=window)
    return int((recent + (q - recent).clamp(max=sink)).sum())


def plan_cost(plan: AttentionPlan, length: int, head_dim: int, group: int, dtype_bytes: int = 2) -> dict[str, float]:
    """KV-cache bytes after a prefill of `length` tokens (per sequence) and attention FLOPs of that
    prefill (QKᵀ and PV, 2 FLOPs per multiply-add), beside the full-attention figures."""
    kv_tokens = flops = 0
    for s, k, w in zip(plan.streaming.flatten().tolist(), plan.sink.flatten().tolist(), plan.window.flatten().tolist()):
        kv_tokens += min(length, k + w) if s else length
        flops += 4 * head_dim * group * attended_keys(length, k, w if s else None)
    heads = plan.streaming.numel()
    full_flops = 4 * head_dim * group * heads * attended_keys(length, 0, None)
    return {"kv_cache_bytes": 2 * head_dim * dtype_bytes * kv_tokens, "kv_cache_fraction": kv_tokens / (heads * length),
            "attention_flops": flops, "attention_flops_fraction": flops / full_flops}


# ---------------------------------------------------------------------------------------------- execution


@dataclass
class LayerHeads:
    """What one attention module runs: the layer's row of a plan (on the module's device), the gates
    mixing in full attention while they learn, and the backend."""

    streaming: torch.Tensor
    sink: torch.Tensor
    window: torch.Tensor
    gate: torch.Tensor | None
    backend: str
    block_masks: dict = field(default_factory=dict)  # FlexAttention block masks by (Lq, Lk, device)

    def allowed(self, kv_head, q_pos, k_pos, start=0):
        """The one definition of the pattern: causal, and for a streaming head only sink or recent keys.
        Broadcasts over tensors (the SDPA mask) and runs per element as a FlexAttention mask_mod.
        `start` is where each sequence's first real token sits (left padding): the sink is counted from
        there, so a padded prompt keeps the same sink as it has alone."""
        full_head = ~self.streaming[kv_head]
        is_sink = k_pos - start < self.sink[kv_head]
        is_recent = q_pos - k_pos < self.window[kv_head]
        return (k_pos <= q_pos) & (full_head | is_sink | is_recent)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each decoder block (the one that carries `layer_idx`)."""
    mods = []
    for block in decoder_blocks(model):
        found = [m for m in block.modules() if hasattr(m, "layer_idx") and "Attention" in type(m).__name__]
        if len(found) != 1:
            raise MaskpipeError(f"unsupported architecture {type(model).__name__}: expected one attention module "
                                f"with a layer_idx per decoder block, found {len(found)}")
        mods.append(found[0])
    return mods


def _sdpa(query, key, value, mask, scaling, group):
    from transformers.integrations.sdpa_attention import repeat_kv

    return torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(key, group), repeat_kv(value, group), attn_mask=mask, scale=scaling)


def _flex(heads: LayerHeads, query, key, value, offset, scaling, group):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return heads.allowed(h // group, q_idx + offset, kv_idx)

    # One block mask per layer and shape: building it is the expensive part of a short forward.
    cache_key = (query.shape[2], key.shape[2], str(query.device))
    if cache_key not in heads.block_masks:
        # Eager create_block_mask materialises the whole [heads, Lq, Lk] boolean mask (34 GB at 32 query
        # heads and 32k tokens); compiled, it evaluates the mask_mod block by block, as torch advises.
        make = create_block_mask if query.device.type == "cpu" else _compiled(create_block_mask)
        heads.block_masks[cache_key] = make(mask_mod, None, query.shape[1], query.shape[2], key.shape[2],
                                            device=query.device)
    run = flex_attention if query.device.type == "cpu" else _compiled(flex_attention)
    return run(query, key, value, block_mask=heads.block_masks[cache_key], scale=scaling, enable_gqa=group > 1)


def _compiled(fn):
    """`fn` compiled once per process, with torch's automatic dynamic shapes: the first length compiles
    static, the second recompiles with symbolic lengths that later ones reuse. Static shapes (one graph
    per length) hit torch's recompile limit within a retrieval sweep and fell back to eager, which
    materialises the whole mask; on the CPU's compiled FlexAttention, five lengths 256-768 made 4 graphs
    instead of 10 and the last three compiled in 0.1 s instead of ~9 s each, exact against SDPA
    (`benchmarks/flex_recompiles.py`)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=None)
    return _COMPILED[fn]


_COMPILED: dict = {}


def planned_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] (the cache
    included), so query i sits at position Lk − Lq + i. Returns ([B, Lq, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    heads: LayerHeads | None = getattr(module, "maskpipe_heads", None)
    if heads is None or (not bool(heads.streaming.any()) and heads.gate is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise MaskpipeError(f"{IMPLEMENTATION}: expected a boolean attention mask, got {attention_mask.dtype}")
    group, offset = query.shape[1] // key.shape[1], key.shape[2] - query.shape[2]
    # Decoding steps (one query) take SDPA: their mask is one row, and a block mask per new length would cost more.
    use_flex = attention_mask is None and query.shape[2] > 1 and (
        heads.backend == "flex" or (heads.backend == "auto" and query.is_cuda))
    if use_flex:
        out = _flex(heads, query, key, value, offset, scaling, group)
    else:
        q_pos = torch.arange(query.shape[2], device=query.device)[:, None] + offset
        k_pos = torch.arange(key.shape[2], device=query.device)[None, :]
        kv_head = torch.arange(query.shape[1], device=query.device)[:, None, None] // group
        if attention_mask is None:
            mask = heads.allowed(kv_head, q_pos, k_pos)[None]  # [1, Hq, Lq, Lk]
        else:
            # Left padding: the last query row (a real token) sees exactly the real keys, so its first
            # visible key is where the sequence starts.
            start = attention_mask[:, 0, -1, :].int().argmax(-1)[:, None, None, None]
            mask = heads.allowed(kv_head[None], q_pos[None], k_pos[None], start) & attention_mask
            # Padding queries may see no key at all; let them see every key rather than produce NaNs
            # that would flow into the next layer's keys (their outputs are never used).
            mask = mask | ~mask.any(-1, keepdim=True)
        out = _sdpa(query, key, value, mask, scaling, group)
    if heads.gate is not None:
        full, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        alpha = heads.gate.to(out.dtype).repeat_interleave(group)[None, :, None, None]
        out = alpha * full.transpose(1, 2) + (1 - alpha) * out
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make IMPLEMENTATION a transformers attention implementation (masks built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, planned_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def planned(model: nn.Module, plan: AttentionPlan | None, gates: torch.Tensor | None = None, backend: str = "auto"):
    """Run `model` under `plan` (None: unchanged); with `gates` [layers, kv_heads] each head's output
    is gate·full + (1 − gate)·planned, differentiably in the gates. Restores the model on exit."""
    if plan is None:
        yield model
        return
    modules = attention_modules(model)
    if plan.shape != kv_heads(model)[:2]:
        raise MaskpipeError(f"attention plan is for {plan.shape[0]} layers x {plan.shape[1]} KV heads, the model has "
                            f"{kv_heads(model)[0]} x {kv_heads(model)[1]}")
    register()
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        for i, mod in enumerate(modules):
            mod.maskpipe_heads = LayerHeads(plan.streaming[i].to(device), plan.sink[i].to(device),
                                            plan.window[i].to(device), None if gates is None else gates[i], backend)
        yield model
    finally:
        for mod in modules:
            mod.__dict__.pop("maskpipe_heads", None)
        model.set_attn_implementation(previous)


def check_plan(plan_json: dict[str, Any], model: nn.Module, source: str, fingerprint=fingerprint) -> AttentionPlan:
    """The plan of an artifact, refused before use if it was made for another base model."""
    plan = AttentionPlan.from_json(plan_json, source)
    if plan.shape != kv_heads(model)[:2]:
        raise MaskpipeError(f"{source}: attention plan is for {plan.shape[0]} layers x {plan.shape[1]} KV heads, "
                            f"the model has {kv_heads(model)[0]} x {kv_heads(model)[1]}")
    check_fingerprint(plan_json.get("fingerprint"), model, source, "attention plan", fingerprint)
    return plan


def check_fingerprint(recorded: str | None, model: nn.Module, source: str, what: str, fingerprint=fingerprint) -> None:
    """Refuse an attention mask (`what`) made for another base model: the fingerprint of its decoder linears."""
    ours = fingerprint(decoder_linears(model))
    if recorded != ours:
        raise MaskpipeError(f"{source}: base model fingerprint mismatch: the {what} was made for {recorded}, "
                            f"this model is {ours}")
