"""Gate learning step by step on one model: the lr, the distance, every gate's gradient and every gate,
every `--every` steps (docs/static_plans.md §1). Library functions only.

    PYTHONPATH=. python benchmarks/gate_trajectories.py --model tests/fixtures/models/micro-llama --steps 40 --lr 0.1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from maskpipe.pipeline.attention.gates import GateLearning
from maskpipe.pipeline.core.models import load_model, load_tokenizer
from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.stages.attention import AttentionStage
from maskpipe.pipeline.train.loop import cosine_lr

CORPORA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "corpora"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tests/fixtures/models/micro-llama")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--reg", type=float, default=2.0)
    ap.add_argument("--streaming", type=float, default=0.5, help="the budget (fraction of KV heads streaming)")
    ap.add_argument("--threshold", type=float, default=None, help="learn for a threshold instead (AdamW + reg)")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(name_or_path=args.model, dtype="float32", device="cpu")
    model, tok = load_model(cfg), load_tokenizer(cfg)
    model.eval()
    budget = {"threshold": args.threshold} if args.threshold is not None else {"streaming": args.streaming}
    st = AttentionStage.model_validate({"stage": "attention", "name": "gates", "data": "mix", "steps": args.steps,
                                        "lr": args.lr, "reg": args.reg, "batch_size": 4, "seqlen": 512, **budget})
    data = DataConfig.model_validate({"sources": [str(CORPORA / "kjv.train.txt"), str(CORPORA / "pydocs.train.txt")],
                                      "shuffle_buffer": 1000})
    method = GateLearning(model, tok, st, TokenStream(data, tok, st.seqlen, 0), sink=8, window=64, seed=0)
    for step in range(args.steps):
        lr = cosine_lr(args.lr, step, args.steps, st.warmup_steps)
        distance = method.step(step, lr)
        if step % args.every == 0 or step == args.steps - 1:
            print(f"step {step} lr {lr:.4f} distance {distance:.4f}")
            print("  gradient", " ".join(f"{g:.4f}" for g in method.gates.grad.flatten().tolist()))
            print("  gates   ", " ".join(f"{g:.3f}" for g in method.gates.detach().flatten().tolist()))


if __name__ == "__main__":
    main()
