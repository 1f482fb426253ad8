"""`results.json`, typed, and every table rendered from it (results.md, the CLI's tables, the model card).

results.json: {"stages": {name: record}, "perplexity": {variant: {corpus: cell}}, "retrieval": {variant:
{cost, passkey|niah|multikey: {acc, n, cells, ...}}}, "done": [stage names], "lm_eval": {variant: {task:
{metric: value, n, num_fewshot}}}}. A stage record is what `Variant.record` writes: the stage's method and
numbers, its artifact and updated weights relative to the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_serializer, model_validator

from maskpipe.pipeline.io.artifacts import write_json
from maskpipe.pipeline.core.vocab import LEARNED_METHOD, REFINING_METHODS, RETRIEVAL_TASKS, STANDALONE_METHODS
from maskpipe.pipeline.eval.zeroshot import primary

ONESHOT = STANDALONE_METHODS  # the card's baseline rows: one-shot methods that start from no earlier mask
NOT_EVALUATED = "No evaluation of this artifact was recorded in its run."


class _Open(BaseModel):
    """A record whose named fields are typed and whose other keys are kept as they are, written back
    with the keys it was made with, in their order."""

    model_config = ConfigDict(extra="allow")
    _keys: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_keys(cls, value: Any, handler):
        record = handler(value)
        if isinstance(value, dict):
            record._keys = list(value)
        return record

    @model_serializer(mode="wrap")
    def _in_order(self, handler) -> dict[str, Any]:
        out = handler(self)
        return {k: out[k] for k in self._keys if k in out}


class StageRecord(_Open):
    """One mask-producing stage's row: method, pattern, tokens, seconds, ... and its files."""

    method: str | None = None
    prior: str | None = None
    weight_update: bool = False
    artifact: str | None = None
    updated_weights: str | None = None

    @property
    def learned(self) -> bool:
        return self.method == LEARNED_METHOD

    @property
    def oneshot(self) -> bool:
        return self.method in ONESHOT


class PplCell(_Open):
    """Perplexity of one variant on one corpus (`pipeline.eval.perplexity.perplexity`)."""

    ppl: float
    nll: float | None = None
    tokens: int
    windows: int | None = None
    seqlen: int | None = None
    stride: int | None = None


EMPTY = {"stages": {}, "perplexity": {}, "retrieval": {}, "done": [], "lm_eval": {}}


class Results(BaseModel):
    """The content of `results.json`: the keys every version wrote, each record as it was written
    (`dump` writes the keys a record was read or made with, no more)."""

    model_config = ConfigDict(extra="allow")

    stages: dict[str, StageRecord]
    perplexity: dict[str, dict[str, PplCell]]
    retrieval: dict[str, dict[str, Any]]
    done: list[str]
    lm_eval: dict[str, dict[str, dict[str, Any]]]

    @classmethod
    def read(cls, path: Path) -> Results:
        """A run's results; empty where none were written yet. Sections an older version did not write
        (retrieval, lm_eval) read as empty."""
        return cls.model_validate(EMPTY | (json.loads(Path(path).read_text()) if Path(path).exists() else {}))

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def write(self, path: Path) -> None:
        write_json(path, self.dump())

    def add(self, section: str, rows: dict[str, Any]) -> None:
        """A stage's rows ({variant: ...}) into one section (perplexity, retrieval, lm_eval)."""
        getattr(self, section).update(getattr(type(self).model_validate(EMPTY | {section: rows}), section))

    def learned(self) -> list[str]:
        """The stages that learned a mask (MaskLLM)."""
        return [name for name, rec in self.stages.items() if rec.learned]

    def tables(self) -> str:
        """results.md: every table the run has numbers for."""
        tables = ([perplexity_table(self.perplexity, self.stages)] if self.perplexity else []) + (
            [retrieval_table(self.retrieval)] if self.retrieval else []) + (
            [zeroshot_table(self.lm_eval)] if self.lm_eval else [])
        return "\n".join(tables)


def _ppl(results: dict, name: str, corpus: str) -> float:
    cell = results[name][corpus]
    return cell.ppl if isinstance(cell, PplCell) else cell["ppl"]


def _tokens(cell) -> int:
    return cell.tokens if isinstance(cell, PplCell) else cell["tokens"]


def gap_closed(results: dict[str, dict], name: str, prior: str | None, corpus: str) -> float | None:
    """(PPL prior − PPL learned) / (PPL prior − PPL dense): the share of the prior mask's perplexity gap
    that a learned mask closes on one corpus (above 1 when it beats the dense model)."""
    try:
        dense, start, got = (_ppl(results, k, corpus) for k in ("dense", prior, name))
    except (KeyError, TypeError):
        return None
    return (start - got) / (start - dense) if start != dense else None


