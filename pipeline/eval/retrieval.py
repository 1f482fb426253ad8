"""Long-context retrieval evaluations for any causal LM: passkey, needle-in-a-haystack, multi-key.

Every prompt is an intro, a haystack of whole sentences with needles inserted at sentence boundaries,
and a question whose answer the model must complete; lengths are in tokens of the model's own
tokenizer. Decoding is greedy, all samples of a length in one left-padded batch, and scoring is exact
match on the first number(s) generated. Samples are drawn from seeded generators, so every variant of a
model sees the same prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from itertools import cycle, islice
from pathlib import Path

import torch
from torch import nn

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.eval.prompts import (FILLER, MULTIKEY_DIGITS, MULTIKEY_INTRO, MULTIKEY_NEEDLE, MULTIKEY_QUESTION,
                              MULTIKEY_WORDS, MULTIVALUE_QUESTION, PASSKEY_DIGITS, PASSKEY_INTRO, PASSKEY_NEEDLE,
                              PASSKEY_QUESTION, build_prompt, random_number, split_sentences)


@dataclass
class Sample:
    ids: list[int]  # the prompt, ending where the answer starts
    answers: list[str]  # every number the model must produce
    length: int  # the requested length in tokens; len(ids) <= length
    depth: float  # of the (first) needle, as a fraction of the haystack's sentences
    info: dict = field(default_factory=dict)


def _haystack(rng: random.Random, pool: list[str], n: int) -> list[str]:
    """`n` consecutive sentences of `pool` from a random start, wrapping around."""
    start = rng.randrange(len(pool))
    return list(islice(cycle(pool[start:] + pool[:start]), n))


def passkey_samples(tokenizer, lengths: list[int], samples: int, seed: int,
                    haystack: list[str] | None = None) -> list[Sample]:
    """Passkey retrieval: the needle at a uniformly random depth of a filler haystack (or of `haystack`)."""
    rng = random.Random(f"passkey-{seed}")
    pool = haystack or split_sentences(FILLER)
    out = []
    for length in lengths:
        for _ in range(samples):
            key = random_number(rng, PASSKEY_DIGITS)
            ids, depth = build_prompt(tokenizer, PASSKEY_INTRO, _haystack(rng, pool, length),
                                      [PASSKEY_NEEDLE.format(key=key)], [rng.random()], PASSKEY_QUESTION, length)
            out.append(Sample(ids, [key], length, depth))
    return out


def niah_samples(tokenizer, haystack: list[str], lengths: list[int], depths: list[float], samples: int,
                 seed: int) -> list[Sample]:
    """Needle in a haystack: the passkey needle at each depth of each length, in a corpus haystack."""
    rng = random.Random(f"niah-{seed}")
    out = []
    for length in lengths:
        for depth in depths:
            for _ in range(samples):
                key = random_number(rng, PASSKEY_DIGITS)
                ids, _ = build_prompt(tokenizer, PASSKEY_INTRO, _haystack(rng, haystack, length),
                                      [PASSKEY_NEEDLE.format(key=key)], [depth], PASSKEY_QUESTION, length)
                out.append(Sample(ids, [key], length, depth))
    return out


def multikey_samples(tokenizer, lengths: list[int], samples: int, seed: int, keys: int, values: int,
                     haystack: list[str] | None = None) -> list[Sample]:
    """RULER multi-key (`keys` > 1: distractor keys) / multi-value (`values` > 1: every value of the
    asked key must come out) retrieval; needles at uniformly random depths."""
    if keys > len(MULTIKEY_WORDS):
        raise MaskpipeError(f"retrieval.multikey.keys: at most {len(MULTIKEY_WORDS)}, got {keys}")
    rng = random.Random(f"multikey-{seed}")
    pool = haystack or split_sentences(FILLER)
    template = MULTIKEY_QUESTION if values == 1 else MULTIVALUE_QUESTION
    out = []
    for length in lengths:
        for _ in range(samples):
            names = rng.sample(MULTIKEY_WORDS, keys)
            needles = [(k, random_number(rng, MULTIKEY_DIGITS)) for k in names for _ in range(values)]
            rng.shuffle(needles)
            depths = [rng.random() for _ in needles]
            asked = names[0]
            ids, _ = build_prompt(tokenizer, MULTIKEY_INTRO, _haystack(rng, pool, length),
                                  [MULTIKEY_NEEDLE.format(key=k, value=v) for k, v in needles], depths,
                                  template.format(key=asked), length)
            first = next(i for i, (k, _) in enumerate(needles) if k == asked)
            out.append(Sample(ids, [v for k, v in needles if k == asked], length, depths[first], {"key": asked}))
    return out


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of a batch of prompts, `max_new_tokens` each, with the model's KV cache.

    Prompts of different lengths are left-padded: the attention mask hides the padding and the
    position ids count from each prompt's first token, so every prompt decodes as it would alone
    (attention plans count their sink from that token too: `pipeline.attention.plans`). Decoding does not
    stop at an end-of-sequence token, so a prompt's tokens never depend on its batch."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    if not 0 <= pad_id < vocab or any(not 0 <= i < vocab for p in prompts for i in p):
        raise MaskpipeError(f"token ids past the model's embedding table ({vocab} rows): the tokenizer does not "
                            f"match the model")
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    new = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
        if step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                    use_cache=True)
    return torch.stack(new, dim=1).tolist() if new else [[] for _ in prompts]


def pad_id(tokenizer, model: nn.Module) -> int:
    """An id to left-pad prompts with that the model's embedding table has: the tokenizer's pad token,
    else EOS, else 0. Padded positions are masked, so any id the model has will do; a pad token added
    to the tokenizer past the embedding table (as some Qwen2 tokenizers have) would index out of it."""
    vocab = model.get_input_embeddings().num_embeddings
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None and 0 <= i < vocab)


def exact_match(generated: str, answers: list[str]) -> bool:
    """The first len(answers) numbers generated are exactly the answers (in any order)."""
    return sorted(re.findall(r"\d+", generated)[: len(answers)]) == sorted(answers)


def score(model: nn.Module, tokenizer, samples: list[Sample], desc: str = "retrieval",
          batch_size: int | None = None, decode=None) -> list[dict]:
    """One record per sample: its length, depth, answers, the generation and whether it matched.
    Samples of one requested length decode together, `batch_size` at a time (None: all at once);
    each gets as many new tokens as its answers take plus two, whatever its batch. `decode(model,
    prompts, max_new_tokens, pad_id)` replaces `greedy_decode` (e.g. a dynamic mask's evicting cache)."""
    from tqdm.auto import tqdm

    decode = decode or greedy_decode

    pad = pad_id(tokenizer, model)
    budgets = [len(tokenizer(" " + ", ".join(s.answers), add_special_tokens=False).input_ids) + 2 for s in samples]
    by_length: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_length.setdefault(s.length, []).append(i)
    batches = [group[j : j + (batch_size or len(group))] for group in by_length.values()
               for j in range(0, len(group), batch_size or len(group))]
    generated: dict[int, list[int]] = {}
    for batch in tqdm(batches, desc=desc, leave=False, disable=None):
        # Greedy decoding is prefix-stable: the batch runs to its longest budget, each sample keeps its own.
        tokens = decode(model, [samples[i].ids for i in batch], max(budgets[i] for i in batch), pad)
        generated |= {i: t[: budgets[i]] for i, t in zip(batch, tokens)}
    records = []
    for i, s in enumerate(samples):
        text = tokenizer.decode(generated[i], skip_special_tokens=True)
        records.append({"length": s.length, "tokens": len(s.ids), "depth": round(s.depth, 4), "answers": s.answers,
                        "generated": text, "correct": exact_match(text, s.answers), **s.info})
    return records


def accuracy(records: list[dict], by: tuple[str, ...] = ()) -> dict:
    """Exact-match accuracy overall, or per group of the `by` keys: {"acc", "n"} or a list of cells."""
    if not by:
        return {"acc": sum(r["correct"] for r in records) / max(len(records), 1), "n": len(records)}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    return {"cells": [{**dict(zip(by, key)), **accuracy(rs)} for key, rs in groups.items()]}


def require_matplotlib(key: str = "niah") -> None:
    """Refuse NIAH (whose heatmap needs matplotlib) when matplotlib is not installed: one line, named by `key`."""
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module set to None in sys.modules
        found = False
    if not found:
        raise MaskpipeError(f"{key}: the NIAH heatmap needs matplotlib, which is not installed "
                            "(pip install 'maskpipe[plots]')")


def niah_heatmap(cells: list[dict], path: str | Path, title: str) -> Path:
    """Accuracy per (depth, length) cell as a heatmap PNG (depths down, lengths across); matplotlib is an
    extra (`pip install 'maskpipe[plots]'`), imported only here."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({c["length"] for c in cells})
    depths = sorted({c["depth"] for c in cells})
    grid = [[next((c["acc"] for c in cells if c["length"] == L and c["depth"] == d), float("nan")) for L in lengths]
            for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
