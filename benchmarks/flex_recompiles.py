"""How often compiled FlexAttention recompiles over prompt lengths, with the dynamic mask's block mask
(`pipeline.attention.dynamic_flex`), under static shapes and under torch's automatic dynamic shapes (what
`plans._compiled` uses), each output checked against SDPA with the rule's boolean mask. CPU or CUDA.

    python benchmarks/flex_recompiles.py --dynamic false
    python benchmarks/flex_recompiles.py --dynamic auto
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.attention.flex_attention as fa
import torch.nn.functional as F

from maskpipe.pipeline.attention.dynamic_flex import block_mask, drop_positions
from maskpipe.pipeline.attention.kv_scores import kept_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dynamic", choices=["false", "auto"], default="auto")
    ap.add_argument("--lengths", default="256,384,512,640,768")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    dynamic = None if args.dynamic == "auto" else False
    compiled_mask = torch.compile(fa.create_block_mask, dynamic=dynamic)
    compiled_flex = torch.compile(fa.flex_attention, dynamic=dynamic)
    fa.create_block_mask = compiled_mask  # what block_mask imports at its call
    dev, d, g = torch.device(args.device), 32, torch.Generator().manual_seed(0)
    for length in map(int, args.lengths.split(",")):
        t = time.perf_counter()
        scores = torch.randn(1, 2, length, generator=g).to(dev)
        q, k, v = (torch.randn(1, h, length, d, generator=g).to(dev) for h in (4, 2, 2))
        out = compiled_flex(q, k, v, block_mask=block_mask(drop_positions(scores, 4, 32, 16), 4, length),
                            scale=d ** -0.5, enable_gqa=True)
        pos = torch.arange(length, device=dev)
        mask = kept_mask(scores, pos, pos, 4, 32, 16).repeat_interleave(2, 1)
        ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                             attn_mask=mask, scale=d ** -0.5)
        print(f"{length} tokens: {time.perf_counter() - t:.1f} s, max |flex - sdpa| {(out - ref).abs().max().item():.1e}",
              flush=True)
    print("dynamo:", dict(torch._dynamo.utils.counters["stats"]))


if __name__ == "__main__":
    main()
