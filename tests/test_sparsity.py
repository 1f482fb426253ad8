import pytest
import torch

from pipeline import MaskpipeError
from pipeline.sparsity import check_divisible, is_nm, masked, nm_mask


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
