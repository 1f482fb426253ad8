"""The soft mask in one autograd node (`pipeline.nm.learn._SoftMaskedWeight`), on both of its paths (the
CPU's fused 2:4 kernel and whole tensors), against the autograd chain it replaced, kept here as the
reference: from the same noise, equal within float32 rounding, forward and gradient, at the start and the
end of the anneal; a short run learns the same masks; the late backward holds no subnormal."""

import pytest
import torch
from torch.nn.utils import parametrize

from maskpipe.pipeline.nm import fused
from maskpipe.pipeline.nm.learn import GumbelNMMask, train_masks
from maskpipe.pipeline.train.checkpoint import CheckpointDir
from tests.test_learn import _stage, _stream

TINY = torch.finfo(torch.float32).tiny


class _MaskedWeight(torch.autograd.Function):
    """W ⊙ M whose backward adds ∂(−λ‖W⊙M‖²)/∂M = −2λ·W²·M: the old node, verbatim."""

    @staticmethod
    def forward(ctx, weight, mask, lam):
        ctx.save_for_backward(weight, mask)
        ctx.lam = lam
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        grad_mask = grad * weight
        if ctx.lam:
            grad_mask = grad_mask - 2 * ctx.lam * weight * weight * mask
        return None, grad_mask, None


def reference_masked_weight(mod: GumbelNMMask, weight: torch.Tensor, lam_in_node: bool = True) -> torch.Tensor:
    """GumbelNMMask's training forward before the fused node: the same noise (torch's draw, or the fused
    kernel's where it serves the layer), ATen's softmax, the floor, the candidate product, and the
    regulariser in W ⊙ M's backward (or, lam_in_node=False, left out)."""
    shape = mod.logits.shape[:-1] + (len(mod.candidates),)
    if fused.available(weight, mod.candidate_logits(), mod.candidates):
        u = fused.uniforms(shape, mod.noise_seed)
    else:
        gen = torch.Generator(device=mod.logits.device).manual_seed(mod.noise_seed)
        u = torch.rand(shape, generator=gen, device=mod.logits.device)
    gumbel = u.clamp_min_(1e-10).log_().neg_().clamp_min_(1e-10).log_().neg_()
    probs = torch.softmax((mod.candidate_logits() * mod.kappa + gumbel) / mod.tau, dim=-1)
    probs = probs.masked_fill(probs < 1e-12, 0.0)
    mask = (probs @ mod.candidates).reshape(weight.shape).to(weight.dtype)
    return _MaskedWeight.apply(weight, mask, mod.lam if lam_in_node else 0.0)


