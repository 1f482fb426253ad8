"""The memory plan (`maskpipe plan`) against the measured peak of a few learning steps, one process.

    python benchmarks/memory_plan.py [--model ../shared/fixtures/models/tiny-llama] [--batch 4] [--seqlen 512]

On CUDA the peak is `torch.cuda.max_memory_allocated`; on CPU it is the growth of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over the resident set after loading the
model, so the frozen weights and the CUDA allowance are left out of the planned total it is set against.
Prints one row per activation-checkpointing setting: planned, measured, measured / planned.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import re
from pathlib import Path

import torch

from maskpipe.pipeline.train.checkpoint import CheckpointDir
from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
from maskpipe.pipeline.stages.learn import LearnStage
from maskpipe.pipeline.io.data import TokenStream
from maskpipe.pipeline.nm.learn import train_masks
from maskpipe.pipeline.core.models import load_model, load_tokenizer, prunable_linears
from maskpipe.pipeline.train.plan import CUDA_RESERVE, gib, memory_plan, model_shape


def rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/fixtures/models/tiny-llama")
    p.add_argument("--data", default="../shared/fixtures/corpora/kjv.train.txt")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--ac", choices=["off", "on"], default=None, help="one setting only (this process)")
    a = p.parse_args()
    if a.ac is None:  # each setting in a fresh process: freed pages stay resident and would hide a peak
        print("| activation checkpointing | planned (excl. frozen weights) | measured peak | measured / planned |")
        print("| --- | --- | --- | --- |", flush=True)
        for ac in ("off", "on"):
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--ac", ac], check=True)
        return
    cuda = torch.cuda.is_available()
    cfg = ModelConfig(name_or_path=a.model, dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    tokenizer = load_tokenizer(cfg)
    data = DataConfig.model_validate({"sources": [a.data]})
    ac = a.ac == "on"
    model = load_model(cfg)
    linears = prunable_linears(model, cfg)
    st = LearnStage.model_validate({"stage": "learn", "name": "plan", "data": "d", "steps": a.steps,
                                    "batch_size": a.batch, "seqlen": a.seqlen, "log_every": a.steps,
                                    "checkpoint_every": 10**6})
    stream = TokenStream(data, tokenizer, a.seqlen, seed=0)
    stream.next_batch(1)  # tokenizer and stream buffers are not the learning stage's memory
    plan = memory_plan(model_shape(model.config, cfg), n=2, m=4, micro_batch=a.batch, seqlen=a.seqlen,
                       strategy="none", world=1, activation_checkpointing=ac, model_dtype=cfg.dtype, cuda=cuda)
    planned = sum(plan.values()) - plan["frozen weights"] - (CUDA_RESERVE if cuda else 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = rss("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        train_masks(model, linears, st, 2, 4, stream, seed=0, store=CheckpointDir(tmp, keep=1),
                    activation_checkpointing=ac)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")) - base
    print(f"| {'on' if ac else 'off'} | {gib(planned)} | {gib(peak)} | {peak / planned:.2f} |")


if __name__ == "__main__":
    main()
