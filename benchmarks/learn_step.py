"""Learned-mask training step vs a dense forward+backward with weight gradients, at the first, middle and
last step of the anneal, one and two threads, batch 4 and 8, on tiny-llama and a ~100M random LLaMA.

    python benchmarks/learn_step.py                 # the whole table; cells past --budget (540 s) are skipped
    python benchmarks/learn_step.py --quick         # one timed repeat per cell: the code paths, rough numbers
    python benchmarks/learn_step.py --kernel        # the fused soft mask alone, ns a weight, and the memory floor

Both steps run on their own copy of the model, interleaved repeat by repeat (dense, first, middle, last,
each model's timed steps after an untimed step of its own, as in a run), so drift on a shared machine hits
every column alike; the ratio is the median of learned over the median
of dense, measured in one run. The matmuls' floor is about 1.0x: the mask's gradient needs the same
matmuls as the weight gradient. The mask adds per-weight memory traffic that no token count changes
(KERNEL_BYTES + ADAMW_EXTRA_BYTES a masked weight), so with few tokens a step the floor is higher:
`--kernel` prints it for this machine. The learned step is what `MaskLearning.step` does per micro-batch:
new noise seeds, forward, backward (the regulariser on), AdamW on the logits; its anneal points take
tau and kappa from the learn stage's default schedule and logits spread as a run leaves them.

Then one `torch.profiler` step of each (dense, first, last) per cell, its self CPU time grouped: the
soft mask's parts (`pipeline.nm.learn.PROFILE_RANGES` names them), the optimiser, the dense matmuls
and the rest of the model. Profiles are proportions: the profiler slows small ops more than large ones.
Prints markdown tables (and writes them with `--json`).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from the tree, whatever `maskpipe` is installed

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from maskpipe.pipeline.core.models import load_model, prunable_linears  # noqa: E402
from maskpipe.pipeline.core.schema import ModelConfig  # noqa: E402
from maskpipe.pipeline.nm import learn  # noqa: E402
from maskpipe.pipeline.stages.learn import LearnStage  # noqa: E402
from maskpipe.pipeline.train.loop import linear_schedule  # noqa: E402
from maskpipe.pipeline.train.shard import adamw  # noqa: E402

TINY = ROOT.parent / "shared" / "fixtures" / "models" / "tiny-llama"
# ~100M parameters, 85M of them under masks: LLaMA blocks at GPT-2-small width, a small vocabulary
BIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
           num_key_value_heads=12, vocab_size=8192, max_position_embeddings=2048)
STEPS = 100  # a run's length, for the anneal points: step 0, 50 and 99 of the default schedule
SPREAD = {"first": 0.01, "middle": 0.03, "last": 0.05}  # logits' std: init_std at first, as a run leaves them later
# Bytes a masked weight moves in the fused soft mask at the least: forward reads 6/4 logits and W, writes
# 6/4 probabilities and W*M; backward reads the probabilities, dL/d(W*M), W and W*M, writes 6/4 logit grads.
KERNEL_BYTES = 4 * (1.5 + 1 + 1.5 + 1) + 4 * (1.5 + 1 + 1 + 1 + 1.5)
# AdamW on 1.5 logits a weight instead of one weight: read p, g, m, v and write p, m, v (28 B) 0.5 times more
ADAMW_EXTRA_BYTES = 0.5 * 28
CATEGORIES = ("noise", "fused", "softmax", "product", "masked_weight", "regulariser", "optimiser", "dense matmuls", "rest")
MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}


def set_anneal(mods: dict, point: str, gen: torch.Generator) -> None:
    """The masks at an anneal point (`anneal_points`), logits spread as a run leaves them there."""
    tau, kappa = anneal_points()[point]
    with torch.no_grad():
        for mod in mods.values():
            mod.logits.copy_(torch.randn(mod.logits.shape, generator=gen) * SPREAD[point])
            mod.tau, mod.kappa = tau, kappa


def anneal_points() -> dict[str, tuple[float, float]]:
    """(tau, kappa) at the first, middle and last step of LearnStage's default schedule."""
    tau, kappa = (LearnStage.model_fields[k].default for k in ("tau", "kappa"))
    steps = {"first": 0, "middle": STEPS // 2, "last": STEPS - 1}
    return {k: (linear_schedule(*tau, s, STEPS), linear_schedule(*kappa, s, STEPS)) for k, s in steps.items()}


def load(which: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, linears) of tiny-llama or of the random LLaMA of BIG's shape (seeded, written here)."""
    if which == "tiny":
        cfg = ModelConfig(name_or_path=str(TINY), dtype=str(dtype).removeprefix("torch."), device=device)
        model = load_model(cfg)
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = ModelConfig(name_or_path="random-llama", dtype=str(dtype).removeprefix("torch."), device=device)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**BIG), dtype=dtype).requires_grad_(False).eval()
    return model, prunable_linears(model, cfg)


