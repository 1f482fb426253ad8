"""Learning a per-head attention plan (DuoAttention, Xiao et al. 2024, arXiv 2410.10819): a gate
α ∈ [0, 1] per KV head mixes the outputs of full and streaming attention (`pipeline.attention.plans`),
α·full + (1 − α)·streaming; only the gates train, to keep the mixed model's final hidden states on the
answers of synthetic passkey samples close to the dense model's. The gates are then binarised
(`pipeline.attention.plans.binarize`): the heads with the lowest gates stream. The loop around the step
is `pipeline.train.loop`'s, as for mask learning.

How the gates move depends on what the plan is asked for:
- a fraction of streaming heads (the budget): the gates keep that budget throughout, mean α = 1 −
  fraction (a Euclidean projection after every step), and step along the distance's gradient normalised
  by its largest entry, with momentum. This is projected gradient descent on "least distance at this
  budget"; at its fixed point the heads the distance pays most for are at 1 and the rest at 0. There is
  no regulariser weight to match to the distance's scale, and the gradient's magnitudes rank the heads.
- a gate threshold: DuoAttention's own recipe, AdamW on the distance plus λ·mean|α| from α = 1.

Why not DuoAttention's recipe under a budget: AdamW divides each gate's gradient by its own running
magnitude, so every gate moves by about lr per step whatever its gradient's size, and heads separate only
where the gradient changes sign, i.e. where the distance's pull exceeds λ/heads. From α = 1 the distance's
gradient is 0 (it is a square at its minimum), so all gates first fall in lockstep, and where they come to
rest depends on λ against the distance's scale: on micro-llama with λ = 2 every gate stayed in 0.8-1.0
after 40 steps (docs/static_plans.md), and the binarised plan was decided by those small, noisy gaps.
The distance is relative, |h_mixed − h_dense|² / |h_dense|² per answer position, so the numbers mean the
same at every hidden size.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.attention.plans import kv_heads, planned, uniform_plan
from maskpipe.pipeline.train.checkpoint import rank_world
from maskpipe.pipeline.train.loop import train
from maskpipe.pipeline.core.models import materialize
from maskpipe.pipeline.eval.prompts import (PASSKEY_DIGITS, PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, build_prompt,
                                       random_number, split_sentences)


HAYSTACK_PIECE = 32  # tokens per haystack piece where sentences cannot be found (`keeps_spaces`)


def keeps_spaces(tokenizer) -> bool:
    """Whether `tokenizer`'s decode gives back the spaces between words, so that a decoded block of the
    stream splits into sentences. Not always so: a sentencepiece vocabulary ("▁" marks a space) loaded as a
    byte-level BPE tokenizer (transformers picks `Qwen2Tokenizer` from a qwen2 config.json over the
    tokenizer_config's class) encodes and decodes text with every space dropped. A model trained through
    that tokenizer reads such text, so its prompts are built through it too; but a decoded block is then
    one "sentence" longer than any prompt, and the haystack came out empty (a 768-token passkey batch held
    148 tokens, the rest padding, and the scorer's and the gates' losses were 0)."""
    return " " in tokenizer.decode(tokenizer("a b. C", add_special_tokens=False).input_ids, skip_special_tokens=True)


def passkey_batch(rng: random.Random, stream, tokenizer, batch_size: int, seqlen: int, needles: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic multi-passkey samples, right-padded to `seqlen`: a haystack of whole sentences from the
    next block of `stream` (pieces of HAYSTACK_PIECE tokens where the decode loses them: `keeps_spaces`)
    with `needles` passkeys at random depths, then for each passkey in order
    "What is the pass key? The pass key is KEY." Returns (ids [B, seqlen], targets [B, seqlen] bool: the
    positions whose next token is a key digit, i.e. the hidden states that must retrieve it)."""
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    by_sentence = keeps_spaces(tokenizer)
    ids, targets = [], []
    for _ in range(batch_size):
        block = next(stream)
        if by_sentence:
            haystack = split_sentences(tokenizer.decode(block, skip_special_tokens=True))
        else:  # no sentence boundary survives the decode: pieces of the block, each decoded alone
            haystack = [tokenizer.decode(block[i:i + HAYSTACK_PIECE], skip_special_tokens=True)
                        for i in range(0, len(block), HAYSTACK_PIECE)]
        keys = [random_number(rng, PASSKEY_DIGITS) for _ in range(needles)]
        depths = sorted(rng.random() for _ in keys)  # keys are asked in the order they appear
        tail, answer = [], []
        for i, key in enumerate(keys):
            for text, is_answer in ((" " + PASSKEY_QUESTION, False), (" " + key, True), (".", False)):
                if i == 0 and text == " " + PASSKEY_QUESTION:
                    continue  # the prompt itself ends with the first question
                piece = tokenizer(text, add_special_tokens=False).input_ids
                tail += piece
                answer += [is_answer] * len(piece)
        prompt, _ = build_prompt(tokenizer, PASSKEY_INTRO, haystack, [PASSKEY_NEEDLE.format(key=k) for k in keys],
                                 depths, PASSKEY_QUESTION, seqlen - len(tail))
        row = prompt + tail
        is_target = [False] * len(prompt) + answer
        ids.append(row + [pad] * (seqlen - len(row)))
        targets.append(is_target[1:] + [False] * (seqlen - len(row) + 1))  # position t predicts token t + 1
    return torch.tensor(ids), torch.tensor(targets)


def passkey_share(rng: random.Random, stream, tokenizer, st, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's rows of a global batch of `st.batch_size` passkey samples (`passkey_batch`) on
    `device`, and how many answer positions the whole batch holds. Every rank draws the whole batch
    with the same generator and stream, so the samples, and a resume, do not depend on the number of
    ranks; the ranks take equal shares (`check_data_parallel`)."""
    rank, world = rank_world()
    x, targets = passkey_batch(rng, stream, tokenizer, st.batch_size, st.seqlen, st.needles)
    share = slice(rank * st.batch_size // world, (rank + 1) * st.batch_size // world)
    return x[share].to(device), targets[share].to(device), int(targets.sum())


class GateLearning:
    """The `pipeline.train.loop.Method` of DuoAttention: one step is one synthetic passkey batch, the dense
    model's and the gate-mixed model's final hidden states on the answer positions, and a step on the
    gates against their relative squared distance: projected onto the budget when there is one, else
    AdamW with λ·mean|α| (module doc). A checkpoint adds the gates, the optimizer's state and the
    passkey generator's state.

    Data-parallel: every rank draws the whole global batch (the same generator and stream, so resuming
    stays exact on any number of ranks), runs its rows, and the gate gradients are summed over the
    ranks, each rank's loss being its share of the global mean; the gates are a few hundred numbers,
    so every rank holds them and their optimizer state whole, and rank 0 saves them."""

    desc, loss_key = "gate learning", "distance"

    def __init__(self, model: nn.Module, tokenizer, st, stream, *, sink: int, window: int, seed: int):
        self.model, self.tokenizer, self.st, self.stream = model, tokenizer, st, stream
        self.rank, self.world = rank_world()
        self.device = next(model.parameters()).device
        shape = kv_heads(model)[:2]
        fraction = getattr(st, "streaming", None) if getattr(st, "threshold", None) is None else None
        self.open_mean = None if fraction is None else 1.0 - fraction  # the mean gate the budget allows
        self.gates = nn.Parameter(torch.ones(shape, device=self.device))  # start as the dense model...
        if self.open_mean is not None:
            with torch.no_grad():  # ...or as close to it as the budget allows
                self.gates.copy_(project_mean(self.gates, self.open_mean))
            self.momentum = torch.zeros(shape, device=self.device)
        else:
            self.opt = torch.optim.AdamW([self.gates], lr=st.lr, weight_decay=0.0)
        self.rng = random.Random(seed)
        self.streaming = uniform_plan(shape, True, sink, window)

    def load(self, ckpt) -> None:
        with torch.no_grad():
            self.gates.copy_(ckpt.read("gates"))
        if self.open_mean is not None:
            self.momentum = ckpt.read("momentum").to(self.device)
        else:
            self.opt.state[self.gates] = {"step": torch.tensor(float(ckpt.step)),
                                          **{k: ckpt.read(k).to(self.device) for k in ("exp_avg", "exp_avg_sq")}}
        self.rng.setstate(rng_state(ckpt.meta["rng"]))

    def state(self) -> tuple[dict, dict]:
        if self.open_mean is not None:
            tensors = {"gates": self.gates, "momentum": self.momentum}
        else:
            s = self.opt.state[self.gates]
            tensors = {"gates": self.gates, "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
        return tensors if self.rank == 0 else {}, {"rng": self.rng.getstate()}

    def step(self, step: int, lr: float) -> float:
        st, gates = self.st, self.gates
        x, targets, answers = passkey_share(self.rng, self.stream, self.tokenizer, st, self.device)
        with torch.no_grad():
            dense = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state[targets]
        with planned(self.model, self.streaming, gates):
            mixed = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state[targets]
        per_answer = (mixed - dense).pow(2).sum(-1) / dense.pow(2).sum(-1).clamp_min(1e-12)  # relative (module doc)
        distance = per_answer.mean() if self.world == 1 else per_answer.sum() / answers
        budgeted = self.open_mean is not None
        loss = distance if budgeted else distance + st.reg * gates.abs().mean() / self.world
        gates.grad = None
        loss.backward()
        distance = distance.detach()
        if self.world > 1:
            dist.all_reduce(gates.grad)
            dist.all_reduce(distance)
        with torch.no_grad():
            if budgeted:  # projected, max-normalised gradient descent with momentum (module doc)
                self.momentum.mul_(MOMENTUM).add_(gates.grad, alpha=1 - MOMENTUM)
                gates.sub_(lr * self.momentum / self.momentum.abs().max().clamp_min(1e-30))
                gates.copy_(project_mean(gates, self.open_mean))
            else:
                for group in self.opt.param_groups:
                    group["lr"] = lr
                self.opt.step()
                gates.clamp_(0, 1)
        return distance.item()

    def logged(self, lr: float) -> dict:
        return {"lr": lr, "gate_mean": self.gates.mean().item(),
                "gates_below_half": (self.gates < 0.5).float().mean().item()}


MOMENTUM = 0.9  # averages the gradient over about ten batches: one batch holds only a few answers


def project_mean(x: torch.Tensor, mean: float) -> torch.Tensor:
    """The Euclidean projection of `x` onto {y ∈ [0, 1]^n : mean(y) = mean}: clamp(x − τ, 0, 1) with
    the shift τ found by bisection (the clamped mean falls monotonically in τ)."""
    lo, hi = float(x.min()) - 1, float(x.max())
    for _ in range(60):
        tau = (lo + hi) / 2
        lo, hi = (tau, hi) if float((x - tau).clamp(0, 1).mean()) > mean else (lo, tau)
    return (x - (lo + hi) / 2).clamp(0, 1)


def train_gates(model: nn.Module, tokenizer, st, stream, *, sink: int, window: int, seed: int, store,
                on_log=None, strategy: str = "ddp") -> tuple[torch.Tensor, list[dict]]:
    """Learn a gate per KV head (DuoAttention) with every model weight frozen, resuming from
    `store.latest()` if there is a checkpoint. Returns the gates [layers, kv_heads] and the log history.

    Under torch.distributed every rank runs this on its share of each global batch of `st.batch_size`
    samples (`GateLearning`), and the step equals one process's step on the whole batch. Every rank
    holds the whole frozen model (`strategy` none on one rank, ddp on several): the sharded strategies
    of `pipeline.train.shard` shard mask state, and gates have none worth sharding."""
    check_data_parallel(GateLearning.desc, strategy, st.batch_size)
    materialize(model)  # a model loaded on meta is read whole
    model.eval()
    method = GateLearning(model, tokenizer, st, stream, sink=sink, window=window, seed=seed)
    history = train(method, st, stream, store, on_log)
    return method.gates.detach().cpu(), history


GATE_STRATEGIES = ("none", "ddp")


def gate_strategy(strategy: str) -> str:
    """The strategy gates learn with under `workers.strategy`: the sharded ones hold the model whole."""
    return strategy if strategy in GATE_STRATEGIES else "ddp"


def check_data_parallel(desc: str, strategy: str, batch_size: int) -> None:
    """Refuse what data parallelism over whole models (gates, DMA's key scorer) cannot run: a strategy
    beyond `GATE_STRATEGIES` (none on one rank only), or a global batch that does not split into
    equal shares over the ranks (each rank's loss is its share of the global mean)."""
    _, world = rank_world()
    if strategy not in GATE_STRATEGIES or (strategy == "none" and world > 1):
        raise MaskpipeError(f"{desc} on {world} worker(s) runs strategy "
                            f"{'ddp' if world > 1 else 'none or ddp'}, not {strategy!r}")
    if batch_size % world:
        raise MaskpipeError(f"batch_size {batch_size} is not divisible by the {world} workers")


def rng_state(state):
    """random.Random's state back from JSON, which turned its tuples into lists."""
    return tuple(rng_state(s) for s in state) if isinstance(state, list) else state
