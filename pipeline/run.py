"""Running a recipe: the stages a config lists, in order, into a run directory.

A run directory holds `config.yaml` (the resolved config), `run.log`, `status.json` (status
running/stopped/failed/completed, the stage, the owner's pid and host, start and end, and for a run that
ended early its last step and error), `metrics.jsonl` (every logged training step, each once), one mask
artifact per mask-producing stage under `artifacts/`, the last checkpoints of each learning stage,
`results.json` + `results.md`, and `.lock`, its owner (`pipeline.rundir`). Paths in `results.json` are
relative to the run directory.

`run` only orders the stages and records what they produced; a backend executes them. `LocalBackend`
runs each stage in this process; `workers.RayBackend` runs the same stage functions on Ray (a Ray
Train worker group for learning, tasks and actors for the rest), so this module never imports Ray.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline import MaskpipeError, __version__, rundir
from pipeline.artifacts import (check_compatible, check_disjoint, load_artifact, load_soft_logits, read_manifest,
                                save_artifact, write_json, write_text)
from pipeline.attention import (AttentionPlan, binarize, check_plan, default_sink_window, gate_strategy, kv_heads,
                                moa_windows, plan_cost, planned, random_scores, train_gates, uniform_plan)
from pipeline.checkpoint import CheckpointDir
from pipeline.config import (AttentionStage, Config, EvalStage, LearnStage, LmEvalStage, ModelConfig, OneshotStage,
                             RetrievalStage, dump_config)
from pipeline.data import TokenStream, eval_text
from pipeline.evaluate import Perplexity, perplexity
from pipeline.learn import hard_mask, train_masks
from pipeline.loggers import MetricsLog, log_results, read_metrics, require  # noqa: F401 (read_metrics: jobs.submit)
from pipeline.models import (base_weight, device_of, fingerprint, load_model, load_tokenizer, prunable_linears,
                             resolve_device)
from pipeline.oneshot import oneshot_masks
from pipeline.plan import model_shape, plan_report
from pipeline.retrieval import (accuracy, multikey_samples, niah_heatmap, niah_samples, passkey_samples, score,
                                split_sentences)
from pipeline.sparsity import masked
from pipeline.vocab import LEARNED_METHOD
from pipeline.zeroshot import check_tasks, lm_eval_stage, zeroshot_table

log = logging.getLogger("maskpipe")


@dataclass
class Variant:
    """A way of running the base model: dense, masked by an artifact, or (baseline rows only) with
    weights SparseGPT updated, which no artifact carries."""

    name: str
    artifact: Path | None = None
    updated_weights: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def record(self, run_dir: Path) -> dict[str, Any]:
        """The variant as `results.json` stores it: its files relative to the run directory."""
        return {**self.info, "artifact": rundir.relative(run_dir, self.artifact),
                "updated_weights": rundir.relative(run_dir, self.updated_weights)}

    @classmethod
    def from_record(cls, name: str, rec: dict[str, Any], run_dir: Path) -> Variant:
        info = {k: v for k, v in rec.items() if k not in ("artifact", "updated_weights")}
        return cls(name, artifact=rundir.resolve(run_dir, rec.get("artifact")),
                   updated_weights=rundir.resolve(run_dir, rec.get("updated_weights")), info=info)


class Session:
    """A model, its tokenizer and prunable linears, loaded once and shared by a run's stages."""

    def __init__(self, model_cfg: ModelConfig, meta: bool = False):
        """`meta`: the model on the meta device, read later by whoever places it (`load_model`)."""
        self.model_cfg = model_cfg
        self.tokenizer = load_tokenizer(model_cfg)
        try:
            self.model = load_model(model_cfg, meta=meta)
        except SafetensorError as e:  # a truncated or corrupted weights file
            raise MaskpipeError(f"model {model_cfg.name_or_path!r}: cannot load its weights: {e}") from None
        self.linears = prunable_linears(self.model, model_cfg)

    def base_model_info(self) -> dict[str, Any]:
        return {
            "name_or_path": self.model_cfg.name_or_path,
            "revision": self.model_cfg.revision,
            "architecture": type(self.model).__name__,
        }

    def load_artifact(self, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """An artifact's masks and manifest, masks and attention plan checked against this base model."""
        masks, manifest = load_artifact(path)
        check_compatible(manifest, self.linears, str(path))
        if "attention" in manifest:
            check_plan(manifest["attention"], self.model, str(path))
        return masks, manifest

    def load_artifacts(self, paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict[Path, dict[str, Any]]]:
        """Artifacts applied together: their masks merged, each checked against this base model, all
        refused if two mask the same layer or carry a plan each (`check_disjoint`, before any mask loads)."""
        check_disjoint([(str(p), read_manifest(p)) for p in paths])
        masks, manifests = {}, {}
        for path in paths:
            found, manifests[path] = self.load_artifact(path)
            masks |= found
        return masks, manifests

    def masks_of(self, variant: Variant) -> dict[str, torch.Tensor]:
        return self.contents(variant)[0]

    def contents(self, variant: Variant) -> tuple[dict[str, torch.Tensor], AttentionPlan | None]:
        """A variant's N:M masks and attention plan, checked against this base model."""
        masks, manifest = ({}, {}) if variant.artifact is None else self.load_artifact(variant.artifact)
        return masks, AttentionPlan.from_json(manifest["attention"]) if "attention" in manifest else None

    def plan_of(self, variant: Variant) -> AttentionPlan | None:
        return self.contents(variant)[1]

    @contextmanager
    def running(self, variant: Variant):
        """The model as `variant` describes it (masks, attention plan); the base weights are restored on exit."""
        masks, plan = self.contents(variant)  # checked against the base model before its weights are swapped
        saved = {}
        try:
            if variant.updated_weights is not None:
                for name, w in load_file(str(variant.updated_weights)).items():
                    base = base_weight(self.linears[name])
                    saved[name] = base.detach().clone()
                    base.data.copy_(w)
            with masked(self.linears, masks), planned(self.model, plan):
                yield self.model
        finally:
            for name, w in saved.items():
                base_weight(self.linears[name]).data.copy_(w)


def oneshot_stage(cfg: Config, s: Session, st: OneshotStage, out_dir: Path) -> list[Variant]:
    """One-shot N:M masks; writes the artifact to `out_dir / st.name`. DSnoT refines the mask of the
    earlier stage `st.mask_from`, whose artifact lies beside it in `out_dir`."""
    pattern = cfg.stage_pattern(st)
    n, m = pattern
    init_masks = None
    if st.mask_from is not None:
        init_masks, manifest = s.load_artifact(out_dir / st.mask_from)
        if manifest["pattern"] != str(pattern):
            raise MaskpipeError(f"{st.name}: mask_from: {st.mask_from} is {manifest['pattern']}, "
                                f"the stage makes {pattern}")
    calib, data_info = None, {}
    if st.data is not None:
        stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed)
        calib = stream.next_batch(st.n_samples)
        data_info = {"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources],
                     "n_samples": st.n_samples, "seqlen": st.seqlen, "tokens": calib.numel(),
                     "token_shares": stream.token_shares()}
        log.info("%s: calibration on %d tokens, shares %s", st.name, calib.numel(), _shares(stream))
    log.info("%s: %s %d:%d over %d linears", st.name, st.method, n, m, len(s.linears))
    t0 = time.perf_counter()
    masks, updated = oneshot_masks(
        s.model, s.linears, st.method, n, m, calib, batch_size=st.batch_size,
        weight_update=st.weight_update, blocksize=st.blocksize, percdamp=st.percdamp, init_masks=init_masks,
        max_cycles=st.max_cycles, offload_to=resolve_device(cfg.model.device) if cfg.model.offload else None,
    )
    seconds = time.perf_counter() - t0
    dsnot_only = {"mask_from", "max_cycles"} if st.mask_from is None else set()
    params = st.model_dump(exclude={"stage", "name", "data"} | dsnot_only)
    artifact = save_artifact(
        out_dir / st.name, masks, s.linears, base_model=s.base_model_info(), pattern=pattern,
        method={"name": st.method, "params": params, "seconds": round(seconds, 2)},
        data=data_info, config=cfg.model_dump(mode="json"),
    )
    log.info("%s: mask artifact written to %s (%.1f s)", st.name, artifact, seconds)
    info = {"method": st.method, "pattern": str(pattern), "seconds": round(seconds, 2),
            "tokens": data_info.get("tokens", 0), "token_shares": data_info.get("token_shares"),
            **({"prior": st.mask_from} if st.mask_from else {})}
    if updated is None:
        return [Variant(st.name, artifact=artifact, info=info)]
    # The weight update is a baseline row only: kept in the run directory, never in an artifact.
    weights = out_dir.parent / "baselines" / st.name / "updated_weights.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in updated.items()}, str(weights))
    log.warning("%s: SparseGPT weight update changes the base weights; its perplexity is reported as a "
                "baseline row, and the artifact holds only the mask", st.name)
    return [Variant(st.name, artifact=artifact, updated_weights=weights,
                    info={**info, "weight_update": True, "note": "weights updated: not a mask over frozen weights"})]


