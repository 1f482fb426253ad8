import math

import pytest
import torch
from torch.nn.utils import parametrize

from maskpipe.pipeline.train.checkpoint import CheckpointDir
from maskpipe.pipeline.core.schema import DataConfig
from maskpipe.pipeline.stages.learn import LearnStage
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.nm.learn import GumbelNMMask, add_learned_masks, hard_mask, nm_candidates, prior_logits, train_masks
from maskpipe.pipeline.train.loop import cosine_lr, linear_schedule
from maskpipe.pipeline.core.models import base_weight
from maskpipe.pipeline.nm.sparsity import is_nm, nm_mask
from tests.conftest import CORPORA, Killed, die_at


@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)])
def test_candidates_are_all_n_of_m_masks_once(n, m):
    c = nm_candidates(n, m)
    assert c.shape == (math.comb(m, n), m)
    assert bool((c.sum(-1) == n).all())
    assert len({tuple(r.tolist()) for r in c}) == len(c)


def test_soft_mask_keeps_n_in_expectation_and_hard_mask_is_nm():
    g = torch.Generator().manual_seed(0)
    mod = GumbelNMMask(torch.Size([16, 32]), 2, 4, g)
    mod.train()
    soft = mod.soft_mask()
    assert torch.allclose(soft.sum(-1), torch.full((16, 8), 2.0), atol=1e-5)
    assert bool(((soft >= 0) & (soft <= 1)).all())
    mod.eval()
    w = torch.randn(16, 32)
    hard = mod(w)
    assert is_nm(hard != 0, 2, 4) and torch.equal(hard, w * mod.hard_mask().reshape(16, 32))


def test_late_phase_soft_mask_and_masked_weight_hold_no_subnormal_value():
    # At the end of the anneal (tau 0.05, kappa 500), logits a few hundredths apart are ~100 apart
    # after scaling: the losing candidates' probabilities underflow into subnormals, which make x86
    # matmuls ~100x slower.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.02
    mod = GumbelNMMask(w.shape, 2, 4, g, init_std=0.02)
    mod.train()
    mod.tau, mod.kappa = 0.05, 500.0
    for seed in range(3):
        mod.noise_seed = seed
        soft = mod.soft_mask()
        masked = w * soft.reshape(w.shape)
        for t in (soft, masked):
            assert not bool(((t != 0) & (t.abs() < torch.finfo(torch.float32).tiny)).any())
        assert torch.allclose(soft.sum(-1), torch.full_like(soft.sum(-1), 2.0), atol=1e-5)


def test_hard_mask_is_the_argmax_candidate():
    mod = GumbelNMMask(torch.Size([1, 4]), 2, 4)
    with torch.no_grad():
        mod.logits.zero_()
        mod.logits[0, 0, 5] = 1.0  # candidate 5 of 2:4 keeps positions (2, 3)
    assert mod.hard_mask().tolist() == [[[False, False, True, True]]]


def test_prior_rule_2of4_is_the_papers():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 6) * 0.01
    prior = nm_mask(torch.randn(3, 8), 2, 4)
    out = prior_logits(logits, prior, 2, 4, strength=3.0)
    overlap = prior.reshape(3, 2, 4).float() @ nm_candidates(2, 4).float().T
    assert torch.allclose(out, logits + (overlap - 1) * logits.std() * 3.0)
    # the prior's own candidate wins every group
    chosen = nm_candidates(2, 4)[out.argmax(-1)]
    assert torch.equal(chosen.reshape(3, 8), prior)


