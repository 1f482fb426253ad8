import pytest
import torch

from maskpipe.pipeline.attention.moa import choose_spans, moa_plan, outside, profile_spans


def _attention(length, far):
    """One query head's causal attention: each query puts `far` of its mass on the key half-way back to
    the start (long range) and the rest on itself (local)."""
    a = torch.zeros(length, length)
    for q in range(length):
        back = q // 2
        a[q, q] += 1 - far if back != q else 1.0
        if back != q:
            a[q, back] += far
    return a


def test_the_profile_counts_what_sink_and_window_miss():
    a = _attention(64, far=0.7)
    a[:60] = 0  # only queries 60-63, which look back about 30 tokens
    mass = outside(a[None], sink=2, windows=[8, 40])
    assert torch.allclose(mass, torch.tensor([[4 * 0.7, 0.0]]))


def test_chosen_spans_respect_the_budget():
    torch.manual_seed(0)
    mass = torch.rand(12, 4).sort(-1, descending=True).values
    mass[:, -1] = 0
    costs = [16, 32, 64, 256]
    for budget in (12 * 16, 800, 1500, 12 * 256):
        choice = choose_spans(mass, costs, budget)
        assert sum(costs[c] for c in choice.tolist()) <= budget
    assert choose_spans(mass, costs, 12 * 256).eq(3).all()  # everything fits: every head full


def test_a_local_head_gets_the_smallest_window_and_a_long_range_head_a_long_one():
    # head 0 attends locally (no mass beyond any window), head 1 retrieves from far back
    mass = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.9, 0.9, 0.8, 0.0]]])
    plan = moa_plan(mass, [32, 64, 128, 512], budget_tokens=(8 + 32) + 512, sink=8, length=512)
    assert plan.window[0, 0] == 32 and bool(plan.streaming[0, 0])
    assert not bool(plan.streaming[0, 1])


@pytest.mark.parametrize("measure", ["gradient", "mass"])
def test_profiling_a_model_finds_less_influence_outside_longer_windows(micro, tokenizer, measure):
    from tests.test_attention import _stream

    model, _ = micro
    mass, windows = profile_spans(model, tokenizer, _stream(tokenizer), sink=4, batches=1, batch_size=1, seqlen=128,
                                  needles=1, measure=measure)
    assert windows == [8, 16, 32, 64, 128] and mass.shape == (4, 2, 5)
    assert bool((mass[..., :-1] >= mass[..., 1:] - 1e-6).all()) and bool((mass[..., -1].abs() < 1e-5).all())
    assert bool((mass[..., 0] > 0).any())
    assert model.config._attn_implementation == "sdpa"
    assert all(p.grad is None for p in model.parameters())


def test_a_moa_stage_needs_a_haystack_and_no_gates_and_only_moa_takes_candidate_windows():
    from pydantic import ValidationError

    from maskpipe.pipeline.stages.attention import AttentionStage

    def stage(**kw):
        return AttentionStage.model_validate({"stage": "attention", "name": "a", **kw})

    assert stage(method="moa", data="d", candidate_windows=[16, 32]).candidate_windows == [16, 32]
    with pytest.raises(ValidationError, match="data: profiling MoA spans needs a haystack corpus"):
        stage(method="moa")
    with pytest.raises(ValidationError, match="method: a moa plan takes a streaming fraction"):
        stage(method="moa", data="d", gates_from="duo")
    with pytest.raises(ValidationError, match="candidate_windows: only method moa"):
        stage(data="d", candidate_windows=[16])
