"""The dynamic mask through FlexAttention (`pipeline.attention.dynamic_flex`): drop positions that give the
kept-key rule exactly, a block mask that skips blocks, and the same attention as the SDPA path (FlexAttention
runs eagerly on the CPU: unfused and slow, but the same arithmetic as its compiled CUDA kernel's)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import maskpipe.pipeline.attention.dynamic as dyn
from maskpipe.pipeline.attention import dynamic_flex
from maskpipe.pipeline.attention.dynamic import KeyScorer, dynamic
from maskpipe.pipeline.attention.dynamic_flex import (
    block_mask,
    drop_positions,
    flex_dynamic_attention,
    kept,
    running_kth,
)
from maskpipe.pipeline.attention.kv_scores import Budget, KeyNormScores, OracleScores, kept_mask
from maskpipe.pipeline.core.models import load_model
from maskpipe.pipeline.core.schema import ModelConfig
from tests.conftest import MICRO

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without")  # eager on CPU: unfused, exact


def rule_from_drop(drop, q_pos, k_pos):
    b, h = torch.arange(drop.shape[0]).view(-1, 1, 1, 1), torch.arange(drop.shape[1]).view(1, -1, 1, 1)
    return kept(drop, b, h, q_pos[:, None], k_pos[None, :])


@pytest.mark.parametrize("scan", ["one block", "blocks of 64"])
def test_drop_positions_give_the_rule_exactly(monkeypatch, scan):
    if scan != "one block":  # the scan's carry across blocks, as at long lengths
        monkeypatch.setattr(dynamic_flex, "SCAN_ELEMENTS", 1)
    g = torch.Generator().manual_seed(0)
    for length, sink, window, k, ties in itertools.product([1, 7, 130], [0, 4], [1, 3, 16], [0, 1, 5, 40, 200],
                                                            [False, True]):
        scores = torch.randn(2, 3, length, generator=g)
        if ties:  # equal scores: the position breaks them
            scores = scores.mul(2).round()
        drop = drop_positions(scores, sink, window, k)
        pos = torch.arange(length)
        assert torch.equal(rule_from_drop(drop, pos, pos), kept_mask(scores, pos, pos, sink, window, k)), \
            (length, sink, window, k, ties)
        # rows of a prefill after a cache (queries from position 100 on) are rows of the same rule
        tail = torch.arange(min(100, length - 1), length)
        assert torch.equal(rule_from_drop(drop, tail, pos), kept_mask(scores, tail, pos, sink, window, k))


def test_running_kth_is_the_prefix_order_statistic(monkeypatch):
    monkeypatch.setattr(dynamic_flex, "SCAN_ELEMENTS", 1)
    v = torch.randint(0, 50, (2, 2, 300), generator=torch.Generator().manual_seed(1))
    for k in (1, 5, 17):
        padded = [torch.cat([v[..., :p + 1], torch.full((2, 2, k), 300)], -1) for p in range(300)]
        assert torch.equal(running_kth(v, k), torch.stack([t.sort(-1).values[..., k - 1] for t in padded], -1))


@pytest.mark.parametrize("q_len", [150, 37])
def test_flex_attention_is_sdpa_with_the_rules_mask_under_gqa(q_len):
    torch.manual_seed(0)
    b, hq, hkv, length, d = 2, 4, 2, 150, 16
    q, k, v = torch.randn(b, hq, q_len, d), torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    scores = torch.randn(b, hkv, length)
    pos = torch.arange(length)
    for sink, window, top in [(4, 8, 12), (0, 1, 0), (2, 16, 200)]:
        out = flex_dynamic_attention(q, k, v, scores, sink, window, top, d**-0.5, block_size=16)
        mask = kept_mask(scores, pos[length - q_len:], pos, sink, window, top).repeat_interleave(2, 1)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attn_mask=mask, scale=d**-0.5)
        assert torch.allclose(out, ref, atol=1e-5), (sink, window, top, (out - ref).abs().max())


def test_block_mask_skips_blocks_that_no_query_keeps():
    length, block = 192, 32
    scores = torch.randn(1, 2, length, generator=torch.Generator().manual_seed(2))
    small = block_mask(drop_positions(scores, 4, 16, 8), 4, length, block)
    full = block_mask(drop_positions(scores, 4, 16, length), 4, length, block)  # everything fits: causal
    computed = [int((m.kv_num_blocks + m.full_kv_num_blocks).sum()) for m in (small, full)]
    causal = 4 * sum(range(1, length // block + 1))
    assert computed[1] == causal and computed[0] < causal
    assert small.sparsity() > full.sparsity()
    # built per KV head and shared by its group: the block mask of the rule per query head
    drop = drop_positions(scores, 4, 16, 8)
    for q_len in (length, 80):
        direct = create_block_mask(lambda b, h, q, k, offset=length - q_len: kept(drop, b, h // 2, q + offset, k),
                                   1, 4, q_len, length, device="cpu", BLOCK_SIZE=block)
        shared = block_mask(drop, 4, q_len, block)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices"):
            assert torch.equal(getattr(shared, name), getattr(direct, name)), name
        assert shared.shape == direct.shape


class Counting:
    """`flex_dynamic_attention` with small blocks (so that they matter at these lengths), counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1
        return flex_dynamic_attention(*args, block_size=32)


@pytest.fixture()
def micro():
    return load_model(ModelConfig(name_or_path=str(MICRO), dtype="float32", device="cpu"))


@pytest.mark.parametrize("source", ["learned", "key-norm"])
def test_micro_llama_under_flex_is_the_sdpa_masked_model(micro, monkeypatch, source):
    scores = KeyScorer.for_model(micro, seed=3) if source == "learned" else KeyNormScores()
    flex = Counting()
    monkeypatch.setattr(dyn, "flex_dynamic_attention", flex)
    x = torch.randint(0, 2048, (2, 160), generator=torch.Generator().manual_seed(0))
    budget = Budget(keys=40, sink=4, window=16)
    with torch.no_grad():
        dense = micro(input_ids=x).logits
        with dynamic(micro, scores, budget, backend="sdpa"):
            ref = micro(input_ids=x).logits
        with dynamic(micro, scores, budget):  # auto: SDPA on the CPU
            assert torch.equal(micro(input_ids=x).logits, ref)
        assert flex.calls == 0
        with dynamic(micro, scores, budget, backend="flex"):
            out = micro(input_ids=x).logits
    assert flex.calls == micro.config.num_hidden_layers
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    assert not torch.allclose(ref, dense, atol=1e-2)  # the budget masks something


def test_flex_falls_back_to_sdpa_where_it_does_not_apply(micro, monkeypatch):
    flex = Counting()
    monkeypatch.setattr(dyn, "flex_dynamic_attention", flex)
    x = torch.randint(0, 2048, (2, 64), generator=torch.Generator().manual_seed(0))
    budget = Budget(keys=24, sink=4, window=8)
    with torch.no_grad():
        with dynamic(micro, OracleScores(), budget, backend="flex"):  # query-dependent scores
            micro(input_ids=x)
        with dynamic(micro, KeyNormScores(), budget, backend="flex"):
            mask = torch.ones_like(x)
            mask[0, :5] = 0  # left padding
            micro(input_ids=x, attention_mask=mask)
            out = micro(input_ids=x[:, :40], use_cache=True)  # the prefill: flex
            micro(input_ids=x[:, 40:41], cache=out.cache, use_cache=True)  # one query: SDPA
    assert flex.calls == micro.config.num_hidden_layers
    with pytest.raises(ValueError, match="backend"), dynamic(micro, KeyNormScores(), budget, backend="triton"):
        pass
