import math
from pathlib import Path

import pytest
import torch
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.schema import ModelConfig
from maskpipe.pipeline.eval.perplexity import perplexity
from maskpipe.pipeline.core.models import load_model, load_tokenizer, prunable_linears
from maskpipe.pipeline.nm.oneshot import Hessian, _swapped_weights, oneshot_masks, sparsegpt_prune
from maskpipe.pipeline.nm.sparsity import is_nm, masked, nm_mask

FIXTURES = Path(__file__).parent / "fixtures"
CFG = ModelConfig(name_or_path=str(FIXTURES / "models/micro-llama"), dtype="float32")


@pytest.fixture(scope="module")
def micro():
    model = load_model(CFG, device="cpu")
    return model, prunable_linears(model, CFG), load_tokenizer(CFG)


def tokens(tok, corpus: str, chars: int = 60_000) -> torch.Tensor:
    text = (FIXTURES / "corpora" / corpus).read_text()[:chars]
    return tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]


def blocks(ids: torch.Tensor, n: int, seqlen: int) -> torch.Tensor:
    return ids[: n * seqlen].reshape(n, seqlen)


@pytest.fixture(scope="module")
def calib(micro):
    return blocks(tokens(micro[2], "kjv.train.txt"), 8, 64)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- every method, end to end on micro-llama --------------------------------------------------------


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (3, 8)])
@pytest.mark.parametrize("method,update", [("magnitude", False), ("wanda", False), ("sparsegpt", False), ("sparsegpt", True)])
def test_masks_are_nm_and_weights_untouched(micro, calib, method, update, pattern):
    model, linears, _ = micro
    n, m = pattern
    before = state(model)
    params = {name: lin.weight for name, lin in linears.items()}
    masks, updated = oneshot_masks(model, linears, method, n, m, calib, batch_size=3, weight_update=update)

    assert masks.keys() == linears.keys()
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.device.type == "cpu"
        assert mask.shape == linears[name].weight.shape
        assert is_nm(mask, n, m), name
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(linears[name].weight is p for name, p in params.items())
    assert not any(hasattr(lin, "parametrizations") for lin in linears.values())

    if not update:
        assert updated is None
        return
    assert updated.keys() == linears.keys()
    for name, w in updated.items():
        assert w.dtype == linears[name].weight.dtype and w.device.type == "cpu"
        assert torch.equal(w != 0, masks[name]), name


def test_magnitude_is_topk_of_abs_weight(micro):
    model, linears, _ = micro
    masks, _ = oneshot_masks(model, linears, "magnitude", 2, 4)
    for name, lin in linears.items():
        groups = lin.weight.abs().reshape(lin.out_features, -1, 4)
        second_largest = groups.sort(dim=-1, descending=True).values[..., 1:2]
        assert torch.equal(masks[name], (groups >= second_largest).reshape(lin.weight.shape)), name


def test_sparsegpt_mask_only_and_update_agree_on_first_block(micro, calib):
    # Block 0 sees the same inputs in both modes; later blocks see different (pruned) activations.
    model, linears, _ = micro
    only, _ = oneshot_masks(model, linears, "sparsegpt", 2, 4, calib)
    upd, _ = oneshot_masks(model, linears, "sparsegpt", 2, 4, calib, weight_update=True)
    first = [name for name in linears if ".layers.0." in name]
    assert first and all(torch.equal(only[name], upd[name]) for name in first)
    assert not all(torch.equal(only[name], upd[name]) for name in linears)


def test_batch_size_does_not_change_masks(micro, calib):
    model, linears, _ = micro
    a, _ = oneshot_masks(model, linears, "wanda", 2, 4, calib, batch_size=8)
    b, _ = oneshot_masks(model, linears, "wanda", 2, 4, calib, batch_size=3)
    assert all(torch.equal(a[name], b[name]) for name in linears)


