"""Learned N:M masks over frozen weights (MaskLLM, Fang et al. 2024, arXiv 2409.17481).

Every group of M consecutive weights along a linear's input dimension gets a vector of logits over
its C(M,N) candidate masks. Training draws a soft mask with Gumbel-softmax over `logits * kappa` at
temperature `tau`, the candidate-weighted sum of the candidates; evaluation and export take the
argmax candidate. Only the logits train; the base weights stay frozen underneath a parametrization.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parametrize

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.train.checkpoint import Rows, rank_world
from maskpipe.pipeline.nm import fused
from maskpipe.pipeline.nm.encoding import candidates
from maskpipe.pipeline.train.loop import linear_schedule, train
from maskpipe.pipeline.core.models import base_weight, decoder_blocks, defer, deferred, device_of
from maskpipe.pipeline.train.shard import MOMENTS, make_strategy
from maskpipe.pipeline.nm.sparsity import check_divisible
from maskpipe.pipeline.core.vocab import check_batch_split


# Soft-mask probabilities below this are exact zeros: far above float32's subnormal range (< 1.2e-38),
# far below anything that moves the mask (1e-12 of a weight) or a logit (its gradient is scaled by p).
PROB_FLOOR = 1e-12


@lru_cache(maxsize=None)
def nm_candidates(n: int, m: int) -> torch.Tensor:
    """All C(M,N) masks of one group, [C, M] bool, in the artifact's rank order (`pipeline.nm.encoding.candidates`)."""
    return torch.tensor(candidates(n, m))


# The largest float32 below PROB_FLOOR: `threshold_(p, BELOW_FLOOR, 0)` zeroes exactly the p < PROB_FLOOR.
BELOW_FLOOR = torch.nextafter(torch.tensor(PROB_FLOOR), torch.tensor(0.0)).item()
EXP_FLOOR = -80.0  # exp(−80) ≈ 1.8e-35: a normal float32, and far below PROB_FLOOR (≈ exp(−27.6))
PROFILE_RANGES = False  # benchmarks/learn_step.py names the soft mask's parts in its profiles


def _part(name: str):
    return torch.profiler.record_function(f"soft_mask.{name}") if PROFILE_RANGES else nullcontext()