def learn_stage(cfg: Config, s: Session, st: LearnStage, out_dir: Path, prior: Path | None, store, on_log,
                rank: int = 0, world_size: int = 1) -> list[Variant]:
    """MaskLLM mask learning from `prior` (an artifact, or None), resuming from `store`; the caller's
    rank among `world_size` data-parallel workers (each its share of every batch). Rank 0 writes the
    artifact to `out_dir / st.name` and returns its variant; other ranks return nothing."""
    pattern = cfg.stage_pattern(st)
    n, m = pattern
    priors = init_logits = None
    prior_info: dict[str, Any] = {}
    if prior is not None:
        priors, manifest = s.load_artifact(prior)
        if manifest["pattern"] != str(pattern):
            raise MaskpipeError(f"{st.name}: prior {prior} is {manifest['pattern']}, the stage learns {pattern}")
        if st.prior.soft:
            init_logits, priors = load_soft_logits(prior), None
        prior_info = {"artifact": str(prior), "method": manifest["method"].get("name"),
                      "strength": st.prior.strength, "soft": st.prior.soft}
    stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed, rank, world_size)
    tokens = st.steps * st.grad_accum * st.batch_size * st.seqlen
    log.info("%s: learning %d:%d masks for %d linears, %d steps, %d tokens on %d worker(s)", st.name, n, m,
             len(s.linears), st.steps, tokens, world_size)
    if rank == 0:
        device = device_of(base_weight(next(iter(s.linears.values()))))
        cuda = device.type == "cuda"
        capacity = torch.cuda.get_device_properties(device).total_memory if cuda else None
        log.info("%s: memory plan\n%s", st.name,
                 plan_report(cfg, st, model_shape(s.model.config, cfg.model), world_size, capacity, cuda))
    # Read before training: a sharded strategy leaves the model's weights partitioned. Only rank 0
    # writes the artifact, so only rank 0 hashes the weights.
    shapes = {k: base_weight(lin).shape for k, lin in s.linears.items()}
    base_model = {**s.base_model_info(), "fingerprint": fingerprint(s.linears)} if rank == 0 else None
    w = cfg.workers
    t0 = time.perf_counter()
    logits, history = train_masks(s.model, s.linears, st, n, m, stream, seed=cfg.seed, store=store, priors=priors,
                                  init_logits=init_logits, on_log=on_log, strategy=w.strategy,
                                  zero_stage=w.zero_stage, activation_checkpointing=w.activation_checkpointing,
                                  shard_group=w.shard_group)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return []
    log.info("%s: learned on %d tokens, shares %s", st.name, stream.tokens(), _shares(stream))
    masks = {k: hard_mask(v, n, m).reshape(shapes[k]) for k, v in logits.items()}
    soft = {k: v.to(getattr(torch, st.save_logits)) for k, v in logits.items()} if st.save_logits else None
    artifact = save_artifact(
        out_dir / st.name, masks, s.linears, base_model=base_model, pattern=pattern,
        method={"name": LEARNED_METHOD, "params": st.model_dump(mode="json", exclude={"stage", "name", "data"}),
                "prior": prior_info, "seconds": round(seconds, 2), "workers": world_size,
                "final": history[-1] if history else {}},
        data={"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources], "tokens": tokens,
              "token_shares": stream.token_shares()},
        config=cfg.model_dump(mode="json"), soft_logits=soft,
    )
    log.info("%s: mask artifact written to %s (%.1f s)", st.name, artifact, seconds)
    return [learned_variant(st, artifact)]


