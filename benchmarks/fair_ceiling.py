"""The fair ceiling of a learned mask: what the same tokens buy when weights may change.

    python benchmarks/fair_ceiling.py [--model ../shared/fixtures/models/tiny-llama] [--tokens 614400]
                                      [--batch 8] [--seqlen 512] [--lr 3e-4] [--out FILE.json]

Two runs on exactly the stream a learn stage reads (both `train` corpora, token-balanced, block-shuffled,
seed 0), the same number of tokens, AdamW with a cosine schedule:

  dense fine-tuned         every weight of the model trains (the budget's value as ordinary training)
  one-shot mask, weights   the SparseGPT 2:4 mask (128 x seqlen calibration blocks) held fixed and
  fine-tuned               every weight trains, masked ones held at zero (sparse fine-tuning)

A learned mask over frozen weights can beat neither in principle; it should come within a few percent
of the second. Prints a Markdown table (perplexity, wikitext protocol over each whole valid file) and
writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.io.data import TokenStream, eval_text
from maskpipe.pipeline.eval.perplexity import perplexity
from maskpipe.pipeline.core.models import load_model, load_tokenizer, prunable_linears
from maskpipe.pipeline.nm.oneshot import oneshot_masks

CORPORA = "../shared/fixtures/corpora"


def finetune(model, stream, steps: int, batch: int, lr: float, masks: dict | None, linears: dict) -> None:
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = stream.next_batch(batch)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if masks is not None:  # pruned weights stay pruned
            with torch.no_grad():
                for k, lin in linears.items():
                    lin.weight.mul_(masks[k].to(lin.weight.dtype))
    model.eval()
    for p in params:
        p.requires_grad_(False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/fixtures/models/tiny-llama")
    p.add_argument("--corpora", default=CORPORA)
    p.add_argument("--tokens", type=int, default=614_400)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(name_or_path=a.model, dtype="float32", device="cpu")
    tok = load_tokenizer(cfg)
    data = DataConfig.model_validate({"sources": [f"{a.corpora}/kjv.train.txt", f"{a.corpora}/pydocs.train.txt"],
                                      "shuffle_buffer": 1000})
    texts = {k: tok(eval_text(DataConfig.model_validate({"sources": [{"path": f"{a.corpora}/{k}.valid.txt",
                                                                      "sample_by": "document"}]})),
                    add_special_tokens=False, return_tensors="pt")["input_ids"][0] for k in ("kjv", "pydocs")}
    steps = a.tokens // (a.batch * a.seqlen)

    def ppl(model) -> dict[str, float]:
        return {k: round(perplexity(model, ids, a.seqlen, batch_size=8).ppl, 2) for k, ids in texts.items()}

    rows = {}
    model = load_model(cfg)
    rows["dense"] = ppl(model)
    t0 = time.perf_counter()
    finetune(model, TokenStream(data, tok, a.seqlen, seed=0), steps, a.batch, a.lr, None, {})
    rows["dense fine-tuned"] = ppl(model)
    print(f"dense fine-tuned in {time.perf_counter() - t0:.0f} s", flush=True)

    model = load_model(cfg)
    linears = prunable_linears(model, cfg)
    calib = TokenStream(data, tok, a.seqlen, seed=0).next_batch(128)
    masks, _ = oneshot_masks(model, linears, "sparsegpt", 2, 4, calib)
    with torch.no_grad():
        for k, lin in linears.items():
            lin.weight.mul_(masks[k].to(lin.weight.dtype))
    rows["SparseGPT 2:4 mask"] = ppl(model)
    t0 = time.perf_counter()
    finetune(model, TokenStream(data, tok, a.seqlen, seed=0), steps, a.batch, a.lr, masks, linears)
    rows["SparseGPT 2:4 mask, weights fine-tuned"] = ppl(model)
    print(f"sparse fine-tuned in {time.perf_counter() - t0:.0f} s", flush=True)

    print(f"\n{a.model}: {steps} steps x {a.batch} x {a.seqlen} = {steps * a.batch * a.seqlen:,} tokens, AdamW lr {a.lr} cosine")
    print("| | PPL kjv | PPL pydocs |\n| --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['kjv']:.2f} | {r['pydocs']:.2f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "steps": steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