def gap_start(stages: dict, name: str) -> str | None:
    """The mask whose gap a stage's gap closed is measured against: for a learned or refined weight mask,
    the first mask up its chain of priors that was not learned (a learned prior is often near dense, and
    the share of its small gap is no measure of the mask); None for anything else (an attention plan
    re-binarised from another plan has no gap to close)."""
    info = _info(stages, name)
    if info.get("method") not in (LEARNED_METHOD, *REFINING_METHODS):
        return None
    start = info.get("prior")
    while start not in (None, name) and _info(stages, start).get("method") == LEARNED_METHOD:
        start = _info(stages, start).get("prior")
    return start


def _info(stages: dict, name: str) -> dict[str, Any]:
    rec = stages.get(name)
    return {} if rec is None else rec.model_dump() if isinstance(rec, StageRecord) else rec


def perplexity_table(results: dict[str, dict], stages: dict[str, StageRecord | dict] | None = None) -> str:
    """Perplexity per variant and corpus, with each stage's method, tokens seen and time; a learned
    mask also says how much of its prior's gap to dense it closes."""
    stages = stages or {}
    corpora = sorted({c for r in results.values() for c in r})
    head = "| variant | " + " | ".join(f"PPL {c}" for c in corpora) + " | method | tokens seen | method time (s) |"
    lines = [head, "|" + " --- |" * (len(corpora) + 4)]
    for name, row in results.items():
        info = _info(stages, name)
        label = name + (" (weight update)" if info.get("weight_update") else "")
        method = info.get("method") or ""
        if info.get("prior"):
            method += f" from {info['prior']}"
        start = gap_start(stages, name)
        closed = [gap_closed(results, name, start, c) for c in corpora]
        if any(x is not None for x in closed):
            against = "" if start == info.get("prior") else f" of {start}'s"
            method += f" (gap{against} closed: " + ", ".join(
                f"{c} {x:.0%}" for c, x in zip(corpora, closed) if x is not None) + ")"
        cells = [f"{_ppl(results, name, c):.2f}" if c in row else "" for c in corpora]
        tokens, seconds = info.get("tokens"), info.get("seconds")
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {method} | {'' if tokens is None else tokens} | {'' if seconds is None else seconds} |")
    tokens = {c: next(_tokens(r[c]) for r in results.values() if c in r) for c in corpora}
    lines.append("")
    lines.append("Tokens scored: " + ", ".join(f"{c} {t}" for c, t in tokens.items()) + ".")
    return "\n".join(lines) + "\n"


