"""Learning DMA's key scorer (`pipeline.attention.dynamic_learning`): only the scorer learns and it resumes
exactly; the attention objective's target and loss; a few steps keep more of what the answers attend to."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.attention.dynamic import KeyScorer, dynamic
from maskpipe.pipeline.attention.dynamic_learning import train_scorer
from maskpipe.pipeline.attention.gates import passkey_batch
from maskpipe.pipeline.attention.kv_scores import Budget, attention_target_loss, needed_keys
from maskpipe.pipeline.core.models import load_model
from maskpipe.pipeline.core.schema import DataConfig
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.train.checkpoint import CheckpointDir
from tests.conftest import CORPORA, Killed, die_at

KJV = CORPORA / "kjv.train.txt"


@pytest.fixture()
def micro(micro_cfg):
    """The bare model (conftest's `micro` also gives its prunable linears); `tokenizer` is conftest's."""
    return load_model(micro_cfg)


def test_training_learns_only_the_scorer_and_resumes_exactly(micro, tokenizer, tmp_path):
    model = micro
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = SimpleNamespace(steps=4, lr=0.05, warmup_steps=1, log_every=1, checkpoint_every=2, batch_size=1,
                         seqlen=128, needles=1)
    budget = Budget(fraction=0.25, sink=2, window=8)

    def stream():
        data = DataConfig.model_validate({"sources": [str(KJV)], "shuffle_buffer": 8})
        return TokenStream(data, tokenizer, 128, seed=0)

    def run(store, on_log=None):
        return train_scorer(model, tokenizer, st, stream(), budget, seed=0, store=store, on_log=on_log)

    scorer, history = run(CheckpointDir(tmp_path / "full", keep=2))
    init = KeyScorer.for_model(model, seed=0)
    assert not torch.equal(scorer.w, init.w) and not torch.equal(scorer.A, init.A)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    with pytest.raises(Killed):
        run(CheckpointDir(tmp_path / "cut", keep=2), die_at(3))
    assert model.config._attn_implementation == "sdpa"
    events = []
    scorer2, history2 = run(CheckpointDir(tmp_path / "cut", keep=2), events.append)
    assert events[0] == {"resumed_from_step": 2} and history2 == history
    assert torch.equal(scorer2.w, scorer.w) and torch.equal(scorer2.A, scorer.A)


def test_training_refuses_a_strategy_that_shards_the_model(micro, tokenizer):
    st = SimpleNamespace(batch_size=2)
    with pytest.raises(MaskpipeError, match=r"dma learning on 1 worker\(s\) runs strategy none or ddp, not 'fsdp'"):
        train_scorer(micro, tokenizer, st, None, Budget(fraction=0.25), seed=0, store=None, strategy="fsdp")


def test_needed_keys_are_the_answer_queries_most_attended_candidates():
    # one row, 2 query heads over 1 KV head, 6 keys; queries 4 and 5 are the answer queries
    probs = torch.zeros(1, 2, 6, 6)
    probs[0, 0, 5, 1] = 0.7  # far key: a candidate of query 5 (sink 1, window 2 keep keys 0, 4, 5)
    probs[0, 1, 4, 2] = 0.4  # far key of query 4, seen by the other head of the group
    probs[0, 0, 5, 4] = 0.9  # in query 5's window: kept anyway, so not needed
    probs[0, 0, 2, 1] = 1.0  # query 2 is not an answer query
    queries = torch.tensor([[False, False, False, False, True, True]])
    pos = torch.arange(6)
    need, cand = needed_keys(probs, 1, queries, pos, pos, sink=1, window=2)
    assert need.shape == (1, 1, 6) and cand.shape == (1, 1, 6)
    assert cand[0, 0].tolist() == [False, True, True, True, False, False]
    assert torch.allclose(need[0, 0], torch.tensor([0, 0.7, 0.4, 0, 0, 0]))
    probs[0, 1, 5, 1] = 0.2  # a second look at key 1: "sum" accumulates it, "max" keeps the larger
    need, _ = needed_keys(probs, 1, queries, pos, pos, sink=1, window=2, reduce="sum")
    assert torch.allclose(need[0, 0], torch.tensor([0, 0.9, 0.4, 0, 0, 0]))
    assert torch.allclose(needed_keys(probs, 1, queries, pos, pos, 1, 2)[0][0, 0, 1], torch.tensor(0.7))


def test_attention_target_loss_prefers_scores_that_rank_the_needed_keys_first():
    need = torch.tensor([[[0.0, 0.7, 0.4, 0.0, 0.9]]])
    cand = torch.tensor([[[False, True, True, True, False]]])
    aligned = torch.tensor([[[0.0, 5.0, 3.0, -5.0, 0.0]]])
    reversed_ = torch.tensor([[[0.0, -5.0, -3.0, 5.0, 0.0]]])
    assert attention_target_loss(aligned, need, cand) < attention_target_loss(reversed_, need, cand)
    # keys outside the candidates carry no loss, whatever their score
    moved = aligned.clone()
    moved[..., 4] = 100.0
    assert attention_target_loss(moved, need, cand) == attention_target_loss(aligned, need, cand)


def test_attention_objective_teaches_the_scorer_to_keep_what_the_answers_attend_to(micro, tokenizer, tmp_path):
    """A few steps of the attention objective, and the keys a quarter budget keeps carry more of the attention
    the dense model's answer queries pay outside their sink and window, on passkey samples it never saw."""
    model = micro
    st = SimpleNamespace(steps=12, lr=0.1, warmup_steps=1, log_every=4, checkpoint_every=100, batch_size=2,
                         seqlen=256, needles=1)
    budget = Budget(fraction=0.25, sink=4, window=16)
    data = DataConfig.model_validate({"sources": [str(KJV)], "shuffle_buffer": 8})
    init = KeyScorer.for_model(model, seed=0)
    scorer, history = train_scorer(model, tokenizer, st, TokenStream(data, tokenizer, 256, seed=0), budget, seed=0,
                                   store=CheckpointDir(tmp_path / "ckpt", keep=1), loss="attention",
                                   scorer=KeyScorer.for_model(model, seed=0))
    assert history[-1]["distance"] < history[0]["distance"]
    x, targets = passkey_batch(random.Random(7), TokenStream(data, tokenizer, 256, seed=1), tokenizer, 4, 256, 1)
    cap = {"queries": {"answer": (targets, "max")}, "budget": budget}
    with torch.no_grad(), dynamic(model, None, None, capture=cap):
        model.base_model(input_ids=x, use_cache=False)
    _, _, k = budget.resolve(256)

    @torch.no_grad()
    def kept_need(source) -> float:
        kept = total = 0.0
        for layer, (v, needed) in cap["needed"].items():
            need, cand = needed["answer"]
            top = torch.where(cand, source(layer, v), -math.inf).topk(k, -1).indices
            kept += need.gather(-1, top).sum().item()
            total += need.sum().item()
        return kept / total

    assert kept_need(scorer) > 1.3 * kept_need(init)


def test_a_profile_costs_each_share_by_the_change_of_the_heads_attention_output(micro):
    """profile_shares' cost of a share, for layer 0 (whose input the mask cannot change), is the relative
    change of each query head's attention output under the rule at that share, summed over the KV head's
    group and averaged over the queries: here text and "prompts" are the same windows, every query an
    answer, so the cost is twice that mean. The chosen share is the cheapest, per head."""
    from maskpipe.pipeline.attention.dynamic_learning import SHARES, profile_shares

    model = micro
    x = torch.randint(3, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
    scorer = KeyScorer.for_model(model, seed=1)
    budget = Budget(keys=16, sink=2)
    shares, cost = profile_shares(model, scorer, budget, x, (x, torch.ones_like(x, dtype=torch.bool)))
    assert cost.shape == (4, 2, len(SHARES)) and shares == tuple(tuple(SHARES[i] for i in r) for r in cost.argmin(-1).tolist())
    outputs = []
    hook = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, i, o: outputs.append(i[0]))
    try:
        with torch.no_grad():
            model(input_ids=x)
            for share in SHARES:
                with dynamic(model, scorer, Budget(keys=16, sink=2, recent=share)):
                    model(input_ids=x)
    finally:
        hook.remove()
    dense = outputs[0].unflatten(-1, (4, -1))  # [B, L, Hq, D]
    for i, out in enumerate(outputs[1:]):
        err = (out.unflatten(-1, (4, -1)) - dense).pow(2).sum(-1) / dense.pow(2).sum(-1)  # [B, L, Hq]
        per_kv = err.unflatten(-1, (2, 2)).sum(-1).mean((0, 1))
        assert torch.allclose(cost[0, :, i].float(), 2 * per_kv, rtol=1e-4, atol=1e-7), SHARES[i]
    assert cost[0, :, 0].sum() != cost[0, :, -1].sum()  # the shares differ in what they cost
