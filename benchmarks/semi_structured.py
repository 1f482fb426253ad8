"""2:4 semi-structured sparse kernels vs dense matmuls, on a CUDA GPU: linear layers, then a whole model.

    python benchmarks/semi_structured.py [--model ../shared/fixtures/models/tiny-llama] [--masks ARTIFACT]
                                         [--dtype float16] [--tokens 16 64 256 1024 4096] [--batches 1 8 32]

Linear layers: LLaMA-2-7B and -70B shapes, y = x Wᵀ for x of `--tokens` rows, dense W (2:4 zeros
included) against `torch.sparse.to_sparse_semi_structured(W)`. End to end: the model's forward pass
(`--batches` × `--seqlen`) with its prunable linears masked by `--masks` (default: magnitude 2:4) held
dense, against the same linears semi-structured (`pipeline.nm.sparsity.to_semi_structured`); the logits of
the two are compared too. Median of `--repeats` timed runs after warm-up, CUDA events. Without a CUDA
GPU of compute capability ≥ 8.0 it says so and exits with status 2: nothing is measured on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from maskpipe.pipeline.nm.sparsity import SEMI_STRUCTURED_CAPABILITY, nm_mask, to_semi_structured

# (out_features, in_features): LLaMA-2-7B q/k/v/o, gate/up, down; LLaMA-2-70B gate/up, down
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (28672, 8192), (8192, 28672)]


def cuda_time(fn, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def linear_timings(tokens: list[int], dtype: torch.dtype, repeats: int, shapes=SHAPES) -> list[dict]:
    """Per (weight shape, tokens): median ms of the dense and the semi-structured linear, and their
    largest output difference."""
    from torch.sparse import to_sparse_semi_structured

    out = []
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, device="cuda", dtype=dtype)
        w = w * nm_mask(w.abs(), 2, 4)
        sparse = to_sparse_semi_structured(w)
        for t in tokens:
            x = torch.randn(t, in_f, device="cuda", dtype=dtype)
            dense_ms = cuda_time(lambda: F.linear(x, w), repeats)
            sparse_ms = cuda_time(lambda: F.linear(x, sparse), repeats)
            diff = (F.linear(x, w) - F.linear(x, sparse)).abs().max().item()
            out.append({"shape": [out_f, in_f], "tokens": t, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
                        "speedup": dense_ms / sparse_ms, "max_abs_diff": diff})
    return out


def linear_layers(tokens: list[int], dtype: torch.dtype, repeats: int) -> list[str]:
    rows = ["| weight (out × in) | tokens | dense (ms) | 2:4 semi-structured (ms) | speed-up | max abs diff |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in linear_timings(tokens, dtype, repeats):
        rows.append(f"| {r['shape'][0]} × {r['shape'][1]} | {r['tokens']} | {r['dense_ms']:.3f} | {r['sparse_ms']:.3f} "
                    f"| {r['speedup']:.2f}x | {r['max_abs_diff']:.3g} |")
    return rows


@torch.no_grad()
def end_to_end(model_path: str, masks_path: str | None, dtype: str, batches: list[int], seqlen: int,
               repeats: int) -> list[str]:
    from maskpipe.pipeline.io.artifacts import load_artifact
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.core.models import load_model, prunable_linears
    from maskpipe.pipeline.nm.sparsity import masked

    cfg = ModelConfig(name_or_path=model_path, dtype=dtype, device="cuda")
    model = load_model(cfg)
    linears = prunable_linears(model, cfg)
    masks = (load_artifact(masks_path)[0] if masks_path
             else {k: nm_mask(lin.weight.abs(), 2, 4) for k, lin in linears.items()})
    inputs = {b: torch.randint(0, model.config.vocab_size, (b, seqlen), device="cuda") for b in batches}
    dense_ms, logits = {}, {}
    # Dense weights with the 2:4 zeros, as a materialized model runs them; cached, so masking costs nothing.
    with masked(linears, masks), parametrize.cached():
        for b, x in inputs.items():
            dense_ms[b] = cuda_time(lambda: model(input_ids=x, use_cache=False), repeats)
            logits[b] = model(input_ids=x, use_cache=False).logits.float()
    to_semi_structured(linears, masks)
    rows = [f"| {model_path} ({len(masks)} linears 2:4, {dtype}) | batch × {seqlen} tokens | dense (ms) "
            "| semi-structured (ms) | speed-up | max abs logit diff |", "| --- | --- | --- | --- | --- | --- |"]
    for b, x in inputs.items():
        sparse_ms = cuda_time(lambda: model(input_ids=x, use_cache=False), repeats)
        diff = (model(input_ids=x, use_cache=False).logits.float() - logits[b]).abs().max().item()
        rows.append(f"| | {b} | {dense_ms[b]:.2f} | {sparse_ms:.2f} | {dense_ms[b] / sparse_ms:.2f}x | {diff:.3g} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/fixtures/models/tiny-llama")
    p.add_argument("--masks", default=None, help="a 2:4 artifact of --model (default: magnitude 2:4 masks)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 1024, 4096])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < SEMI_STRUCTURED_CAPABILITY:
        found = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
        print(f"semi_structured.py: 2:4 semi-structured kernels need a CUDA GPU of compute capability "
              f"{'.'.join(map(str, SEMI_STRUCTURED_CAPABILITY))} or newer (Ampere, Hopper); found {found}. "
              "Nothing measured.", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("\n".join(linear_layers(a.tokens, getattr(torch, a.dtype), a.repeats)) + "\n")
    print("\n".join(end_to_end(a.model, a.masks, a.dtype, a.batches, a.seqlen, a.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
