"""Batched greedy decoding for retrieval against one prompt at a time: same samples, same records.

    python benchmarks/retrieval_batch.py [--model ../shared/fixtures/models/tiny-llama] [--lengths 256 512 768]
                                         [--samples 8] [--plan-streaming 0.5]

Scores the dense model (and, with --plan-streaming F, a plan whose first F of KV heads stream with
sink 8 + window 64) on passkey samples, once one prompt at a time (`batch_size=1`, what retrieval did
before batching) and once with every sample of a length in one left-padded batch. Prints both wall
times, the speed-up, and whether every generation is identical (it must be). Absolute times on shared
CPUs are noisy; the ratio is what to quote.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from maskpipe.pipeline.attention.plans import kv_heads, planned, uniform_plan
from maskpipe.pipeline.core.schema import ModelConfig
from maskpipe.pipeline.core.models import load_model, load_tokenizer
from maskpipe.pipeline.eval.retrieval import passkey_samples, score


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/fixtures/models/tiny-llama")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 768])
    p.add_argument("--samples", type=int, default=8, help="per length")
    p.add_argument("--plan-streaming", type=float, default=None, help="also a plan with this fraction streaming")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    cfg = ModelConfig(name_or_path=a.model, dtype="float32", device=a.device)
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    samples = passkey_samples(tokenizer, a.lengths, a.samples, seed=0)
    variants = {"dense": None}
    if a.plan_streaming is not None:
        layers, heads, _ = kv_heads(model)
        streaming = torch.arange(layers * heads).reshape(layers, heads) < round(a.plan_streaming * layers * heads)
        variants[f"plan {a.plan_streaming:.0%} streaming"] = uniform_plan((layers, heads), streaming, 8, 64)
    score(model, tokenizer, samples[:1])  # warm-up
    print(f"{a.model}: passkey, lengths {a.lengths}, {a.samples} samples each, {torch.get_num_threads()} threads")
    print("| variant | one at a time (s) | batched (s) | speed-up | identical generations | exact match |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, plan in variants.items():
        with planned(model, plan) if plan is not None else nullcontext():
            t0 = time.perf_counter()
            single = score(model, tokenizer, samples, batch_size=1)
            t1 = time.perf_counter()
            batched = score(model, tokenizer, samples)
            t2 = time.perf_counter()
        same = [r["generated"] for r in single] == [r["generated"] for r in batched]
        acc = sum(r["correct"] for r in batched) / len(batched)
        print(f"| {name} | {t1 - t0:.1f} | {t2 - t1:.1f} | {(t1 - t0) / (t2 - t1):.2f}x | {same} | {acc:.2f} |")


if __name__ == "__main__":
    main()