def gumbel_noise(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise that depends only on the seed: a resumed run, every data-parallel rank and
    an activation-checkpointing recomputation all draw the same noise. (The CPU's fused 2:4 kernel draws
    its own, counter-based: `fused`.)"""
    gen = torch.Generator(device=device).manual_seed(seed)
    u = torch.rand(shape, generator=gen, device=device)
    return u.clamp_min_(1e-10).log_().neg_().clamp_min_(1e-10).log_().neg_()  # in place: as large as the logits


def gumbel_softmax(logits: torch.Tensor, gumbel: torch.Tensor, tau: float, kappa: float) -> torch.Tensor:
    """softmax((κ·logits + gumbel)/τ) over the last dim, floored at PROB_FLOOR; overwrites `gumbel`.
    Written out in whole-tensor ops: ATen's CPU softmax over a last dim of 6 runs row by row, 3-7x slower
    (one 768×64×6 layer)."""
    scores = gumbel.add_(logits * kappa).div_(tau)
    scores -= scores.amax(-1, keepdim=True)
    # exp of x < −87 (a float32 subnormal or 0) takes x86's slow path, ~30-70x slower: late in the anneal
    # most candidates are there. Below EXP_FLOOR p < PROB_FLOOR and is floored anyway: the same probs.
    probs = scores.clamp_min_(EXP_FLOOR).exp_()
    probs /= probs.sum(-1, keepdim=True)
    # As tau anneals, the losing candidates' probabilities underflow into float32 subnormals, and
    # x86 matmuls with subnormal operands run ~100x slower (the last steps of a run took 15x the
    # first). Below PROB_FLOOR a candidate changes neither the mask nor, through Adam's eps, its logit.
    return torch.nn.functional.threshold_(probs, BELOW_FLOOR, 0.0)


def gumbel_softmax_backward(probs: torch.Tensor, grad_probs: torch.Tensor, tau: float, kappa: float) -> torch.Tensor:
    """∂/∂logits of `gumbel_softmax`: κ/τ · p ⊙ (g − Σ p⊙g); overwrites `grad_probs`. A floored
    candidate's p is 0, so its gradient is an exact 0, never the subnormal y·(0 − Σ) of softmax's own backward.
    (Not `torch.set_flush_denormal`: it sets the calling thread's FTZ/DAZ only; at 2 threads half of an
    op's subnormal results, those of the OpenMP worker, survive it.)"""
    dot = (probs * grad_probs).sum(-1, keepdim=True)
    return grad_probs.sub_(dot).mul_(probs).mul_(kappa / tau)


class _SoftMaskedWeight(torch.autograd.Function):
    """W ⊙ M with M = gumbel_softmax(logits) @ candidates, in one node with a hand-written backward:
    autograd's chain saved the softmax's output, the floor's bool mask and the floored probabilities;
    this saves the probabilities (and W⊙M while the regulariser is on). The backward also carries the
    gradient of the sparse-weight regulariser −λ·‖W⊙M‖² (∂/∂M = −2λ·W²·M). Adding it here, inside each
    layer, rather than as a loss term over every weight keeps each block's gradients local to that
    block: no masked weight outlives its block's backward, which is what sharded training and
    activation checkpointing need. Autocast is off inside: the mask is summed in float32, then cast once.
    On the CPU a 2:4 float32 layer takes `fused`'s one-pass kernel, noise included."""

    @staticmethod
    def forward(ctx, weight, logits, candidates, seed, tau, kappa, lam):
        ctx.tau, ctx.kappa, ctx.lam = tau, kappa, lam
        ctx.fused = fused.available(weight, logits, candidates)
        if ctx.fused:  # the noise is drawn inside the kernel (`fused`: another draw than torch's)
            with _part("fused"):
                probs, masked = fused.forward(weight, logits, seed, tau, kappa, EXP_FLOOR, BELOW_FLOOR)
            ctx.save_for_backward(weight, probs, candidates, masked if lam else None)
            return masked
        with torch.autocast(weight.device.type, enabled=False):
            with _part("noise"):
                gumbel = gumbel_noise(logits.shape[:-1] + (len(candidates),), seed, logits.device)
            with _part("softmax"):
                probs = gumbel_softmax(logits, gumbel, tau, kappa)
            with _part("product"):
                mask = (probs @ candidates).reshape(weight.shape).to(weight.dtype)
            with _part("masked_weight"):
                masked = weight * mask
        ctx.save_for_backward(weight, probs, candidates, masked if lam else None)
        return masked

    @staticmethod
    def backward(ctx, grad):
        weight, probs, candidates, masked = ctx.saved_tensors
        if ctx.fused:
            with _part("fused"):
                return None, fused.backward(probs, grad, weight, masked, ctx.tau, ctx.kappa, ctx.lam), *[None] * 5
        with torch.autocast(weight.device.type, enabled=False):
            if ctx.lam:  # ∂/∂M = (grad − 2λ·W⊙M)·W: one pass over the weight more than without it
                with _part("regulariser"):
                    grad = torch.add(grad, masked, alpha=-2 * ctx.lam)
            with _part("masked_weight"):
                grad_mask = grad.mul_(weight) if ctx.lam else grad * weight
            with _part("product"):
                grad_probs = grad_mask.float().reshape(probs.shape[:-1] + (-1,)) @ candidates.T
            with _part("softmax"):
                grad_logits = gumbel_softmax_backward(probs, grad_probs, ctx.tau, ctx.kappa)
        return None, grad_logits, None, None, None, None, None


class GumbelNMMask(nn.Module):
    """Weight parametrization W -> W * mask(logits): soft Gumbel-softmax sample in training mode,
    hard argmax candidate in eval mode. The trainer sets `tau`, `kappa`, `lam` (the regulariser's λ,
    already divided by the accumulation steps) and `noise_seed` before every forward.

    `per_group="candidates"` is MaskLLM: one logit per candidate, C(M,N) per group. `"positions"`
    keeps one logit per weight, a candidate's logit being the sum of its kept positions' (M per
    group: 4 instead of 6 at 2:4, 8 instead of 70 at 4:8); MaskLLM's prior is of that form already."""

    def __init__(self, shape: torch.Size, n: int, m: int, generator: torch.Generator | None = None,
                 init_std: float = 0.01, per_group: str = "candidates", dtype: torch.dtype = torch.float32,
                 meta: bool = False):
        super().__init__()
        out_features, in_features = shape
        cands = nm_candidates(n, m)
        self.n, self.m = n, m
        self.register_buffer("candidates", cands.float(), persistent=False)
        width = len(cands) if per_group == "candidates" else m
        if meta:  # filled later, rows by rows (`add_learned_masks` defers them)
            logits = torch.empty(out_features, in_features // m, width, device="meta")
        else:
            logits = torch.randn(out_features, in_features // m, width, generator=generator) * init_std
        self.logits = nn.Parameter(logits.to(dtype))
        self.per_group = per_group
        self.tau, self.kappa, self.lam, self.noise_seed = 4.0, 100.0, 0.0, 0

    def candidate_logits(self) -> torch.Tensor:
        return candidate_logits(self.logits.float(), self.n, self.m, self.per_group)

    def soft_mask(self) -> torch.Tensor:
        """The soft mask alone, [out, G, M], without autograd's view of it (tests, inspection)."""
        with torch.no_grad():  # the training forward on a weight of ones: its path, draw and arithmetic
            logits = self.candidate_logits()
            ones = torch.ones(logits.shape[0], logits.shape[1] * self.m, device=logits.device)
            mask = _SoftMaskedWeight.apply(ones, logits, self.candidates, self.noise_seed, self.tau, self.kappa, 0.0)
            return mask.view(*logits.shape[:-1], self.m)

    def hard_mask(self) -> torch.Tensor:
        return hard_mask(self.candidate_logits(), self.n, self.m)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return weight * self.hard_mask().reshape(weight.shape).to(weight.dtype)
        return _SoftMaskedWeight.apply(weight, self.candidate_logits(), self.candidates, self.noise_seed,
                                       self.tau, self.kappa, self.lam)


def candidate_logits(logits: torch.Tensor, n: int, m: int, per_group: str = "candidates") -> torch.Tensor:
    """[out, G, C] logits over the candidates, from either parametrization."""
    if per_group == "candidates":
        return logits
    return logits @ nm_candidates(n, m).to(logits.device, logits.dtype).T


def hard_mask(logits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The argmax candidate of every group: [out, G, C] logits -> [out, G, M] bool."""
    return nm_candidates(n, m).to(logits.device)[logits.argmax(-1)]


def prior_logits(logits: torch.Tensor, prior: torch.Tensor, n: int, m: int, strength: float,
                 per_group: str = "candidates") -> torch.Tensor:
    """MaskLLM's prior, generalised to N:M: each candidate's logit rises by
    (2·overlap/N − 1) · std(logits) · strength, overlap = kept positions shared with the prior mask.
    For 2:4 this is the paper's (overlap − 1) · std · strength. With one logit per position the same
    rise, up to a constant per group, is 2·prior/N · std · strength on each kept position."""
    groups = prior.reshape(logits.shape[0], -1, m).float()  # [out, G, M]
    std = candidate_logits(logits.float(), n, m, per_group).std()
    if per_group == "positions":
        return logits + (2 * groups / n * std * strength).to(logits.dtype)
    cands = nm_candidates(n, m).to(logits.device).float()  # [C, M]
    overlap = groups @ cands.T  # [out, G, C]
    return logits + ((2 * overlap / n - 1) * std * strength).to(logits.dtype)


def positions_from_candidates(logits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per-position logits whose sums best match candidate logits (least squares): how a stored soft
    state (always per candidate) seeds a per-position run."""
    cands = nm_candidates(n, m).to(logits.device).float()
    return logits.float() @ torch.linalg.pinv(cands).T


def add_learned_masks(
    linears: dict[str, nn.Linear], n: int, m: int, generator: torch.Generator,
    priors: dict[str, torch.Tensor] | None = None, strength: float = 3.0, init_std: float = 0.01,
    per_group: str = "candidates", dtype: torch.dtype = torch.float32,
    init_logits: dict[str, torch.Tensor] | None = None,
) -> dict[str, GumbelNMMask]:
    """Put a GumbelNMMask on every linear; returns name -> mask module (whose logits are what trains).
    `init_logits` (over the candidates) replace the random start. On a linear whose weight is deferred
    (`pipeline.core.models.load_model(meta=True)`) the logits are deferred too: each layer's initial logits
    are made whole when they are materialized, in this same order (the generator's draws are those of
    an ordinary load), and only the rows asked for are kept."""
    for name, lin in linears.items():
        check_divisible(name, lin.weight.shape, m)
    masks = {}
    for name in sorted(linears):
        lin = linears[name]
        weight = base_weight(lin)
        meta = deferred(weight) is not None

        def initial(mod, name=name):
            logits = mod.logits if not meta else torch.randn(mod.logits.shape, generator=generator) * init_std
            logits = logits.detach().to(mod.logits.dtype)
            if priors is not None and name in priors:
                logits = prior_logits(logits, priors[name].to(logits.device), n, m, strength, per_group)
            if init_logits is not None:
                init = init_logits[name].to(logits.device)
                logits = (init if per_group == "candidates" else positions_from_candidates(init, n, m)).to(logits.dtype)
            return logits

        mod = GumbelNMMask(weight.shape, n, m, generator, init_std, per_group, dtype, meta=meta)
        if meta:
            mod.candidates = mod.candidates.to(device_of(weight))
            defer(mod.logits, lambda start, stop, f=initial, mod=mod: f(mod)[start:stop], device_of(weight))
        else:
            mod = mod.to(lin.weight.device)
            with torch.no_grad():
                mod.logits.copy_(initial(mod))
        parametrize.register_parametrization(lin, "weight", mod, unsafe=True)
        masks[name] = mod
    return masks


class MaskLearning:
    """The `pipeline.train.loop.Method` of MaskLLM: one step draws each layer's Gumbel noise from the seed,
    anneals tau, kappa and the regulariser's λ, and runs `grad_accum` micro-batches of the LM loss
    through `shard` (`pipeline.train.shard`), which owns the logits and their AdamW state. A checkpoint
    adds each owned row block of the logits, their moments and the argmax at the last log."""

    desc, loss_key = "mask learning", "loss"

    def __init__(self, shard, mods: dict[str, GumbelNMMask], st, n: int, m: int, stream, *, seed: int,
                 strategy: str, device: torch.device):
        self.shard, self.mods, self.order, self.st, self.n, self.m = shard, mods, sorted(mods), st, n, m
        self.stream, self.seed, self.strategy, self.device = stream, seed, strategy, device
        _, self.world = rank_world()
        self.last = self.argmaxes()  # the mask-change baseline: argmax candidates at the last log
        self.tau = self.kappa = self.lam = 0.0

    def argmaxes(self) -> dict[str, torch.Tensor]:
        """The argmax candidate of every group in the rows this rank owns."""
        return {k: candidate_logits(self.shard.owned(k).float(), self.n, self.m, self.st.logits_per_group)
                .argmax(-1).to(torch.uint8) for k in self.order}

    def change_rate(self, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
        """Fraction of groups whose argmax candidate flipped (MaskLLM's mask-change rate), over all ranks."""
        counts = torch.tensor([float(sum(int((before[k] != after[k]).sum()) for k in self.order)),
                               float(sum(after[k].numel() for k in self.order))]) * self.shard.writes  # one copy a row
        if self.world > 1:
            dist.all_reduce(counts)
        return (counts[0] / counts[1]).item()

    def load(self, ckpt) -> None:
        self.shard.load(ckpt)
        self.last = {k: ckpt.read(f"argmax.{k}", *self.shard.rows(k)) for k in self.order}

    def state(self) -> tuple[dict, dict]:
        tensors = {}
        for k in self.order if self.shard.writes else ():
            start = self.shard.rows(k)[0]
            for what in ("logits", *MOMENTS):
                tensors[f"{what}.{k}"] = Rows(self.shard.owned(k, what), start)
            tensors[f"argmax.{k}"] = Rows(self.last[k], start)
        return tensors, {"world_size": self.world, "strategy": self.strategy}

    def step(self, step: int, lr: float) -> float:
        st, shard, accum = self.st, self.shard, self.st.grad_accum
        self.tau = linear_schedule(*st.tau, step, st.steps)
        self.kappa = linear_schedule(*st.kappa, step, st.steps)
        self.lam = st.sparse_reg * (1 - step / st.steps)
        shard.set_lr(lr)
        shard.zero_grad()
        lm_loss = torch.zeros((), device=self.device)
        for micro in range(accum):
            for i, k in enumerate(self.order):
                mod = self.mods[k]
                mod.tau, mod.kappa, mod.lam = self.tau, self.kappa, self.lam / accum
                mod.noise_seed = (self.seed * 1_000_003 + (step * accum + micro) * len(self.order) + i) % 2**63
            x = self.stream.next_batch(st.batch_size // self.world).to(self.device)
            with shard.sync(micro == accum - 1), torch.autocast(self.device.type, torch.bfloat16,
                                                                enabled=self.device.type == "cuda"):
                loss = shard.forward(input_ids=x, labels=x, use_cache=False).loss
                shard.backward(loss / accum)
            lm_loss += loss.detach().float() / accum
        if self.world > 1:
            dist.all_reduce(lm_loss)
            lm_loss /= self.world
        shard.step()
        return lm_loss.item()

    def logged(self, lr: float) -> dict:
        now = self.argmaxes()
        entry = {"tau": self.tau, "kappa": self.kappa, "lambda": self.lam, "lr": lr,
                 "mask_change": self.change_rate(self.last, now), "state_bytes": self.shard.state_bytes()}
        self.last = now
        return entry


def train_masks(
    model: nn.Module, linears: dict[str, nn.Linear], st, n: int, m: int, stream, *, seed: int, store,
    priors: dict[str, torch.Tensor] | None = None, init_logits: dict[str, torch.Tensor] | None = None,
    on_log=None, strategy: str = "ddp", zero_stage: int = 3, activation_checkpointing: bool = False,
    shard_group: int | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Learn N:M masks for `linears` on token blocks from `stream` (a TokenStream), resuming from
    `store.latest()` if there is a checkpoint. Returns (logits over the candidates, log history); the
    model is left without parametrizations, its base weights untouched.

    Under torch.distributed every rank runs this with its own share of each global batch of
    `st.batch_size` blocks, and `strategy` (`pipeline.train.shard`) decides how the logits and their
    optimizer state are spread; every rank draws the same Gumbel noise, so the step equals one
    process's step on the whole batch."""
    _, world = rank_world()
    try:
        micro_batch = check_batch_split(st.batch_size, world)
    except ValueError as e:
        raise MaskpipeError(str(e)) from None
    device = device_of(base_weight(next(iter(linears.values()))))
    generator = torch.Generator().manual_seed(seed)  # the initial logits only
    mods = add_learned_masks(linears, n, m, generator, priors, st.prior.strength if st.prior else 0.0, st.init_std,
                             st.logits_per_group, getattr(torch, st.logits_dtype), init_logits)
    if activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # no dropout; the masks alone train
    for mod in mods.values():
        mod.train()
    if activation_checkpointing:  # transformers checkpoints a block only while the block says it trains
        for block in decoder_blocks(model):
            block.training = True
    shard = make_strategy(strategy, model, mods, lr=st.lr,
                          weight_decay=st.weight_decay, grad_clip=st.grad_clip,
                          micro_batch=micro_batch, grad_accum=st.grad_accum, zero_stage=zero_stage,
                          shard_group=shard_group)
    # The logits may now be strategy-owned views (FSDP2's DTensors, ZeRO's partitions): read them through `shard`.
    try:
        method = MaskLearning(shard, mods, st, n, m, stream, seed=seed, strategy=strategy, device=device)
        history = train(method, st, stream, store, on_log)
        logits = {k: candidate_logits(v.float(), n, m, st.logits_per_group) for k, v in shard.full_logits().items()}
    finally:
        if activation_checkpointing:
            model.activation_checkpointing_disable()
        for lin in linears.values():
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    return logits, history