def test_blocks_run_without_a_kv_cache(micro, calib):
    model, linears, _ = micro
    seen = []
    block = model.model.layers[2]
    handle = block.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(kwargs), with_kwargs=True)
    try:
        oneshot_masks(model, linears, "wanda", 2, 4, calib, batch_size=4)
    finally:
        handle.remove()
    assert len(seen) == 2 * 2  # two batches, run once for statistics and once for the next block's inputs
    assert all(kw.get("past_key_values") is None and kw.get("use_cache") is False for kw in seen)
    assert all("position_embeddings" in kw for kw in seen)


def test_a_subset_of_linears_gets_masks_and_later_blocks_are_not_run(micro, calib):
    model, linears, _ = micro
    subset = {name: lin for name, lin in linears.items() if ".layers.1.mlp." in name}
    calls = []
    handle = model.model.layers[2].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        masks, _ = oneshot_masks(model, subset, "sparsegpt", 2, 4, calib)
    finally:
        handle.remove()
    assert masks.keys() == subset.keys() and all(is_nm(mask, 2, 4) for mask in masks.values())
    assert not calls


def test_indivisible_dimension_raises_before_any_work(micro, calib):
    model, linears, _ = micro
    calls = []
    handle = model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(MaskpipeError, match="not divisible by M=5"):
            oneshot_masks(model, linears, "sparsegpt", 2, 5, calib)
        # 384 (down_proj's input) divides by 3, 128 does not.
        with pytest.raises(MaskpipeError, match="input dimension 128 is not divisible by M=3"):
            oneshot_masks(model, linears, "wanda", 1, 3, calib)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="obs", n=2, m=4), "unknown one-shot method"),
        (dict(method="magnitude", n=4, m=4), "0<N<M"),
        (dict(method="wanda", n=2, m=4, weight_update=True), "only sparsegpt"),
        (dict(method="sparsegpt", n=2, m=4), "calibration"),
    ],
)
def test_bad_arguments(micro, kwargs, match):
    model, linears, _ = micro
    with pytest.raises(MaskpipeError, match=match):
        oneshot_masks(model, linears, **kwargs)


def test_linear_outside_the_decoder_blocks_is_refused(micro, calib):
    model, _, _ = micro
    with pytest.raises(MaskpipeError, match="not inside a decoder block.*lm_head"):
        oneshot_masks(model, {"lm_head": model.lm_head}, "wanda", 2, 4, calib)


def test_pruning_costs_perplexity_and_the_weight_update_recovers_it(micro):
    model, linears, tok = micro
    valid = tokens(tok, "kjv.valid.txt", chars=12_000)
    calib = blocks(tokens(tok, "kjv.train.txt"), 16, 128)

    def ppl():
        return perplexity(model, valid, 128, batch_size=8).ppl

    dense = ppl()
    mag, _ = oneshot_masks(model, linears, "magnitude", 2, 4)
    with masked(linears, mag):
        magnitude = ppl()
    _, weights = oneshot_masks(model, linears, "sparsegpt", 2, 4, calib, weight_update=True)
    with _swapped_weights(linears, weights):
        sparsegpt = ppl()
    assert math.isfinite(magnitude) and dense < magnitude
    assert dense < sparsegpt < magnitude


# --- the scores, on a toy model whose block inputs are known ---------------------------------------


class ToyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)

    def forward(self, hidden_states, **kwargs):
        return (hidden_states + self.fc(hidden_states),)  # a tuple, like older transformers layers


class Toy(nn.Module):
    """Embedding -> blocks, with the `_no_split_modules` that `decoder_blocks` looks for."""

    _no_split_modules = ["ToyBlock"]

    def __init__(self, embed: torch.Tensor, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embed)
        self.layers = nn.ModuleList(ToyBlock(embed.shape[1]) for _ in range(layers))

    def forward(self, input_ids, use_cache=None):
        assert use_cache is False
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, use_cache=use_cache)[0]
        return h


