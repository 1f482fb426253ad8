"""Why does DSnoT's refinement raise perplexity on tiny-llama while every layer's error falls?

    python benchmarks/dsnot_why.py --run /tmp/bench-dsnot [--pattern 2:4] [--threads 2]

Takes a run of benchmarks/dsnot.yaml (its Wanda mask and the refined masks of both DSnoT rules) and
measures perplexity on the first --tokens of both valid corpora (512-token windows) for:
  1. each block refined alone (every other block keeps Wanda's mask): is the damage one block's, or
     does it only appear when refined blocks follow each other (interaction with later layers)?
  2. each kind of linear refined alone (q/k/v/o/gate/up/down) in every block;
  3. the exact rule's objective split in two: the mean-shift term alone (Var = 0: ε² only) and the
     variance term alone (E[x] = 0: Σ r² Var[x] only, Wanda's objective with centred inputs), from the
     dense model's statistics on the run's calibration stream (64 x 512 tokens);
  4. calibration on the evaluation text itself (kjv.valid): is it a calibration/evaluation mismatch?
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from maskpipe.pipeline.core.models import load_model, load_tokenizer, prunable_linears
from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.eval.perplexity import perplexity
from maskpipe.pipeline.io.artifacts import load_artifact
from maskpipe.pipeline.io.data import TokenStream, eval_text
from maskpipe.pipeline.nm.dsnot import ChannelMoments, refine_exact
from maskpipe.pipeline.nm.sparsity import masked

CORPORA = Path("../shared/fixtures/corpora")


def moments(model, linears, ids) -> dict[str, ChannelMoments]:
    stats = {k: ChannelMoments(lin) for k, lin in linears.items()}
    handles = [lin.register_forward_hook(stats[k].add_batch) for k, lin in linears.items()]
    with torch.no_grad():
        for b in ids.split(8):
            model(b, use_cache=False)
    for h in handles:
        h.remove()
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run directory of benchmarks/dsnot.yaml")
    p.add_argument("--model", default="../shared/fixtures/models/tiny-llama")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=16384, help="the first TOKENS of each valid corpus (0: all)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    n, m = map(int, a.pattern.split(":"))
    cfg = ModelConfig(name_or_path=a.model, dtype="float32", device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    linears = prunable_linears(model, cfg)
    art = Path(a.run) / "artifacts"
    wanda = load_artifact(art / f"wanda-{a.pattern}")[0]
    rules = {"dsnot-exact": load_artifact(art / f"wanda+dsnot-exact-{a.pattern}")[0]}
    whole = {"dsnot (official, mlp skipped)": load_artifact(art / f"wanda+dsnot-{a.pattern}")[0],
             "dsnot (official, every linear)": load_artifact(art / f"wanda+dsnot-all-{a.pattern}")[0]}
    valid = {c: tok(eval_text(DataConfig.model_validate({"sources": [{"path": str(CORPORA / f"{c}.valid.txt"),
                                                                      "sample_by": "document"}]})),
                    return_tensors="pt").input_ids[0] for c in ("kjv", "pydocs")}
    valid = {c: ids[: a.tokens or None] for c, ids in valid.items()}

    def ppl(masks) -> str:
        with masked(linears, masks):
            return " / ".join(f"{perplexity(model, ids, 512, batch_size=4).ppl:.2f}" for ids in valid.values())

    def mix(refined, pick) -> dict:
        return {k: refined[k] if pick(k) else wanda[k] for k in wanda}

    print(f"| masks ({a.pattern}, tiny-llama) | kjv / pydocs |\n| --- | --- |")
    print(f"| Wanda | {ppl(wanda)} |", flush=True)
    for rule, refined in whole.items():
        print(f"| Wanda + {rule} | {ppl(refined)} |", flush=True)
    blocks = sorted({int(k.split(".layers.")[1].split(".")[0]) for k in wanda})
    kinds = sorted({k.rsplit(".", 1)[1] for k in wanda})
    for rule, refined in rules.items():
        print(f"| Wanda + {rule}, every block | {ppl(refined)} |", flush=True)
        for b in blocks:
            print(f"| {rule}, block {b} alone | {ppl(mix(refined, lambda k: f'.layers.{b}.' in k))} |", flush=True)
        for kind in kinds:
            print(f"| {rule}, {kind} alone | {ppl(mix(refined, lambda k: k.endswith(kind)))} |", flush=True)

    # The exact objective's two terms, and calibration on the evaluation text (dense-model statistics).
    train = DataConfig.model_validate({"sources": [str(CORPORA / "kjv.train.txt"), str(CORPORA / "pydocs.train.txt")],
                                       "shuffle_buffer": 1000})
    evaluated = DataConfig.model_validate({"sources": [{"path": str(CORPORA / "kjv.valid.txt"), "sample_by": "document"}]})
    for label, data in (("train calibration", train), ("calibrated on kjv.valid", evaluated)):
        stats = moments(model, linears, TokenStream(data, tok, 512).next_batch(64))
        for term, f in (("both terms", lambda mu, v: (mu, v)), ("mean shift ε² only", lambda mu, v: (mu, v * 0)),
                        ("variance term only", lambda mu, v: (mu * 0, v))):
            if label != "train calibration" and term != "both terms":
                continue
            masks = {}
            for k, lin in linears.items():
                mu, v = f(stats[k].channel_mean(), stats[k].channel_var())
                masks[k] = refine_exact(lin.weight.detach(), wanda[k], mu, v, n, m)
            print(f"| dsnot-exact, dense statistics, {label}, {term} | {ppl(masks)} |", flush=True)


if __name__ == "__main__":
    main()