def _pair(n, m, per_group, tau, kappa, lam, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(25, 8 * m, generator=g) * 0.05  # 2:4: 200 groups, 12 full tiles of the kernel and a partial one
    mod = GumbelNMMask(w.shape, n, m, g, init_std=spread, per_group=per_group)
    mod.train()
    mod.tau, mod.kappa, mod.lam, mod.noise_seed = tau, kappa, lam, 11
    upstream = torch.randn(w.shape, generator=g)
    return w, mod, upstream


def _rounding(mod, w, upstream) -> float:
    """Float32 rounding of a logit's gradient κ/τ·p·(g − Σp·g): late in the anneal the winner's p is 1 − ε
    and g − Σp·g cancels, leaving the rounding of g (ulp ~ 1.2e-7·|g|) times κ/τ (1e4 at the end)."""
    g = (upstream * w).reshape(*mod.logits.shape[:-1], mod.m) @ mod.candidates.T
    return 2 * torch.finfo(torch.float32).eps * mod.kappa / mod.tau * float(g.abs().max())


def _exponent_rounding(mod) -> float:
    """Relative rounding of a probability whose exp and log are another library's (`fused`'s vector
    math against ATen's): an ulp of the softmax's argument s = (κ·logit + gumbel)/τ, which reaches ~10³
    late in the anneal (gumbel noise ≤ 25 at 1e-10 uniforms)."""
    s = (mod.candidate_logits().detach().abs().max() * mod.kappa + 25) / mod.tau
    return 4 * torch.finfo(torch.float32).eps * float(s)


ANNEAL = [(4.0, 100.0, 0.01), (1.0, 300.0, 0.03), (0.05, 500.0, 0.05)]  # tau, kappa, logit spread late in a run


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8)])
@pytest.mark.parametrize("per_group", ["candidates", "positions"])
@pytest.mark.parametrize("tau,kappa,spread", ANNEAL)
@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("kernel", ["fused", "whole-tensor"])
def test_fused_soft_mask_equals_the_autograd_chain(n, m, per_group, tau, kappa, spread, lam, kernel, monkeypatch):
    """The node on both of its paths: the CPU's one-pass kernel (`fused`, 2:4 only) and whole tensors."""
    monkeypatch.setattr(fused, "ENABLED", kernel == "fused")
    w, mod, upstream = _pair(n, m, per_group, tau, kappa, lam, spread)
    masked = reference_masked_weight(mod, w)
    (masked * upstream).sum().backward()
    ref_grad, mod.logits.grad = mod.logits.grad, None
    ours = mod(w)
    (ours * upstream).sum().backward()
    exp = _exponent_rounding(mod) if fused.available(w, mod.candidate_logits(), mod.candidates) else 0.0
    torch.testing.assert_close(ours, masked, rtol=max(1e-6, exp), atol=1e-7)  # W times sums of p: a few ulp
    torch.testing.assert_close(mod.logits.grad, ref_grad, rtol=max(1e-5, exp), atol=_rounding(mod, w, upstream))


def test_regulariser_in_the_backward_is_the_gradient_of_the_loss_term():
    """The node's backward adds ∂(−λ‖W⊙M‖²)/∂logits: the gradient of the explicit loss term."""
    w, mod, upstream = _pair(2, 4, "candidates", 1.0, 300.0, 0.3, 0.03)
    masked = reference_masked_weight(mod, w, lam_in_node=False)
    ((masked * upstream).sum() - 0.3 * masked.pow(2).sum()).backward()
    ref_grad, mod.logits.grad = mod.logits.grad, None
    (mod(w) * upstream).sum().backward()
    torch.testing.assert_close(mod.logits.grad, ref_grad, rtol=1e-5, atol=_rounding(mod, w, upstream))


def test_soft_mask_is_the_masked_weights_mask_and_depends_only_on_the_seed():
    w, mod, _ = _pair(2, 4, "candidates", 0.05, 500.0, 0.0, 0.05)
    torch.testing.assert_close(w * mod.soft_mask().reshape(w.shape), mod(w).detach(), rtol=0, atol=0)
    a = mod.soft_mask()
    mod.noise_seed += 1
    assert not torch.equal(a, mod.soft_mask())


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_late_phase_backward_holds_no_subnormal(lam):
    """At tau 0.05, kappa 500 softmax's own backward gives every floored candidate y·(0 − Σ p·g), y
    subnormal; the node's backward gives it an exact 0, and its other values stay normal."""
    w, mod, upstream = _pair(2, 4, "candidates", 0.05, 500.0, lam, 0.05)
    for seed in range(3):
        mod.noise_seed = seed
        (mod(w) * upstream).sum().backward()
        grad, mod.logits.grad = mod.logits.grad, None
        assert not bool(((grad != 0) & (grad.abs() < TINY)).any())
        assert float((grad == 0).float().mean()) > 0.3  # the floored candidates: exact zeros, not subnormals