def toy(channel_scale: torch.Tensor, vocab: int = 50) -> tuple[Toy, dict[str, nn.Linear], torch.Tensor]:
    # Every embedding entry is ±1 times its channel's scale, so each channel's mean x² is scale².
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (vocab, len(channel_scale)), generator=g).float() * 2 - 1
    model = Toy(signs * channel_scale)
    for layer in model.layers:
        nn.init.normal_(layer.fc.weight, generator=g)
    linears = {f"layers.{i}.fc": layer.fc for i, layer in enumerate(model.layers)}
    return model, linears, torch.randint(0, vocab, (6, 10), generator=g)


def test_wanda_with_equal_channel_norms_is_magnitude():
    model, linears, calib = toy(torch.full((16,), 3.0))
    wanda, _ = oneshot_masks(model, linears, "wanda", 2, 4, calib)
    magnitude, _ = oneshot_masks(model, linears, "magnitude", 2, 4)
    assert torch.equal(wanda["layers.0.fc"], magnitude["layers.0.fc"])


def test_wanda_scales_weights_by_input_channel_norms():
    scale = torch.linspace(0.1, 4.0, 16)
    model, linears, calib = toy(scale)
    wanda, _ = oneshot_masks(model, linears, "wanda", 2, 4, calib)
    w = model.layers[0].fc.weight
    assert torch.equal(wanda["layers.0.fc"], nm_mask(w.abs() * scale, 2, 4))
    assert not torch.equal(wanda["layers.0.fc"], nm_mask(w.abs(), 2, 4))


def test_block_is_calibrated_on_pruned_outputs_of_the_block_before():
    # With mask-only pruning, block 1's statistics come from block 0 run with its mask applied.
    model, linears, calib = toy(torch.ones(16))
    masks, _ = oneshot_masks(model, linears, "wanda", 2, 4, calib)
    fc0, fc1 = model.layers[0].fc, model.layers[1].fc
    h = model.embed(calib)
    x1 = h + nn.functional.linear(h, fc0.weight * masks["layers.0.fc"])
    norms = x1.reshape(-1, 16).square().mean(0)
    assert torch.equal(masks["layers.1.fc"], nm_mask(fc1.weight.abs() * norms.sqrt(), 2, 4))


# --- SparseGPT on a single layer ---------------------------------------------------------------------


