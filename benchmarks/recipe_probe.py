"""One learned-mask run on the micro model, by maskpipe's `train_masks` or by an independent minimal
MaskLLM learner, with every recipe knob on the command line: how the default recipe was found.

    python benchmarks/recipe_probe.py [--learner maskpipe|reference] [--strength 10] [--lr 2e-3]
                                      [--steps 150] [--batch 4] [--sched cosine|const] [--seed 0] ...

Both learners read the same prior (SparseGPT 2:4 on `--calib` blocks of the blend), the same stream
(`TokenStream`: both train excerpts, token-balanced, block-shuffled) and the same schedules; the
reference learner shares no code with `pipeline.nm.learn`: `F.gumbel_softmax` with one global generator,
its own parametrization and MaskLLM's own 2:4 prior rule. Prints one JSON line: dense, prior and learned
perplexity (wikitext protocol on each valid excerpt), gap closed per corpus, share of weights whose mask
bit differs from the prior's, realised token shares.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import maskpipe.pipeline.nm.learn as learn
import maskpipe.pipeline.train.loop as loop
from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.stages.learn import LearnStage
from maskpipe.pipeline.io.data import TokenStream, calibration_blocks, eval_text
from maskpipe.pipeline.eval.perplexity import perplexity
from maskpipe.pipeline.core.models import load_model, load_tokenizer, prunable_linears
from maskpipe.pipeline.nm.oneshot import oneshot_masks


class RandomWindows:
    """The issue-14 reference learner's data: random `seqlen`-token windows cut anywhere in each whole
    tokenized train file (no record boundaries, no EOS), each sequence from one corpus picked 50/50."""

    def __init__(self, corpora: dict[str, torch.Tensor], seqlen: int, seed: int):
        self.corpora, self.seqlen, self.gen = corpora, seqlen, torch.Generator().manual_seed(seed)
        self.drawn = dict.fromkeys(corpora, 0)

    def next_batch(self, batch: int) -> torch.Tensor:
        out = []
        for _ in range(batch):
            name = list(self.corpora)[int(torch.randint(len(self.corpora), (1,), generator=self.gen))]
            ids = self.corpora[name]
            start = int(torch.randint(len(ids) - self.seqlen, (1,), generator=self.gen))
            out.append(ids[start:start + self.seqlen])
            self.drawn[name] += 1
        return torch.stack(out)

    def token_shares(self) -> dict[str, float]:
        """The realised share of tokens per corpus, as TokenStream reports it."""
        total = sum(self.drawn.values())
        return {k: (n / total if total else 0.0) for k, n in self.drawn.items()}

    def state_dict(self) -> dict:
        return {}


class NoCheckpoints:
    @contextlib.contextmanager
    def latest(self):
        yield None

    def save(self, *args):
        pass


def reference_learner(model, linears, prior, stream, a, tau, kappa) -> dict[str, torch.Tensor]:
    """MaskLLM in a screenful: gates [groups, 6] per linear, the paper's prior, soft Gumbel samples."""
    torch.manual_seed(a.seed)
    options = torch.tensor([[float(i in keep) for i in range(4)] for keep in itertools.combinations(range(4), 2)])

    class Gate(torch.nn.Module):
        def __init__(self, weight, prior_mask):
            super().__init__()
            gate = torch.randn(weight.numel() // 4, 6) * a.init_std
            overlap = (prior_mask.reshape(-1, 1, 4).float() * options).sum(-1)  # [groups, 6]
            self.gate = torch.nn.Parameter(gate + (overlap - 1) * gate.std() * a.strength)
            self.shape, self.tau, self.kappa = weight.shape, tau[0], kappa[0]

        def forward(self, weight):
            if not self.training:
                return weight * options[self.gate.argmax(-1)].reshape(self.shape)
            choice = F.gumbel_softmax(self.gate * self.kappa, tau=self.tau, hard=False)
            choice = choice.masked_fill(choice < 1e-12, 0.0)  # no subnormals (slow on x86)
            return weight * (choice @ options).reshape(self.shape)

    gates = {}
    for name, lin in linears.items():
        gates[name] = Gate(lin.weight, prior[name])
        parametrize.register_parametrization(lin, "weight", gates[name])
    model.eval()
    for g in gates.values():
        g.train()
    opt = torch.optim.AdamW([g.gate for g in gates.values()], lr=a.lr, weight_decay=0.0)
    for step in range(a.steps):
        frac = step / a.steps
        for g in gates.values():
            g.tau = tau[0] + (tau[1] - tau[0]) * frac
            g.kappa = kappa[0] + (kappa[1] - kappa[0]) * frac
        for group in opt.param_groups:
            group["lr"] = a.lr if a.sched == "const" else a.lr * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        x = stream.next_batch(a.batch)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    masks = {k: options[g.gate.argmax(-1)].reshape(g.shape).bool() for k, g in gates.items()}
    for lin in linears.values():
        parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    return masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--learner", choices=["maskpipe", "reference"], default="maskpipe")
    p.add_argument("--model", default="tests/fixtures/models/micro-llama")
    p.add_argument("--corpora", default="tests/fixtures/corpora")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: LearnStage's budget-scaled lr")
    p.add_argument("--strength", type=float, default=10.0)
    p.add_argument("--clip", type=float, default=0.0)
    p.add_argument("--sched", choices=["cosine", "const"], default="cosine")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--tau", default="4,0.05")
    p.add_argument("--kappa", default="100,500")
    p.add_argument("--init-std", type=float, default=0.01)
    p.add_argument("--lam", type=float, default=0.0)
    p.add_argument("--calib", type=int, default=32)
    p.add_argument("--stream", choices=["maskpipe", "windows"], default="maskpipe",
                   help="windows: random windows of the whole train files (RandomWindows) for learning and calibration")
    p.add_argument("--shuffle-buffer", type=int, default=64, help="records per source (DataConfig.shuffle_buffer)")
    p.add_argument("--shuffle-blocks", type=int, default=None, help="DataConfig.shuffle_blocks (default: its default)")
    p.add_argument("--separator", default="eos", help="DataConfig.separator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tau, kappa = ([float(x) for x in s.split(",")] for s in (a.tau, a.kappa))
    st = LearnStage(stage="learn", data="train", steps=a.steps, batch_size=a.batch, seqlen=a.seqlen, lr=a.lr,
                    grad_accum=a.accum, grad_clip=a.clip or None, sparse_reg=a.lam, tau=tau, kappa=kappa,
                    warmup_steps=a.warmup, prior={"stage": "prior", "strength": a.strength}, init_std=a.init_std)
    a.lr = st.lr
    cfg = ModelConfig(name_or_path=a.model, dtype="float32", device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    linears = prunable_linears(model, cfg)
    data = DataConfig.model_validate({"sources": [f"{a.corpora}/kjv.train.txt", f"{a.corpora}/pydocs.train.txt"],
                                      "shuffle_buffer": a.shuffle_buffer,
                                      "shuffle_blocks": a.shuffle_blocks, "separator": a.separator})
    texts = {k: tok(eval_text(DataConfig.model_validate({"sources": [{"path": f"{a.corpora}/{k}.valid.txt",
                                                                      "sample_by": "document"}]})),
                    add_special_tokens=False, return_tensors="pt")["input_ids"][0] for k in ("kjv", "pydocs")}

    def ppl(masks=None) -> dict[str, float]:
        saved = {k: lin.weight.data.clone() for k, lin in linears.items()} if masks else {}
        for k, lin in linears.items() if masks else ():
            lin.weight.data.mul_(masks[k].to(lin.weight.dtype))
        out = {k: round(perplexity(model, ids, a.seqlen, batch_size=8).ppl, 3) for k, ids in texts.items()}
        for k, w in saved.items():
            linears[k].weight.data.copy_(w)
        return out

    t0 = time.time()
    dense = ppl()
    if a.stream == "windows":
        files = [f"{a.corpora}/{k}.train.txt" for k in ("kjv", "pydocs")]
        corpora = {f: torch.tensor(tok(open(f).read(), add_special_tokens=False)["input_ids"]) for f in files}
        calib = RandomWindows(corpora, a.seqlen, seed=1_000 + a.seed).next_batch(a.calib)
        stream = RandomWindows(corpora, a.seqlen, seed=a.seed)
    else:
        calib = calibration_blocks(data, tok, a.calib, a.seqlen)
        stream = TokenStream(data, tok, a.seqlen, seed=a.seed)
    prior, _ = oneshot_masks(model, linears, "sparsegpt", 2, 4, calib)
    prior_ppl = ppl(prior)
    if a.learner == "maskpipe":
        if a.sched == "const":
            loop.cosine_lr = lambda base, step, total, warmup: base
        logits, _ = learn.train_masks(model, linears, st, 2, 4, stream, seed=a.seed, store=NoCheckpoints(),
                                      priors=prior, strategy="none")
        masks = {k: learn.hard_mask(v, 2, 4).reshape(linears[k].weight.shape) for k, v in logits.items()}
    else:
        masks = reference_learner(model, linears, prior, stream, a, tau, kappa)
    learned = ppl(masks)
    flipped = sum(int((masks[k] != prior[k]).sum()) for k in masks) / sum(m.numel() for m in masks.values())
    closed = {k: round(100 * (prior_ppl[k] - learned[k]) / (prior_ppl[k] - dense[k]), 1) for k in dense}
    print(json.dumps({"args": vars(a), "dense": dense, "prior": prior_ppl, "learned": learned, "gap_closed_%": closed,
                      "flipped": round(flipped, 4), "token_shares": stream.token_shares(),
                      "seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