def test_schedules():
    assert linear_schedule(4.0, 0.05, 0, 100) == 4.0 and linear_schedule(4.0, 0.05, 99, 100) == pytest.approx(0.05)
    assert linear_schedule(100, 500, 50, 101) == pytest.approx(300)
    assert cosine_lr(1.0, 0, 100, 10) == pytest.approx(0.1) and cosine_lr(1.0, 10, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(1.0, 100, 100, 10) == pytest.approx(0.0, abs=1e-12)


def test_gradient_reaches_only_the_logits(micro):
    model, linears = micro
    mods = add_learned_masks(linears, 2, 4, torch.Generator().manual_seed(0))
    for mod in mods.values():
        mod.train()
    x = torch.randint(0, 2048, (2, 32))
    model(input_ids=x, labels=x).loss.backward()
    assert all(mod.logits.grad is not None and mod.logits.grad.abs().sum() > 0 for mod in mods.values())
    logits = {id(mod.logits) for mod in mods.values()}
    frozen = [p for p in model.parameters() if id(p) not in logits]
    assert len(frozen) == sum(1 for _ in model.parameters()) - len(mods)
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    assert all(not base_weight(l).requires_grad and base_weight(l).grad is None for l in linears.values())


def _stage(**kw):
    return LearnStage.model_validate({"stage": "learn", "name": "learn", "data": "d", "steps": 6, "batch_size": 2,
                                      "seqlen": 32, "lr": 1e-2, "log_every": 1, "checkpoint_every": 2,
                                      "keep_checkpoints": 2, **kw})


def _stream(tokenizer):
    data = DataConfig.model_validate({"sources": [str(CORPORA / "kjv.train.txt")], "shuffle_buffer": 8})
    return TokenStream(data, tokenizer, 32, seed=0)


def test_interrupted_and_resumed_run_ends_with_the_same_mask(micro, micro_cfg, tokenizer, tmp_path):
    model, linears = micro
    before = {k: base_weight(l).detach().clone() for k, l in linears.items()}
    st = _stage()
    logits, history = train_masks(model, linears, st, 2, 4, _stream(tokenizer), seed=0,
                                  store=CheckpointDir(tmp_path / "full", keep=2))
    assert [h["step"] for h in history] == list(range(1, 7))
    assert history[0]["tau"] == 4.0 and history[-1]["tau"] == pytest.approx(0.05)
    assert history[0]["kappa"] == 100.0 and history[-1]["kappa"] == pytest.approx(500.0)
    assert all(is_nm(hard_mask(v, 2, 4).reshape(base_weight(linears[k]).shape), 2, 4) for k, v in logits.items())
    assert [p.name for p in CheckpointDir(tmp_path / "full", keep=2).list()] == ["step-00000004", "step-00000006"]

    # Logs every 3 steps, checkpoints every 2: killed at step 6 (after its log, before its checkpoint), the
    # run resumes from step 4 in the middle of a log window, whose losses and mask-change baseline it keeps.
    st = _stage(log_every=3)
    logits, history = train_masks(model, linears, st, 2, 4, _stream(tokenizer), seed=0,
                                  store=CheckpointDir(tmp_path / "full3", keep=2))
    assert [h["step"] for h in history] == [3, 6]

    with pytest.raises(Killed):
        train_masks(model, linears, st, 2, 4, _stream(tokenizer), seed=0, store=CheckpointDir(tmp_path / "cut", keep=2),
                    on_log=die_at(6))
    assert not any(parametrize.is_parametrized(l) for l in linears.values())
    resumed_from = []
    logits2, history2 = train_masks(model, linears, st, 2, 4, _stream(tokenizer), seed=0,
                                    store=CheckpointDir(tmp_path / "cut", keep=2), on_log=resumed_from.append)
    assert resumed_from[0] == {"resumed_from_step": 4}
    assert history2 == history
    for k in logits:
        assert torch.equal(logits[k], logits2[k])
    for k, l in linears.items():  # frozen weights never moved
        assert torch.equal(base_weight(l), before[k])


def test_metrics_log_drops_steps_past_a_resume_and_writes_tensorboard_events(tmp_path):
    from maskpipe.pipeline.io.loggers import MetricsLog, read_metrics

    log = MetricsLog(tmp_path, "learn", tensorboard=True)
    other = MetricsLog(tmp_path, "other")
    for step in (5, 10, 15):
        log({"step": step, "loss": 1.0 / step})
    other({"step": 5, "loss": 0.5})
    log({"resumed_from_step": 10})  # the checkpoint was at 10: step 15 will be logged again
    log({"step": 15, "loss": 0.2})
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [(m["stage"], m["step"]) for m in lines] == [("learn", 5), ("learn", 10), ("other", 5), ("learn", 15)]
    assert lines[-1]["loss"] == 0.2
    assert list((tmp_path / "tensorboard" / "learn").glob("events.out.tfevents.*"))


def test_a_stages_log_line_is_its_progress_steps_tokens_per_second_and_eta(tmp_path, monkeypatch, caplog):
    from maskpipe.pipeline.io import loggers

    clock = iter([100.0, 110.0, 200.0, 205.0])  # start; step 10 at +10 s; a resume at 200; step 60 at +5 s
    monkeypatch.setattr(loggers.time, "monotonic", lambda: next(clock))
    log = loggers.MetricsLog(tmp_path, "maskllm", steps=100, tokens_per_step=4 * 512)
    with caplog.at_level("INFO", logger="maskpipe"):
        log({"step": 10, "loss": 3.5})
        log({"resumed_from_step": 50})  # the rate counts the steps this process ran
        log({"step": 60, "loss": 3.0})
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "maskllm: step 10/100 (10%), 2,048 tokens/s, ETA 1m30s | loss=3.5"
    assert lines[1] == "maskllm: resumed_from_step=50"
    assert lines[2] == "maskllm: step 60/100 (60%), 4,096 tokens/s, ETA 0m20s | loss=3"


def test_gumbel_noise_depends_only_on_the_seed():
    mod = GumbelNMMask(torch.Size([4, 16]), 2, 4, torch.Generator().manual_seed(0))
    mod.train()
    mod.noise_seed = 7
    a, b = mod.soft_mask(), mod.soft_mask()
    mod.noise_seed = 8
    assert torch.equal(a, b) and not torch.equal(a, mod.soft_mask())


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_per_position_logits_take_the_prior_and_export_over_candidates(n, m):
    from maskpipe.pipeline.nm.learn import candidate_logits, positions_from_candidates

    torch.manual_seed(0)
    prior = nm_mask(torch.randn(6, 4 * m), n, m)
    mod = GumbelNMMask(torch.Size([6, 4 * m]), n, m, torch.Generator().manual_seed(0), per_group="positions")
    assert mod.logits.shape[-1] == m
    with torch.no_grad():
        mod.logits.copy_(prior_logits(mod.logits, prior, n, m, 3.0, "positions"))
    assert torch.equal(mod.hard_mask().reshape(6, 4 * m), prior)  # the prior's candidate wins every group
    cands = candidate_logits(mod.logits, n, m, "positions")
    assert cands.shape[-1] == math.comb(m, n)
    # a stored soft state (over candidates) seeds a per-position run by least squares: exact when additive
    torch.testing.assert_close(positions_from_candidates(cands, n, m) @ nm_candidates(n, m).float().T, cands,
                               atol=1e-5, rtol=0)
