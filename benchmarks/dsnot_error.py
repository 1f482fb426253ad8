"""Why DSnoT can make a one-shot 2:4 mask worse: its objective against the layer's true reconstruction error.

    python benchmarks/dsnot_error.py --model ../shared/fixtures/models/tiny-llama --samples 64 --seqlen 512

For every prunable linear of the *dense* model (one calibration pass, inputs of the dense model, so the
layers are independent of each other), with x the layer's input over the calibration tokens:
  - exact error  E = Σ_i r_iᵀ E[x xᵀ] r_i, r_i = W_i ⊙ ¬M_i (the expected squared output change that
    pruning causes, with every correlation between input channels);
  - DSnoT's D = Σ_i (Σ_j r_ij E[x_j])² + Σ_j r_ij² Var[x_j] (`pipeline.nm.dsnot.dsnot_error`: the same with
    input channels taken as independent).
Prints, per kind of linear, the mean ratio DSnoT-refined / initial for both, for Wanda's mask as the
initial one (or, with --artifacts, two masks a run made, e.g. its wanda and wanda+dsnot stages).
If DSnoT lowered D while E rose, the independence assumption would be what misleads it.

Measured on tiny-llama 2:4 (docs/RESULTS.md, "DSnoT"): it is not. DSnoT lowers E too, by 8–22% on every
kind of linear, on the calibration tokens and on held-out ones alike, for 80–90% of the tokens; yet
perplexity rises with every cycle of swaps (Wanda 75.46 / 100.56; 1 cycle 77.21 / 102.87; 4 cycles
83.46 / 109.53; 50 cycles 89.53 / 114.84 on kjv / pydocs). Lower layer-wise error, worse model.
"""

from __future__ import annotations

import argparse
import collections

import torch

from maskpipe.pipeline.io.artifacts import load_artifact
from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.core.models import load_model, load_tokenizer, prunable_linears
from maskpipe.pipeline.nm.dsnot import dsnot_error, refine_exact
from maskpipe.pipeline.nm.sparsity import nm_mask

CORPORA = "../shared/fixtures/corpora"


def exact_error(weight: torch.Tensor, mask: torch.Tensor, second: torch.Tensor) -> float:
    r = weight.double() * ~mask
    return float(((r @ second) * r).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/fixtures/models/tiny-llama")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--artifacts", nargs=2, metavar=("INITIAL", "REFINED"),
                   help="score these two mask artifacts (e.g. a run's wanda and wanda+dsnot) instead")
    p.add_argument("--skip-first", type=int, default=0,
                   help="leave the first K positions of every sequence out of the statistics")
    a = p.parse_args()
    given = [load_artifact(x)[0] for x in a.artifacts] if a.artifacts else None
    cfg = ModelConfig(name_or_path=a.model, dtype="float32", device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    linears = prunable_linears(model, cfg)
    data = DataConfig.model_validate({"sources": [f"{CORPORA}/kjv.train.txt", f"{CORPORA}/pydocs.train.txt"],
                                      "shuffle_buffer": 1000})
    ids = TokenStream(data, tok, a.seqlen).next_batch(a.samples)
    stats = {n: [0, 0, 0] for n in linears}  # tokens, Σx, Σxxᵀ

    def hook(name):
        def add(module, args, output):
            x = args[0][:, a.skip_first:].reshape(-1, args[0].shape[-1]).double()
            s = stats[name]
            s[0] += x.shape[0]
            s[1] = s[1] + x.sum(0)
            s[2] = s[2] + x.T @ x
        return add

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears.items()]
    with torch.no_grad():
        for b in ids.split(8):
            model(b)
    for h in handles:
        h.remove()

    ratios = collections.defaultdict(list)
    for name, lin in linears.items():
        tokens, sx, sxx = stats[name]
        mean, second = sx / tokens, sxx / tokens
        var = (second.diagonal() - mean.square()).clamp_min(0)
        w = lin.weight.detach()
        if given:
            wanda, refined = given[0][name], given[1][name]
        else:
            wanda = nm_mask(w.abs() * second.diagonal().sqrt().float(), 2, 4)
            refined = refine_exact(w, wanda, mean, var, 2, 4)
        kind = name.rsplit(".", 1)[-1]
        e0, e1 = exact_error(w, wanda, second), exact_error(w, refined, second)
        d0, d1 = float(dsnot_error(w, wanda, mean, var).sum()), float(dsnot_error(w, refined, mean, var).sum())
        ratios[kind].append((d1 / d0, e1 / e0, float((refined != wanda).float().mean())))
        print(f"{name}: D {d1 / d0:.3f}  exact {e1 / e0:.3f}  changed {ratios[kind][-1][2]:.3%}", flush=True)
    print("\n| linear | DSnoT objective, refined / Wanda | exact error, refined / Wanda | weights changed |")
    print("| --- | --- | --- | --- |")
    for kind, rs in ratios.items():
        d, e, c = (sum(x[i] for x in rs) / len(rs) for i in range(3))
        print(f"| {kind} | {d:.3f} | {e:.3f} | {c:.2%} |")


if __name__ == "__main__":
    main()