def _shares(stream: TokenStream) -> str:
    return ", ".join(f"{Path(k).name} {v:.1%}" for k, v in stream.token_shares().items())


def learned_variant(st: LearnStage, artifact: Path) -> Variant:
    """A learning stage's row, read back from its artifact (all that a worker group leaves behind)."""
    manifest = read_manifest(artifact)
    method = manifest["method"]
    info = {"method": LEARNED_METHOD, "pattern": manifest["pattern"], "seconds": method["seconds"],
            "tokens": manifest["data"]["tokens"], "token_shares": manifest["data"].get("token_shares"),
            "workers": method["workers"],
            "prior": st.prior and (st.prior.stage or Path(st.prior.artifact).name)}
    return Variant(st.name, artifact=artifact, info=info)


def prior_source(st: LearnStage, variants: dict[str, Variant]) -> Path | None:
    if st.prior is None:
        return None
    return variants[st.prior.stage].artifact if st.prior.stage else Path(st.prior.artifact)


def eval_texts(cfg: Config, st: EvalStage, tokenizer) -> dict[str, torch.Tensor]:
    texts = {}
    for key in st.data:
        texts[key] = tokenizer(eval_text(cfg.data[key]), return_tensors="pt").input_ids[0]
        log.info("%s: corpus %s has %d tokens", st.name, key, len(texts[key]))
    return texts


