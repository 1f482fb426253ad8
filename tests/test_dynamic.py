"""Content-aware dynamic attention masks (`pipeline.attention.dynamic`, `pipeline.attention.kv_scores`): the DMA
scorer, the kept-key rule and its equivalence with an evicting KV cache, the baselines' scores, a 100%
budget that is the dense model, and gradients that reach only the scorer (its learning: test_dynamic_learning)."""

import math
import random

import pytest
import torch

from maskpipe.pipeline.attention.dynamic import (  # noqa: E402
    KeyScorer,
    cache_bytes,
    dynamic,
    dynamic_attention,
    evict_decode,
    masked_decode,
    param_fraction,
    prompt_scores,
)
from maskpipe.pipeline.attention.kv_scores import (  # noqa: E402
    Budget,
    FixedScores,
    KeyNormScores,
    OracleScores,
    h2o_reduce,
    kept_mask,
    random_scores,
    snapkv_reduce,
    soft_bias,
)
from maskpipe.pipeline.core.models import load_model, load_tokenizer
from maskpipe.pipeline.core.schema import ModelConfig
from maskpipe.pipeline.eval.retrieval import greedy_decode
from tests.conftest import CORPORA, MICRO, ROOT

TINY = ROOT.parent / "shared" / "fixtures" / "models" / "tiny-llama"
KJV = CORPORA / "kjv.train.txt"


def _cfg(path):
    return ModelConfig(name_or_path=str(path), dtype="float32", device="cpu")


@pytest.fixture()
def micro():
    return load_model(_cfg(MICRO))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(_cfg(MICRO))


def reference_keep(scores, i, sink, window, k):
    """The rule for query i written out: sink, window, then the k best candidates by (score desc, position asc)."""
    fixed = {j for j in range(i + 1) if j < sink or i - j < window}
    cand = sorted((j for j in range(i + 1) if j not in fixed), key=lambda j: (-scores[j], j))
    return fixed | set(cand[:k])


# ---------------------------------------------------------------------------------------------- the rule


def test_scorer_is_dmas_formula_and_tiny():
    torch.manual_seed(0)
    s = KeyScorer(layers=3, kv=2, head_dim=8, seed=1)
    with torch.no_grad():
        s.A.copy_(torch.tensor([[0.5, -1.0]] * 3))
    v = torch.randn(2, 2, 5, 8)
    dt = torch.exp(s.A[1][None, :, None] * torch.nn.functional.softplus(torch.einsum("bhld,hd->bhl", v, s.w[1])))
    assert torch.allclose(s(1, v).exp(), dt, atol=1e-6)  # log score = A · softplus(v · w_dt)
    for path in (MICRO, TINY):
        model = load_model(_cfg(path))
        n, frac = param_fraction(KeyScorer.for_model(model, mix_heads=False), model)
        c = model.config
        assert n == c.num_hidden_layers * c.num_key_value_heads * (c.head_dim + 1)
        assert frac < 1e-3, (path.name, n, frac)
        # by default DMA's mixed form, at full rank where it stays under 0.1% of the model (micro-llama),
        # else factored at the largest rank that does (tiny-llama: rank 4 of 8 heads)
        auto = KeyScorer.for_model(model)
        assert param_fraction(auto, model)[1] < 1e-3
        if path == MICRO:
            assert auto.w.dim() == 4
        else:
            assert auto.w_in.shape[-1] == 4 and param_fraction(KeyScorer.for_model(model, rank=5), model)[1] > 1e-3


def test_dmas_mixed_form_reads_every_kv_heads_values_and_is_the_per_head_one_without_cross_weights():
    own = KeyScorer(layers=2, kv=3, head_dim=4, seed=1)
    mixed = KeyScorer(layers=2, kv=3, head_dim=4, seed=2, mix_heads=True)
    assert mixed.w.shape == (2, 3, 3, 4)
    v = torch.randn(2, 3, 5, 4)
    with torch.no_grad():
        mixed.w.zero_()
        mixed.w[:, torch.arange(3), torch.arange(3)] = own.w
    assert torch.allclose(mixed(1, v), own(1, v), atol=1e-6)
    with torch.no_grad():
        mixed.w[1, 0, 2] += 1.0  # head 0's score now moves with head 2's values
    v2 = v.clone()
    v2[:, 2] += 1.0
    assert not torch.allclose(mixed(1, v2)[:, 0], mixed(1, v)[:, 0])
    micro = load_model(_cfg(MICRO))
    n, frac = param_fraction(KeyScorer.for_model(micro, mix_heads=True), micro)
    assert n == 4 * 2 * (2 * 32 + 1) and frac < 1e-3


