"""One-shot N:M masks: magnitude, Wanda (Sun et al. 2023) and SparseGPT (Frantar & Alistarh 2023), and
DSnoT (Zhang et al. 2023), which refines any of them without training.

They are the baselines, and the priors that learned masks start from. DSnoT takes another method's
mask (`init_masks`) and swaps kept and pruned weights inside each N:M group (`pipeline.nm.dsnot`). Wanda and
SparseGPT prune sequentially, block by block, as both papers do: the first decoder block's inputs are
captured for every calibration sample, then each block is calibrated on what the already-pruned blocks
before it produce, so memory holds one block's activations at a time. DSnoT walks the blocks the same
way: a block's masks are refined on the outputs of the blocks before it, run with their refined masks.
With `offload_to` the model stays in host memory and only the block being calibrated is on the device
(`_Offloaded`), so a one-shot mask of a model larger than one GPU is possible.

A mask is a CPU bool tensor shaped like the weight [out, in]; every group of M consecutive input columns
of a row keeps exactly N. The model's weights are never changed: pruned blocks run through a mask
parametrization, or with SparseGPT's updated weights swapped in for the duration of one forward.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.models import base_weight, decoder_blocks
from maskpipe.pipeline.nm.sparsity import check_divisible, is_nm, masked, nm_mask
from maskpipe.pipeline.core.vocab import ONESHOT_METHODS, REFINING_METHODS, Pattern
from maskpipe.pipeline.nm.dsnot import ChannelMoments, OfficialStats, refine_exact, refine_official, skipped


@torch.no_grad()
def oneshot_masks(
    model: nn.Module, linears: dict[str, nn.Linear], method: str, n: int, m: int,
    calib: torch.Tensor | None = None,  # LongTensor [n_samples, seqlen] of token ids; None for magnitude
    *, batch_size: int = 8, weight_update: bool = False, blocksize: int = 128, percdamp: float = 0.01,
    init_masks: dict[str, torch.Tensor] | None = None, refine: dict | None = None,
    offload_to: torch.device | str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Returns (masks: name -> CPU bool tensor shaped like the weight, N:M along the input dim;
    updated weights: name -> CPU tensor (model dtype) when weight_update, else None).
    The refining methods (`dsnot`, `dsnot-exact`: `pipeline.nm.dsnot`) refine `init_masks` (N:M masks of
    every linear, e.g. Wanda's); `refine` holds their options (`max_cycles`, and for `dsnot`
    `update_threshold`, `pow_of_var_regrowing`, `same_sign`, `skip_layer`). On return the model's
    weights are exactly as they were on entry.

    `offload_to`: calibrate on this device a model that stays in host memory (`_Offloaded`)."""
    if method not in ONESHOT_METHODS:
        raise MaskpipeError(f"unknown one-shot method {method!r} (choose from {', '.join(ONESHOT_METHODS)})")
    try:
        Pattern(n, m)
    except ValueError as e:
        raise MaskpipeError(f"N:M pattern: {e}") from None
    if weight_update and method != "sparsegpt":
        raise MaskpipeError("weight_update: only sparsegpt updates weights")
    for name, lin in linears.items():
        check_divisible(name, lin.weight.shape, m)
    refine = dict(refine or {})
    skip_layer = refine.pop("skip_layer", "no_skip")
    if method in REFINING_METHODS:
        missing = sorted(set(linears) - set(init_masks or {}))
        if missing:
            raise MaskpipeError(f"{method} refines a mask: no initial mask for {missing[:3]}")
        for name, lin in linears.items():
            if init_masks[name].shape != lin.weight.shape or not is_nm(init_masks[name], n, m):
                raise MaskpipeError(f"{method}: the initial mask of {name} is no {n}:{m} mask of its weight")
    if method == "magnitude":
        return {name: nm_mask(base_weight(lin).to(offload_to).abs(), n, m).cpu()
                for name, lin in linears.items()}, None
    if calib is None or calib.dim() != 2:
        raise MaskpipeError(f"{method} needs calibration token ids shaped [n_samples, seqlen]")

    blocks = decoder_blocks(model)
    per_block = [_linears_in(block, linears) for block in blocks]
    stray = set(linears) - {name for subset in per_block for name in subset}
    if stray:
        raise MaskpipeError(f"{method}: not inside a decoder block: {sorted(stray)}")

    # Blocks after the last one with something to prune need no calibration.
    last = max((i for i, subset in enumerate(per_block) if subset), default=-1)
    offload = _Offloaded(model, blocks, offload_to)
    try:
        inputs = _capture_block_inputs(model, blocks[0], calib, batch_size, offload.device)
    except BaseException:
        offload.restore()
        raise
    masks: dict[str, torch.Tensor] = {}
    updated: dict[str, torch.Tensor] | None = {} if weight_update else None
    for block, subset in zip(tqdm(offload.each(blocks[: last + 1]), desc=f"{method} {n}:{m}", total=last + 1,
                                  disable=None), per_block):
        # Statistics of each linear's inputs while the block is still dense, as in both papers.
        kind = {"wanda": ChannelNorms, "sparsegpt": Hessian, "dsnot": OfficialStats, "dsnot-exact": ChannelMoments}[method]
        stats = {name: kind(lin) for name, lin in subset.items()}
        handles = [lin.register_forward_hook(stats[name].add_batch) for name, lin in subset.items()]
        try:
            _forward(block, inputs)
        finally:
            for h in handles:
                h.remove()

        block_masks, block_weights = {}, {}
        for name, lin in subset.items():
            w = base_weight(lin)
            if method == "wanda":
                block_masks[name] = nm_mask(w.float().abs() * stats[name].mean().sqrt(), n, m)
            elif method == "dsnot":
                init = init_masks[name].to(w.device)
                s = stats[name]
                block_masks[name] = init if skipped(name, skip_layer) else refine_official(
                    w, init, s.mean(), s.var, s.norm(), n, m, **refine)
            elif method == "dsnot-exact":
                block_masks[name] = refine_exact(w, init_masks[name].to(w.device), stats[name].channel_mean(),
                                                 stats[name].channel_var(), n, m, **refine)
            else:
                block_masks[name], new_w = sparsegpt_prune(w, stats[name].H, n, m, blocksize, percdamp)
                block_weights[name] = new_w.to(w.dtype)
            del stats[name]  # a Hessian is in_features² floats: free it before the next one
        masks.update({name: mask.cpu() for name, mask in block_masks.items()})

        # The next block is calibrated on this block's pruned outputs.
        if weight_update:
            updated.update({name: w.cpu() for name, w in block_weights.items()})
            with _swapped_weights(subset, block_weights):
                inputs = _forward(block, inputs)
        else:
            with masked(subset, block_masks):
                inputs = _forward(block, inputs)
    return masks, updated


