"""Tokens-to-closure curve of learned 2:4 masks: the share of the one-shot gap a learned mask closes
on each corpus after a given number of training tokens, over several seeds, with the default recipe.

    python benchmarks/closure_curve.py --model tiny   # ../shared/fixtures/models/tiny-llama, 512-token blocks
    python benchmarks/closure_curve.py --model micro  # the vendored micro-llama, 256-token blocks

Every point is a normal run of maskpipe's pipeline (`pipeline.run.runner.run`, one process): a SparseGPT 2:4
prior computed once (128 calibration blocks of the blend), then per (budget, seed) a `learn` stage with
every recipe key left at its `LearnStage` default except the budget (steps x batch_size x seqlen) and the
prior, and an `eval` stage. Data: both `train` corpora of ../shared/fixtures, token-balanced and
block-shuffled (the `DataConfig` defaults); perplexity on each whole `valid` file (wikitext protocol).
Gap closed = (PPL prior - PPL learned) / (PPL prior - PPL dense), per corpus.

Writes <out>/<model>.json, <model>.md and closure-<model>.png, all three of the points run (default out:
docs/closure, the full curves; a run of a few points belongs elsewhere, --out); finished points are reused
when re-run with the same --work directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from maskpipe.pipeline.config import config_from_dict
from maskpipe.pipeline.run.runner import LocalBackend, run

MODELS = {
    "tiny": {"path": "../shared/fixtures/models/tiny-llama", "seqlen": 512, "batch": 8},
    "micro": {"path": "tests/fixtures/models/micro-llama", "seqlen": 256, "batch": 8},
}
CORPORA = "../shared/fixtures/corpora"


def base_config(model: str, name: str, stages: list[dict]) -> dict:
    m = MODELS[model]
    return {
        "name": name, "seed": 0,
        "model": {"name_or_path": m["path"], "dtype": "float32", "device": "cpu"},
        "data": {
            "train": {"sources": [f"{CORPORA}/kjv.train.txt", f"{CORPORA}/pydocs.train.txt"], "shuffle_buffer": 1000},
            "kjv": {"sources": [{"path": f"{CORPORA}/kjv.valid.txt", "sample_by": "document"}]},
            "pydocs": {"sources": [{"path": f"{CORPORA}/pydocs.valid.txt", "sample_by": "document"}]},
        },
        "stages": stages,
    }


def group_by_tokens(points: list[dict]) -> dict[int, list[dict]]:
    """The points of each budget (one per seed)."""
    by_tokens: dict[int, list[dict]] = {}
    for pt in points:
        by_tokens.setdefault(pt["tokens"], []).append(pt)
    return by_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--tokens", type=float, nargs="+", default=[0.05e6, 0.1e6, 0.2e6, 0.4e6, 0.8e6])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--work", default="/tmp/closure-curve")
    p.add_argument("--out", default="docs/closure")
    p.add_argument("--override", nargs="*", default=[], help="learn-stage keys, e.g. lr=2e-3 (for experiments)")
    a = p.parse_args()
    m = MODELS[a.model]
    work, out = Path(a.work) / a.model, Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = {"stage": "eval", "data": ["kjv", "pydocs"], "seqlen": m["seqlen"], "batch_size": 8}
    backend = LocalBackend()  # one model load for every point

    prior_cfg = config_from_dict(base_config(a.model, "prior", [
        {"stage": "oneshot", "method": "sparsegpt", "data": "train", "n_samples": 128, "seqlen": m["seqlen"]},
        {**ev, "dense": True}]))
    prior_dir = run(prior_cfg, work / "prior", backend)
    ppl = json.loads((prior_dir / "results.json").read_text())["perplexity"]
    dense = {c: ppl["dense"][c]["ppl"] for c in ("kjv", "pydocs")}
    prior = {c: ppl["sparsegpt"][c]["ppl"] for c in ("kjv", "pydocs")}
    overrides = {k: json.loads(v) if v[:1] in "[{" else float(v) for k, v in (o.split("=", 1) for o in a.override)}

    def write_tables() -> None:
        (out / f"{a.model}.json").write_text(json.dumps({"model": m, "dense": dense, "prior": prior, "overrides": overrides,
                                                         "points": points}, indent=1))
        by_tokens = group_by_tokens(points)
        lines = [f"{a.model}-llama, dense {dense['kjv']:.2f} / {dense['pydocs']:.2f}, SparseGPT 2:4 prior "
                 f"{prior['kjv']:.2f} / {prior['pydocs']:.2f} (PPL kjv / pydocs); seeds {a.seeds}", "",
                 "| tokens | steps | PPL kjv (mean) | PPL pydocs (mean) | gap closed kjv: mean (min–max) | gap closed pydocs: mean (min–max) |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for tokens, pts in sorted(by_tokens.items()):
            cells = []
            for c in ("kjv", "pydocs"):
                cl = [100 * p["closure"][c] for p in pts]
                cells.append(f"{statistics.mean(cl):.0f}% ({min(cl):.0f}–{max(cl):.0f})")
            ppls = [f"{statistics.mean(p['ppl'][c] for p in pts):.2f}" for c in ("kjv", "pydocs")]
            lines.append(f"| {tokens:,} | {pts[0]['steps']} | {ppls[0]} | {ppls[1]} | {cells[0]} | {cells[1]} |")
        (out / f"{a.model}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))

    points: list[dict] = []
    for tokens in a.tokens:
        steps = max(1, round(tokens / (m["batch"] * m["seqlen"])))
        for seed in a.seeds:
            learn = {"stage": "learn", "name": "learned", "data": "train", "steps": steps, "batch_size": m["batch"],
                     "seqlen": m["seqlen"], "prior": {"artifact": str((prior_dir / "artifacts" / "sparsegpt").resolve())},
                     "checkpoint_every": 10**6, **overrides}
            cfg = config_from_dict({**base_config(a.model, f"curve-{steps}-s{seed}", [learn, {**ev, "dense": False}]),
                                    "seed": seed})
            d = run(cfg, work / f"{steps}-s{seed}", backend)
            learned = json.loads((d / "results.json").read_text())["perplexity"]["learned"]
            got = {c: learned[c]["ppl"] for c in dense}
            points.append({"tokens": steps * m["batch"] * m["seqlen"], "steps": steps, "seed": seed, "ppl": got,
                           "closure": {c: (prior[c] - got[c]) / (prior[c] - dense[c]) for c in dense}})
            print(json.dumps(points[-1]), flush=True)
            write_tables()  # after every point: an interrupted curve keeps what it measured

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_tokens = group_by_tokens(points)
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, color in (("kjv", "tab:blue"), ("pydocs", "tab:orange")):
        xs = sorted(by_tokens)
        means = [statistics.mean(100 * p["closure"][c] for p in by_tokens[x]) for x in xs]
        ax.plot(xs, means, "-o", color=color, label=c)
        for x in xs:
            ax.scatter([x] * len(by_tokens[x]), [100 * p["closure"][c] for p in by_tokens[x]], color=color, s=8, alpha=0.5)
    ax.axhline(100, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("gap closed (%)")
    ax.set_title(f"{a.model}-llama 2:4, learned from SparseGPT (default recipe)")
    ax.legend()
    img = out / f"closure-{a.model}.png"
    fig.tight_layout()
    fig.savefig(img, dpi=120)


if __name__ == "__main__":
    main()
