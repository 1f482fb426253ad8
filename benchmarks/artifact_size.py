"""Size of a mask artifact: bits per masked weight of `masks.safetensors`, per N:M pattern.

    python benchmarks/artifact_size.py [--model ../shared/fixtures/models/tiny-llama] [--patterns 2:4 4:8 ...]

For each pattern: magnitude masks of every prunable linear, written as an artifact; the whole
`masks.safetensors` (header included) over the weights it masks, against the information limit
log2 C(M,N) / M and the bitmap of format 1 (1 bit per weight, as MaskLLM's `np.packbits` release); the
manifest's size; and the time to encode and to decode (load and check) the masks.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from math import comb, log2
from pathlib import Path

from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, MASKS_FILE, load_artifact, save_artifact
from maskpipe.pipeline.core.schema import ModelConfig
from maskpipe.pipeline.nm.encoding import Codec
from maskpipe.pipeline.core.models import load_model, prunable_linears
from maskpipe.pipeline.nm.sparsity import nm_mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="../shared/fixtures/models/tiny-llama")
    p.add_argument("--patterns", nargs="+", default=["2:4", "4:8", "1:4", "2:8", "1:2", "3:4", "8:16"])
    a = p.parse_args()
    cfg = ModelConfig(name_or_path=a.model, dtype="float32", device="cpu")
    model = load_model(cfg)
    linears = prunable_linears(model, cfg)
    weights = sum(lin.weight.numel() for lin in linears.values())
    print(f"{a.model}: {len(linears)} linears, {weights:,} weights\n")
    print("| pattern | C(M,N) | groups per word × bits | limit (bits/weight) | masks.safetensors (bytes) "
          "| bits per masked weight | format 1 bitmap (bytes) | manifest (bytes) | save (s) | load (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for pattern in a.patterns:
        n, m = map(int, pattern.split(":"))
        masks = {k: nm_mask(lin.weight.abs(), n, m) for k, lin in linears.items()}
        codec = Codec.best(n, m)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            path = save_artifact(Path(tmp) / "a", masks, linears, base_model={"name_or_path": a.model},
                                 pattern=pattern, method={"name": "magnitude"})
            t1 = time.perf_counter()
            load_artifact(path)
            t2 = time.perf_counter()
            size, manifest = (path / MASKS_FILE).stat().st_size, (path / MANIFEST_FILE).stat().st_size
        bitmap = sum(Codec(n, m, "packbits-le").nbytes(mask.numel()) for mask in masks.values())
        print(f"| {pattern} | {comb(m, n)} | {codec.k} × {codec.w} | {log2(comb(m, n)) / m:.4f} | {size:,} "
              f"| **{size * 8 / weights:.4f}** | {bitmap:,} | {manifest:,} | {t1 - t0:.2f} | {t2 - t1:.2f} |")


if __name__ == "__main__":
    main()
