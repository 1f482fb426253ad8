"""Learning DMA's key scorer (`dynamic.KeyScorer`) over a frozen model: `train_scorer`, one step of
which is `DMALearning`, a `pipeline.train.loop` method.

By default loss="attention": the scorer's softmax over the keys the rule may drop learns the attention the
frozen dense model pays them (`kv_scores.needed_keys`, `attention_target_loss`), from the passkey answers
(max over queries) and, weighted by `general`, from every query (H2O's sum): one dense forward a step, no
backward through the model (Locret's idea of learning what the model attends to, with DMA's scorer).
loss="hidden"/"kl" distils the masked model on the answers through a relaxation (`kv_scores.soft_bias`:
the log-score, shifted by each row's top-k threshold and saturated with log σ, as an additive bias;
relax="st" keeps the hard mask forward and the relaxation's gradient); measured worse (docs/RESULTS.md,
DMA section).

`profile_shares` then picks each (layer, KV head)'s recent share of the budget (`kv_scores.Budget.shares`)
from what the rule costs that head's attention output on text and on passkey answers.

Checkpoint (`pipeline.train.checkpoint`): the scorer's tensors by name, each with its AdamW moments
(`<name>.exp_avg`, `<name>.exp_avg_sq`), and the passkey generator's state in the meta (`rng`).
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist
import torch.nn.functional as F

from maskpipe.pipeline.attention.dynamic import KeyScorer, dynamic
from maskpipe.pipeline.attention.gates import check_data_parallel, passkey_share, rng_state
from maskpipe.pipeline.attention.kv_scores import Budget, attention_target_loss, kept_mask
from maskpipe.pipeline.attention.plans import kv_heads
from maskpipe.pipeline.train.checkpoint import rank_world
from maskpipe.pipeline.train.loop import train


class DMALearning:
    """The `pipeline.loop.Method` of DMA over a frozen model: one step is one synthetic passkey batch
    (`gates.passkey_batch`) and an AdamW step on the scorer against loss="attention" (the dense model's
    attention as the scorer's target, see the module docstring), or against the squared L2 distance of
    the dense and the masked model's final hidden states on the answer positions (loss="hidden", as
    DuoAttention's) or the KL of their next-token distributions there (loss="kl"). A checkpoint holds the
    scorer, its moments and the passkey generator's state.

    Data-parallel as `gates.GateLearning`: every rank draws the whole global batch (`gates.passkey_share`),
    runs its rows, and the scorer's gradients and the loss are summed over the ranks, each rank's loss
    being its share of the global one (its rows' mean over the ranks for "attention", whose shares are
    equal; its answers' sum over the global batch's answers for "hidden"/"kl"), so a step equals one
    process's step on the whole batch. Every rank holds the scorer and its moments whole; rank 0 saves them."""

    desc, loss_key = "dma learning", "distance"

    def __init__(self, model, tokenizer, st, stream, scorer: KeyScorer, budget: Budget, *, seed: int,
                 relax: str = "st", temperature: float = 1.0, loss: str = "attention", general: float = 1.0):
        self.general = general
        self.model, self.tokenizer, self.st, self.stream, self.scorer = model, tokenizer, st, stream, scorer
        self.budget, self.relax, self.temperature, self.loss = budget, relax, temperature, loss
        self.rank, self.world = rank_world()
        self.device = next(model.parameters()).device
        self.params = dict(scorer.named_parameters())
        self.opt = torch.optim.AdamW(self.params.values(), lr=st.lr, weight_decay=0.0)
        self.rng = random.Random(seed)

    def load(self, ckpt) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(ckpt.read(name))
        for name, p in self.params.items():
            self.opt.state[p] = {"step": torch.tensor(float(ckpt.step)),
                                 **{k: ckpt.read(f"{name}.{k}").to(self.device) for k in ("exp_avg", "exp_avg_sq")}}
        self.rng.setstate(rng_state(ckpt.meta["rng"]))

    def state(self) -> tuple[dict, dict]:
        tensors = {}
        for name, p in self.params.items():
            tensors[name] = p.detach()
            for k in ("exp_avg", "exp_avg_sq"):
                tensors[f"{name}.{k}"] = self.opt.state[p][k]
        return tensors if self.rank == 0 else {}, {"rng": self.rng.getstate()}

    def step(self, step: int, lr: float) -> float:
        st = self.st
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, targets, answers = passkey_share(self.rng, self.stream, self.tokenizer, st, self.device)
        if self.loss == "attention":
            loss = self._attention_loss(x, targets) / self.world
        else:
            loss = self._distillation_loss(x, targets, answers)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        if self.world > 1:
            for p in self.params.values():
                dist.all_reduce(p.grad)
            dist.all_reduce(loss)
        self.opt.step()
        return loss.item()

    def _attention_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        queries = {"answer": (targets, "max")}
        if self.general:  # every query up to the last answer: no padding
            queries["all"] = (targets.flip(-1).cummax(-1).values.flip(-1), "sum")
        cap = {"queries": queries, "budget": self.budget}
        with torch.no_grad(), dynamic(self.model, None, None, capture=cap):
            self.model.base_model(input_ids=x, use_cache=False)
        loss = 0.0
        for layer, (v, needed) in cap["needed"].items():
            log_scores = self.scorer(layer, v)
            loss = loss + attention_target_loss(log_scores, *needed["answer"])
            if self.general:
                loss = loss + self.general * attention_target_loss(log_scores, *needed["all"])
        return loss / len(cap["needed"])

    def _distillation_loss(self, x: torch.Tensor, targets: torch.Tensor, answers: int) -> torch.Tensor:
        """Summed over these rows' answer positions, divided by the global batch's `answers`: the ranks'
        losses add up to the mean over the global batch however its answers fall on the ranks."""
        with torch.no_grad():
            dense = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state[targets]
        with dynamic(self.model, self.scorer, self.budget, self.relax, self.temperature):
            masked = self.model.base_model(input_ids=x, use_cache=False).last_hidden_state[targets]
        if self.loss == "kl":
            head = self.model.get_output_embeddings()
            with torch.no_grad():
                p = head(dense).log_softmax(-1)
            return F.kl_div(head(masked).log_softmax(-1), p, log_target=True, reduction="sum") / answers
        return (masked - dense).pow(2).sum() / answers

    def logged(self, lr: float) -> dict:
        return {"lr": lr, "A_mean": self.scorer.A.mean().item()}


def train_scorer(model, tokenizer, st, stream, budget: Budget, *, seed: int, store, on_log=None,
                 relax: str = "st", temperature: float = 1.0, loss: str = "attention", general: float = 1.0,
                 scorer: KeyScorer | None = None, strategy: str = "ddp") -> tuple[KeyScorer, list[dict]]:
    """Learn DMA's scorer with every model weight frozen, resuming from `store.latest()`. `st` needs the
    loop's settings (steps, lr, warmup_steps, log_every, checkpoint_every) and batch_size, seqlen,
    needles. Returns the scorer and the log history.

    Under torch.distributed every rank runs this on its share of each global batch (`DMALearning`), with
    the same initial scorer, and the step equals one process's step on the whole batch. Every rank holds
    the whole frozen model, as for gates (`gates.check_data_parallel`: strategy none on one rank, ddp)."""
    check_data_parallel(DMALearning.desc, strategy, st.batch_size)
    model.requires_grad_(False)
    model.eval()
    scorer = scorer if scorer is not None else KeyScorer.for_model(model, seed=seed)
    method = DMALearning(model, tokenizer, st, stream, scorer, budget, seed=seed, relax=relax,
                         temperature=temperature, loss=loss, general=general)
    return scorer, train(method, st, stream, store, on_log)


SHARES = (0.25, 0.5, 0.625, 0.75, 0.875, 1.0)  # the recent shares a profile chooses from


@torch.no_grad()
def profile_shares(model, source, budget: Budget, windows: torch.Tensor, prompts: tuple[torch.Tensor, torch.Tensor],
                   shares: tuple[float, ...] = SHARES) -> tuple[tuple[tuple[float, ...], ...], torch.Tensor]:
    """Each (layer, KV head)'s recent share of `budget`: the one of `shares` under which the rule (with
    `source`'s scores) changes that head's attention output least, the other heads and layers dense.
    The change of a query head's output is |o_rule − o_dense|² / |o_dense|², summed over the KV head's
    group; a share's cost is its mean over every query of the text `windows` [B, L] plus its mean over
    the answer queries of passkey `prompts` (ids [B, L], targets [B, L] bool, `gates.passkey_batch`):
    what the language model loses and what retrieval loses. Every head keeps the budget's count of keys.

    Measured before it was built (docs/RESULTS.md, DMA section): on micro-llama at 48 keys it gave the
    retrieval head half its keys by score and six of eight heads all recent, passkey 0.67/0.75 -> 1.00/1.00
    beside the uniform 3/4 for about the same perplexity. The attention mass a share keeps was tried as
    the cost first and chose worse (it spends diffuse layers' keys by score).

    Returns (shares per layer and KV head, the cost [layers, kv_heads, len(shares)])."""
    layers, kv, _ = kv_heads(model)
    cost = torch.zeros(layers, kv, len(shares), dtype=torch.float64)
    device = next(model.parameters()).device
    for ids, queries in ((windows, torch.ones_like(windows, dtype=torch.bool)), prompts):
        chosen = int(queries.sum())
        for row in range(ids.shape[0]):  # one sample a forward: the probabilities are [heads, L, L]
            weight = queries[row:row + 1, None, :].to(device).float() / chosen  # a mean over the set's queries

            def hook(layer, query, key, value, probs, q_pos, k_pos, scaling, weight=weight):
                group = query.shape[1] // key.shape[1]
                v = value.float().repeat_interleave(group, 1)
                dense = probs.float() @ v
                scores = source.scores(layer, query, key, value, q_pos, k_pos, scaling)
                total = budget.count(len(k_pos))
                for i, share in enumerate(shares):
                    rule = Budget(keys=total, sink=budget.sink, recent=share).resolve(len(k_pos))
                    kept = probs.float() * kept_mask(scores, q_pos, k_pos, *rule).repeat_interleave(group, 1)
                    out = (kept / kept.sum(-1, keepdim=True)) @ v
                    err = (out - dense).pow(2).sum(-1) / dense.pow(2).sum(-1).clamp_min(1e-12)  # [1, Hq, Lq]
                    cost[layer, :, i] += (err.unflatten(1, (kv, group)).sum(2) * weight).sum((0, 2)).double().cpu()

            with dynamic(model, None, None, capture={"hook": hook}):
                model.base_model(input_ids=ids[row:row + 1].to(device), use_cache=False)
    best = cost.argmin(-1)
    return tuple(tuple(shares[i] for i in row) for row in best.tolist()), cost
