"""How large the mask logits' gradients are along the anneal, under a firm prior.

    python benchmarks/logit_gradients.py [--model tests/fixtures/models/micro-llama] [--strength 10]

For each (tau, kappa) of the default schedule's start, 40%, 75% and end, three batches of the blend with
fresh Gumbel noise: quantiles of |d loss / d logit| over every logit, and the share above Adam's eps
(1e-8). A logit's gradient is (kappa / tau) · p · (advantage), so once the prior's margin times
kappa / tau is large, p of every other candidate underflows and the gradient with it: the rest of the
run cannot change the mask.
"""

from __future__ import annotations

import argparse

import torch

from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.nm.learn import add_learned_masks
from maskpipe.pipeline.core.models import load_model, load_tokenizer, prunable_linears
from maskpipe.pipeline.nm.oneshot import oneshot_masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tests/fixtures/models/micro-llama")
    p.add_argument("--corpora", default="tests/fixtures/corpora")
    p.add_argument("--strength", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(name_or_path=a.model, dtype="float32", device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    linears = prunable_linears(model, cfg)
    data = DataConfig.model_validate({"sources": [f"{a.corpora}/kjv.train.txt", f"{a.corpora}/pydocs.train.txt"]})
    stream = TokenStream(data, tok, 256)
    prior, _ = oneshot_masks(model, linears, "magnitude", 2, 4)
    mods = add_learned_masks(linears, 2, 4, torch.Generator().manual_seed(0), prior, a.strength)
    model.eval()
    for mod in mods.values():
        mod.train()
    print(f"prior strength {a.strength} (margin {a.strength * 0.01:g}); |grad| of the logits")
    print("| tau | kappa | median | p90 | p99 | share > 1e-8 |\n| --- | --- | --- | --- | --- | --- |")
    for tau, kappa in ((4.0, 100.0), (2.4, 260.0), (1.0, 400.0), (0.05, 500.0)):
        grads = []
        for rep in range(3):
            for i, mod in enumerate(mods.values()):
                mod.tau, mod.kappa, mod.noise_seed = tau, kappa, rep * 1000 + i
                mod.logits.grad = None
            x = stream.next_batch(4)
            model(input_ids=x, labels=x, use_cache=False).loss.backward()
            grads.append(torch.cat([mod.logits.grad.flatten() for mod in mods.values()]).abs())
        g = torch.cat(grads)
        q = torch.quantile(g[torch.randperm(len(g), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                           torch.tensor([0.5, 0.9, 0.99]))
        print(f"| {tau} | {kappa:.0f} | {q[0]:.1e} | {q[1]:.1e} | {q[2]:.1e} | {(g > 1e-8).float().mean():.1%} |")


if __name__ == "__main__":
    main()
