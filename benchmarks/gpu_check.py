"""Every GPU question of maskpipe in one command, for one GPU, within about 8 minutes.

    python benchmarks/gpu_check.py [--out docs/gpu_check] [--parts NAME ...] [--budget 480] [--smoke]

Independent parts, each timed; a part that raises is recorded as `failed: <reason>` and the next one runs:

  semi_structured  2:4 semi-structured vs dense `F.linear` at LLaMA-2-7B shapes (4096×4096, 11008×4096,
                   4096×11008), 1 / 16 / 256 tokens, bf16 and fp16 (`benchmarks/semi_structured.py`)
  stages           the perplexity and retrieval stages' code on tiny-llama on CUDA: perplexity over the
                   whole kjv.valid (512-token windows) in fp32 and bf16, passkey exact match (20 samples
                   at 256/512/768 tokens), beside the CPU figures of docs/RESULTS.md (68.13, 0.95)
  learn_step       a learned 2:4 mask step (Gumbel masks, fp32 logits, bf16 autocast) vs a dense bf16
                   forward+backward with weight gradients and AdamW, on a randomly initialised LLaMA of
                   TinyLlama-1.1B's shape, 4 × 2048 tokens: tokens/s and ratio at the first, middle and
                   last step of the anneal, a profile of each by category (`benchmarks/learn_step.py`'s,
                   CUDA time), and the mask step's peak `torch.cuda.max_memory_allocated` against
                   `pipeline.train.plan.memory_plan`
  strategies       `train_masks` on tiny-llama, 8 steps, with strategy none, fsdp (whole load), fsdp
                   loaded from meta (each rank reads its rows), deepspeed ZeRO-3: world size 1 in an
                   NCCL process group; every mask against strategy none's
  flex_prefill     prefill (no_grad forward) of the 1.1B LLaMA at 8k and 32k tokens: a plan with half
                   of the KV heads streaming (sink 128, window 1024) through FlexAttention vs dense SDPA;
                   at 8k the planned logits are also checked against the same plan through SDPA masks
  dynamic_mask     the dynamic mask (`pipeline.attention.dynamic`: DMA's key scorer at its random init, 1/8 of
                   the keys, 4 sink, 3/4 of the budget recent) on the same 1.1B LLaMA at 8k and 32k tokens:
                   prefill through FlexAttention vs dense SDPA (and the share of layer 0's key blocks it
                   computes); greedy decoding of 64 tokens with the evicting cache (`evict_decode`) vs the
                   dense cache, tokens/s and KV-cache bytes; at 8k the flex logits are also checked against
                   the same mask through SDPA
(flex_prefill and dynamic_mask are in `benchmarks/gpu_attention.py`.)

Writes `gpu_check.json` (everything measured) and `gpu_check.md` (one table per part) into `--out`.
Without CUDA it prints one line and exits with status 2. `--smoke` runs every part on the CPU at toy
sizes (micro-llama, a 2-block LLaMA, gloo): it checks the code paths, not the numbers (the test suite
runs it); semi_structured then fails, as it must without CUDA.

On the lent GPU machine (see /work/.library/device/README.md) the image has torch, transformers and
safetensors but not pydantic or deepspeed: carry their wheels. Prepared here, once:

    pip download -d wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        pydantic pydantic-core annotated-types typing-inspection hjson transformers==5.24.0
    pip download -d wheels --no-deps --no-binary=:all: deepspeed==0.19.8

then, with `wheels` carried: `pip install --no-index --find-links wheels pydantic transformers==5.24.0 hjson &&
DS_BUILD_OPS=0 pip install --no-index --no-deps --no-build-isolation wheels/deepspeed-0.19.8.tar.gz &&
python benchmarks/gpu_check.py --out $OUT`. The fixtures are read from `../shared/fixtures` when that
exists, else from the vendored micro-llama (said in the output).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # runs from a bare copy of the tree, nothing installed

import torch  # noqa: E402
from gpu_attention import LLAMA_1B, TOY, part_dynamic_mask, part_flex_prefill  # noqa: E402

TINY = ROOT.parent / "shared" / "fixtures" / "models" / "tiny-llama"
MICRO = ROOT / "tests" / "fixtures" / "models" / "micro-llama"
KJV_VALID = [ROOT.parent / "shared" / "fixtures" / "corpora" / "kjv.valid.txt",
             ROOT / "tests" / "fixtures" / "corpora" / "kjv.valid.txt"]
PARTS = ("semi_structured", "stages", "learn_step", "strategies", "flex_prefill", "dynamic_mask")


class Context:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.fixture = MICRO if smoke or not TINY.is_dir() else TINY
        self.text_path = next(p for p in KJV_VALID if p.is_file())

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn, repeats: int, warmup: int = 1) -> float:
        """Median seconds of fn()."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def random_llama(self, dims: dict, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**dims), dtype=dtype)
        return model.requires_grad_(False).eval()


