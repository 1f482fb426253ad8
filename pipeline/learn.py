"""Learned N:M masks over frozen weights (MaskLLM, Fang et al. 2024, arXiv 2409.17481).

Every group of M consecutive weights along a linear's input dimension gets a vector of logits over
its C(M,N) candidate masks. Training draws a soft mask with Gumbel-softmax over `logits * kappa` at
temperature `tau`, the candidate-weighted sum of the candidates; evaluation and export take the
argmax candidate. Only the logits train; the base weights stay frozen underneath a parametrization.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from pipeline import MaskpipeError
from pipeline.models import base_weight
from pipeline.sparsity import check_divisible


@lru_cache(maxsize=None)
def nm_candidates(n: int, m: int) -> torch.Tensor:
    """All C(M,N) masks of one group, [C, M] bool, in lexicographic order of kept positions."""
    rows = [[i in keep for i in range(m)] for keep in itertools.combinations(range(m), n)]
    return torch.tensor(rows, dtype=torch.bool)


class GumbelNMMask(nn.Module):
    """Weight parametrization W -> W * mask(logits): soft Gumbel-softmax sample in training mode,
    hard argmax candidate in eval mode. `tau` and `kappa` are set by the trainer's schedules."""

    def __init__(self, shape: torch.Size, n: int, m: int, generator: torch.Generator | None = None,
                 init_std: float = 0.01):
        super().__init__()
        out_features, in_features = shape
        cands = nm_candidates(n, m)
        self.n, self.m = n, m
        self.register_buffer("candidates", cands.float(), persistent=False)
        logits = torch.randn(out_features, in_features // m, len(cands), generator=generator) * init_std
        self.logits = nn.Parameter(logits)
        self.generator = generator
        self.tau, self.kappa = 4.0, 100.0

    def soft_mask(self) -> torch.Tensor:
        # Gumbel noise from the trainer's own generator, so that a resumed run draws the same noise.
        # In place: the noise is as large as the logits, and drawing it is most of the mask's own cost.
        u = torch.rand(self.logits.shape, generator=self.generator, device=self.logits.device)
        gumbel = u.clamp_min_(1e-10).log_().neg_().clamp_min_(1e-10).log_().neg_()
        probs = torch.softmax((self.logits * self.kappa + gumbel) / self.tau, dim=-1)
        return probs @ self.candidates  # [out, groups, M]: never a [groups, C, M] intermediate

    def hard_mask(self) -> torch.Tensor:
        return hard_mask(self.logits, self.n, self.m)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.soft_mask() if self.training else self.hard_mask()
        return weight * mask.reshape(weight.shape).to(weight.dtype)


def hard_mask(logits: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The argmax candidate of every group: [out, G, C] logits -> [out, G, M] bool."""
    return nm_candidates(n, m).to(logits.device)[logits.argmax(-1)]


def prior_logits(logits: torch.Tensor, prior: torch.Tensor, n: int, m: int, strength: float) -> torch.Tensor:
    """MaskLLM's prior, generalised to N:M: each candidate's logit rises by
    (2·overlap/N − 1) · std(logits) · strength, overlap = kept positions shared with the prior mask.
    For 2:4 this is the paper's (overlap − 1) · std · strength."""
    cands = nm_candidates(n, m).to(logits.device).float()  # [C, M]
    groups = prior.reshape(logits.shape[0], -1, m).float()  # [out, G, M]
    overlap = groups @ cands.T  # [out, G, C]
    return logits + (2 * overlap / n - 1) * logits.std() * strength


def add_learned_masks(
    linears: dict[str, nn.Linear], n: int, m: int, generator: torch.Generator,
    priors: dict[str, torch.Tensor] | None = None, strength: float = 3.0, init_std: float = 0.01,
) -> dict[str, GumbelNMMask]:
    """Put a GumbelNMMask on every linear; returns name -> mask module (whose logits are what trains)."""
    for name, lin in linears.items():
        check_divisible(name, lin.weight.shape, m)
    masks = {}
    for name in sorted(linears):
        lin = linears[name]
        mod = GumbelNMMask(base_weight(lin).shape, n, m, generator, init_std).to(lin.weight.device)
        if priors is not None and name in priors:
            with torch.no_grad():
                mod.logits.copy_(prior_logits(mod.logits, priors[name].to(mod.logits.device), n, m, strength))
        parametrize.register_parametrization(lin, "weight", mod, unsafe=True)
        masks[name] = mod
    return masks


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    return start + (end - start) * min(step / max(total - 1, 1), 1.0)


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def mask_change_rate(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of groups whose argmax candidate flipped (MaskLLM's mask-change rate)."""
    changed = sum(int((before[k] != after[k]).sum()) for k in after)
    return changed / sum(v.numel() for v in after.values())


def train_masks(
    model: nn.Module, linears: dict[str, nn.Linear], st, n: int, m: int, stream, *, seed: int, store,
    priors: dict[str, torch.Tensor] | None = None, init_logits: dict[str, torch.Tensor] | None = None,
    on_log=None,
) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Learn N:M masks for `linears` on token blocks from `stream` (a TokenStream), resuming from
    `store.latest()` if there is a checkpoint. Returns (logits, log history); the model is left without
    parametrizations, its base weights untouched.

    Under torch.distributed every rank runs this with its own share of each global batch of
    `st.batch_size` blocks; DDP averages the logits' gradients. Every rank draws the same Gumbel
    noise, so the step equals one process's step on the whole batch."""
    from pipeline.checkpoint import load_optimizer_state, optimizer_state

    world = dist.get_world_size() if dist.is_initialized() else 1
    if st.batch_size % world:
        raise MaskpipeError(f"batch_size {st.batch_size} is not divisible by the {world} workers")
    device = base_weight(next(iter(linears.values()))).device
    generator = torch.Generator(device=device).manual_seed(seed)
    mods = add_learned_masks(linears, n, m, generator, priors, st.prior.strength if st.prior else 3.0, st.init_std)
    if init_logits is not None:
        with torch.no_grad():
            for k, mod in mods.items():
                mod.logits.copy_(init_logits[k].to(mod.logits))
    params = [mods[k].logits for k in sorted(mods)]
    opt = torch.optim.AdamW(params, lr=st.lr, weight_decay=st.weight_decay)
    forward = DistributedDataParallel(model) if world > 1 else model

    def argmaxes() -> dict[str, torch.Tensor]:
        return {k: mod.logits.detach().argmax(-1) for k, mod in mods.items()}

    step, history = 0, []
    window: list[float] = []  # LM losses since the last log: one batch's loss is too noisy to read
    last = argmaxes()  # the mask-change baseline: argmax candidates at the last log
    saved = store.latest()
    if saved is not None:
        tensors, meta = saved
        with torch.no_grad():
            for k, mod in mods.items():
                mod.logits.copy_(tensors[f"logits.{k}"])
        load_optimizer_state(opt, tensors, meta)
        generator.set_state(tensors["rng.gumbel"])
        stream.load_state_dict(meta["stream"])
        step, history, window = meta["step"], meta["history"], meta["loss_window"]
        last = {k: tensors[f"argmax.{k}"].long() for k in mods}
        if on_log:
            on_log({"resumed_from_step": step})

    def checkpoint() -> None:
        opt_tensors, opt_meta = optimizer_state(opt)
        tensors = {f"logits.{k}": mod.logits for k, mod in mods.items()} | opt_tensors
        tensors |= {f"argmax.{k}": v.to(torch.int32) for k, v in last.items()}
        tensors["rng.gumbel"] = generator.get_state()
        store.save(step, tensors, {**opt_meta, "stream": stream.state_dict(), "history": history,
                                   "loss_window": window})

    model.eval()
    for mod in mods.values():
        mod.train()
    use_bf16 = device.type == "cuda"
    bar = tqdm(total=st.steps, initial=step, desc="mask learning", disable=None)
    try:
        while step < st.steps:
            tau = linear_schedule(*st.tau, step, st.steps)
            kappa = linear_schedule(*st.kappa, step, st.steps)
            lam = st.sparse_reg * (1 - step / st.steps)
            lr = cosine_lr(st.lr, step, st.steps, st.warmup_steps)
            for mod in mods.values():
                mod.tau, mod.kappa = tau, kappa
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            lm_loss = torch.zeros((), device=device)
            for micro in range(st.grad_accum):
                x = stream.next_batch(st.batch_size // world).to(device)
                sync = micro == st.grad_accum - 1 or world == 1
                # One Gumbel sample per linear per micro-batch, shared by the forward and the regulariser.
                with (parametrize.cached(), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16),
                      contextlib.nullcontext() if sync else forward.no_sync()):
                    loss = forward(input_ids=x, labels=x, use_cache=False).loss
                    total = loss
                    if lam > 0:
                        total = total - lam * sum(lin.weight.float().pow(2).sum() for lin in linears.values())
                    (total / st.grad_accum).backward()
                lm_loss += loss.detach().float() / st.grad_accum
            if world > 1:
                dist.all_reduce(lm_loss)
                lm_loss /= world
            if st.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, st.grad_clip)
            opt.step()
            step += 1
            window.append(lm_loss.item())
            bar.update(1)
            if step % st.log_every == 0 or step == st.steps:
                now = argmaxes()
                entry = {"step": step, "loss": sum(window) / len(window), "tau": tau, "kappa": kappa, "lambda": lam,
                         "lr": lr, "mask_change": mask_change_rate(last, now)}
                last, window = now, []
                history.append(entry)
                if on_log:
                    on_log(entry)
            if step % st.checkpoint_every == 0 or step == st.steps:
                checkpoint()
        logits = {k: mod.logits.detach().cpu() for k, mod in mods.items()}
    finally:
        bar.close()
        for lin in linears.values():
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    return logits, history
