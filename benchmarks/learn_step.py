"""Learned-mask training step vs a dense forward+backward with weight gradients, same model and batch.

    python benchmarks/learn_step.py [--model ../shared/fixtures/models/tiny-llama] [--batch 8] [--seqlen 512]

Prints the median time of each (the learned step at the start and at the end of the anneal) and their ratio, measured in one run (absolute times on shared CPUs are
noisy; the ratio is what to quote). The physical floor is about 1.0x: the mask's gradient needs the same
matmuls as the weight gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from maskpipe.pipeline.core.schema import ModelConfig
from maskpipe.pipeline.nm.learn import add_learned_masks
from maskpipe.pipeline.core.models import load_model, prunable_linears


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/fixtures/models/tiny-llama")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    n, m = map(int, a.pattern.split(":"))
    cfg = ModelConfig(name_or_path=a.model, dtype="float32", device="auto")
    model = load_model(cfg)
    linears = prunable_linears(model, cfg)
    device = next(model.parameters()).device
    x = torch.randint(0, model.config.vocab_size, (a.batch, a.seqlen), device=device)

    # Dense: the same linears' weights trainable, as in ordinary fine-tuning of those layers.
    weights = [lin.weight for lin in linears.values()]
    for w in weights:
        w.requires_grad_(True)
    dense_opt = torch.optim.AdamW(weights, lr=0.0)

    def dense_step():
        dense_opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        dense_opt.step()

    dense = median_time(dense_step, a.repeats)
    for w in weights:
        w.requires_grad_(False)
        w.grad = None

    mods = add_learned_masks(linears, n, m, torch.Generator().manual_seed(0))
    for mod in mods.values():
        mod.train()
        mod.lam = 1e-5  # the sparse-weight regulariser rides in each layer's backward, as in train_masks
    logits = [mod.logits for mod in mods.values()]
    mask_opt = torch.optim.AdamW(logits, lr=0.0)
    draws = iter(range(10**9))

    def mask_step():
        mask_opt.zero_grad(set_to_none=True)
        for mod in mods.values():
            mod.noise_seed = next(draws)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        mask_opt.step()

    learned = median_time(mask_step, a.repeats)
    # The last step of a run: tau 0.05, kappa 500, logits spread as after training. Soft-mask
    # probabilities then underflow; unless floored (PROB_FLOOR) they are float32 subnormals, and x86
    # matmuls on subnormal operands run ~100x slower: time the end of the anneal, not just its start.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in mods.values():
            mod.logits.copy_(torch.randn(mod.logits.shape, generator=gen) * 0.05)
            mod.tau, mod.kappa = 0.05, 500.0
    last = median_time(mask_step, a.repeats)
    tokens = a.batch * a.seqlen
    print(f"model {a.model} | batch {a.batch}x{a.seqlen} | {device} | {a.threads} threads | pattern {a.pattern}")
    print("| step | median s | tokens/s |")
    print("| --- | --- | --- |")
    print(f"| dense fwd+bwd (weight grads) + AdamW | {dense:.3f} | {tokens / dense:.0f} |")
    print(f"| learned mask (Gumbel) fwd+bwd + AdamW, first step (tau 4, kappa 100) | {learned:.3f} | {tokens / learned:.0f} |")
    print(f"| learned mask, last step (tau 0.05, kappa 500) | {last:.3f} | {tokens / last:.0f} |")
    print(f"ratio learned/dense: {learned / dense:.2f}x first step, {last / dense:.2f}x last step")


if __name__ == "__main__":
    main()