def obs_reference(W: torch.Tensor, H: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT as the paper states it, in float64 without Cholesky or lazy batching: visit columns left
    to right, eliminating each from the inverse Hessian; at every M-th column drop the M-N weights of the
    next M with the smallest w² / [H⁻¹]_jj and spread each column's error over the columns after it."""
    W, H = W.double().clone(), H.double().clone()
    H.diagonal().add_(0.01 * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    rows = []  # row i of H⁻¹ after columns < i are eliminated
    for i in range(W.shape[1]):
        rows.append(Hinv[i].clone())
        Hinv = Hinv - torch.outer(Hinv[:, i], Hinv[i]) / Hinv[i, i]
    prune = torch.zeros_like(W, dtype=torch.bool)
    for i in range(W.shape[1]):
        if i % m == 0:
            d = torch.stack([rows[j][j] for j in range(i, i + m)])
            drop = (W[:, i : i + m] ** 2 / d).topk(m - n, dim=1, largest=False).indices
            prune[:, i : i + m].scatter_(1, drop, True)
        err = torch.where(prune[:, i], W[:, i], 0.0)
        W[:, i:] -= torch.outer(err / rows[i][i], rows[i][i:])
        W[:, i] = torch.where(prune[:, i], 0.0, W[:, i])
    return ~prune, W


def layer_data(out_features=12, in_features=32, tokens=400):
    g = torch.Generator().manual_seed(1)
    # Correlated inputs with uneven channel scales: where OBS and magnitude disagree.
    mix = torch.randn(in_features, in_features, generator=g) + 2 * torch.eye(in_features)
    X = torch.randn(tokens, in_features, generator=g) @ mix * torch.linspace(0.2, 3, in_features)
    W = torch.randn(out_features, in_features, generator=g)
    hess = Hessian(nn.Linear(in_features, out_features))
    for x in X.split(100):
        hess.add_batch(None, (x[None],), None)
    return W, X, hess.H


def test_hessian_is_two_over_samples_sum_of_outer_products():
    _, X, H = layer_data()
    torch.testing.assert_close(H, 2 / 4 * X.T @ X, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("blocksize", [128, 8, 6])  # one block, several, and one rounded to whole groups
def test_sparsegpt_matches_the_unbatched_obs_algorithm(blocksize):
    W, _, H = layer_data()
    mask, pruned = sparsegpt_prune(W, H, 2, 4, blocksize=blocksize)
    ref_mask, ref_pruned = obs_reference(W, H, 2, 4)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(pruned, ref_pruned.float(), rtol=1e-4, atol=1e-4)


def test_sparsegpt_update_reconstructs_the_layer_output_best():
    W, X, H = layer_data()
    mask, pruned = sparsegpt_prune(W, H, 2, 4)
    norms = X.square().mean(0)

    def error(w):
        return (X @ W.T - X @ w.T).norm()

    magnitude = error(W * nm_mask(W.abs(), 2, 4))
    wanda = error(W * nm_mask(W.abs() * norms.sqrt(), 2, 4))
    assert torch.equal(pruned != 0, mask) and is_nm(mask, 2, 4)
    assert error(pruned) < 0.9 * min(magnitude, wanda)


def test_sparsegpt_dead_inputs_are_pruned_first():
    W, _, H = layer_data()
    H[:, 5] = H[5, :] = 0
    mask, pruned = sparsegpt_prune(W, H, 2, 4)
    assert not mask[:, 5].any() and is_nm(mask, 2, 4)
    assert torch.isfinite(pruned).all()


# --- offloaded calibration: the model in host memory, one block on the device at a time ---------------

OTHER = torch.device("cpu", 0)  # a device other than the model's "cpu" as far as placement goes


def test_offloaded_calibration_holds_one_block_on_the_device_at_a_time(micro, calib, monkeypatch):
    from maskpipe.pipeline.core.models import decoder_blocks

    model, linears, _ = micro
    reference = oneshot_masks(model, linears, "sparsegpt", 2, 4, calib, batch_size=3, weight_update=True)
    blocks = decoder_blocks(model)
    index = {id(b): i for i, b in enumerate(blocks)}
    on_device, moves = set(), []
    real_to = nn.Module.to

    def to(self, *args, **kwargs):
        device = torch.device(args[0])
        if id(self) in index:
            (on_device.add if device == OTHER else on_device.discard)(index[id(self)])
            assert len(on_device) <= 1, "two blocks on the device"
            moves.append((index[id(self)], str(device)))
        elif self is model:
            moves.append(("outside", str(device), len(blocks)))  # 0: the blocks stay where they are
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "to", to)
    masks, updated = oneshot_masks(model, linears, "sparsegpt", 2, 4, calib, batch_size=3, weight_update=True,
                                   offload_to=OTHER)
    assert moves == [("outside", "cpu:0", 0)] + [(i, d) for i in range(len(blocks)) for d in ("cpu:0", "cpu")] + \
        [("outside", "cpu", 0)]
    assert len(blocks) == 4 and not on_device
    for name in linears:
        assert torch.equal(masks[name], reference[0][name])
        assert torch.equal(updated[name], reference[1][name])


def test_offloaded_calibration_puts_everything_back_when_it_fails(micro, monkeypatch):
    model, linears, _ = micro
    moved = []
    real_to = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: (moved.append(str(a[0])), real_to(self, *a, **k))[1])
    bad = torch.full((2, 16), 10**6)  # token ids beyond the vocabulary: the capture fails
    with pytest.raises(IndexError):
        oneshot_masks(model, linears, "wanda", 2, 4, bad, offload_to=OTHER)
    assert moved == ["cpu:0", "cpu"]
