"""Reading and writing the artifacts other projects publish: MaskLLM masks and DuoAttention head plans.

MaskLLM (Fang et al. 2024, NVlabs/MaskLLM) releases a learned mask as `mask_compressed.npz` in its Hub
repositories: one array per masked parameter, keyed `<parameter name>.mask` (for example
`model.layers.0.mlp.up_proj.weight.mask`), holding `np.packbits` (big-endian bit order, numpy's
default) of the flattened boolean keep-mask, 1 = kept. Their loaders `np.unpackbits` it and view it
as the parameter's shape. maskpipe reads it with `np.load(allow_pickle=False)`: an npz holding an
object array is refused, never unpickled.

DuoAttention (Xiao et al. 2024, mit-han-lab/duo-attention) releases a head pattern as a directory:
`full_attention_heads.tsv`, one row per decoder layer and one tab-separated gate α ∈ [0, 1] per KV
head (α = how much the head needs full attention), and `config.json` with `sink_size` and
`recent_size` (the streaming heads' sink and window). Their `sparsify_attention_heads` binarises the
gates, after clipping them to [0, 1]: at a target `sparsity` the threshold is `np.quantile(gates,
sparsity)` and heads with gate >= threshold stay full (sparsity 0: all full, 1: all streaming); or a
fixed `threshold`. They break ties with noise of up to 1e-6 added to the gates, drawn from numpy's
global generator after their scripts seed it with 42 (`seed_everything(42)`). Imports follow that rule
exactly by default (`ties="upstream"`: the same plan DuoAttention's own code makes from the file);
`ties="head-order"` breaks ties by head order instead, without noise. The manifest's method params say
which rule a plan used.

The importers check everything against the base model before writing anything, and write ordinary
maskpipe artifacts (`pipeline.io.artifacts`): fingerprinted, so they never apply to another model.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.artifacts import atomic_dir, atomic_file, load_artifact, read_manifest, save_artifact
from maskpipe.pipeline.attention.plans import AttentionPlan, kv_heads
from maskpipe.pipeline.core.models import base_weight
from maskpipe.pipeline.nm.sparsity import is_nm
from maskpipe.pipeline.core.vocab import Pattern

MASKLLM_SUFFIX = ".weight.mask"  # what MaskLLM appends to a linear's module name
DUO_GATES, DUO_CONFIG = "full_attention_heads.tsv", "config.json"


# ---------------------------------------------------------------------------------------------- MaskLLM


def read_maskllm(path: str | Path, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The bool keep-masks of a MaskLLM `mask_compressed.npz`, by linear name, each checked against
    the model: its key must name a prunable linear's weight and its bits fill exactly that weight."""
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise MaskpipeError(f"{path}: not a readable .npz file ({e})") from None
    masks = {}
    with npz:
        if not npz.files:
            raise MaskpipeError(f"{path}: holds no masks")
        for key in npz.files:
            if not key.endswith(MASKLLM_SUFFIX):
                raise MaskpipeError(f"{path}: key {key!r} is not a MaskLLM mask key (<linear>{MASKLLM_SUFFIX})")
            name = key[: -len(MASKLLM_SUFFIX)]
            if name not in linears:
                raise MaskpipeError(f"{path}: key {key!r}: the model has no prunable linear {name!r}")
            try:
                packed = npz[key]
            except ValueError as e:  # an object array: numpy refuses to unpickle it
                raise MaskpipeError(f"{path}: key {key!r}: {e}") from None
            shape = tuple(base_weight(linears[name]).shape)
            numel = math.prod(shape)
            if packed.dtype != np.uint8 or packed.size != -(-numel // 8):
                raise MaskpipeError(f"{path}: key {key!r}: expected {-(-numel // 8)} packed uint8 bytes for a "
                                    f"{list(shape)} weight, got {packed.size} of {packed.dtype}")
            bits = np.unpackbits(packed.reshape(-1))[:numel]
            masks[name] = torch.from_numpy(bits.reshape(shape).astype(bool))
    return masks


def infer_pattern(masks: dict[str, torch.Tensor], source: str) -> Pattern:
    """The N:M pattern every mask follows, with the smallest M (a 2:4 mask is also 4:8; a 1:2 one also 2:4)."""
    width = math.gcd(*(m.shape[-1] for m in masks.values()))
    first = next(iter(masks.values()))
    for m in range(2, min(width, 256) + 1):
        if width % m:
            continue
        n = int(first.reshape(-1, m)[0].sum())
        if 0 < n < m and all(is_nm(mask, n, m) for mask in masks.values()):
            return Pattern(n, m)
    raise MaskpipeError(f"{source}: the masks follow no N:M pattern (M up to {min(width, 256)}); "
                        "give --pattern to see which layer breaks it")


def check_pattern(masks: dict[str, torch.Tensor], pattern: Pattern, source: str) -> None:
    n, m = pattern
    for name, mask in masks.items():
        if mask.shape[-1] % m:
            raise MaskpipeError(f"{source}: {name}: input dimension {mask.shape[-1]} is not divisible by M={m}")
        counts = mask.reshape(-1, m).sum(-1)
        bad = (counts != n).nonzero().flatten()
        if len(bad):
            g = int(bad[0])
            raise MaskpipeError(f"{source}: {name}: group {g} (row {g * m // mask.shape[-1]}) keeps "
                                f"{int(counts[g])} of {m}, not {pattern} ({len(bad)} groups break it)")


def import_maskllm(path: str | Path, model: nn.Module, linears: dict[str, nn.Linear], out: str | Path, *,
                   base_model: dict[str, Any], pattern: Pattern | str | None = None) -> Path:
    """A maskpipe artifact at `out` from a MaskLLM `mask_compressed.npz` (pattern inferred unless given)."""
    path = Path(path)
    masks = read_maskllm(path, linears)
    if pattern is None:
        pattern = infer_pattern(masks, str(path))
    else:
        try:
            pattern = Pattern.parse(pattern)
        except ValueError as e:
            raise MaskpipeError(f"--pattern: {e}") from None
        check_pattern(masks, pattern, str(path))
    return save_artifact(out, masks, linears, base_model=base_model, pattern=pattern,
                         method={"name": "maskllm-import", "params": {"format": "maskllm mask_compressed.npz"},
                                 "source": str(path), "source_sha256": _file_sha256(path)},
                         data={"note": "imported: the data it was learned on is unknown to maskpipe"})


def export_maskllm(artifact: str | Path, out: str | Path) -> Path:
    """An artifact's N:M masks as a MaskLLM `mask_compressed.npz` (written atomically)."""
    masks, _ = load_artifact(artifact)
    if not masks:
        raise MaskpipeError(f"{artifact}: the artifact holds no N:M masks (an attention plan alone)")
    arrays = {f"{name}{MASKLLM_SUFFIX}": np.packbits(mask.numpy().astype(bool).reshape(-1))
              for name, mask in sorted(masks.items())}
    return atomic_file(out, lambda f: np.savez_compressed(f, **arrays), binary=True)


# ---------------------------------------------------------------------------------------------- DuoAttention


def read_duo_gates(path: str | Path, shape: tuple[int, int]) -> tuple[np.ndarray, Path]:
    """The gates [layers, kv_heads] of a DuoAttention `full_attention_heads.tsv` (or its directory),
    checked against the model's shape and clipped to [0, 1] as DuoAttention does; and the file read."""
    path = Path(path)
    tsv = path / DUO_GATES if path.is_dir() else path
    try:
        gates = np.loadtxt(tsv, dtype=np.float64, delimiter="\t", ndmin=2)
    except (OSError, ValueError) as e:
        raise MaskpipeError(f"{tsv}: not a readable DuoAttention gate table ({e})") from None
    if gates.shape != tuple(shape):
        raise MaskpipeError(f"{tsv}: {gates.shape[0]} rows x {gates.shape[1]} gates, the model has "
                            f"{shape[0]} layers x {shape[1]} KV heads")
    if not np.isfinite(gates).all():
        raise MaskpipeError(f"{tsv}: holds a gate that is not a finite number")
    return np.clip(gates, 0, 1), tsv


def read_duo_config(path: str | Path) -> dict[str, int]:
    """`sink_size` and `recent_size` of the `config.json` beside (or in) a DuoAttention pattern; {} if none."""
    path = Path(path)
    cfg = (path if path.is_dir() else path.parent) / DUO_CONFIG
    if not cfg.is_file():
        return {}
    try:
        obj = json.loads(cfg.read_text())
        return {k: int(obj[k]) for k in ("sink_size", "recent_size") if k in obj}
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise MaskpipeError(f"{cfg}: not a readable DuoAttention config ({e})") from None


TIE_RULES = ("upstream", "head-order")
UPSTREAM_SEED = 42  # duo_attn's seed_everything(42) before sparsify_attention_heads


def duo_streaming(gates: np.ndarray, *, sparsity: float | None = None, threshold: float | None = None,
                  ties: str = "upstream") -> np.ndarray:
    """Streaming heads as DuoAttention's `sparsify_attention_heads` chooses them: full where gate >=
    np.quantile(gates, sparsity) (or >= threshold). Ties: `upstream` adds their noise (uniform in
    [0, 1e-6), numpy's legacy generator seeded 42) first, as their code does; `head-order` breaks them
    by head order, without noise."""
    if (sparsity is None) == (threshold is None):
        raise MaskpipeError("give exactly one of --sparsity and --threshold")
    if ties not in TIE_RULES:
        raise MaskpipeError(f"--ties: expected one of {', '.join(TIE_RULES)}, got {ties!r}")
    if sparsity is not None and not 0 <= sparsity <= 1:
        raise MaskpipeError(f"--sparsity: expected a fraction in [0, 1], got {sparsity}")
    if ties == "upstream":
        noisy = gates + np.random.RandomState(UPSTREAM_SEED).uniform(0, 1e-6, gates.shape)
        if sparsity is not None:
            threshold = 2 if sparsity >= 1 else -1 if sparsity <= 0 else np.quantile(noisy, sparsity)
        return ~(noisy >= threshold)
    if threshold is not None:
        return gates < threshold
    if sparsity >= 1:
        return np.ones(gates.shape, dtype=bool)
    # Rank the heads (stable: equal gates in head order) and take the quantile over the ranks: the
    # heads below it are those the noise-free quantile of distinct gates would leave streaming.
    order = np.argsort(gates.reshape(-1), kind="stable")
    rank = np.empty(order.size)
    rank[order] = np.arange(order.size)
    return (rank < np.quantile(rank, sparsity)).reshape(gates.shape)


def import_duo_attention(path: str | Path, model: nn.Module, linears: dict[str, nn.Linear], out: str | Path, *,
                         base_model: dict[str, Any], sparsity: float | None = None, threshold: float | None = None,
                         sink: int | None = None, recent: int | None = None, ties: str = "upstream") -> Path:
    """A plan artifact at `out` from DuoAttention gates; sink and window from the arguments or, when
    not given, from the pattern's `config.json`; ties broken by `ties` (`duo_streaming`)."""
    gates, tsv = read_duo_gates(path, kv_heads(model)[:2])
    cfg = read_duo_config(path)
    sink = sink if sink is not None else cfg.get("sink_size")
    recent = recent if recent is not None else cfg.get("recent_size")
    for flag, value in (("--sink", sink), ("--recent", recent)):
        if value is None:
            raise MaskpipeError(f"{flag}: not given and no {DUO_CONFIG} beside {tsv} names it")
        if value < 0:
            raise MaskpipeError(f"{flag}: expected a non-negative number of tokens, got {value}")
    streaming = duo_streaming(gates, sparsity=sparsity, threshold=threshold, ties=ties)
    shape = gates.shape
    plan = AttentionPlan(torch.from_numpy(streaming), torch.full(shape, sink), torch.full(shape, recent),
                         torch.from_numpy(gates))
    return save_artifact(out, {}, linears, base_model=base_model, pattern=None,
                         method={"name": "duo-attention-import",
                                 "params": {"sparsity": sparsity, "threshold": threshold, "sink": sink,
                                            "window": recent, "ties": ties},
                                 "source": str(tsv), "source_sha256": _file_sha256(tsv)},
                         data={"note": "imported: the data its gates were learned on is unknown to maskpipe"},
                         attention=plan.to_json(model))


def export_duo_attention(artifact: str | Path, out: str | Path) -> Path:
    """An artifact's attention plan as a DuoAttention pattern directory: `full_attention_heads.tsv`
    (the learned gates; a plan without gates writes 1 for full and 0 for streaming heads) and
    `config.json` with `sink_size` and `recent_size`. DuoAttention has one sink and one window for all
    streaming heads, so a plan with several (MoA windows) is refused."""
    manifest = read_manifest(artifact)
    if "attention" not in manifest:
        raise MaskpipeError(f"{artifact}: the artifact holds no attention plan")
    plan = AttentionPlan.from_json(manifest["attention"], str(artifact))
    sinks = {int(k) for k in plan.sink[plan.streaming].tolist()} or {int(plan.sink.flatten()[0])}
    windows = {int(w) for w in plan.window[plan.streaming].tolist()} or {int(plan.window.flatten()[0])}
    if len(sinks) > 1 or len(windows) > 1:
        raise MaskpipeError(f"{artifact}: streaming heads with sinks {sorted(sinks)} and windows {sorted(windows)}; "
                            "a DuoAttention pattern has one sink_size and one recent_size")
    learned = not bool(plan.gate.isnan().any())
    gates = plan.gate.double() if learned else (~plan.streaming).double()
    rows = "".join("\t".join(repr(round(float(g), 6)) for g in row) + "\n" for row in gates.tolist())
    config = {"sink_size": sinks.pop(), "recent_size": windows.pop(), "streaming_fraction": plan.streaming_fraction(),
              "gates": "learned" if learned else "binary (plan had no gates)", "source": str(artifact)}
    with atomic_dir(out, replaces=DUO_GATES) as tmp:  # both files or neither; never over another directory
        (tmp / DUO_GATES).write_text(rows)
        (tmp / DUO_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()