def model_cfg(path, dtype: str, device: str):
    from maskpipe.pipeline.core.schema import ModelConfig

    return ModelConfig(name_or_path=str(path), dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------ parts


def part_semi_structured(ctx: Context) -> dict:
    from semi_structured import SHAPES, linear_timings

    if ctx.device.type != "cuda":
        raise RuntimeError("2:4 semi-structured kernels need CUDA (compute capability ≥ 8.0)")
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for r in linear_timings([1, 16, 256], dtype, repeats=50, shapes=SHAPES[:3]):
            rows.append({"dtype": str(dtype).removeprefix("torch."), **r})
    table = ["| dtype | weight (out × in) | tokens | dense ms | 2:4 ms | speed-up | max abs diff |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['dtype']} | {r['shape'][0]} × {r['shape'][1]} | {r['tokens']} | {r['dense_ms']:.4f} | "
              f"{r['sparse_ms']:.4f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.3g} |" for r in rows]
    return {"rows": rows, "table": table}


def part_stages(ctx: Context) -> dict:
    from maskpipe.pipeline.eval.perplexity import perplexity
    from maskpipe.pipeline.core.models import load_model, load_tokenizer
    from maskpipe.pipeline.eval.retrieval import accuracy, passkey_samples, score

    tokenizer = load_tokenizer(model_cfg(ctx.fixture, "float32", "cpu"))
    text = ctx.text_path.read_text()
    ids = torch.tensor(tokenizer(text[:5_000] if ctx.smoke else text, add_special_tokens=False).input_ids)
    seqlen, lengths, samples = (128, [128], 1) if ctx.smoke else (512, [256, 512, 768], 20)
    rows = []
    for dtype in ("float32", "bfloat16"):
        model = load_model(model_cfg(ctx.fixture, dtype, str(ctx.device)))
        t0 = time.perf_counter()
        ppl = perplexity(model, ids, seqlen, batch_size=8)
        ctx.sync()
        t_ppl = time.perf_counter() - t0
        t0 = time.perf_counter()
        records = score(model, tokenizer, passkey_samples(tokenizer, lengths, samples, seed=0))
        t_key = time.perf_counter() - t0
        rows.append({"dtype": dtype, "ppl": ppl.ppl, "tokens": ppl.tokens, "ppl_seconds": t_ppl,
                     "passkey": accuracy(records)["acc"], "passkey_samples": len(records), "passkey_seconds": t_key})
        del model
    table = [f"model {ctx.fixture.name}, {ctx.text_path.name} ({rows[0]['tokens']} tokens scored, {seqlen}-token "
             f"windows); CPU reference (docs/RESULTS.md, tiny-llama): PPL 68.13, passkey 0.95", "",
             "| dtype | PPL kjv.valid | s | passkey exact match | samples | s |", "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['dtype']} | {r['ppl']:.2f} | {r['ppl_seconds']:.1f} | {r['passkey']:.2f} | {r['passkey_samples']} "
              f"| {r['passkey_seconds']:.1f} |" for r in rows]
    return {"model": str(ctx.fixture), "rows": rows, "table": table}


def part_learn_step(ctx: Context) -> dict:
    from learn_step import anneal_points, anneal_table, learned_step, profile_table, profiled, set_anneal
    from maskpipe.pipeline.core.models import prunable_linears
    from maskpipe.pipeline.train.plan import CUDA_RESERVE, GiB, memory_plan, model_shape
    from maskpipe.pipeline.train.shard import adamw

    dims, (batch, seqlen), repeats = (TOY, (2, 32), 1) if ctx.smoke else (LLAMA_1B, (4, 2048), 5)
    model = ctx.random_llama(dims, torch.bfloat16)
    cfg = model_cfg("random-llama", "bfloat16", str(ctx.device))
    linears = prunable_linears(model, cfg)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randint(0, dims["vocab_size"], (batch, seqlen), device=ctx.device)
    tokens = batch * seqlen
    cuda = ctx.device.type == "cuda"

    weights = [lin.weight for lin in linears.values()]
    for w in weights:
        w.requires_grad_(True)
    dense_opt = adamw(weights, 1e-5, 0.01)  # the learned step's AdamW (fused where torch has one)

    def dense_step():
        dense_opt.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
        dense_opt.step()

    dense = ctx.timed(dense_step, repeats)
    profiles = {"dense": profiled(dense_step)}
    dense_opt.zero_grad(set_to_none=True)
    dense_opt.state.clear()
    model.requires_grad_(False)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    mods, step = learned_step(model, linears, autocast=cuda)  # fp32 logits, bf16 autocast on CUDA

    def mask_step():
        step(x)

    learned, gen = {}, torch.Generator().manual_seed(1)
    for point in anneal_points():  # first, middle, last step of the default anneal
        set_anneal(mods, point, gen)
        learned[point] = ctx.timed(mask_step, repeats)
        if point != "middle":
            profiles[point] = profiled(mask_step)
    shape = model_shape(model.config, cfg)
    plan = memory_plan(shape, n=2, m=4, micro_batch=batch, seqlen=seqlen, strategy="none", world=1,
                       model_dtype="bfloat16", cuda=cuda)
    planned = sum(plan.values()) - (CUDA_RESERVE if cuda else 0)  # the reserve is not allocated memory
    peak = torch.cuda.max_memory_allocated() if cuda else None
    ratios = {k: v / dense for k, v in learned.items()}
    result = {"params": params, "masked": shape.masked, "tokens": tokens, "dense_s": dense, "learned_s": learned,
              "dense_tokens_per_s": tokens / dense, "ratios": ratios, "ratio": max(ratios.values()),
              "anneal": anneal_points(), "profile_ms": profiles,
              "peak_bytes": peak, "plan_bytes_without_reserve": planned, "plan": plan,
              "peak_over_plan": peak / planned if peak else None}
    result["table"] = [f"random LLaMA {params / 1e9:.2f}B parameters ({shape.masked / 1e9:.2f}B under 2:4 masks), "
                       f"{batch} × {seqlen} tokens, bf16 weights, median of {repeats}", ""]
    result["table"] += anneal_table(dense, learned, tokens, "dense bf16", "learned 2:4 mask (fp32 logits, bf16 autocast)")
    result["table"] += ["", f"Profile, {'CUDA kernel' if cuda else 'self CPU'} ms of one step by category", ""]
    result["table"] += profile_table({(k,): ms for k, ms in profiles.items()}, ("step",))
    result["table"] += ["",
        f"mask step peak allocated: {peak / GiB:.2f} GiB; plan (strategy none, without the "
        f"{CUDA_RESERVE // GiB} GiB CUDA reserve): {planned / GiB:.2f} GiB; measured/plan "
        f"{peak / planned:.2f}" if peak else "peak memory: not measured on CPU"]
    return result


class TextBlocks:
    """A token stream for `train_masks` without the datasets library: consecutive `seqlen` blocks of
    one text, cycled; its state is the position (as TokenStream's, for checkpoints)."""

    def __init__(self, ids: torch.Tensor, seqlen: int):
        self.blocks = ids[: len(ids) // seqlen * seqlen].view(-1, seqlen)
        self.pos = 0

    def next_batch(self, n: int) -> torch.Tensor:
        idx = torch.arange(self.pos, self.pos + n) % len(self.blocks)
        self.pos += n
        return self.blocks[idx]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def part_strategies(ctx: Context) -> dict:
    import torch.distributed as dist

    from maskpipe.pipeline.train.checkpoint import CheckpointDir
    from maskpipe.pipeline.stages.learn import LearnStage
    from maskpipe.pipeline.nm.learn import train_masks
    from maskpipe.pipeline.core.models import load_model, load_tokenizer, prunable_linears

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    dtype = "bfloat16" if cuda else "float32"
    cfg = model_cfg(ctx.fixture, dtype, str(ctx.device))
    tokenizer = load_tokenizer(cfg)
    ids = torch.tensor(tokenizer(ctx.text_path.read_text()[:100_000], add_special_tokens=False).input_ids)
    steps, seqlen = (2, 32) if ctx.smoke else (8, 128)
    st = LearnStage.model_validate({"stage": "learn", "name": "learn", "data": "d", "steps": steps, "batch_size": 4,
                                    "seqlen": seqlen, "lr": 1e-2, "log_every": steps, "checkpoint_every": 100})
    runs = {"none": ("none", False), "fsdp": ("fsdp", False), "fsdp, loaded from meta": ("fsdp", True),
            "deepspeed ZeRO-3": ("deepspeed", False)}
    out: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, (strategy, meta) in runs.items():
                try:
                    model = load_model(cfg, meta=meta)
                    t0 = time.perf_counter()
                    logits, history = train_masks(model, prunable_linears(model, cfg), st, 2, 4,
                                                  TextBlocks(ids, st.seqlen), seed=0,
                                                  store=CheckpointDir(Path(tmp) / label, keep=1), strategy=strategy,
                                                  zero_stage=3)
                    ctx.sync()
                    out[label] = {"status": "ok", "seconds": time.perf_counter() - t0, "loss": history[-1]["loss"],
                                  "logits": logits}
                except Exception as e:  # noqa: BLE001 - one strategy failing must not hide the others
                    out[label] = {"status": f"failed: {type(e).__name__}: {e}".splitlines()[0]}
                finally:
                    model = None
                    gc.collect()
    finally:
        dist.destroy_process_group()
    ref = out["none"].get("logits")
    rows = []
    for label, r in out.items():
        logits = r.pop("logits", None)
        if logits is not None and ref is not None:
            agree = sum(int((logits[k].argmax(-1) == ref[k].argmax(-1)).sum()) for k in ref)
            r["argmax_agreement"] = agree / sum(v[..., 0].numel() for v in ref.values())
            r["max_abs_logit_diff"] = max((logits[k] - ref[k]).abs().max().item() for k in ref)
        rows.append({"strategy": label, **r})
    table = [f"{ctx.fixture.name}, {dtype} weights, {steps} steps of 4 × {seqlen} tokens, lr 1e-2, world size 1 "
             f"({'NCCL' if cuda else 'gloo'})", "",
             "| strategy | status | s | final loss | mask agreement with none | max abs logit diff |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        table.append(f"| {r['strategy']} | {r['status']} | {r.get('seconds', float('nan')):.1f} | "
                     f"{r.get('loss', float('nan')):.4f} | {r.get('argmax_agreement', float('nan')):.4f} | "
                     f"{r.get('max_abs_logit_diff', float('nan')):.2g} |")
    failed = [r["strategy"] for r in rows if r["status"] != "ok"]
    return {"rows": rows, "table": table, "failed": failed}


FUNCTIONS = {"semi_structured": part_semi_structured, "stages": part_stages, "learn_step": part_learn_step,
             "strategies": part_strategies, "flex_prefill": part_flex_prefill, "dynamic_mask": part_dynamic_mask}


# ------------------------------------------------------------------------------------------------ runner


def run_parts(ctx: Context, names: list[str], budget: float) -> dict:
    start = time.perf_counter()
    results = {}
    for name in names:
        spent = time.perf_counter() - start
        if spent > budget:
            results[name] = {"status": f"failed: not started, {spent:.0f} s of the {budget:.0f} s budget spent"}
            continue
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            out = FUNCTIONS[name](ctx)
            status = "ok" if not out.get("failed") else f"failed: {', '.join(out['failed'])}"
        except Exception as e:  # noqa: BLE001 - a part's failure is its result; the next part runs
            out = {"traceback": traceback.format_exc(limit=8)}
            status = f"failed: {type(e).__name__}: {e}".splitlines()[0][:500]
        results[name] = {"status": status, "seconds": round(time.perf_counter() - t0, 2), **out}
        print(f"gpu_check: {name}: {status} ({results[name]['seconds']} s)", file=sys.stderr, flush=True)
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def environment(ctx: Context) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "smoke": ctx.smoke,
           "fixture": str(ctx.fixture), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    if ctx.device.type == "cuda":
        env |= {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                "memory_bytes": torch.cuda.get_device_properties(0).total_memory}
    else:
        env["device"] = "cpu"
    return env


def markdown(env: dict, results: dict) -> str:
    lines = [f"# gpu_check: {env['device']}, torch {env['torch']}, transformers {env['transformers']} "
             f"({env['date']}{', SMOKE: toy sizes on CPU' if env['smoke'] else ''})", ""]
    for name, r in results.items():
        lines += [f"## {name}: {r['status']} ({r.get('seconds', 0)} s)", ""]
        lines += r.get("table", []) + [""]
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items() if k != "traceback" or v}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "gpu_check"), help="folder for gpu_check.json and .md")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--budget", type=float, default=480, help="seconds; parts not started by then are reported failed")
    p.add_argument("--smoke", action="store_true", help="every part on the CPU at toy sizes: the code paths only")
    a = p.parse_args(argv)
    if not a.smoke and not torch.cuda.is_available():
        print(f"gpu_check.py: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
              "nothing measured: run it on a GPU machine, or with --smoke for the CPU code paths", file=sys.stderr)
        return 2
    ctx = Context(a.smoke)
    results = run_parts(ctx, a.parts, math.inf if a.smoke else a.budget)
    env = environment(ctx)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(_jsonable({"environment": env, "parts": results}), indent=1))
    (out / "gpu_check.md").write_text(markdown(env, results))
    print(markdown(env, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
