"""DSnoT (training-free prune-and-grow inside each N:M group) refining another method's mask: the official
rule (`dsnot`), checked step for step against a slow per-row transcription of the published algorithm
with the official code's candidate order, and the exact-objective variant (`dsnot-exact`)."""

import json

import pytest
import torch
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.nm.dsnot import ChannelMoments, OfficialStats, dsnot_error, refine_exact, refine_official, skipped
from maskpipe.pipeline.nm.oneshot import oneshot_masks
from maskpipe.pipeline.nm.sparsity import is_nm, nm_mask
from tests.test_oneshot import FIXTURES, calib, layer_data, micro, state  # noqa: F401 - fixtures and helpers

# --- DSnoT: refining a mask by prune-and-grow inside its groups ------------------------------------


def test_dsnot_makes_the_best_single_swap_per_row():
    # One cycle = for every row, the (grow, prune) pair inside one group that lowers D_i most, found here
    # by brute force over every single swap.
    g = torch.Generator().manual_seed(3)
    W, mean, var = torch.randn(6, 16, generator=g), torch.randn(16, generator=g), torch.rand(16, generator=g)
    start = nm_mask(torch.rand(6, 16, generator=g), 2, 4)
    one = refine_exact(W, start, mean, var, 2, 4, max_cycles=1)
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
def test_dsnot_exact_keeps_the_pattern_the_weights_and_never_raises_its_objective(micro, calib, init, pattern):
    model, linears, _ = micro
    n, m = pattern
    start, _ = oneshot_masks(model, linears, init, n, m, calib)
    before = state(model)
    refined, updated = oneshot_masks(model, linears, "dsnot-exact", n, m, calib, init_masks=start)
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


def test_dsnot_exact_lowers_the_layer_reconstruction_error_of_wanda_masks(micro, calib):
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
    refined, _ = oneshot_masks(model, first, "dsnot-exact", 2, 4, calib, init_masks=start)
    for k, lin in first.items():
        X, W = torch.cat(inputs[k]).double(), lin.weight.double()
        error = lambda mask: (X @ (W * ~mask).T).square().sum()  # noqa: E731
        assert error(refined[k]) < error(start[k]), k


@pytest.mark.parametrize("method", ["dsnot", "dsnot-exact"])
def test_dsnot_refuses_a_missing_or_malformed_initial_mask(micro, calib, method):
    model, linears, _ = micro
    with pytest.raises(MaskpipeError, match=f"{method} refines a mask: no initial mask"):
        oneshot_masks(model, linears, method, 2, 4, calib)
    start, _ = oneshot_masks(model, linears, "magnitude", 2, 4)
    name = next(iter(linears))
    with pytest.raises(MaskpipeError, match=f"initial mask of {name} is no 1:4 mask"):
        oneshot_masks(model, linears, method, 1, 4, calib, init_masks=start)
    with pytest.raises(MaskpipeError, match=f"initial mask of {name} is no 2:4 mask"):
        oneshot_masks(model, linears, method, 2, 4, calib, init_masks={**start, name: torch.ones_like(start[name])})


def test_a_dsnot_stage_refines_the_artifact_of_an_earlier_stage_of_a_run(tmp_path):
    from maskpipe.pipeline.io.artifacts import load_artifact
    from maskpipe.pipeline.config import config_from_dict
    from maskpipe.pipeline.run.runner import run

    calib = {"stage": "oneshot", "data": "calib", "n_samples": 4, "seqlen": 64}
    cfg = config_from_dict({
        "name": "dsnot", "model": {"name_or_path": str(FIXTURES / "models/micro-llama"), "dtype": "float32",
                                   "device": "cpu"},
        "data": {"calib": str(FIXTURES / "corpora" / "kjv.train.txt")},
        "stages": [{**calib, "method": "wanda"},
                   {**calib, "name": "refined", "method": "dsnot", "mask_from": "wanda", "skip_layer": "no_skip"}],
    })
    run_dir = run(cfg, tmp_path / "run")
    start, _ = load_artifact(run_dir / "artifacts" / "wanda")
    refined, manifest = load_artifact(run_dir / "artifacts" / "refined")
    params = manifest["method"]["params"]
    assert manifest["method"]["name"] == "dsnot" and params["mask_from"] == "wanda"
    assert params["update_threshold"] == 0.1 and params["skip_layer"] == "no_skip" and params["max_cycles"] == 50
    assert all(is_nm(mask, 2, 4) for mask in refined.values())
    assert any(not torch.equal(refined[k], start[k]) for k in start)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stages"]["refined"]["prior"] == "wanda"


