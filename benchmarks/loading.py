"""Per-rank peak resident memory of an fsdp learning stage: loading, then its first steps, for a whole
load per rank against a load from meta (each rank reads only its rows), on 1, 2 and 4 CPU ranks (gloo).

    python benchmarks/loading.py [--dir DIR] [--worlds 1 2 4] [--whole 1 2 4] [--steps 1] [--no-ac]

The model is a randomly initialised LLaMA of 220M parameters (12 blocks, hidden 1024, MLP 2816, vocab
32000), written once in bf16 to `--dir` (440 MB of safetensors). Every rank loads it in bf16 and learns
2:4 masks on random tokens, 4 × 32 per global batch, with the lean mask state (one bf16 logit per
weight: `logits_per_group: positions`, `logits_dtype: bfloat16`, so that 4 ranks of whole loads fit
beside other work on a 24 GB machine) and activation checkpointing (what `fsdp` runs with at scale: without
it every rank keeps every block's soft mask, whatever the number of ranks), for `--steps` (AdamW makes
its state at the end of the first step; later steps add at most one block's activations to that peak). Each rank
reports the growth of its peak resident set (VmHWM, reset through /proc/self/clear_refs) over its
resident set before loading: once when FSDP has sharded and filled the model (loading), once after the
steps. The planned figures are `pipeline.train.plan.loading_plan` and `memory_plan` (fsdp, CPU). The table
gives the largest rank of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

DIMS = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
BATCH, SEQLEN = 4, 32
LEAN = {"logits_per_group": "positions", "logits_dtype": "bfloat16"}


def rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def write_model(directory: Path) -> None:
    if (directory / "model.safetensors").is_file():
        return
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**DIMS), dtype=torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="10GB")


class RandomBlocks:
    """Random token blocks: rank r of W draws its share of each global batch from its own generator."""

    def __init__(self, rank: int):
        self.gen, self.drawn = torch.Generator().manual_seed(rank), 0

    def next_batch(self, n: int) -> torch.Tensor:
        self.drawn += n
        return torch.randint(0, DIMS["vocab_size"], (n, SEQLEN), generator=self.gen)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError  # never resumed


def worker(rank: int, world: int, port: int, directory: str, meta: bool, steps: int, ac: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, 2 // world))
    import torch.distributed as dist

    from maskpipe.pipeline.train.checkpoint import CheckpointDir
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.stages.learn import LearnStage
    from maskpipe.pipeline.nm.learn import train_masks
    from maskpipe.pipeline.core.models import load_model, prunable_linears
    from maskpipe.pipeline.train.shard import FSDP

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = ModelConfig(name_or_path=directory, dtype="bfloat16", device="cpu")
    st = LearnStage.model_validate({"stage": "learn", "name": "learn", "data": "d", "steps": steps,
                                    "batch_size": BATCH, "seqlen": SEQLEN, "log_every": steps,
                                    "checkpoint_every": 10**6, **LEAN})
    marks = {}
    setup = FSDP._setup

    def measured_setup(self, *args, **kwargs):  # the model sharded and filled: loading ends here
        result = setup(self, *args, **kwargs)
        marks["loading"] = rss("VmHWM") - marks["base"]
        reset_peak()
        return result

    FSDP._setup = measured_setup
    load_model(cfg, meta=True)  # imports transformers' model code: not memory of either load
    reset_peak()
    marks["base"] = rss("VmRSS")
    model = load_model(cfg, meta=meta)
    train_masks(model, prunable_linears(model, cfg), st, 2, 4, RandomBlocks(rank), seed=0,
                store=CheckpointDir(Path(out).parent / "checkpoints", keep=1), strategy="fsdp",  # seen by every rank
                activation_checkpointing=ac)
    marks["steps"] = rss("VmHWM") - marks["base"]
    Path(f"{out}.{rank}").write_text(json.dumps(marks))
    dist.destroy_process_group()


def run(world: int, directory: Path, meta: bool, steps: int, ac: bool) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "marks")
        mp.start_processes(worker, args=(world, port, str(directory), meta, steps, ac, out), nprocs=world,
                           start_method="spawn")
        return [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "maskpipe-loading-220m"))
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=1, help="AdamW's state appears at the end of step 1; from step 2 "
                   "the peak adds one block's activations to it (small under activation checkpointing)")
    p.add_argument("--whole", type=int, nargs="*", default=None, help="worlds that also run whole loads (default: all)")
    p.add_argument("--no-ac", dest="ac", action="store_false",
                   help="without activation checkpointing every rank keeps every block's soft mask for the backward")
    a = p.parse_args()
    from transformers import AutoConfig

    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.train.plan import gib, loading_plan, memory_plan, model_shape

    directory = Path(a.dir)
    write_model(directory)
    shape = model_shape(AutoConfig.from_pretrained(directory), ModelConfig(name_or_path=str(directory)))
    print(f"random LLaMA: {shape.params / 1e6:.0f}M parameters ({gib(shape.params * 2)} in bf16), "
          f"{shape.masked / 1e6:.0f}M under 2:4 masks (positions, bf16); fsdp, {BATCH} x {SEQLEN} tokens per step, "
          f"{a.steps} step(s), activation checkpointing {'on' if a.ac else 'off'}")
    print("| ranks | load | loading: measured | planned | measured / planned | first steps: measured | planned "
          "| measured / planned |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for world in a.worlds:
        for meta in (False, True) if a.whole is None or world in a.whole else (True,):
            marks = run(world, directory, meta, a.steps, a.ac)
            loading = max(m["loading"] for m in marks)
            steps = max(m["steps"] for m in marks)
            plan_load = sum(loading_plan(shape, n=2, m=4, world=world, sharded=meta, **LEAN).values())
            plan_steps = sum(memory_plan(shape, n=2, m=4, micro_batch=BATCH // world, seqlen=SEQLEN, strategy="fsdp",
                                         world=world, model_dtype="bfloat16", cuda=False, activation_checkpointing=a.ac,
                                         **LEAN).values())
            print(f"| {world} | {'meta, own rows' if meta else 'whole'} | {gib(loading)} | {gib(plan_load)} | "
                  f"{loading / plan_load:.2f} | {gib(steps)} | {gib(plan_steps)} | {steps / plan_steps:.2f} |",
                  flush=True)


if __name__ == "__main__":
    sys.exit(main())
