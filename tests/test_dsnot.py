"""DSnoT (training-free prune-and-grow inside each N:M group) refining another method's mask."""

import json

import pytest
import torch
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.nm.oneshot import ChannelMoments, dsnot_error, dsnot_refine, oneshot_masks
from maskpipe.pipeline.nm.sparsity import is_nm, nm_mask
from tests.test_oneshot import FIXTURES, calib, layer_data, micro, state  # noqa: F401 - fixtures and helpers

# --- DSnoT: refining a mask by prune-and-grow inside its groups ------------------------------------


def test_dsnot_makes_the_best_single_swap_per_row():
    # One cycle = for every row, the (grow, prune) pair inside one group that lowers D_i most, found here
    # by brute force over every single swap.
    g = torch.Generator().manual_seed(3)
    W, mean, var = torch.randn(6, 16, generator=g), torch.randn(16, generator=g), torch.rand(16, generator=g)
    start = nm_mask(torch.rand(6, 16, generator=g), 2, 4)
    one = dsnot_refine(W, start, mean, var, 2, 4, max_cycles=1)
    for i in range(6):
        best, best_mask = dsnot_error(W[i : i + 1], start[i : i + 1], mean, var).item(), start[i]
        for grow in (~start[i]).nonzero().flatten().tolist():
            for prune in start[i].nonzero().flatten().tolist():
                if grow // 4 != prune // 4:
                    continue
                cand = start[i].clone()
                cand[grow], cand[prune] = True, False
                err = dsnot_error(W[i : i + 1], cand[None], mean, var).item()
                if err < best:
                    best, best_mask = err, cand
        assert torch.equal(one[i], best_mask), i


def test_dsnot_error_is_the_expected_squared_output_change_of_independent_channels():
    g = torch.Generator().manual_seed(4)
    W, mask = torch.randn(3, 8, generator=g), nm_mask(torch.rand(3, 8, generator=g), 2, 4)
    mean, std = torch.randn(8, generator=g), torch.rand(8, generator=g)
    X = mean + std * torch.randn(200_000, 8, generator=g, dtype=torch.float64)  # independent channels
    moments = ChannelMoments(nn.Linear(8, 3))
    moments.add_batch(None, (X.float(),), None)
    torch.testing.assert_close(moments.channel_mean(), X.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(moments.channel_var(), X.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    empirical = (X @ (W.double() * ~mask).T).square().mean(0)
    torch.testing.assert_close(dsnot_error(W, mask, mean, std.square()), empirical, rtol=0.02, atol=1e-3)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
@pytest.mark.parametrize("init", ["magnitude", "wanda", "sparsegpt"])
def test_dsnot_keeps_the_pattern_the_weights_and_never_raises_its_objective(micro, calib, init, pattern):
    model, linears, _ = micro
    n, m = pattern
    start, _ = oneshot_masks(model, linears, init, n, m, calib)
    before = state(model)
    refined, updated = oneshot_masks(model, linears, "dsnot", n, m, calib, init_masks=start)
    assert updated is None and refined.keys() == linears.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(is_nm(mask, n, m) and mask.dtype == torch.bool for mask in refined.values())
    assert any(not torch.equal(refined[k], start[k]) for k in linears)
    # On block 0 both masks see the same (dense) inputs: D_i of every row is at most the input mask's.
    first = {k: lin for k, lin in linears.items() if ".layers.0." in k}
    stats = {k: ChannelMoments(lin) for k, lin in first.items()}
    handles = [lin.register_forward_hook(stats[k].add_batch) for k, lin in first.items()]
    try:
        model(calib, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for k, lin in first.items():
        mean, var = stats[k].channel_mean(), stats[k].channel_var()
        assert (dsnot_error(lin.weight, refined[k], mean, var) <= dsnot_error(lin.weight, start[k], mean, var)).all()


def test_dsnot_lowers_the_layer_reconstruction_error_of_wanda_masks(micro, calib):
    # The real error ‖X Wᵀ − X (W⊙M)ᵀ‖² on the calibration inputs, every linear of block 0 (whose inputs
    # both masks share). DSnoT's objective ignores correlations between channels, which SparseGPT's mask
    # accounts for, so on SparseGPT masks q/k/v can get slightly worse while perplexity improves.
    model, linears, _ = micro
    first = {k: lin for k, lin in linears.items() if ".layers.0." in k}
    inputs = {k: [] for k in first}
    handles = [lin.register_forward_hook(lambda mod, a, o, k=k: inputs[k].append(a[0].reshape(-1, a[0].shape[-1])))
               for k, lin in first.items()]
    try:
        model(calib, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    start, _ = oneshot_masks(model, first, "wanda", 2, 4, calib)
    refined, _ = oneshot_masks(model, first, "dsnot", 2, 4, calib, init_masks=start)
    for k, lin in first.items():
        X, W = torch.cat(inputs[k]).double(), lin.weight.double()
        error = lambda mask: (X @ (W * ~mask).T).square().sum()  # noqa: E731
        assert error(refined[k]) < error(start[k]), k


def test_dsnot_refuses_a_missing_or_malformed_initial_mask(micro, calib):
    model, linears, _ = micro
    with pytest.raises(MaskpipeError, match="dsnot refines a mask: no initial mask"):
        oneshot_masks(model, linears, "dsnot", 2, 4, calib)
    start, _ = oneshot_masks(model, linears, "magnitude", 2, 4)
    name = next(iter(linears))
    with pytest.raises(MaskpipeError, match=f"initial mask of {name} is no 1:4 mask"):
        oneshot_masks(model, linears, "dsnot", 1, 4, calib, init_masks=start)
    with pytest.raises(MaskpipeError, match=f"initial mask of {name} is no 2:4 mask"):
        oneshot_masks(model, linears, "dsnot", 2, 4, calib, init_masks={**start, name: torch.ones_like(start[name])})


def test_a_dsnot_stage_refines_the_artifact_of_an_earlier_stage_of_a_run(tmp_path):
    from maskpipe.pipeline.io.artifacts import load_artifact
    from maskpipe.pipeline.config import config_from_dict
    from maskpipe.pipeline.run.runner import run

    calib = {"stage": "oneshot", "data": "calib", "n_samples": 4, "seqlen": 64}
    cfg = config_from_dict({
        "name": "dsnot", "model": {"name_or_path": str(FIXTURES / "models/micro-llama"), "dtype": "float32",
                                   "device": "cpu"},
        "data": {"calib": str(FIXTURES / "corpora" / "kjv.train.txt")},
        "stages": [{**calib, "method": "wanda"}, {**calib, "name": "refined", "method": "dsnot", "mask_from": "wanda"}],
    })
    run_dir = run(cfg, tmp_path / "run")
    start, _ = load_artifact(run_dir / "artifacts" / "wanda")
    refined, manifest = load_artifact(run_dir / "artifacts" / "refined")
    assert manifest["method"]["name"] == "dsnot" and manifest["method"]["params"]["mask_from"] == "wanda"
    assert all(is_nm(mask, 2, 4) for mask in refined.values())
    assert any(not torch.equal(refined[k], start[k]) for k in start)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"]["refined"]["prior"] == "wanda"
