import math
import re

import pytest
import torch

from maskpipe.pipeline.attention.plans import (AttentionPlan, LayerHeads, attended_keys, binarize, kv_heads, moa_windows,
                                plan_cost, planned, planned_attention, random_scores, uniform_plan)
from tests.conftest import Killed, die_at


class Attn(torch.nn.Module):
    """Stands in for a transformers attention module: the function reads only its plan."""

    def __init__(self, heads):
        super().__init__()
        self.maskpipe_heads = heads
        self.num_key_value_groups = 2
        self.is_causal = True


def reference_mask(length, streaming, sink, window):
    """The streaming pattern written out element by element."""
    m = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(i + 1):
            m[i, j] = not streaming or j < sink or i - j < window
    return m


@pytest.mark.filterwarnings("ignore:flex_attention called without")  # eager FlexAttention on CPU: unfused, exact
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_a_streaming_head_matches_its_reference_mask(backend):
    torch.manual_seed(0)
    L, D = 40, 16
    q, k, v = torch.randn(1, 4, L, D), torch.randn(1, 2, L, D), torch.randn(1, 2, L, D)
    heads = LayerHeads(torch.tensor([False, True]), torch.tensor([0, 3]), torch.tensor([0, 7]), None, backend)
    out, _ = planned_attention(Attn(heads), q, k, v, None, scaling=D**-0.5)
    masks = [reference_mask(L, False, 0, 0), reference_mask(L, True, 3, 7)]
    for h in range(4):  # query heads 0, 1 share KV head 0; 2, 3 share KV head 1
        ref = torch.nn.functional.scaled_dot_product_attention(q[:, h], k[:, h // 2], v[:, h // 2],
                                                               attn_mask=masks[h // 2], scale=D**-0.5)
        assert torch.allclose(out[:, :, h], ref, atol=1e-6), h
    assert torch.equal(heads.allowed(1, torch.arange(L)[:, None], torch.arange(L)[None]), masks[1])


def test_gates_mix_full_and_streaming_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    stream = LayerHeads(torch.tensor([True, True]), torch.tensor([2, 2]), torch.tensor([4, 4]), None, "sdpa")
    full = LayerHeads(torch.tensor([False, False]), torch.tensor([2, 2]), torch.tensor([4, 4]), None, "sdpa")
    out_s, out_f = (planned_attention(Attn(h), q, k, v, None)[0] for h in (stream, full))
    gate = torch.tensor([1.0, 0.25], requires_grad=True)
    mixed, _ = planned_attention(Attn(LayerHeads(stream.streaming, stream.sink, stream.window, gate, "sdpa")),
                                 q, k, v, None)
    assert torch.allclose(mixed[:, :, :2], out_f[:, :, :2], atol=1e-6)
    assert torch.allclose(mixed[:, :, 2:], 0.25 * out_f[:, :, 2:] + 0.75 * out_s[:, :, 2:], atol=1e-6)
    mixed.sum().backward()
    assert gate.grad is not None and bool((gate.grad != 0).all())


def test_an_all_full_plan_reproduces_the_dense_model(micro):
    model, _ = micro
    x = torch.randint(0, 2048, (2, 48))
    dense = model(input_ids=x).logits
    with planned(model, uniform_plan(kv_heads(model)[:2], False, 4, 8)):
        assert torch.equal(model(input_ids=x).logits, dense)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_streaming_changes_only_positions_past_sink_plus_window_and_decoding_matches(micro):
    model, _ = micro
    x = torch.randint(0, 2048, (1, 40))
    dense = model(input_ids=x).logits
    streaming = torch.zeros(kv_heads(model)[:2], dtype=torch.bool)
    streaming[1, 0] = True
    plan = uniform_plan(streaming.shape, streaming, 2, 6)
    with planned(model, plan):
        logits = model(input_ids=x).logits
        # incremental decoding through the KV cache sees the same pattern as a full forward
        out = model(input_ids=x[:, :30], use_cache=True)
        for t in range(30, 40):
            out = model(input_ids=x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            assert torch.allclose(out.logits[0, -1], logits[0, t], atol=1e-4)
    assert torch.allclose(logits[:, :8], dense[:, :8], atol=1e-5)
    assert not torch.allclose(logits[:, 8:], dense[:, 8:], atol=1e-3)
    with planned(model, plan, backend="flex"):  # the GPU path, run unfused on CPU: the same model
        assert torch.allclose(model(input_ids=x).logits, logits, atol=1e-4)


def test_binarize_random_and_moa_windows():
    gates = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    assert binarize(gates, fraction=0.5).tolist() == [[False, True, False], [True, False, True]]
    assert binarize(gates, threshold=0.25).tolist() == [[False, True, False], [True, False, False]]
    r = binarize(random_scores((6, 8), seed=0), fraction=0.75)
    assert int(r.sum()) == 36 and torch.equal(r, binarize(random_scores((6, 8), seed=0), fraction=0.75))
    w = moa_windows(gates, binarize(gates, fraction=0.5), [16, 64, 32])
    assert w.tolist() == [[0, 16, 0], [32, 0, 64]]  # lowest gate, smallest window


def test_plan_json_round_trip_and_costs():
    plan = uniform_plan((2, 2), torch.tensor([[True, False], [False, False]]), 4, 16, torch.rand(2, 2))
    back = AttentionPlan.from_json(plan.to_json())
    assert torch.equal(back.streaming, plan.streaming) and torch.equal(back.window, plan.window)
    assert torch.allclose(back.gate, plan.gate, atol=1e-6)
    assert math.isnan(AttentionPlan.from_json(uniform_plan((1, 1), True, 1, 2).to_json()).gate.item())
    assert attended_keys(10, 0, None) == 55 and attended_keys(10, 2, 3) == int(reference_mask(10, True, 2, 3).sum())
    cost = plan_cost(plan, 100, head_dim=32, group=2)
    assert cost["kv_cache_fraction"] == pytest.approx((20 + 300) / 400)
    assert cost["kv_cache_bytes"] == 2 * 32 * 2 * (20 + 300)
    assert 0.75 < cost["attention_flops_fraction"] < 1


def _gate_stage(**kw):
    from maskpipe.pipeline.stages.attention import AttentionStage

    return AttentionStage.model_validate({"stage": "attention", "data": "d", "steps": 4, "batch_size": 1,
                                          "seqlen": 128, "needles": 2, "log_every": 1, "checkpoint_every": 2,
                                          "keep_checkpoints": 2, **kw})


def _stream(tokenizer):
    from maskpipe.pipeline.core.schema import DataConfig
    from maskpipe.pipeline.io.data import TokenStream
    from tests.conftest import CORPORA

    return TokenStream(DataConfig.model_validate({"sources": [str(CORPORA / "kjv.train.txt")], "shuffle_buffer": 8}),
                       tokenizer, 128, seed=0)


def test_passkey_batches_mark_the_key_digits_and_resume_exactly(tokenizer):
    import random

    from maskpipe.pipeline.attention.gates import passkey_batch

    rng, stream = random.Random(0), _stream(tokenizer)
    passkey_batch(rng, stream, tokenizer, 2, 128, needles=2)
    rng_state, stream_state = rng.getstate(), stream.state_dict()
    ids, targets = passkey_batch(rng, stream, tokenizer, 2, 128, needles=2)
    assert ids.shape == targets.shape == (2, 128)
    for row, t in zip(ids, targets):
        text = tokenizer.decode(row)
        keys = re.findall(r"The pass key is (\d+)\. Remember", text)
        assert len(keys) == 2 and text.count("What is the pass key? The pass key is") == 2
        predicted = tokenizer.decode(row[1:][t[:-1]]).replace(" ", "")
        assert predicted == "".join(keys)  # exactly the answer digits are predicted from target positions
    rng2, stream2 = random.Random(), _stream(tokenizer)
    rng2.setstate(rng_state)
    stream2.load_state_dict(stream_state)
    ids2, targets2 = passkey_batch(rng2, stream2, tokenizer, 2, 128, needles=2)
    assert torch.equal(ids, ids2) and torch.equal(targets, targets2)


def test_passkey_haystacks_fill_the_prompt_under_a_tokenizer_whose_decode_drops_spaces(tokenizer):
    """A sentencepiece vocabulary loaded as Qwen2Tokenizer (what transformers does for a qwen2 model trained
    with the fixtures' script) encodes and decodes without spaces: a decoded block has no sentence
    boundary, and the haystack came out empty (the unseen Qwen2 model's gates and DMA scorer learned from
    prompts of ~150 tokens in 768). Its haystack is now pieces of the block; a Llama tokenizer's is
    unchanged (sentences)."""
    import random

    from transformers import Qwen2Tokenizer

    from maskpipe.pipeline.attention.gates import keeps_spaces, passkey_batch
    from tests.conftest import MICRO

    spaceless = Qwen2Tokenizer.from_pretrained(MICRO)
    assert keeps_spaces(tokenizer) and not keeps_spaces(spaceless)
    assert spaceless.pad_token_id >= 2048  # and its pad token lies past the embedding (`test_retrieval`)
    for tok in (tokenizer, spaceless):
        ids, targets = passkey_batch(random.Random(0), _stream(tok), tok, 4, 256, needles=2)
        real = (ids != tok.eos_token_id).sum(-1)
        assert (real >= 220).all(), real  # the haystack fills the row, whatever the decode does
        assert (targets.sum(-1) >= 10).all()  # two five-digit keys a row (a digit a token, maybe a space)


def test_gate_learning_trains_only_gates_and_resumes_exactly(micro, tokenizer, tmp_path):
    from maskpipe.pipeline.attention.gates import train_gates
    from maskpipe.pipeline.train.checkpoint import CheckpointDir

    model, _ = micro
    before = {k: v.clone() for k, v in model.state_dict().items()}
    st = _gate_stage()
    full = CheckpointDir(tmp_path / "full", keep=2)
    gates, history = train_gates(model, tokenizer, st, _stream(tokenizer), sink=4, window=16, seed=0, store=full)
    assert gates.shape == kv_heads(model)[:2] and bool(((gates >= 0) & (gates <= 1)).all())
    assert not torch.equal(gates, torch.ones_like(gates))
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [p.name for p in full.list()] == ["step-00000002", "step-00000004"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    with pytest.raises(Killed):
        train_gates(model, tokenizer, st, _stream(tokenizer), sink=4, window=16, seed=0,
                    store=CheckpointDir(tmp_path / "cut", keep=2), on_log=die_at(3))
    assert model.config._attn_implementation == "sdpa"
    events = []
    gates2, history2 = train_gates(model, tokenizer, st, _stream(tokenizer), sink=4, window=16, seed=0,
                                   store=CheckpointDir(tmp_path / "cut", keep=2), on_log=events.append)
    assert events[0] == {"resumed_from_step": 2} and history2 == history and torch.equal(gates2, gates)


def test_projecting_gates_onto_a_budget_keeps_their_order_and_meets_the_mean():
    from maskpipe.pipeline.attention.gates import project_mean

    x = torch.tensor([1.7, 0.9, 0.2, -0.4, 0.55, 0.5])
    for mean in (0.0, 0.25, 0.5, 0.9, 1.0):
        y = project_mean(x, mean)
        assert abs(y.mean().item() - mean) < 1e-6 and bool(((y >= 0) & (y <= 1)).all())
        assert bool((y[torch.argsort(x)].diff() >= 0).all())  # a projection never swaps two gates


def test_gates_learned_under_a_budget_rank_the_one_retrieval_head_first(micro, tokenizer, tmp_path):
    """micro-llama retrieves through one KV head, layer 2 head 1: every 50% plan that streams it scores
    0.10 passkey, every one that keeps it full 1.00 (docs/static_plans.md). A few steps under the
    budget must find it, and keep the mean gate at the budget."""
    from maskpipe.pipeline.attention.gates import train_gates
    from maskpipe.pipeline.train.checkpoint import CheckpointDir

    model, _ = micro
    st = _gate_stage(steps=6, batch_size=2, seqlen=256, lr=0.1, checkpoint_every=100)
    gates, _ = train_gates(model, tokenizer, st, _stream(tokenizer), sink=4, window=32, seed=0,
                           store=CheckpointDir(tmp_path, keep=1))
    assert divmod(int(gates.argmax()), gates.shape[1]) == (2, 1)
    assert abs(gates.mean().item() - 0.5) < 1e-5
    assert bool(binarize(gates, fraction=0.5)[2, 1]) is False