def learned_step(model, linears: dict, lam: float = 1e-5, autocast: bool = False):
    """(masks, step(x)): 2:4 masks on `linears`, and what `MaskLearning.step` does per micro-batch: new
    noise seeds, forward (bf16 autocast if asked), backward with the regulariser on, AdamW on the logits."""
    mods = learn.add_learned_masks(linears, 2, 4, torch.Generator().manual_seed(0))
    for mod in mods.values():
        mod.train()
        mod.lam = lam  # the sparse-weight regulariser rides in each layer's backward, as in train_masks
    opt = adamw([mod.logits for mod in mods.values()], 1e-5, 0.01)  # the learn stage's (`shard.adamw`)
    draws = iter(range(10**9))

    def step(x):
        opt.zero_grad(set_to_none=True)
        for mod in mods.values():
            mod.noise_seed = next(draws)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()

    return mods, step


class Steps:
    """A dense step and a learned step on two copies of one model, and the learned step's anneal point."""

    def __init__(self, model, linears, x, lam: float = 1e-5, autocast: bool = False):
        self.x, self.autocast, self.device = x, autocast, x.device
        self.dense_model, self.masked_model = model, copy.deepcopy(model)
        weights = [lin.weight for lin in linears.values()]
        for w in weights:
            w.requires_grad_(True)
        self.dense_opt = adamw(weights, 0.0, 0.01)  # the same AdamW; lr 0: the model stays the same for every cell
        masked = {name: self.masked_model.get_submodule(name) for name in linears}
        self.mods, self._learned = learned_step(self.masked_model, masked, lam, autocast)
        self.points = {}
        gen = torch.Generator().manual_seed(1)
        for name, (tau, kappa) in anneal_points().items():
            logits = [torch.randn(mod.logits.shape, generator=gen).to(self.device) * SPREAD[name] for mod in self.mods.values()]
            self.points[name] = (tau, kappa, logits)

    def _loss(self, model):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            return model(input_ids=self.x, labels=self.x, use_cache=False).loss

    def dense(self) -> None:
        self.dense_opt.zero_grad(set_to_none=True)
        self._loss(self.dense_model).backward()
        self.dense_opt.step()

    def at(self, point: str) -> None:
        tau, kappa, logits = self.points[point]
        with torch.no_grad():
            for mod, value in zip(self.mods.values(), logits):
                mod.logits.copy_(value)
                mod.tau, mod.kappa = tau, kappa

    def learned(self) -> None:
        self._learned(self.x)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def medians(self, repeats: int) -> dict[str, float]:
        """Median seconds of the dense step and of the learned step at each anneal point, interleaved."""
        # Warm-up: one untimed round of every step timed below. With a single warm-up learned step, the
        # first timed learned step on the 98M model ran 1.4-1.8x the later ones in one-repeat cells.
        self.dense()
        for point in self.points:
            self.at(point)
            self.learned()
        times = defaultdict(list)
        for _ in range(repeats):
            # Each model's timed steps follow an untimed step of its own, as they do in a run: a learned
            # step right after a dense one ran 0.2-0.35 s slower on the 98M model at 2 threads (1.69 and
            # 1.95 s against 1.50-1.58 after a learned step; 2026-12-04), which had made the first anneal
            # point, timed right after the dense step, the dearest.
            self.dense()
            times["dense"].append(self.timed(self.dense))
            self.at(next(iter(self.points)))
            self.learned()
            for point in self.points:
                self.at(point)
                times[point].append(self.timed(self.learned))
        return {k: statistics.median(v) for k, v in times.items()}

    def profiled(self, which: str) -> dict[str, float]:
        if which != "dense":
            self.at(which)
        return profiled(self.dense if which == "dense" else self.learned)


def profiled(fn) -> dict[str, float]:
    """Milliseconds of one fn() by category (module docstring): self CPU time, or on CUDA kernel time."""
    cuda = torch.cuda.is_available()
    learn.PROFILE_RANGES = True
    try:
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
    finally:
        learn.PROFILE_RANGES = False
    return breakdown(prof.events(), device=cuda)


