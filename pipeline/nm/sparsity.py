"""N:M masks over frozen linear weights: selecting them from scores, checking them, applying them.

A mask is a bool tensor shaped like the linear's weight (out_features, in_features); every group of M
consecutive weights along the input dimension keeps exactly N.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.utils import parametrize

from maskpipe.pipeline import MaskpipeError


def check_divisible(name: str, shape: tuple[int, ...] | torch.Size, m: int) -> None:
    if shape[-1] % m:
        raise MaskpipeError(f"{name}: input dimension {shape[-1]} is not divisible by M={m}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest-scoring weights of every group of M along the last dimension."""
    groups = scores.reshape(*scores.shape[:-1], -1, m)
    keep = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(scores.shape)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    return mask.shape[-1] % m == 0 and bool((mask.reshape(-1, m).sum(-1) == n).all())


class FixedMask(nn.Module):
    """Weight parametrization W -> W * mask; the frozen original stays untouched underneath."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def add_masks(linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        lin = linears[name]
        if mask.shape != lin.weight.shape:
            raise MaskpipeError(f"{name}: mask shape {tuple(mask.shape)} != weight shape {tuple(lin.weight.shape)}")
        parametrize.register_parametrization(lin, "weight", FixedMask(mask.to(lin.weight.device)), unsafe=True)


def remove_masks(linears: dict[str, nn.Linear]) -> None:
    for lin in linears.values():
        if parametrize.is_parametrized(lin, "weight"):
            parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)


@contextmanager
def masked(linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor]):
    """Run the model with masks in place; the base weights are the same objects before and after."""
    add_masks(linears, masks)
    try:
        yield
    finally:
        remove_masks(linears)


SEMI_STRUCTURED_CAPABILITY = (8, 0)  # sparse tensor cores: Ampere and newer


@torch.no_grad()
def to_semi_structured(linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor]) -> None:
    """Replace each masked linear's weight by weight ⊙ mask in PyTorch's 2:4 semi-structured format
    (`torch.sparse.to_sparse_semi_structured`: compressed values plus metadata, run by cuSPARSELt or
    CUTLASS), for inference. It needs a CUDA GPU of compute capability 8.0 or newer and 2:4 masks. The
    weights are replaced, not parametrized: use it on a model loaded for inference, never before a save."""
    from torch.sparse import to_sparse_semi_structured

    for name, mask in masks.items():
        if not is_nm(mask, 2, 4):
            raise MaskpipeError(f"{name}: semi-structured sparsity needs a 2:4 mask")
        lin = linears[name]
        device = lin.weight.device
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < SEMI_STRUCTURED_CAPABILITY:
            raise MaskpipeError(f"{name}: 2:4 semi-structured kernels need a CUDA GPU of compute capability "
                                f"{'.'.join(map(str, SEMI_STRUCTURED_CAPABILITY))} or newer; the weight is on {device}")
        try:
            sparse = to_sparse_semi_structured(lin.weight * mask.to(lin.weight))
        except RuntimeError as e:
            raise MaskpipeError(f"{name}: torch cannot make this weight semi-structured: {e}") from None
        lin.weight = nn.Parameter(sparse, requires_grad=False)

