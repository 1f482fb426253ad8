import os
import subprocess
import sys

import pytest
import torch

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.nm.sparsity import check_divisible, is_nm, masked, nm_mask, to_semi_structured
from tests.conftest import ROOT


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_keeps_top_n_per_group(n, m):
    torch.manual_seed(0)
    scores = torch.randn(16, 4 * m)
    mask = nm_mask(scores, n, m)
    assert is_nm(mask, n, m)
    groups, kept = scores.reshape(-1, m), mask.reshape(-1, m)
    # every kept score is >= every dropped score of its group
    assert bool((groups.masked_fill(~kept, float("inf")).min(-1).values >=
                 groups.masked_fill(kept, float("-inf")).max(-1).values).all())


def test_check_divisible():
    check_divisible("x", (4, 8), 4)
    with pytest.raises(MaskpipeError, match="x: input dimension 10 is not divisible by M=4"):
        check_divisible("x", (4, 10), 4)


def test_masked_forward_and_base_weights_untouched(micro):
    model, linears = micro
    torch.manual_seed(0)
    masks = {k: nm_mask(torch.rand_like(l.weight), 2, 4) for k, l in linears.items()}
    before = {k: (l.weight, l.weight.detach().clone()) for k, l in linears.items()}
    x = torch.randint(0, 2048, (2, 16))
    dense = model(x).logits
    with masked(linears, masks):
        lin = linears["model.layers.1.mlp.down_proj"]
        assert torch.equal(lin.weight, before["model.layers.1.mlp.down_proj"][1] * masks["model.layers.1.mlp.down_proj"])
        out = model(x).logits
    assert not torch.allclose(out, dense)
    for k, l in linears.items():
        assert l.weight is before[k][0] and torch.equal(l.weight, before[k][1])
    assert torch.equal(model(x).logits, dense)


def test_semi_structured_export_needs_2of4_masks_and_a_cuda_gpu(micro):
    """What can be checked without a GPU: the conversion refuses other patterns and other devices with a
    clear message, and the benchmark says it measured nothing."""
    _, linears = micro
    name, lin = "model.layers.0.mlp.up_proj", linears["model.layers.0.mlp.up_proj"]
    with pytest.raises(MaskpipeError, match=f"{name}: semi-structured sparsity needs a 2:4 mask"):
        to_semi_structured(linears, {name: nm_mask(lin.weight.abs(), 4, 8)})
    with pytest.raises(MaskpipeError, match="need a CUDA GPU of compute capability 8.0 or newer; the weight is on cpu"):
        to_semi_structured(linears, {name: nm_mask(lin.weight.abs(), 2, 4)})  # the micro fixture loads on CPU
    assert lin.weight.layout == torch.strided  # untouched
    out = subprocess.run([sys.executable, "benchmarks/semi_structured.py"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 2 and "found no CUDA GPU. Nothing measured." in out.stderr, out.stderr