def category(event) -> str:
    """The soft-mask part or optimiser range an op ran in, else whether it is a matmul."""
    node = event
    while node is not None:
        if node.name.startswith("soft_mask."):
            return node.name.removeprefix("soft_mask.")
        if node.name.startswith("Optimizer."):
            return "optimiser"
        node = node.cpu_parent
    return "dense matmuls" if event.name in MATMULS else "rest"


def breakdown(events, device: bool = False) -> dict[str, float]:
    """Milliseconds by category: self CPU time, or (device) the kernel time each op launched."""
    ms = dict.fromkeys(CATEGORIES, 0.0)
    for ev in events:
        ms[category(ev)] += (ev.self_device_time_total if device else ev.self_cpu_time_total) / 1e3
    ms["total"] = sum(ms.values())
    return ms


def run_cell(model, linears, threads: int, batch: int, seqlen: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    x = torch.randint(0, model.config.vocab_size, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    steps = Steps(model, linears, x)
    times = steps.medians(repeats)
    profiles = {which: steps.profiled(which) for which in ("dense", "first", "last")}
    for lin in linears.values():
        lin.weight.requires_grad_(False)
        lin.weight.grad = None
    return {"threads": threads, "batch": batch, "seqlen": seqlen, "seconds": times,
            "ratio": {k: v / times["dense"] for k, v in times.items() if k != "dense"}, "profile": profiles}


def tables(rows: list[dict]) -> str:
    points = anneal_points()
    heads = [f"{k} (τ {t:.3g}, κ {c:.3g})" for k, (t, c) in points.items()]
    out = ["| model | threads | batch × seqlen | dense s | " + " | ".join(f"learned {h}" for h in heads) + " |",
           "| --- " * (4 + len(heads)) + "|"]
    for r in rows:
        s = r["seconds"]
        cells = [f"{s[k]:.3f} s, **{r['ratio'][k]:.2f}×**" for k in points]
        out.append(f"| {r['model']} | {r['threads']} | {r['batch']} × {r['seqlen']} | {s['dense']:.3f} | " + " | ".join(cells) + " |")
    out += ["", "Profile, self CPU ms of one step by category (proportions only: the profiler slows small ops most)", ""]
    out += profile_table({(r["model"], r["threads"], r["batch"], k): ms for r in rows for k, ms in r["profile"].items()},
                         ("model", "threads", "batch", "step"))
    return "\n".join(out)


def anneal_table(dense: float, learned: dict[str, float], tokens: int, dense_name: str, learned_name: str) -> list[str]:
    """Markdown rows: the dense step and the learned one at each anneal point, with their ratio."""
    out = ["| step | median s | tokens/s | ratio to dense |", "| --- | --- | --- | --- |",
           f"| {dense_name} fwd+bwd (weight grads) + AdamW | {dense:.3f} | {tokens / dense:.0f} | 1 |"]
    return out + [f"| {learned_name} + AdamW, {k} step (τ {t:.3g}, κ {c:.3g}) | {learned[k]:.3f} | "
                  f"{tokens / learned[k]:.0f} | {learned[k] / dense:.2f}x |" for k, (t, c) in anneal_points().items()]


def profile_table(profiles: dict[tuple, dict], keys: tuple[str, ...]) -> list[str]:
    """Markdown rows of `profiled` results, one per key tuple."""
    out = ["| " + " | ".join(keys) + " | " + " | ".join(CATEGORIES) + " | total |", "| --- " * (len(keys) + len(CATEGORIES) + 1) + "|"]
    for key, ms in profiles.items():
        out.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(f"{ms[c]:.1f}" for c in (*CATEGORIES, "total")) + " |")
    return out


def kernel_cost(threads: int, rows: int = 768, cols: int = 2048) -> dict[str, float]:
    """The fused soft mask alone on one layer of BIG's MLP shape (ns a weight, forward and backward), this
    machine's copy bandwidth (GB/s, read + write counted) and the learned step's memory floor from it: the
    least time a masked weight adds to a step, whatever the kernel, at this many threads."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    w, grad = torch.randn(rows, cols, generator=gen), torch.randn(rows, cols, generator=gen) * 1e-3
    logits = torch.randn(rows, cols // 4, 6, generator=gen) * SPREAD["last"]
    tau, kappa = anneal_points()["last"]
    args = (learn.EXP_FLOOR, learn.BELOW_FLOOR)

    def ns_each(fn, n: int, reps: int) -> float:  # ns per element of one fn() over n elements, warmed up
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps / n * 1e9

    probs, masked = learn.fused.forward(w, logits, 7, tau, kappa, *args)
    fwd = ns_each(lambda: learn.fused.forward(w, logits, 7, tau, kappa, *args), w.numel(), 50)
    bwd = ns_each(lambda: learn.fused.backward(probs, grad, w, masked, tau, kappa, 1e-5), w.numel(), 50)
    big, out = torch.full((100_000_000,), 1.0), torch.zeros(100_000_000)  # touched: no zero-page reads
    gbs = 8 / ns_each(lambda: out.copy_(big), big.numel(), 5)  # 4 B read + 4 B written a float
    return {"threads": threads, "forward_ns": fwd, "backward_ns": bwd, "copy_GBs": gbs,
            "floor_ns": (KERNEL_BYTES + ADAMW_EXTRA_BYTES) / gbs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=["tiny", "big"], default=["tiny", "big"])
    p.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 4])
    p.add_argument("--seqlen", type=int, default=512, help="tiny-llama's block length")
    p.add_argument("--big-seqlen", type=int, default=128, help="the ~100M model's block length (its steps are ~15x tiny's)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per tiny-llama cell, interleaved")
    p.add_argument("--big-repeats", type=int, default=1, help="timed repeats per ~100M cell")
    p.add_argument("--budget", type=float, default=540, help="seconds; cells not started by then are listed as skipped")
    p.add_argument("--quick", action="store_true", help="one timed repeat per cell")
    p.add_argument("--json", help="also write every number here")
    p.add_argument("--fused", choices=["on", "off"], default="on",
                   help="off: the soft mask's whole-tensor path on the CPU (`pipeline.nm.fused`)")
    p.add_argument("--kernel", action="store_true", help="only the fused soft mask's cost and the memory floor")
    a = p.parse_args(argv)
    learn.fused.ENABLED = a.fused == "on"
    if a.kernel:
        if not learn.fused.available(torch.empty(4, 4), torch.empty(4, 1, 6), learn.nm_candidates(2, 4).float()):
            raise SystemExit("learn_step: --kernel: the fused soft mask is not built here (pipeline/nm/fused.py)")
        print(f"fused soft mask on a 768x2048 layer, {torch.backends.cpu.get_cpu_capability()}; floor: "
              f"{KERNEL_BYTES + ADAMW_EXTRA_BYTES:.0f} B a masked weight at the copy bandwidth\n")
        print("| threads | forward ns/weight | backward ns/weight | copy GB/s | floor ns/weight |\n| --- | --- | --- | --- | --- |")
        for threads in a.threads:
            k = kernel_cost(threads)
            print(f"| {threads} | {k['forward_ns']:.2f} | {k['backward_ns']:.2f} | {k['copy_GBs']:.1f} | {k['floor_ns']:.2f} |")
        return
    start, rows, skipped = time.perf_counter(), [], []
    for which in a.models:
        model, linears = load(which)
        params = sum(t.numel() for t in model.parameters())
        masked = sum(lin.weight.numel() for lin in linears.values())
        name = f"{'tiny-llama' if which == 'tiny' else 'random LLaMA'} ({params / 1e6:.0f}M, {masked / 1e6:.0f}M masked)"
        repeats = 1 if a.quick else a.repeats if which == "tiny" else a.big_repeats
        for threads in a.threads:  # the most quoted cells first: 2 threads, batch 8
            for batch in a.batches:
                if time.perf_counter() - start > a.budget:
                    skipped.append(f"{name}, {threads} threads, batch {batch}")
                    continue
                t0 = time.perf_counter()
                row = run_cell(model, linears, threads, batch, a.seqlen if which == "tiny" else a.big_seqlen, repeats)
                rows.append({"model": name, "repeats": repeats, **row})
                print(f"learn_step: {name}, {threads} threads, batch {batch}: "
                      + ", ".join(f"{k} {v:.2f}x" for k, v in row["ratio"].items())
                      + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        del model, linears
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, median of "
          f"{', '.join(sorted({str(r['repeats']) for r in rows}))} interleaved repeats, 2:4 masks, regulariser on, "
          f"AdamW on both; fused soft mask {a.fused}; {time.perf_counter() - start:.0f} s in all")
    print()
    print(tables(rows))
    if skipped:
        print(f"\nnot run (past the {a.budget:.0f} s budget): " + "; ".join(skipped))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