def eval_cell(s: Session, st: EvalStage, v: Variant, key: str, ids: torch.Tensor) -> dict:
    """Perplexity of one variant on one corpus."""
    with s.running(v) as model:
        p: Perplexity = perplexity(model, ids, st.seqlen, st.stride, st.batch_size, desc=f"{v.name}/{key}")
    log.info("%s: %s on %s: ppl %.3f over %d tokens", st.name, v.name, key, p.ppl, p.tokens)
    return {"ppl": p.ppl, "nll": p.nll, "tokens": p.tokens, "windows": p.windows, "seqlen": st.seqlen,
            "stride": st.stride}


def attention_stage(cfg: Config, s: Session, st: AttentionStage, out_dir: Path, store, on_log,
                    variants: dict[str, Variant], rank: int = 0, world_size: int = 1) -> list[Variant]:
    """A per-head attention plan: learned gates (resuming from `store`; the caller's rank among
    `world_size` data-parallel workers), an earlier stage's gates re-binarised, or random scores;
    written by rank 0 as an artifact with the N:M masks of `st.masks`. Other ranks return nothing."""
    default_sink, default_window = default_sink_window(st.seqlen)
    sink, window = st.sink or default_sink, st.window or default_window
    shape = kv_heads(s.model)[:2]
    base = variants[st.masks] if st.masks else Variant("dense")
    if base.updated_weights is not None:
        raise MaskpipeError(f"{st.name}: masks: {st.masks} updated its weights; an artifact carries masks over "
                            "frozen weights only")
    masks, manifest = ({}, {}) if base.artifact is None else s.load_artifact(base.artifact)
    gates, history, tokens, data_info = None, [], 0, {}
    t0 = time.perf_counter()
    if st.method == "random":
        scores = random_scores(shape, cfg.seed if st.seed is None else st.seed)
    elif st.gates_from:
        scores = gates = s.plan_of(variants[st.gates_from]).gate
        if bool(gates.isnan().any()):
            raise MaskpipeError(f"{st.name}: gates_from: {st.gates_from} has no learned gates")
    else:
        stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed)
        tokens = st.steps * st.batch_size * st.seqlen
        data_info = {"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources], "tokens": tokens}
        log.info("%s: learning gates of %d x %d KV heads against streaming sink %d + window %d, %d steps",
                 st.name, *shape, sink, window, st.steps)
        with s.running(base):
            gates, history = train_gates(s.model, s.tokenizer, st, stream, sink=sink, window=window, seed=cfg.seed,
                                         store=store, on_log=on_log, strategy=gate_strategy(cfg.workers.strategy))
        scores = gates
    seconds = time.perf_counter() - t0
    if rank != 0:
        return []
    streaming = binarize(scores, fraction=st.streaming, threshold=st.threshold)
    plan = AttentionPlan(streaming, torch.full(shape, sink),
                         moa_windows(scores, streaming, st.windows) if st.windows else torch.full(shape, window),
                         gates if gates is not None else torch.full(shape, float("nan")))
    cost = plan_cost(plan, st.seqlen, *head_geometry(s.model))
    params = st.model_dump(mode="json", exclude={"stage", "name", "data", "masks"}) | {"sink": sink, "window": window}
    artifact = save_artifact(
        out_dir / st.name, masks, s.linears, base_model=s.base_model_info(), pattern=manifest.get("pattern"),
        method={"name": f"attention-{st.method}", "params": params, "seconds": round(seconds, 2),
                "masks_from": manifest.get("method"), "final": history[-1] if history else {}},
        data=data_info, metrics={f"at_{st.seqlen}_tokens": cost}, config=cfg.model_dump(mode="json"),
        attention=plan.to_json(s.model),
    )
    log.info("%s: %d of %d KV heads streaming (KV cache %.0f%% of dense at %d tokens); artifact %s",
             st.name, int(streaming.sum()), streaming.numel(), 100 * cost["kv_cache_fraction"], st.seqlen, artifact)
    return [attention_variant(st, artifact)]


def attention_variant(st: AttentionStage, artifact: Path) -> Variant:
    """An attention stage's row, read back from its artifact (all that a worker group leaves behind)."""
    manifest = read_manifest(artifact)
    method = manifest["method"]
    info = {"method": method["name"], "streaming": manifest["attention"]["streaming_fraction"],
            "sink": method["params"]["sink"], "window": st.windows or method["params"]["window"],
            "seconds": method["seconds"], "tokens": manifest["data"].get("tokens", 0), "prior": st.gates_from or None}
    return Variant(st.name, artifact=artifact, info=info)


def head_geometry(model) -> tuple[int, int, int]:
    """(head_dim, query heads per KV head, bytes per cached element) for KV-cache and FLOP counts."""
    c = model.config.get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return head_dim, kv_heads(model)[2], next(model.parameters()).element_size()


def eval_stage(cfg: Config, s: Session, st: EvalStage, variants: list[Variant]) -> dict[str, dict[str, dict]]:
    """Perplexity of every variant on every corpus: {variant: {corpus: {ppl, tokens, ...}}}."""
    texts = eval_texts(cfg, st, s.tokenizer)
    return {v.name: {key: eval_cell(s, st, v, key, ids) for key, ids in texts.items()} for v in variants}


def retrieval_stage(cfg: Config, s: Session, st: RetrievalStage, variants: list[Variant],
                    out_dir: Path) -> dict[str, dict[str, dict]]:
    """Retrieval accuracy of every variant: {variant: {task: {acc, n, cells}}}; every sample's record
    goes to `out_dir / st.name / <variant>.json`, and each NIAH grid to a heatmap PNG beside it."""
    def sentences(key: str | None) -> list[str] | None:
        return None if key is None else split_sentences(eval_text(cfg.data[key]))

    tasks = {}
    if st.passkey:
        tasks["passkey"] = (passkey_samples(s.tokenizer, st.passkey.lengths, st.passkey.samples, cfg.seed), ("length",))
    if st.niah:
        tasks["niah"] = (niah_samples(s.tokenizer, sentences(st.niah.data), st.niah.lengths, st.niah.depths,
                                      st.niah.samples, cfg.seed), ("length", "depth"))
    if st.multikey:
        mk = st.multikey
        tasks["multikey"] = (multikey_samples(s.tokenizer, mk.lengths, mk.samples, cfg.seed, mk.keys, mk.values,
                                              sentences(mk.data)), ("length",))
    folder = out_dir / st.name
    longest = max(sample.length for samples, _ in tasks.values() for sample in samples)
    results: dict[str, dict[str, dict]] = {}
    for v in variants:
        plan = s.plan_of(v) or uniform_plan(kv_heads(s.model)[:2], False, 0, 0)
        results[v.name] = {"cost": {"length": longest, **plan_cost(plan, longest, *head_geometry(s.model))}}
        records = {}
        with s.running(v) as model:
            for task, (samples, by) in tasks.items():
                records[task] = score(model, s.tokenizer, samples, desc=f"{v.name}/{task}",
                                      batch_size=st.batch_size)
                results[v.name][task] = {**accuracy(records[task]), **accuracy(records[task], by)}
                log.info("%s: %s %s: exact match %.3f over %d samples", st.name, v.name, task,
                         results[v.name][task]["acc"], len(samples))
        if "niah" in results[v.name]:
            png = niah_heatmap(results[v.name]["niah"]["cells"], folder / f"{v.name}-niah.png",
                               f"{v.name}: needle in a haystack, exact match")
            results[v.name]["niah"]["heatmap"] = str(png)
        write_json(folder / f"{v.name}.json", {"summary": results[v.name], "samples": records})
    return results


def retrieval_table(results: dict[str, dict[str, dict]]) -> str:
    """Exact-match accuracy per variant and task (overall, then per length), and what the variant's
    attention costs at the longest length: KV cache and attention FLOPs of a prefill, as a share of dense."""
    tasks = [t for t in ("passkey", "niah", "multikey") if any(t in r for r in results.values())]
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


def gap_closed(results: dict[str, dict[str, dict]], name: str, prior: str | None, corpus: str) -> float | None:
    """(PPL prior − PPL learned) / (PPL prior − PPL dense): the share of the prior mask's perplexity gap
    that a learned mask closes on one corpus (above 1 when it beats the dense model)."""
    try:
        dense, start, got = (results[k][corpus]["ppl"] for k in ("dense", prior, name))
    except (KeyError, TypeError):
        return None
    return (start - got) / (start - dense) if start != dense else None


def results_table(results: dict[str, dict[str, dict]], variants: dict[str, Variant]) -> str:
    corpora = sorted({c for r in results.values() for c in r})
    head = "| variant | " + " | ".join(f"PPL {c}" for c in corpora) + " | method | tokens seen | method time (s) |"
    lines = [head, "|" + " --- |" * (len(corpora) + 4)]
    for name, row in results.items():
        info = variants[name].info if name in variants else {}
        label = name + (" (weight update)" if info.get("weight_update") else "")
        method = info.get("method", "")
        if info.get("prior"):
            method += f" from {info['prior']}"
        closed = [gap_closed(results, name, info.get("prior"), c) for c in corpora]
        if any(x is not None for x in closed):
            method += " (gap closed: " + ", ".join(f"{c} {x:.0%}" for c, x in zip(corpora, closed) if x is not None) + ")"
        cells = [f"{row[c]['ppl']:.2f}" if c in row else "" for c in corpora]
        lines.append(f"| {label} | " + " | ".join(cells)
                     + f" | {method} | {info.get('tokens', '')} | {info.get('seconds', '')} |")
    tokens = {c: next(r[c]["tokens"] for r in results.values() if c in r) for c in corpora}
    lines.append("")
    lines.append("Tokens scored: " + ", ".join(f"{c} {t}" for c, t in tokens.items()) + ".")
    return "\n".join(lines) + "\n"


def new_run_dir(cfg: Config) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(cfg.output_dir) / f"{cfg.name}-{stamp}"
    i = 1
    while path.exists():
        path = Path(cfg.output_dir) / f"{cfg.name}-{stamp}-{i}"
        i += 1
    return path


@contextmanager
def logs_to(run_dir: Path):
    """The maskpipe log of this process, at INFO, also appended to the run's `run.log`: the driver's,
    and that of any Ray worker that runs one of the run's stages."""
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


class LocalBackend:
    """Every stage in this process, on one device, the model loaded once."""

    def __init__(self):
        self._session: Session | None = None

    def session(self, cfg: Config) -> Session:
        if self._session is None:
            torch.manual_seed(cfg.seed)
            self._session = Session(cfg.model)
        return self._session

    def oneshot(self, cfg: Config, st: OneshotStage, run_dir: Path) -> list[Variant]:
        return oneshot_stage(cfg, self.session(cfg), st, run_dir / "artifacts")

    def learn(self, cfg: Config, st: LearnStage, run_dir: Path, prior: Path | None) -> list[Variant]:
        store = CheckpointDir(run_dir / "checkpoints" / st.name, st.keep_checkpoints)
        metrics = MetricsLog(run_dir, st.name, cfg.logging, config=cfg.model_dump(mode="json"))
        try:
            return learn_stage(cfg, self.session(cfg), st, run_dir / "artifacts", prior, store, metrics)
        finally:
            metrics.close()

    def attention(self, cfg: Config, st: AttentionStage, run_dir: Path, variants: dict[str, Variant]) -> list[Variant]:
        store = CheckpointDir(run_dir / "checkpoints" / st.name, st.keep_checkpoints)
        metrics = MetricsLog(run_dir, st.name, cfg.logging, config=cfg.model_dump(mode="json"))
        try:
            return attention_stage(cfg, self.session(cfg), st, run_dir / "artifacts", store, metrics, variants)
        finally:
            metrics.close()

    def evaluate(self, cfg: Config, st: EvalStage, run_dir: Path, variants: list[Variant]) -> dict[str, dict[str, dict]]:
        return eval_stage(cfg, self.session(cfg), st, variants)

    def retrieval(self, cfg: Config, st: RetrievalStage, run_dir: Path, variants: list[Variant]) -> dict[str, dict]:
        return retrieval_stage(cfg, self.session(cfg), st, variants, run_dir / "retrieval")

    def lm_eval(self, cfg: Config, st: LmEvalStage, run_dir: Path, variants: list[Variant]) -> dict[str, dict]:
        return lm_eval_stage(cfg, self.session(cfg), st, variants)


def context_limit(model_cfg: ModelConfig) -> int | None:
    """The model's context (max_position_embeddings), read from its config without the network; None
    when it cannot be read here (a hub model not in the cache: the load reports that)."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision, local_files_only=True,
                                       trust_remote_code=model_cfg.trust_remote_code)
    except Exception:  # noqa: BLE001 - unreadable here is not an error yet; loading the model says why
        return None
    return getattr(c.get_text_config(), "max_position_embeddings", None)


def _lengths(st) -> dict[str, int]:
    """key path (within the stage) -> tokens one sequence of the stage holds."""
    if isinstance(st, RetrievalStage):
        return {f"{task}.lengths": max(getattr(st, task).lengths) for task in ("passkey", "niah", "multikey")
                if getattr(st, task) is not None}
    if isinstance(st, OneshotStage) and st.data is None or getattr(st, "seqlen", None) is None:
        return {}  # magnitude reads no text; lm-eval tasks bring their own lengths
    return {"seqlen": st.seqlen}


def _sniff(path: str) -> None:
    """Refuse a local corpus file whose head is not what its suffix says, naming the file: the
    streaming readers would fail mid-stage with a traceback. Reads at most the first MiB (and a
    parquet footer), so a fault further into a large file still surfaces only when it is read."""
    suffix = Path(path).suffix
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            if suffix == ".parquet":
                f.seek(max(0, Path(path).stat().st_size - 4))
                tail = f.read(4)
    except OSError as e:
        raise MaskpipeError(f"data source {path}: cannot read: {e.strerror}") from None
    if suffix == ".parquet":
        if not (head.startswith(b"PAR1") and tail == b"PAR1"):
            raise MaskpipeError(f"data source {path}: not a parquet file")
        return
    if b"\0" in head:
        raise MaskpipeError(f"data source {path}: a binary file, not text")
    import codecs

    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < 1 << 20)
    except UnicodeDecodeError as e:
        raise MaskpipeError(f"data source {path}: not UTF-8 text (byte {e.start})") from None
    if suffix in (".jsonl", ".json"):
        lines = text.splitlines()
        for i, line in enumerate(lines[:-1] if len(head) == 1 << 20 else lines, 1):
            if suffix == ".json" and i == 1 and line.lstrip().startswith("["):
                break  # one JSON array: read whole by the json reader
            try:
                if line.strip():
                    json.loads(line)
            except ValueError as e:
                raise MaskpipeError(f"data source {path}: line {i} is not JSON ({e})") from None


def check_device(device: str, key: str = "model.device", local: bool = True) -> None:
    """Refuse a device torch does not know, or (`local`: this process runs the model) one not here."""
    if device == "auto":
        return
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise MaskpipeError(f"{key}: {device!r} is no device (auto, cpu, cuda, cuda:N, mps)") from None
    if not local:
        return  # the Ray workers' devices, not this process's
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise MaskpipeError(f"{key}: {device} asked for, but this machine has {torch.cuda.device_count()} CUDA devices")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise MaskpipeError(f"{key}: mps asked for, but this machine has no MPS device")
    if d.type not in ("cpu", "cuda", "mps"):
        raise MaskpipeError(f"{key}: {device!r} is not supported here (auto, cpu, cuda, cuda:N, mps)")


def check_inputs(cfg: Config, source: str = "", flags: dict[str, str] | None = None) -> None:
    """What can be checked before any model work, named by its key (or by the command-line flag in
    `flags`): every local corpus a stage reads exists and looks like its kind, and no stage asks for
    sequences longer than the model's context."""
    from pipeline.config import data_refs
    from pipeline.data import _local_files

    flags = flags or {}
    where = f"{source}: " if source else ""
    check_device(cfg.model.device, flags.get("model.device", "model.device"), local=cfg.workers.num_workers == 0)
    used = {ref for st in cfg.stages for ref in data_refs(st).values()}
    for name in sorted(used):
        for src in cfg.data[name].sources:
            for f in _local_files(src) or []:
                _sniff(f)
    limit = context_limit(cfg.model)
    if limit is None:
        return
    for i, st in enumerate(cfg.stages):
        for key, n in _lengths(st).items():
            if n > limit:
                name = flags.get(f"stages.{i}.{key}", f"stages.{i}.{key}")
                raise MaskpipeError(f"{where}{name}: {n} tokens is beyond the context of {cfg.model.name_or_path} "
                                    f"(max_position_embeddings {limit})")


# What a resume may change: where and how the stages run, never what they compute (every strategy
# and worker count learns the same mask on the same global batch; see README).
NOT_RESULT = ("output_dir", "tensorboard", "logging", "workers", "model.device")


def _result_keys(raw: dict) -> dict[str, Any]:
    """A config flattened to the key paths that change a run's result. A local corpus counts by its
    file name: a path fixed or re-rooted (another working directory, a moved checkout) is the same corpus."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if prefix in NOT_RESULT:
            return
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)
        else:
            flat[prefix] = v

    walk("", raw)
    for key in [k for k in flat if k.startswith("data.") and k.endswith(".path")]:
        flat[key] = Path(str(flat[key])).name
    return flat


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """Refuse to continue the run in `run_dir` under a config that would change its result, naming
    the keys that differ; log the keys that changed without changing it (e.g. workers.num_workers)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    from pipeline.config import config_from_dict, yaml_load

    try:
        old = config_from_dict(yaml_load(path.read_text()), str(path)).model_dump(mode="json")
    except (MaskpipeError, ValueError) as e:
        raise MaskpipeError(f"{run_dir}: holds a run of another config; resume it with its own config.yaml "
                            f"(its config.yaml does not validate as this one: {str(e).splitlines()[0]})") from None
    new = cfg.model_dump(mode="json")
    a, b = _result_keys(old), _result_keys(new)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        shown = ", ".join(f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in differ[:3]) + (" ..." if len(differ) > 3 else "")
        raise MaskpipeError(f"{run_dir}: holds a run of another config; resume it with its own config.yaml "
                            f"(differs in {shown})")
    if old != new:
        log.info("resuming %s with changed keys that do not change the result: %s", run_dir,
                 ", ".join(sorted(k for k in NOT_RESULT if _get(old, k) != _get(new, k))))


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def stopped_step(run_dir: Path) -> int | None:
    """The last learning step a run logged, if any."""
    steps = [m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if "step" in m]
    return steps[-1] if steps else None


def run(cfg: Config, run_dir: Path | None = None, backend=None, lock_wait: float = 0.0) -> Path:
    """Run every stage of `cfg` in order with `backend` (default: `LocalBackend`); returns the run
    directory.

    Given the directory of an interrupted run of the same config, it resumes: finished stages are
    skipped and a learning stage continues from its latest checkpoint. The run directory is owned
    (`pipeline.rundir.RunLock`) for the whole run: a second writer is refused, after waiting
    `lock_wait` seconds for the owner to let go."""
    require(cfg.logging)
    check_inputs(cfg)
    # Absolute: Ray workers (whose working directory may be a packaged copy of the project) and the
    # paths the run records must not depend on this process's working directory.
    run_dir = Path(run_dir or new_run_dir(cfg)).absolute()
    with rundir.RunLock(run_dir, wait=lock_wait):
        return _run(cfg, run_dir, backend or LocalBackend())


def _run(cfg: Config, run_dir: Path, backend) -> Path:
    check_resumable(cfg, run_dir)
    write_text(run_dir / "config.yaml", dump_config(cfg))
    status = {"status": "running", "stage": None, "maskpipe_version": __version__,
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **rundir.owner(run_dir)}
    status.pop("heartbeat", None)
    write_json(run_dir / "status.json", status)
    results_file = run_dir / "results.json"
    results: dict[str, Any] = (json.loads(results_file.read_text()) if results_file.exists()
                               else {"stages": {}, "perplexity": {}, "retrieval": {}, "done": []})
    results.setdefault("retrieval", {})  # a run directory from before retrieval stages existed
    results.setdefault("lm_eval", {})
    variants: dict[str, Variant] = {"dense": Variant("dense")}
    variants |= {name: Variant.from_record(name, rec, run_dir) for name, rec in results["stages"].items()}
    with logs_to(run_dir):
        try:
            for i, st in enumerate(cfg.stages):  # lm-eval tasks and their data, before any model work
                if isinstance(st, LmEvalStage) and st.name not in results["done"]:
                    check_tasks(st.tasks, st.include_path, (f"stages.{i}.tasks", f"stages.{i}.include_path"))
            for i, st in enumerate(cfg.stages, 1):
                if st.name in results["done"]:
                    log.info("[%d/%d] %s: already done in %s, skipped", i, len(cfg.stages), st.name, run_dir)
                    continue
                # One line per stage on the driver: under Ray the stage's own progress is in its worker.
                log.info("[%d/%d] %s: %s stage started", i, len(cfg.stages), st.name, st.stage)
                t0 = time.perf_counter()
                status["stage"] = st.name
                write_json(run_dir / "status.json", status)
                new: list[Variant] = []
                if isinstance(st, OneshotStage):
                    new = backend.oneshot(cfg, st, run_dir)
                elif isinstance(st, LearnStage):
                    new = backend.learn(cfg, st, run_dir, prior_source(st, variants))
                elif isinstance(st, AttentionStage):
                    new = backend.attention(cfg, st, run_dir, variants)
                else:
                    chosen = [v for name, v in variants.items()
                              if name != "dense" and (st.masks == "all" or name in st.masks)]
                    chosen = ([variants["dense"]] if st.dense else []) + chosen
                    if isinstance(st, EvalStage):
                        results["perplexity"].update(backend.evaluate(cfg, st, run_dir, chosen))
                    elif isinstance(st, LmEvalStage):
                        results["lm_eval"].update(backend.lm_eval(cfg, st, run_dir, chosen))
                    else:
                        found = backend.retrieval(cfg, st, run_dir, chosen)
                        for row in found.values():
                            if "heatmap" in row.get("niah", {}):
                                row["niah"]["heatmap"] = rundir.relative(run_dir, row["niah"]["heatmap"])
                        results["retrieval"].update(found)
                for v in new:
                    variants[v.name] = v
                    results["stages"][v.name] = v.record(run_dir)
                results["done"].append(st.name)
                write_json(results_file, results)
                log.info("[%d/%d] %s: done in %.1f s", i, len(cfg.stages), st.name, time.perf_counter() - t0)
            tables = ([results_table(results["perplexity"], variants)] if results["perplexity"] else []) + (
                [retrieval_table(results["retrieval"])] if results["retrieval"] else []) + (
                [zeroshot_table(results["lm_eval"])] if results["lm_eval"] else [])
            if tables:
                write_text(run_dir / "results.md", "\n".join(tables))
            status["status"] = "completed"
        except KeyboardInterrupt:
            status.update(status="stopped", step=stopped_step(run_dir))
            raise
        except BaseException as e:
            # status.json says what failed in one line; run.log keeps the traceback of what is not ours.
            ours = isinstance(e, MaskpipeError)
            first = (str(e).splitlines() or [""])[0]
            status.update(status="failed", step=stopped_step(run_dir),
                          error=first if ours else f"{type(e).__name__}: {first}")
            log.error("%s: failed: %s", status["stage"], status["error"], exc_info=not ours)
            raise
        finally:
            status["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            write_json(run_dir / "status.json", status)
            log_results(run_dir, cfg.logging, results, status["status"])
    return run_dir