def retrieval_table(results: dict[str, dict[str, dict]]) -> str:
    """Exact-match accuracy per variant and task (overall, then per length), and what the variant's
    attention costs at the longest length: KV cache and attention FLOPs of a prefill, as a share of dense."""
    tasks = [t for t in RETRIEVAL_TASKS if any(t in r for r in results.values())]
    lengths = {t: sorted({c["length"] for r in results.values() if t in r for c in r[t]["cells"]}) for t in tasks}

    def at(cells: list[dict], length: int) -> float:
        chosen = [c for c in cells if c["length"] == length]
        return sum(c["acc"] * c["n"] for c in chosen) / sum(c["n"] for c in chosen)

    longest = max(r["cost"]["length"] for r in results.values())
    head = ("| variant | " + " | ".join(f"{t} (by length {'/'.join(map(str, lengths[t]))})" for t in tasks)
            + f" | KV cache at {longest} | attention FLOPs at {longest} |")
    lines = [head, "|" + " --- |" * (len(tasks) + 3)]
    for name, row in results.items():
        cells = [f"{row[t]['acc']:.2f} (" + "/".join(f"{at(row[t]['cells'], L):.2f}" for L in lengths[t]) + ")"
                 if t in row else "" for t in tasks]
        cost = row["cost"]
        cells += [f"{cost['kv_cache_bytes'] / 2**10:,.0f} KiB ({cost['kv_cache_fraction']:.0%})",
                  f"{cost['attention_flops'] / 1e6:,.0f} M ({cost['attention_flops_fraction']:.0%})"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def zeroshot_table(results: dict[str, dict[str, dict]]) -> str:
    """Accuracy (%) per variant and task, and their mean, as the pruning papers print it: acc_norm where a
    task has it, else acc (`pipeline.eval.zeroshot.primary`)."""
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    shots = sorted({r[t].get("num_fewshot") for r in results.values() for t in r} - {None})
    lines = ["| variant | " + " | ".join(tasks) + " | mean |", "|" + " --- |" * (len(tasks) + 2)]
    for name, row in results.items():
        values = [primary(row[t])[1] if t in row else None for t in tasks]
        present = [v for v in values if v is not None]
        cells = ["" if v is None else f"{100 * v:.1f}" for v in values]
        mean = f"{100 * sum(present) / len(present):.1f}" if present else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    metric = {t: next(primary(r[t])[0] for r in results.values() if t in r) for t in tasks}
    docs = {t: next(r[t]["n"] for r in results.values() if t in r) for t in tasks}
    used = sorted(set(metric.values()) - {None})
    named = (f"metric {used[0]}" if len(used) == 1 else "metric per task "
             + ", ".join(f"{t} {m}" for t, m in metric.items())) if used else "metric none"
    lines += ["", f"lm-evaluation-harness, {'/'.join(map(str, shots)) or 0}-shot, {named} (%; acc_norm where a task "
              "has it, else acc); documents per task: " + ", ".join(f"{t} {n}" for t, n in docs.items()) + "."]
    return "\n".join(lines) + "\n"


def card_tables(results: Results, stage: str) -> list[str]:
    """The model card's results: perplexity and retrieval of the dense model, the one-shot baselines and
    `stage` (the change against dense, the share of the best one-shot mask's gap that `stage` closes),
    then the lm-eval table of the same rows."""
    ppl = _card_ppl(results, stage)
    zeroshot = _card_zeroshot(results, stage)
    return zeroshot[1:] if zeroshot and ppl == [NOT_EVALUATED] else ppl + zeroshot


def _rows(results: Results, stage: str) -> list[str]:
    return ["dense"] + [n for n, rec in results.stages.items() if rec.oneshot and n != stage] + [stage]


def _card_ppl(results: Results, stage: str) -> list[str]:
    ppl, retrieval, stages = results.perplexity, results.retrieval, results.stages
    rows = [r for r in _rows(results, stage) if r in ppl or r in retrieval]
    if stage not in rows:
        return [NOT_EVALUATED]
    corpora = sorted({c for r in rows for c in ppl.get(r, {})})
    tasks = [t for t in RETRIEVAL_TASKS if any(t in retrieval.get(r, {}) for r in rows)]
    lines = ["| variant | " + " | ".join([f"PPL {c}" for c in corpora] + [f"{t} (exact match)" for t in tasks]) + " |",
             "|" + " --- |" * (1 + len(corpora) + len(tasks))]
    dense = ppl.get("dense", {})

    def updated(r: str) -> bool:
        return r in stages and stages[r].weight_update

    for r in rows:
        cells = []
        for c in corpora:
            cell = ppl.get(r, {}).get(c)
            text = "" if cell is None else f"{cell.ppl:.2f}"
            if cell is not None and r != "dense" and c in dense:
                text += f" ({cell.ppl / dense[c].ppl - 1:+.1%} vs dense)"
            cells.append(text)
        cells += [f"{retrieval[r][t]['acc']:.2f}" if t in retrieval.get(r, {}) else "" for t in tasks]
        label = f"**{r} (this artifact)**" if r == stage else r
        if updated(r):
            label += " (weights updated: not a mask over frozen weights)"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for c in corpora:
        masks_only = [r for r in rows if r not in ("dense", stage) and not updated(r) and c in ppl.get(r, {})]
        if c in dense and c in ppl.get(stage, {}) and masks_only:
            best = min(masks_only, key=lambda r: ppl[r][c].ppl)
            gap = ppl[best][c].ppl - dense[c].ppl
            if gap > 0:
                closed = (ppl[best][c].ppl - ppl[stage][c].ppl) / gap
                worse = " (it is worse than that mask)" if closed < 0 else ""
                lines.append(f"\nOn {c}, {stage} closes {closed:.0%} of the gap between the best one-shot mask "
                             f"({best}) and the dense model{worse}.")
    scored = {c: next(ppl[r][c].tokens for r in rows if c in ppl.get(r, {})) for c in corpora}
    if scored:
        lines.append("\nPerplexity: non-overlapping windows of each whole corpus (wikitext-2 protocol); tokens scored: "
                     + ", ".join(f"{c} {t:,}" for c, t in scored.items()) + ".")
    return lines


def _card_zeroshot(results: Results, stage: str) -> list[str]:
    scores = results.lm_eval
    if stage not in scores:
        return []
    table = zeroshot_table({(f"**{r} (this artifact)**" if r == stage else r): scores[r]
                            for r in _rows(results, stage) if r in scores})
    return ["", "### Zero-shot tasks", "", table.rstrip()]