def test_the_fused_kernels_noise_is_uniform_and_a_function_of_the_seed_and_the_element_alone():
    u = fused.uniforms((1000, 1000), 3)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 2e-3 and abs(float(u.var()) - 1 / 12) < 2e-3  # ~5 sigma at 1M
    hist = torch.histc(u, bins=100, min=0, max=1)
    assert float(((hist - 1e4) ** 2 / 1e4).sum()) < 160  # chi-square, 99 degrees of freedom: p < 1e-4 above
    assert torch.equal(fused.uniforms((7, 6), 3).flatten(), u.flatten()[:42])  # no dependence on the shape
    assert not torch.equal(u, fused.uniforms((1000, 1000), 4))
    assert torch.equal(fused.uniforms((4,), 2**64 + 5), fused.uniforms((4,), 5))  # seeds are taken mod 2^64


def test_the_fused_kernel_serves_2_4_float32_on_the_cpu_and_nothing_else():
    """It builds here (a C++ compiler is part of the install), and every other case keeps whole tensors."""
    w, mod, _ = _pair(2, 4, "candidates", 1.0, 300.0, 0.0, 0.03)
    logits = mod.candidate_logits()
    assert fused.available(w, logits, mod.candidates)
    assert not fused.available(w.bfloat16(), logits, mod.candidates)
    w8, mod8, _ = _pair(2, 8, "candidates", 1.0, 300.0, 0.0, 0.03)
    assert not fused.available(w8, mod8.candidate_logits(), mod8.candidates)


def test_a_short_run_learns_the_masks_of_the_autograd_chain(micro, tokenizer, tmp_path, monkeypatch):
    """Six steps through the whole anneal (tau 4 → 0.05), the regulariser on: logits within one step's lr
    of the old path's, the same argmax in all but 1e-3 of the groups (7 of 196,608 on the whole-tensor
    path when written, none on the fused kernel: near-ties)."""
    model, linears = micro
    runs = {}
    for path in ("fused", "reference"):
        if path == "reference":
            def forward(self, weight):
                if not self.training:
                    return weight * self.hard_mask().reshape(weight.shape).to(weight.dtype)
                return reference_masked_weight(self, weight)
            monkeypatch.setattr(GumbelNMMask, "forward", forward)
        logits, _ = train_masks(model, linears, _stage(sparse_reg=1e-2), 2, 4, _stream(tokenizer), seed=0,
                                store=CheckpointDir(tmp_path / path, keep=2))
        runs[path] = logits
    assert not any(parametrize.is_parametrized(lin) for lin in linears.values())
    ours, ref = runs["fused"], runs["reference"]
    diff = max(float((ours[k] - ref[k]).abs().max()) for k in ref)
    flipped = sum(int((ours[k].argmax(-1) != ref[k].argmax(-1)).sum()) for k in ref)
    groups = sum(ref[k].shape[0] * ref[k].shape[1] for k in ref)
    print(f"max |logit diff| {diff:.3g}, argmax differs in {flipped} of {groups} groups")
    # Adam moves a logit by about lr·m/√v whatever the gradient's size: where the gradient is rounding noise
    # (the winner's, late) the two paths move it apart by up to that. Within one step's lr (1e-2; measured
    # 2.7e-4 on the whole-tensor path, 3.7e-4 on the fused kernel, whose exp and log round differently), and
    # the same argmax but at near-ties.
    assert diff < _stage().lr and flipped <= 1e-3 * groups


@pytest.mark.parametrize("tau,kappa,spread", ANNEAL)
def test_clamping_the_exponents_changes_no_probability(tau, kappa, spread, monkeypatch):
    """Exponents below EXP_FLOOR (x86's slow exp) give probabilities below PROB_FLOOR either way."""
    from maskpipe.pipeline.nm import learn

    logits = torch.randn(64, 32, 6, generator=torch.Generator().manual_seed(0)) * spread
    gumbel = learn.gumbel_noise(logits.shape, 5, logits.device)
    clamped = learn.gumbel_softmax(logits, gumbel.clone(), tau, kappa)
    monkeypatch.setattr(learn, "EXP_FLOOR", -float("inf"))
    assert torch.equal(clamped, learn.gumbel_softmax(logits, gumbel, tau, kappa))