class ChannelNorms:
    """Wanda's `scaler_row`: mean of x_j² over calibration tokens, per input channel j."""

    def __init__(self, linear: nn.Linear):
        self.sum = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)
        self.tokens = 0

    def add_batch(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        self.sum += x.square().sum(0)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return self.sum / self.tokens


class Hessian:
    """SparseGPT's layer Hessian H = 2/n Σ x xᵀ, n counting samples, kept as a running average in float32
    so that its scale does not grow with the amount of calibration data."""

    def __init__(self, linear: nn.Linear):
        cols = linear.in_features
        self.H = torch.zeros(cols, cols, dtype=torch.float32, device=linear.weight.device)
        self.samples = 0

    def add_batch(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0]
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.H *= self.samples / (self.samples + batch)
        self.samples += batch
        x = math.sqrt(2 / self.samples) * x
        self.H += x.T @ x


def sparsegpt_prune(
    weight: torch.Tensor, H: torch.Tensor, n: int, m: int, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M on one layer: (mask, pruned float32 weight with the OBS update). Columns are pruned
    left to right; each pruned weight's error is spread over the columns not yet visited, and every M-th
    column picks the M-N weights to drop among the next M by the OBS saliency w² / [H⁻¹]_jj."""
    W = weight.float().clone()
    H = H.clone()
    cols = W.shape[1]
    # Inputs that were always zero carry no information; a unit diagonal keeps H invertible.
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * H.diagonal().mean())
    # Row i of the upper Cholesky factor of H⁻¹ is the OBS update for column i once columns < i are fixed.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    # Whole groups per block, or a group would straddle two blocks.
    blocksize = max(m, blocksize // m * m)

    prune = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        prune1 = prune[:, i1:i2]
        for i in range(i2 - i1):
            if i % m == 0:
                saliency = W1[:, i : i + m] ** 2 / Hinv1.diagonal()[i : i + m] ** 2
                prune1.scatter_(1, i + saliency.topk(m - n, dim=1, largest=False).indices, True)
            w = W1[:, i].clone()
            q = w.masked_fill(prune1[:, i], 0)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        # Lazy batch update: the columns after this block get all of its errors at once.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return ~prune, W


class _Offloaded:
    """A model in host memory calibrated on `device`, as SparseGPT's and llm-compressor's sequential
    pipelines do: everything outside the decoder blocks (embeddings, final norm, head, rotary
    buffers) moves to the device for the whole calibration, each block only while `each` is at it,
    so the device holds one block, its statistics and the calibration activations, never the model
    (`pipeline.train.plan.oneshot_plan`). With `device` None or the model's own device nothing moves."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device | str | None):
        self.model, self.blocks = model, blocks
        self.home = next(model.parameters()).device
        self.device = self.home if device is None else torch.device(device)
        self.moves = self.device != self.home
        self._outside(self.device)

    def _outside(self, device: torch.device) -> None:
        if not self.moves:
            return
        parked = list(self.blocks._modules.items())
        self.blocks._modules.clear()  # the block list empty for a moment: `to` moves all but the blocks
        try:
            self.model.to(device)
        finally:
            self.blocks._modules.update(parked)

    def restore(self) -> None:
        self._outside(self.home)

    def each(self, blocks):
        """The blocks in turn, each on the device while the caller works on it; everything back home
        at the end (also when the caller stops early)."""
        try:
            for block in blocks:
                block.to(self.device)
                try:
                    yield block
                finally:
                    block.to(self.home)
        finally:
            self.restore()


class _Captured(Exception):
    """Stops the model right after block 0's inputs are recorded: the rest of the forward is wasted work."""


def _capture_block_inputs(
    model: nn.Module, first: nn.Module, calib: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, tuple, dict]]:
    """(hidden states, other args, kwargs) of `first` per calibration batch, on `device`."""
    captured = []

    def record(module: nn.Module, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, args[1:], kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                # use_cache=False: no KV cache is made, so the captured kwargs carry none into later calls.
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _forward(block: nn.Module, inputs: list[tuple[torch.Tensor, tuple, dict]]) -> list[tuple[torch.Tensor, tuple, dict]]:
    outputs = []
    for hidden, args, kwargs in inputs:
        out = block(hidden, *args, **kwargs)
        # transformers 5 decoder layers return the hidden states; older ones a tuple starting with them.
        outputs.append((out[0] if isinstance(out, tuple) else out, args, kwargs))
    return outputs


@contextmanager
def _swapped_weights(linears: dict[str, nn.Linear], weights: dict[str, torch.Tensor]):
    """Run with `weights` in place of the linears' own, which are put back as the very same Parameters."""
    originals = {name: linears[name].weight for name in weights}
    try:
        for name, w in weights.items():
            linears[name].weight = nn.Parameter(w, requires_grad=False)
        yield
    finally:
        for name, w in originals.items():
            linears[name].weight = w


def _linears_in(block: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    inside = {id(module) for module in block.modules()}
    return {name: lin for name, lin in linears.items() if id(lin) in inside}