def test_the_factored_mixed_form_is_dt_proj_at_that_rank():
    low = KeyScorer(layers=2, kv=3, head_dim=4, seed=1, mix_heads=True, rank=2)
    assert low.w_in.shape == (2, 3, 4, 2) and low.w_out.shape == (2, 3, 2)
    full = KeyScorer(layers=2, kv=3, head_dim=4, seed=2, mix_heads=True)
    with torch.no_grad():  # w[h, i, d] = sum_r w_out[h, r] w_in[i, d, r]
        full.w.copy_(torch.einsum("lhr,lidr->lhid", low.w_out, low.w_in))
        full.A.copy_(low.A)
    v = torch.randn(2, 3, 5, 4)
    assert torch.allclose(low(1, v), full(1, v), atol=1e-6)
    with pytest.raises(ValueError, match="mix_heads"):
        KeyScorer(layers=2, kv=3, head_dim=4, rank=2)


def test_kept_mask_is_the_rule_with_ties_and_counts():
    g = torch.Generator().manual_seed(0)
    L, sink, window, k = 40, 3, 5, 7
    scores = torch.randint(0, 6, (2, 3, L), generator=g).float()  # many ties: the position breaks them
    mask = kept_mask(scores, torch.arange(L), torch.arange(L), sink, window, k)
    for b in range(2):
        for h in range(3):
            for i in range(L):
                got = set(mask[b, h, i].nonzero().flatten().tolist())
                assert got == reference_keep(scores[b, h].tolist(), i, sink, window, k), (b, h, i)
    assert mask.sum(-1).tolist() == [[[min(i + 1, sink + window + k) for i in range(L)]] * 3] * 2
    # decoding rows (query offset) are rows of the same rule
    tail = kept_mask(scores, torch.arange(30, L), torch.arange(L), sink, window, k)
    assert torch.equal(tail, mask[:, :, 30:])
    # query-dependent scores: per-row top-k of that row's scores
    qs = torch.rand(1, 1, L, L, generator=g)
    qmask = kept_mask(qs, torch.arange(L), torch.arange(L), sink, window, k)
    for i in range(L):
        assert set(qmask[0, 0, i].nonzero().flatten().tolist()) == reference_keep(qs[0, 0, i].tolist(), i, sink,
                                                                                   window, k)


def test_prefix_top_k_is_what_score_eviction_keeps():
    """The documented equivalence: a cache of `budget` keys that drops, at each new token, the lowest-ranked
    key outside sink and window holds, at every step, exactly the rule's keys for that query."""
    rng = random.Random(0)
    sink, window, k = 2, 3, 4
    scores = [rng.randrange(5) for _ in range(60)]
    mask = kept_mask(torch.tensor(scores, dtype=torch.float)[None, None], torch.arange(60), torch.arange(60),
                     sink, window, k)
    cache = []
    for i in range(60):
        cache.append(i)
        if len(cache) > sink + window + k:
            cand = [j for j in cache if j >= sink and i - j >= window]
            cache.remove(min(cand, key=lambda j: (scores[j], -j)))  # lowest score; ties: the latest
        assert set(cache) == set(mask[0, 0, i].nonzero().flatten().tolist()), i


def test_budget_resolution():
    assert Budget(fraction=0.25, sink=4, window=32).resolve(768) == (4, 32, 156)
    assert Budget(keys=10, sink=4, window=32).resolve(100) == (0, 10, 0)  # window first, then sink
    assert Budget(fraction=1.0).count(57) == 57 and Budget(fraction=0.5).fixed(100).keys == 50
    assert Budget(fraction=0.25).resolve(512) == (4, 96, 28)  # no window: `recent` (3/4) of the budget
    assert Budget(fraction=0.25, recent=0.5).resolve(512) == (4, 64, 60)  # H2O's even split
    assert Budget(keys=72, sink=8).resolve(512) == (8, 54, 10) and Budget(keys=1).resolve(9) == (0, 1, 0)
    assert Budget(fraction=0.5, recent=0.5).fixed(100) == Budget(keys=50, recent=0.5)
    with pytest.raises(ValueError):
        Budget(keys=3, fraction=0.1)
    with pytest.raises(ValueError):
        Budget(keys=3, window=0)


