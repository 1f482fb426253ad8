"""Learning a per-head attention plan (DuoAttention, Xiao et al. 2024, arXiv 2410.10819): a gate
α ∈ [0, 1] per KV head mixes the outputs of full and streaming attention (`pipeline.attention.plans`),
α·full + (1 − α)·streaming; only the gates train, to keep the mixed model's final hidden states on the
answers of synthetic passkey samples close to the dense model's, plus λ·mean|α|. The gates are then
binarised (`pipeline.attention.plans.binarize`): the heads with the lowest gates stream. The loop around the
step is `pipeline.train.loop`'s, as for mask learning.
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


def passkey_batch(rng: random.Random, stream, tokenizer, batch_size: int, seqlen: int, needles: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic multi-passkey samples, right-padded to `seqlen`: a haystack of whole sentences from the
    next block of `stream` with `needles` passkeys at random depths, then for each passkey in order
    "What is the pass key? The pass key is KEY." Returns (ids [B, seqlen], targets [B, seqlen] bool: the
    positions whose next token is a key digit, i.e. the hidden states that must retrieve it)."""
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids, targets = [], []
    for _ in range(batch_size):
        haystack = split_sentences(tokenizer.decode(next(stream), skip_special_tokens=True))
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


class GateLearning:
    """The `pipeline.train.loop.Method` of DuoAttention: one step is one synthetic passkey batch, the dense
    model's and the gate-mixed model's final hidden states on the answer positions, and an AdamW step
    on the gates (clamped to [0, 1]) against their squared distance plus λ·mean|α|. A checkpoint adds
    the gates, their moments and the passkey generator's state.

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
        self.gates = nn.Parameter(torch.ones(shape, device=self.device))  # start as the dense model
        self.opt = torch.optim.AdamW([self.gates], lr=st.lr, weight_decay=0.0)
        self.rng = random.Random(seed)
        self.streaming = uniform_plan(shape, True, sink, window)

    def load(self, ckpt) -> None:
        with torch.no_grad():
            self.gates.copy_(ckpt.read("gates"))
        self.opt.state[self.gates] = {"step": torch.tensor(float(ckpt.step)),
                                      **{k: ckpt.read(k).to(self.device) for k in ("exp_avg", "exp_avg_sq")}}
        self.rng.setstate(_tuples(ckpt.meta["rng"]))

    def state(self) -> tuple[dict, dict]:
        s = self.opt.state[self.gates]
        tensors = {"gates": self.gates, "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
        return tensors if self.rank == 0 else {}, {"rng": self.rng.getstate()}

    def step(self, step: int, lr: float) -> float:
        st, gates = self.st, self.gates
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, targets = passkey_batch(self.rng, self.stream, self.tokenizer, st.batch_size, st.seqlen, st.needles)
        answers = int(targets.sum())  # over the global batch
        share = slice(self.rank * st.batch_size // self.world, (self.rank + 1) * st.batch_size // self.world)
        x, targets = x[share].to(self.device), targets[share].to(self.device)
        with torch.no_grad():
            dense = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state[targets]
        with planned(self.model, self.streaming, gates):
            mixed = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state[targets]
        per_answer = (mixed - dense).pow(2).sum(-1)  # squared L2 per answer position, as DuoAttention
        distance = per_answer.mean() if self.world == 1 else per_answer.sum() / answers
        loss = distance + st.reg * gates.abs().mean() / self.world
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        distance = distance.detach()
        if self.world > 1:
            dist.all_reduce(gates.grad)
            dist.all_reduce(distance)
        self.opt.step()
        with torch.no_grad():
            gates.clamp_(0, 1)
        return distance.item()

    def logged(self, lr: float) -> dict:
        return {"lr": lr, "gate_mean": self.gates.mean().item(),
                "gates_below_half": (self.gates < 0.5).float().mean().item()}


def train_gates(model: nn.Module, tokenizer, st, stream, *, sink: int, window: int, seed: int, store,
                on_log=None, strategy: str = "ddp") -> tuple[torch.Tensor, list[dict]]:
    """Learn a gate per KV head (DuoAttention) with every model weight frozen, resuming from
    `store.latest()` if there is a checkpoint. Returns the gates [layers, kv_heads] and the log history.

    Under torch.distributed every rank runs this on its share of each global batch of `st.batch_size`
    samples (`GateLearning`), and the step equals one process's step on the whole batch. Every rank
    holds the whole frozen model (`strategy` none on one rank, ddp on several): the sharded strategies
    of `pipeline.train.shard` shard mask state, and gates have none worth sharding."""
    _, world = rank_world()
    if strategy not in GATE_STRATEGIES or (strategy == "none" and world > 1):
        raise MaskpipeError(f"gate learning on {world} worker(s) runs strategy "
                            f"{'ddp' if world > 1 else 'none or ddp'}, not {strategy!r}")
    if st.batch_size % world:
        raise MaskpipeError(f"batch_size {st.batch_size} is not divisible by the {world} workers")
    materialize(model)  # a model loaded on meta is read whole
    model.eval()
    method = GateLearning(model, tokenizer, st, stream, sink=sink, window=window, seed=seed)
    history = train(method, st, stream, store, on_log)
    return method.gates.detach().cpu(), history


GATE_STRATEGIES = ("none", "ddp")


def gate_strategy(strategy: str) -> str:
    """The strategy gates learn with under `workers.strategy`: the sharded ones hold the model whole."""
    return strategy if strategy in GATE_STRATEGIES else "ddp"


def _tuples(state):
    """random.Random's state back from JSON, which turned its tuples into lists."""
    return tuple(_tuples(s) for s in state) if isinstance(state, list) else state
