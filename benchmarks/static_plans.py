"""Static per-head plans against chance at the same budget: learn DuoAttention gates (`--seeds` of them),
draw `--random` plans with the same number of streaming KV heads, and score passkey (and NIAH with
`--niah`) for each, beside dense, all-streaming and MoA spans from a profile at the learned plan's KV
budget. Library functions only (no Ray, no run directory). Every claim in docs/static_plans.md is one
command of this script, e.g.

    PYTHONPATH=. python benchmarks/static_plans.py --model tests/fixtures/models/micro-llama --lengths 256,512

Gate-learning settings not given here are the attention stage's defaults (`AttentionStage`).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from maskpipe.pipeline.attention.gates import train_gates
from maskpipe.pipeline.attention.moa import moa_plan, profile_spans
from maskpipe.pipeline.attention.plans import binarize, kv_heads, plan_cost, planned, random_scores, uniform_plan
from maskpipe.pipeline.core.models import load_model, load_tokenizer
from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.eval.prompts import split_sentences
from maskpipe.pipeline.eval.retrieval import accuracy, niah_samples, passkey_samples, score
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.stages.attention import AttentionStage, head_geometry
from maskpipe.pipeline.train.checkpoint import CheckpointDir

CORPORA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "corpora"


def retrieval(model, tok, plan, tasks) -> dict[str, float]:
    """Exact match per task and length under `plan` (None: dense)."""
    out = {}
    with planned(model, plan):
        for task, samples in tasks.items():
            records = score(model, tok, samples, desc=task)
            out[task] = accuracy(records)["acc"]
            for cell in accuracy(records, ("length",))["cells"]:
                out[f"{task}@{cell['length']}"] = cell["acc"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tests/fixtures/models/micro-llama")
    ap.add_argument("--lengths", default="256,512", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--samples", type=int, default=20, help="passkey samples per length")
    ap.add_argument("--niah", type=int, default=0, help="NIAH samples per (length, depth) cell; 0: no NIAH")
    ap.add_argument("--streaming", type=float, default=0.5, help="fraction of KV heads that stream")
    ap.add_argument("--sink", type=int, default=8)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=2, help="learned plans (gate-learning seeds)")
    ap.add_argument("--first-seed", type=int, default=0, help="the first gate-learning seed")
    ap.add_argument("--random", type=int, default=10, help="random plans at the same budget")
    ap.add_argument("--steps", type=int, default=None, help="gate-learning steps (default: the stage's)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--reg", type=float, default=None)
    ap.add_argument("--moa", default="gradient,mass", help="MoA profiles to plan from, comma-separated ('' for none)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name_or_path=args.model, dtype="float32", device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    model.eval()
    shape, lengths = kv_heads(model)[:2], [int(n) for n in args.lengths.split(",")]
    st = AttentionStage.model_validate({"stage": "attention", "name": "learned", "data": "mix", "log_every": 10,
                                        "checkpoint_every": 10**6, "seqlen": 512,
                                        **{k: getattr(args, k) for k in ("steps", "lr", "reg") if getattr(args, k)}})
    data = DataConfig.model_validate({"sources": [str(CORPORA / "kjv.train.txt"), str(CORPORA / "pydocs.train.txt")],
                                      "shuffle_buffer": 1000})
    tasks = {"passkey": passkey_samples(tok, lengths, args.samples, seed=1)}
    if args.niah:
        tasks["niah"] = niah_samples(tok, split_sentences((CORPORA / "kjv.valid.txt").read_text()), lengths,
                                     [0.0, 0.25, 0.5, 0.75, 1.0], args.niah, seed=1)
    print(f"{Path(args.model).name}: {shape[0]} layers x {shape[1]} KV heads, {args.streaming:.0%} streaming "
          f"(sink {args.sink} + window {args.window}); gate learning {st.steps} steps, lr {st.lr}, reg {st.reg}, "
          f"batch {st.batch_size} x {st.seqlen}; {', '.join(f'{t} {len(s)}' for t, s in tasks.items())} samples")

    rows: dict[str, dict] = {"dense": retrieval(model, tok, None, tasks)}
    rows["all-streaming"] = retrieval(model, tok, uniform_plan(shape, True, args.sink, args.window), tasks)
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            gates, history = train_gates(model, tok, st, TokenStream(data, tok, st.seqlen, seed), sink=args.sink,
                                         window=args.window, seed=seed, store=CheckpointDir(Path(tmp), keep=1))
        print(f"learned seed {seed}: {time.perf_counter() - t0:.0f} s; distance "
              + " ".join(f"{h['distance']:.3f}" for h in history))
        for layer in gates:
            print("   ", " ".join(f"{g:.2f}" for g in layer.tolist()))
        plan = uniform_plan(shape, binarize(gates, fraction=args.streaming), args.sink, args.window, gates)
        rows[f"learned, seed {seed}"] = retrieval(model, tok, plan, tasks)
    same_budget = uniform_plan(shape, binarize(random_scores(shape, 0), fraction=args.streaming), args.sink,
                               args.window)
    budget = plan_cost(same_budget, max(lengths), *head_geometry(model))["kv_cache_fraction"]
    for measure in args.moa.split(",") if args.moa else []:
        t0 = time.perf_counter()
        spans, windows = profile_spans(model, tok, TokenStream(data, tok, st.seqlen, 0), sink=args.sink, batches=4,
                                       batch_size=st.batch_size, seqlen=st.seqlen, needles=st.needles, measure=measure)
        moa = moa_plan(spans, windows, budget_tokens=budget * max(lengths) * math.prod(shape), sink=args.sink,
                       length=max(lengths))
        print(f"MoA profile ({measure}): {time.perf_counter() - t0:.0f} s; windows per head (F = full):")
        for layer, full in zip(moa.window.tolist(), (~moa.streaming).tolist()):
            print("   ", " ".join("F" if f else str(w) for w, f in zip(layer, full)))
        rows[f"MoA spans, {measure} profile (same KV budget)"] = retrieval(model, tok, moa, tasks)
    randoms = [retrieval(model, tok, uniform_plan(shape, binarize(random_scores(shape, seed), fraction=args.streaming),
                                                  args.sink, args.window), tasks) for seed in range(args.random)]
    if randoms:
        rows["random: mean"] = {k: sum(r[k] for r in randoms) / len(randoms) for k in randoms[0]}
        rows["random: best"] = max(randoms, key=lambda r: r["passkey"])
        rows["random: worst"] = min(randoms, key=lambda r: r["passkey"])
        print("random plans, passkey:", " ".join(f"{r['passkey']:.2f}" for r in randoms))

    keys = list(rows["dense"])
    n = {k: len([s for s in tasks[k.split("@")[0]] if "@" not in k or s.length == int(k.split("@")[1])]) for k in keys}
    print("\n| plan | " + " | ".join(keys) + " |\n| --- |" + " --- |" * len(keys))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    print("| ± (1 s.e. at p = 0.5) | " + " | ".join(f"{0.5 / math.sqrt(n[k]):.2f} (n={n[k]})" for k in keys) + " |")


if __name__ == "__main__":
    main()