def test_per_head_shares_give_each_kv_head_its_own_split_of_one_budget():
    """Budget.shares: each (layer, KV head) its recent share; kept_mask, soft_bias and the drop positions
    of FlexAttention are then, head by head, the uniform rule at that head's (sink, window, k)."""
    from maskpipe.pipeline.attention.dynamic_flex import drop_positions

    budget = Budget(keys=20, sink=3, shares=((0.25, 1.0, 0.5), (0.75, 0.75, 0.75)))
    sink, window, k = budget.resolve(100, 0)
    assert sink.tolist() == [3, 0, 3] and window.tolist() == [5, 20, 10] and k.tolist() == [12, 0, 7]
    assert (sink + window + k).tolist() == [20] * 3  # the same count per head
    assert [x.tolist() for x in budget.resolve(100, 1)] == [[3] * 3, [15] * 3, [2] * 3]
    assert budget.fixed(300) == budget  # a count stays a count, with its shares
    with pytest.raises(ValueError, match="per layer"):
        budget.resolve(100)
    with pytest.raises(ValueError, match="exclude"):
        Budget(keys=20, window=4, shares=((0.5,),))
    g = torch.Generator().manual_seed(3)
    L = 60
    scores, pos = torch.randn(2, 3, L, generator=g), torch.arange(L)
    mask = kept_mask(scores, pos, pos, sink, window, k)
    soft = soft_bias(scores, pos, pos, sink, window, k, temperature=1e-7).exp()
    drop = drop_positions(scores, sink, window, k)
    for h in range(3):
        one = [int(x[h]) for x in (sink, window, k)]
        assert torch.equal(mask[:, h], kept_mask(scores[:, h:h + 1], pos, pos, *one)[:, 0]), h
        assert torch.allclose(soft[:, h], soft_bias(scores[:, h:h + 1], pos, pos, *one, temperature=1e-7).exp()[:, 0])
        assert torch.equal(drop[:, h], drop_positions(scores[:, h:h + 1], *one)[:, 0]), h
    assert torch.equal((pos[None, :] <= pos[:, None]) & (pos[:, None] < drop[..., None, :]), mask)


def test_soft_bias_is_the_hard_rule_in_the_cold_limit():
    g = torch.Generator().manual_seed(1)
    L, sink, window, k = 30, 2, 4, 6
    s = torch.randn(1, 2, L, generator=g)
    hard = kept_mask(s, torch.arange(L), torch.arange(L), sink, window, k)
    cold = soft_bias(s, torch.arange(L), torch.arange(L), sink, window, k, temperature=1e-7).exp()
    assert torch.allclose(cold, hard.float(), atol=1e-6)
    warm = soft_bias(s, torch.arange(L), torch.arange(L), sink, window, k, temperature=1.0).exp()
    assert bool(((warm > 0.5) == hard).all())  # the threshold splits kept from dropped


# ---------------------------------------------------------------------------------------------- execution


class Attn(torch.nn.Module):
    def __init__(self, st, layer=0):
        super().__init__()
        self.maskpipe_dynamic, self.layer_idx = st, layer