# --- the official rule, step for step ------------------------------------------------------------------


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def reference_row(w, keep, mean, var, metric, m, *, max_cycles, threshold, pow_var, same_sign):
    """Algorithm 1 of the paper for one output row, in plain Python, with the official candidate order:
    while t < T and |ε| > threshold: grow the next not-yet-examined column of the fixed ranking of
    (a_j if j was pruned initially else 0) / var_j^p (highest first while ε > 0, else lowest first);
    prune, in its group, the initially kept and never swapped-out weight with the least Wanda score;
    stop the row when the swap is impossible or would flip ε's initial sign; ε += a_p − a_g."""
    cols = len(w)
    a = [w[j] * mean[j] for j in range(cols)]
    init_keep, keep, swapped_out = list(keep), list(keep), set()
    eps = sum(a[j] for j in range(cols) if not init_keep[j])
    sign0 = _sign(eps)
    score = [(0.0 if init_keep[j] else a[j]) / (var[j] ** pow_var if pow_var else 1.0) for j in range(cols)]
    top, bottom = set(), set()
    for _ in range(max_cycles):
        if not abs(eps) > threshold:
            break
        if eps > 0:
            g = max((j for j in range(cols) if j not in top), key=lambda j: (score[j], j))
            top.add(g)
        else:
            g = min((j for j in range(cols) if j not in bottom), key=lambda j: (score[j], j))
            bottom.add(g)
        start = g - g % m
        cands = [j for j in range(start, start + m) if init_keep[j] and j not in swapped_out]
        if not cands or keep[g]:
            break
        p = min(cands, key=lambda j: (metric[j], j))
        after = eps + a[p] - a[g]
        if same_sign and _sign(after) != sign0:
            break
        keep[p], keep[g] = False, True
        swapped_out.add(p)
        eps = after
    return keep


def random_layer(out, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, cols, generator=g) * 0.1
    mean = torch.randn(cols, generator=g) * 2
    var = torch.rand(cols, generator=g) * 3 + 0.05
    return W, mean, var, (var + mean.square()).sqrt() * 7.0  # any multiple of ‖x‖ ranks the same


def wanda_nm(W, norm, n, m):
    return nm_mask(W.abs() * norm, n, m)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
@pytest.mark.parametrize("shape", [(6, 16), (12, 64), (4, 512)])
@pytest.mark.parametrize("same_sign,threshold,pow_var,cycles", [(True, 0.1, 1.0, 50), (False, 0.1, 1.0, 50),
                                                                (True, 0.0, 0.0, 50), (True, 0.02, 0.5, 3)])
def test_official_rule_matches_the_published_algorithm_row_by_row(n, m, shape, same_sign, threshold, pow_var, cycles):
    for seed in range(2):
        W, mean, var, norm = random_layer(*shape, seed=seed + 100 * shape[1])
        keep = wanda_nm(W, norm, n, m)
        got = refine_official(W, keep, mean, var, norm, n, m, same_sign=same_sign, update_threshold=threshold,
                              pow_of_var_regrowing=pow_var, max_cycles=cycles)
        metric = (W.abs() * norm).tolist()
        want = torch.tensor([reference_row(W[r].tolist(), keep[r].tolist(), mean.tolist(), var.tolist(), metric[r], m,
                                           max_cycles=cycles, threshold=threshold, pow_var=pow_var, same_sign=same_sign)
                             for r in range(shape[0])])
        assert torch.equal(got, want)
        assert is_nm(got, n, m) and torch.equal(keep, wanda_nm(W, norm, n, m))  # N:M, the input untouched
        assert shape[1] < 64 or (got != keep).any()  # not vacuous


def test_official_rule_keeps_the_sign_of_eps_and_zero_cycles_change_nothing():
    W, mean, var, norm = random_layer(12, 256, seed=31)
    keep = wanda_nm(W, norm, 2, 4)
    assert torch.equal(refine_official(W, keep, mean, var, norm, 2, 4, max_cycles=0), keep)
    assert torch.equal(refine_official(W, keep, mean, var, norm, 2, 4, update_threshold=1e9), keep)
    eps = lambda mask: (W * mean * ~mask).sum(1)  # noqa: E731
    for cycles in (1, 5, 20):
        assert (eps(refine_official(W, keep, mean, var, norm, 2, 4, max_cycles=cycles)).sign() == eps(keep).sign()).all()


def test_official_statistics_are_those_of_the_official_code_whatever_the_batch():
    lin = nn.Linear(6, 2)
    x = torch.randn(5, 7, 6) + 3
    one, batched = OfficialStats(lin), OfficialStats(lin)
    for seq in x:
        one.add_batch(lin, (seq[None],), None)
    batched.add_batch(lin, (x,), None)
    torch.testing.assert_close(one.mean(), batched.mean())
    torch.testing.assert_close(one.mean(), x.sum((0, 1)) / 5)  # Σ over tokens / sequences
    torch.testing.assert_close(one.var, x.var(1, unbiased=False).mean(0))  # within-sequence, pooled
    torch.testing.assert_close(one.norm(), (x.square().sum((0, 1)) / 5).sqrt())


def test_official_skip_layer_leaves_that_kind_of_linear_alone():
    assert skipped("model.layers.0.mlp.up_proj", "mlp") and not skipped("model.layers.0.self_attn.q_proj", "mlp")
    assert not skipped("model.layers.0.mlp.up_proj", "no_skip")
