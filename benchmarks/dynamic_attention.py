"""End-to-end check on micro-llama: learn DMA's scorer (kjv haystack passkey batches), then passkey
accuracy at given lengths and one budget for dense, DMA (learned and at its random init), H2O, SnapKV, key
norm, random keys (all with a cache evicted to the budget), the oracle (masked, full cache) and "target":
the learning objective's own target as a fixed score, read from the answer (what a perfect query-agnostic
scorer of that objective would keep; a bound, not a method).

    python benchmarks/dynamic_attention.py --samples 20 --lengths 512 --haystacks kjv,filler --ppl-windows 16 [--keys 72]
    python benchmarks/dynamic_attention.py --model ../shared/fixtures/models/tiny-llama --seqlen 768 --lengths 768

Defaults are the `dynamic` stage's: 40 steps of 4 two-passkey samples (kjv haystack), the attention
objective, lr 0.1, 25% of the keys with 4 sink and 3/4 of the budget recent. `--scorer F` saves the trained
scorer to F, or loads it from F if it exists (then nothing trains).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from maskpipe.pipeline.attention.dynamic import (  # noqa: E402
    KeyScorer,
    cache_bytes,
    dynamic,
    evict_decode,
    masked_decode,
    param_fraction,
    prompt_scores,
)
from maskpipe.pipeline.attention.dynamic_learning import profile_shares, train_scorer  # noqa: E402
from maskpipe.pipeline.attention.kv_scores import (  # noqa: E402
    Budget,
    FixedScores,
    KeyNormScores,
    OracleScores,
    random_scores,
)
from maskpipe.pipeline.core.models import load_model, load_tokenizer

# ---- maskpipe imports ----
from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.eval.perplexity import perplexity
from maskpipe.pipeline.eval.prompts import split_sentences
from maskpipe.pipeline.eval.retrieval import exact_match, passkey_samples
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.stages.dynamic import DynamicStage, profile_data
from maskpipe.pipeline.train.checkpoint import CheckpointDir

MICRO = "tests/fixtures/models/micro-llama"
CORPORA = Path("../shared/fixtures/corpora")


@torch.no_grad()
def dense_decode(model, ids, new):
    out, tokens = model(input_ids=ids, use_cache=True), []
    for step in range(new):
        tokens.append(out.logits[:, -1].argmax(-1))
        if step < new - 1:
            out = model(input_ids=tokens[-1][:, None], cache=out.cache, use_cache=True)
    return torch.stack(tokens, 1)


@torch.no_grad()
def answer_target(model, tok, sample, budget) -> FixedScores:
    """The attention objective's own target as a score (a bound, not a method: it reads the answer): per
    layer and KV head, the most attention the dense model's answer queries pay each prompt key,
    teacher-forced on the true answer."""
    answer = tok(" " + sample.answers[0], add_special_tokens=False).input_ids
    full = torch.tensor([sample.ids + answer])
    queries = torch.zeros(1, full.shape[1], dtype=torch.bool)
    queries[0, len(sample.ids) - 1: -1] = True
    cap = {"queries": {"answer": (queries, "max")}, "budget": budget.fixed(len(sample.ids))}
    with dynamic(model, None, None, capture=cap):
        model.base_model(input_ids=full, use_cache=False)
    return FixedScores([cap["needed"][i][1]["answer"][0][..., : len(sample.ids)] for i in range(len(cap["needed"]))])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MICRO, help="a model directory (default: micro-llama)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=DynamicStage.model_fields["lr"].default)
    ap.add_argument("--warmup", type=int, default=DynamicStage.model_fields["warmup_steps"].default)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--needles", type=int, default=2)
    ap.add_argument("--relax", default="st")
    ap.add_argument("--loss", default="attention")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--keys", type=int, help="a count budget per KV head instead of --fraction (e.g. all-streaming's)")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, help="recent keys (default: --recent of the budget)")
    ap.add_argument("--recent", type=float, default=Budget.recent, help="the recent window's share of the budget")
    ap.add_argument("--lengths", default="768", help="comma-separated prompt lengths")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--haystacks", default="filler,kjv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="the scorer's init, its stream and passkey draws (not the test samples)")
    ap.add_argument("--mix-heads", choices=["auto", "yes", "no"], default="auto",
                    help="DMA's dt_proj (each KV head scored from every KV head's values), or each from its own; "
                    "auto: mixed (factored if needed, --rank)")
    ap.add_argument("--rank", type=int, help="factor the mixed form at this rank (default: full where it fits "
                    "under 0.1%% of the model, else the largest rank that does)")
    ap.add_argument("--scorer", help="a .safetensors file: load the scorer from it if it exists (no training), "
                    "else save the trained one there")
    ap.add_argument("--general", type=float, default=1.0, help="weight of every query's attention target")
    ap.add_argument("--ppl-windows", type=int, default=0, help="also perplexity over this many kjv.valid windows")
    ap.add_argument("--ppl-seqlen", type=int, help="their length (default --seqlen; tiny-llama trained at 512)")
    ap.add_argument("--profile", type=int, default=0, help="also a row dma-profiled: the learned scorer with each "
                    "KV head's recent share from a profile of this many kjv windows and passkey prompts (recent: profile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name_or_path=args.model, dtype="float32", device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    split = {"sink": args.sink, "window": args.window, "recent": args.recent}
    budget = Budget(keys=args.keys, **split) if args.keys else Budget(fraction=args.fraction, **split)

    t0 = time.perf_counter()
    data = DataConfig.model_validate({"sources": [str(CORPORA / "kjv.train.txt")], "shuffle_buffer": 8})
    st = SimpleNamespace(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, log_every=5,
                         checkpoint_every=10**9, batch_size=args.batch_size, seqlen=args.seqlen, needles=args.needles)
    mix = {"auto": None, "yes": True, "no": False}[args.mix_heads]
    init = KeyScorer.for_model(model, seed=args.seed, mix_heads=mix, rank=args.rank)
    if args.scorer and Path(args.scorer).exists():
        scorer, history = KeyScorer.for_model(model, seed=args.seed, mix_heads=mix, rank=args.rank), []
        scorer.load_state_dict(load_file(args.scorer))
        args.steps = 0
    if args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            scorer, history = train_scorer(model, tok, st, TokenStream(data, tok, args.seqlen, seed=args.seed), budget,
                                           seed=args.seed, store=CheckpointDir(Path(tmp) / "ckpt", keep=1), relax=args.relax,
                                           loss=args.loss, general=args.general,
                                           scorer=KeyScorer.for_model(model, seed=args.seed, mix_heads=mix, rank=args.rank))
        if args.scorer:
            save_file({k: v.detach().contiguous() for k, v in scorer.state_dict().items()}, args.scorer)
    train_s = time.perf_counter() - t0
    for h in history:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in h.items()}))
    n, frac = param_fraction(scorer, model)
    print(f"trained {args.steps} steps in {train_s:.0f} s; scorer params {n} = {100 * frac:.4f}% of the model")

    layers, kv = scorer.A.shape
    profiled = budget
    if args.profile:
        windows, prompts = profile_data(data, tok, args.profile, args.seqlen, args.needles, args.seed,
                                        text_seqlen=args.ppl_seqlen)
        shares, _ = profile_shares(model, scorer, budget, windows, prompts)
        profiled = dataclasses.replace(budget, shares=shares)
        print("profiled recent shares per layer and KV head:", shares)
    if args.ppl_windows:
        text = "\n\n".join((CORPORA / "kjv.valid.txt").read_text().splitlines())
        ppl_seqlen = args.ppl_seqlen or args.seqlen
        ids = torch.tensor(tok(text).input_ids[: args.ppl_windows * ppl_seqlen])
        rows = {"dense": None, "dma-learned": scorer, "dma-init": init, "key-norm": KeyNormScores(),
                "oracle": OracleScores()} | ({"dma-profiled": scorer} if args.profile else {})
        for name, source in rows.items():
            if source is None:
                p = perplexity(model, ids, ppl_seqlen, batch_size=4).ppl
            else:
                with dynamic(model, source, profiled if name == "dma-profiled" else budget):
                    p = perplexity(model, ids, ppl_seqlen, batch_size=4).ppl
            print(f"ppl kjv.valid {len(ids)} tokens, seqlen {ppl_seqlen}, {name:12s} {p:.3f}")
    for length, hay in [(int(n), h) for n in args.lengths.split(",") for h in args.haystacks.split(",")]:
        pool = None if hay == "filler" else split_sentences((CORPORA / "kjv.valid.txt").read_text())
        samples = passkey_samples(tok, [length], args.samples, seed=1, haystack=pool)
        hits: dict[str, int] = {}
        t1 = time.perf_counter()
        for i, s in enumerate(samples):
            ids = torch.tensor([s.ids])
            new = len(tok(" " + s.answers[0], add_special_tokens=False).input_ids) + 2
            fixed = prompt_scores(model, ids)
            runs = {
                "dense": lambda: dense_decode(model, ids, new),
                "dma-learned": lambda: evict_decode(model, scorer, budget, ids, new),
                "dma-init": lambda: evict_decode(model, init, budget, ids, new),
                "h2o": lambda: evict_decode(model, fixed["h2o"], budget, ids, new),
                "snapkv": lambda: evict_decode(model, fixed["snapkv"], budget, ids, new),
                "key-norm": lambda: evict_decode(model, KeyNormScores(), budget, ids, new),
                "random": lambda: evict_decode(model, random_scores(ids.shape[1], layers, kv, seed=i), budget, ids, new),
                "oracle": lambda: masked_decode(model, OracleScores(), budget, ids, new),
                "target": lambda: evict_decode(model, answer_target(model, tok, s, budget), budget, ids, new),
            } | ({"dma-profiled": lambda: evict_decode(model, scorer, profiled, ids, new)} if args.profile else {})
            for name, run in runs.items():
                text = tok.decode(run()[0].tolist(), skip_special_tokens=True)
                hits[name] = hits.get(name, 0) + exact_match(text, s.answers)
        print(f"\n{Path(args.model).name}: passkey, {hay} haystack, {length} tokens (prompts {min(len(s.ids) for s in samples)}-"
              f"{max(len(s.ids) for s in samples)}), budget {f'{args.fraction:.0%} of each prompt' if not args.keys else 'a count'} ({budget.count(length)} "
              f"keys per KV head at {length}; sink, window, top-k {budget.resolve(length)}), {len(samples)} samples, "
              f"{time.perf_counter() - t1:.0f} s")
        for name, h in hits.items():
            print(f"  {name:12s} {h / len(samples):.2f}")
        print("  cache at", length, "tokens:", cache_bytes(model, length, budget))


if __name__ == "__main__":
    main()