def test_attention_function_masks_per_kv_head_under_gqa():
    from maskpipe.pipeline.attention.dynamic import LayerDynamic

    torch.manual_seed(0)
    L, D = 24, 8
    q, k, v = torch.randn(1, 4, L, D), torch.randn(1, 2, L, D), torch.randn(1, 2, L, D)
    budget = Budget(keys=10, sink=2, window=3)
    src = KeyNormScores()
    out, _ = dynamic_attention(Attn(LayerDynamic(src, budget)), q, k, v, None, scaling=D**-0.5)
    scores = src.scores(0, q, k, v)
    for h in range(4):  # query heads 0, 1 follow KV head 0; 2, 3 follow KV head 1
        keep = torch.tensor([[j in reference_keep(scores[0, h // 2].tolist(), i, 2, 3, 5) for j in range(L)]
                             for i in range(L)])
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, h], k[:, h // 2], v[:, h // 2], attn_mask=keep,
                                                               scale=D**-0.5)
        assert torch.allclose(out[:, :, h], ref, atol=1e-6), h


def test_full_budget_is_the_dense_model_and_a_partial_one_is_not(micro):
    model = micro
    x = torch.randint(0, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    dense = model(input_ids=x).logits
    scorer = KeyScorer.for_model(model)
    for source in (scorer, KeyNormScores(), OracleScores()):
        with dynamic(model, source, Budget(fraction=1.0)):
            assert (model(input_ids=x).logits - dense).abs().max() < 1e-5
    with dynamic(model, scorer, Budget(fraction=1.0), relax="st"):  # training mode at 100%: dense too
        full = model(input_ids=x).logits
    assert (full - dense).abs().max() < 1e-5
    with dynamic(model, scorer, Budget(keys=16, sink=2, window=4)):
        part = model(input_ids=x).logits
    assert torch.allclose(part[:, :16], dense[:, :16], atol=1e-5)  # every query still sees all its keys
    assert not torch.allclose(part[:, 16:], dense[:, 16:], atol=1e-2)
    assert model.config._attn_implementation == "sdpa"  # restored


def test_relaxation_sends_gradients_to_the_scorer_only(micro):
    model = micro
    x = torch.randint(0, 2048, (1, 40), generator=torch.Generator().manual_seed(0))
    scorer = KeyScorer.for_model(model)
    budget = Budget(keys=12, sink=2, window=4)
    with torch.no_grad(), dynamic(model, scorer, budget):
        hard = model.base_model(input_ids=x).last_hidden_state
    for relax in ("st", "sigmoid"):
        scorer.zero_grad()
        with dynamic(model, scorer, budget, relax=relax):
            h = model.base_model(input_ids=x).last_hidden_state
        h.pow(2).sum().backward()
        assert scorer.w.grad.abs().sum() > 0 and scorer.A.grad.abs().sum() > 0, relax
        if relax == "st":  # straight-through: the forward pass is the hard rule
            assert torch.allclose(h, hard, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    # left padding: the relaxation stays finite and its forward pass is still the hard rule
    am = torch.ones(2, 40, dtype=torch.long)
    am[1, :9] = 0
    xx = torch.cat([x, x])
    scorer.zero_grad()
    with torch.no_grad(), dynamic(model, scorer, budget):
        hard = model.base_model(input_ids=xx, attention_mask=am).last_hidden_state
    with dynamic(model, scorer, budget, relax="st"):
        h = model.base_model(input_ids=xx, attention_mask=am).last_hidden_state
    h[am.bool()].pow(2).sum().backward()
    assert torch.allclose(h[am.bool()], hard[am.bool()], atol=1e-5)
    assert bool(scorer.w.grad.isfinite().all()) and scorer.w.grad.abs().sum() > 0


def test_left_padded_batches_decode_as_each_prompt_alone(micro):
    model = micro
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 2048, (n,), generator=g).tolist() for n in (40, 31)]
    scorer = KeyScorer.for_model(model)
    with dynamic(model, scorer, Budget(keys=16, sink=2, window=4)):
        together = greedy_decode(model, prompts, 5)
        alone = [greedy_decode(model, [p], 5)[0] for p in prompts]
    assert together == alone


# ---------------------------------------------------------------------------------------------- baselines


def test_baseline_reductions():
    probs = torch.zeros(1, 2, 6, 6)
    probs[0, 0, :, 1] = 1.0  # query head 0 always looks at key 1
    probs[0, 1, :, 4] = 1.0  # query head 1 at key 4
    assert h2o_reduce(probs, kv_heads=1).tolist() == [[[0, 6, 0, 0, 6, 0]]]
    assert h2o_reduce(probs, kv_heads=2)[0, 1].tolist() == [0, 0, 0, 0, 6, 0]
    snap = snapkv_reduce(probs, kv_heads=2, obs_window=2, kernel=3, pool="max")
    assert snap[0, 0].tolist() == [2, 2, 2, 0, 0, 0]  # max-pooled: the neighbours of a hit count too
    avg = snapkv_reduce(probs, kv_heads=2, obs_window=2, kernel=3, pool="avg")
    assert torch.allclose(avg[0, 1], torch.tensor([0, 0, 0, 2 / 3, 2 / 3, 2 / 3]))
    fixed = FixedScores([torch.tensor([[[3.0, 1.0]]])])
    assert fixed.scores(0, None, torch.zeros(1, 1, 3, 4), None, k_pos=torch.arange(3)).tolist() == [[[3, 1, math.inf]]]
    key = torch.tensor([[[[3.0, 4.0], [0.0, 1.0]]]])
    assert KeyNormScores().scores(0, None, key, None).tolist() == [[[-5.0, -1.0]]]


def test_prompt_scores_come_from_a_dense_pass(micro):
    model = micro
    x = torch.randint(0, 2048, (1, 50), generator=torch.Generator().manual_seed(0))
    scores = prompt_scores(model, x, obs_window=8)
    assert model.config._attn_implementation == "sdpa"
    for s in scores["h2o"].per_layer:  # each query row is a distribution: 50 rows x 2 query heads per KV head
        assert s.shape == (1, 2, 50) and torch.allclose(s.sum(-1), torch.full((1, 2), 100.0), atol=1e-3)
    assert all(s.shape == (1, 2, 50) for s in scores["snapkv"].per_layer)


# ---------------------------------------------------------------------------------------------- eviction


@pytest.mark.parametrize("which", ["dma", "dma-rank-1", "dma-per-head", "key-norm", "h2o", "random"])
def test_evicted_cache_holds_the_budget_and_decodes_as_the_masked_model(micro, which):
    model = micro
    x = torch.randint(3, 2048, (2, 56), generator=torch.Generator().manual_seed(1))
    budget = Budget(keys=20, sink=3, window=4)
    if which == "dma-per-head":  # windows 4 and 10 in each layer but the last, whose heads swap them
        budget = Budget(keys=20, sink=3, shares=((0.2, 0.5),) * 3 + ((0.5, 0.2),))
        which = "dma"
    source = {"dma": lambda: KeyScorer.for_model(model, seed=2), "dma-rank-1": lambda: KeyScorer.for_model(model, rank=1),
              "key-norm": KeyNormScores,
              "h2o": lambda: prompt_scores(model, x)["h2o"], "random": lambda: random_scores(56, 4, 2, seed=0, batch=2)}
    source = source[which]()
    tokens, cache = evict_decode(model, source, budget, x, 1, return_cache=True)
    for i, layer in enumerate(cache.layers):  # after prefill: exactly the rule's keys for the last prompt token
        assert layer.keys.shape == layer.values.shape == (2, 2, 20, 32)
        assert bool((layer.pos[..., :3] == torch.arange(3)).all()) and bool((layer.pos[..., -4:] >= 52).all())
    # greedy decoding with eviction (generated tokens leave the window and compete) = the masked model
    evicted, cache = evict_decode(model, source, budget, x, 9, return_cache=True)
    assert torch.equal(evicted, masked_decode(model, source, budget, x, 9))
    assert all(layer.keys.shape[2] == 20 and int(layer.pos.max()) == 56 + 7 for layer in cache.layers)


def test_cache_contents_are_the_rule_row(micro):
    model = micro
    x = torch.randint(3, 2048, (1, 40), generator=torch.Generator().manual_seed(5))
    scorer = KeyScorer.for_model(model, seed=4)
    budget = Budget(keys=15, sink=2, window=3)
    keys = []
    with torch.no_grad(), dynamic(model, scorer, budget):  # record each layer's value states via the scorer
        orig = scorer.forward

        def spy(layer, value):
            keys.append((layer, value))
            return orig(layer, value)

        scorer.forward = spy
        try:
            model(input_ids=x)
        finally:
            del scorer.forward
    _, cache = evict_decode(model, scorer, budget, x, 1, return_cache=True)
    for layer, value in keys:
        s = scorer(layer, value)
        row = kept_mask(s, torch.tensor([39]), torch.arange(40), 2, 3, 10)[0, :, 0]
        for h in range(2):
            assert cache.layers[layer].pos[0, h].tolist() == row[h].nonzero().flatten().tolist()


def test_cache_bytes(micro):
    c = cache_bytes(micro, 768, Budget(fraction=0.25, sink=4, window=32), dtype_bytes=2, index_bytes=0)
    assert c["keys_per_head"] == 192 and c["kv_cache_bytes"] == 4 * 2 * 192 * 2 * 32 * 2
    assert c["kv_cache_fraction"] == 0.25 and c["dense_kv_cache_bytes"] == 4 * 2 * 768 * 2 * 32 * 2


def test_a_qwen2_model_with_attention_biases_evicts_as_it_masks_and_is_dense_at_full_budget(tmp_path):
    """The issue's unseen model is a GQA Qwen2 (biased q/k/v projections, its own attention class): the
    attention function and the evicting cache must not depend on LLaMA's."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path)
    model = load_model(_cfg(tmp_path))
    assert model.model.layers[0].self_attn.k_proj.bias is not None
    x = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    scorer = KeyScorer.for_model(model, seed=3)
    budget = Budget(keys=12, sink=2)
    evicted, cache = evict_decode(model, scorer, budget, x, 6, return_cache=True)
    assert torch.equal(evicted, masked_decode(model, scorer, budget, x, 6))
    assert all(layer.keys.shape == (2, 2, 12, 16) for layer in cache.layers)
    dense = model(input_ids=x).logits
    with dynamic(model, scorer, Budget(fraction=1.0)):
        torch.testing.assert_close(model(input_ids=x).logits, dense, rtol=0, atol=1e-5)
    with dynamic(model, scorer, budget):
        assert (model(input_ids=x).logits - dense).abs().max() > 1e-3
