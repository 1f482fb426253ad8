"""Running a recipe: the stages a config lists, in order, into a run directory.

A run directory holds `config.yaml` (the resolved config), `run.log`, `status.json`, `metrics.jsonl`
(every logged training step), one mask artifact per mask-producing stage under `artifacts/`, the last
checkpoints of each learning stage, and `results.json` + `results.md`.

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
from safetensors.torch import load_file, save_file

from pipeline import MaskpipeError, __version__
from pipeline.artifacts import (check_compatible, check_disjoint, load_artifact, load_soft_logits, read_manifest,
                                save_artifact, write_json, write_text)
from pipeline.attention import (AttentionPlan, binarize, check_plan, default_sink_window, kv_heads, moa_windows,
                                plan_cost, planned, random_scores, train_gates, uniform_plan)
from pipeline.checkpoint import CheckpointDir
from pipeline.config import (AttentionStage, Config, EvalStage, LearnStage, ModelConfig, OneshotStage, RetrievalStage,
                             dump_config)
from pipeline.data import TokenStream, calibration_blocks, eval_text
from pipeline.evaluate import Perplexity, perplexity
from pipeline.learn import hard_mask, train_masks
from pipeline.models import base_weight, fingerprint, load_model, load_tokenizer, prunable_linears
from pipeline.oneshot import oneshot_masks
from pipeline.plan import model_shape, plan_report
from pipeline.retrieval import (accuracy, multikey_samples, niah_heatmap, niah_samples, passkey_samples, score,
                                split_sentences)
from pipeline.sparsity import masked

log = logging.getLogger("maskpipe")


@dataclass
class Variant:
    """A way of running the base model: dense, masked by an artifact, or (baseline rows only) with
    weights SparseGPT updated, which no artifact carries."""

    name: str
    artifact: Path | None = None
    updated_weights: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {**self.info, "artifact": str(self.artifact) if self.artifact else None,
                "updated_weights": str(self.updated_weights) if self.updated_weights else None}

    @classmethod
    def from_record(cls, name: str, rec: dict[str, Any]) -> Variant:
        info = {k: v for k, v in rec.items() if k not in ("artifact", "updated_weights")}
        return cls(name, artifact=Path(rec["artifact"]) if rec.get("artifact") else None,
                   updated_weights=Path(rec["updated_weights"]) if rec.get("updated_weights") else None, info=info)


class Session:
    """A model, its tokenizer and prunable linears, loaded once and shared by a run's stages."""

    def __init__(self, model_cfg: ModelConfig):
        self.model_cfg = model_cfg
        self.tokenizer = load_tokenizer(model_cfg)
        self.model = load_model(model_cfg)
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
    n, m = cfg.stage_pattern(st)
    init_masks = None
    if st.mask_from is not None:
        init_masks, manifest = s.load_artifact(out_dir / st.mask_from)
        if manifest["pattern"] != f"{n}:{m}":
            raise MaskpipeError(f"{st.name}: mask_from: {st.mask_from} is {manifest['pattern']}, "
                                f"the stage makes {n}:{m}")
    calib, data_info = None, {}
    if st.data is not None:
        calib = calibration_blocks(cfg.data[st.data], s.tokenizer, st.n_samples, st.seqlen, cfg.seed)
        data_info = {"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources],
                     "n_samples": st.n_samples, "seqlen": st.seqlen, "tokens": calib.numel()}
    log.info("%s: %s %d:%d over %d linears", st.name, st.method, n, m, len(s.linears))
    t0 = time.perf_counter()
    masks, updated = oneshot_masks(
        s.model, s.linears, st.method, n, m, calib, batch_size=st.batch_size,
        weight_update=st.weight_update, blocksize=st.blocksize, percdamp=st.percdamp, init_masks=init_masks,
        max_cycles=st.max_cycles,
    )
    seconds = time.perf_counter() - t0
    dsnot_only = {"mask_from", "max_cycles"} if st.mask_from is None else set()
    params = st.model_dump(exclude={"stage", "name", "data"} | dsnot_only)
    artifact = save_artifact(
        out_dir / st.name, masks, s.linears, base_model=s.base_model_info(), pattern=f"{n}:{m}",
        method={"name": st.method, "params": params, "seconds": round(seconds, 2)},
        data=data_info, config=cfg.model_dump(mode="json"),
    )
    log.info("%s: mask artifact written to %s (%.1f s)", st.name, artifact, seconds)
    info = {"method": st.method, "pattern": f"{n}:{m}", "seconds": round(seconds, 2),
            "tokens": data_info.get("tokens", 0), **({"prior": st.mask_from} if st.mask_from else {})}
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


class MetricsLog:
    """A learning stage's `on_log`: the run log, `metrics.jsonl` and, if asked, TensorBoard events.
    On a resume, lines past the checkpoint's step are dropped: the resumed run logs them again."""

    def __init__(self, run_dir: Path, stage: str, tensorboard: bool = False):
        self.path, self.stage = run_dir / "metrics.jsonl", stage
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard" / stage))

    def __call__(self, entry: dict) -> None:
        log.info("%s: %s", self.stage, " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in entry.items()))
        if "resumed_from_step" in entry:
            keep = [line for line in read_metrics(self.path)
                    if line["stage"] != self.stage or line["step"] <= entry["resumed_from_step"]]
            write_text(self.path, "".join(json.dumps(line) + "\n" for line in keep))
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"stage": self.stage, **entry}) + "\n")
        if self.writer is not None:
            for k, v in entry.items():
                if k != "step":
                    self.writer.add_scalar(f"{self.stage}/{k}", v, entry["step"])
            self.writer.flush()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def learn_stage(cfg: Config, s: Session, st: LearnStage, out_dir: Path, prior: Path | None, store, on_log,
                rank: int = 0, world_size: int = 1) -> list[Variant]:
    """MaskLLM mask learning from `prior` (an artifact, or None), resuming from `store`; the caller's
    rank among `world_size` data-parallel workers (each its share of every batch). Rank 0 writes the
    artifact to `out_dir / st.name` and returns its variant; other ranks return nothing."""
    n, m = cfg.stage_pattern(st)
    priors = init_logits = None
    prior_info: dict[str, Any] = {}
    if prior is not None:
        priors, manifest = s.load_artifact(prior)
        if manifest["pattern"] != f"{n}:{m}":
            raise MaskpipeError(f"{st.name}: prior {prior} is {manifest['pattern']}, the stage learns {n}:{m}")
        if st.prior.soft:
            init_logits, priors = load_soft_logits(prior), None
        prior_info = {"artifact": str(prior), "method": manifest["method"].get("name"),
                      "strength": st.prior.strength, "soft": st.prior.soft}
    stream = TokenStream(cfg.data[st.data], s.tokenizer, st.seqlen, cfg.seed, rank, world_size)
    tokens = st.steps * st.grad_accum * st.batch_size * st.seqlen
    log.info("%s: learning %d:%d masks for %d linears, %d steps, %d tokens on %d worker(s)", st.name, n, m,
             len(s.linears), st.steps, tokens, world_size)
    if rank == 0:
        device = base_weight(next(iter(s.linears.values()))).device
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
    masks = {k: hard_mask(v, n, m).reshape(shapes[k]) for k, v in logits.items()}
    soft = {k: v.to(getattr(torch, st.save_logits)) for k, v in logits.items()} if st.save_logits else None
    artifact = save_artifact(
        out_dir / st.name, masks, s.linears, base_model=base_model, pattern=f"{n}:{m}",
        method={"name": "maskllm", "params": st.model_dump(mode="json", exclude={"stage", "name", "data"}),
                "prior": prior_info, "seconds": round(seconds, 2), "workers": world_size,
                "final": history[-1] if history else {}},
        data={"corpus": st.data, "sources": [x.path for x in cfg.data[st.data].sources], "tokens": tokens},
        config=cfg.model_dump(mode="json"), soft_logits=soft,
    )
    log.info("%s: mask artifact written to %s (%.1f s)", st.name, artifact, seconds)
    return [learned_variant(st, artifact)]


def learned_variant(st: LearnStage, artifact: Path) -> Variant:
    """A learning stage's row, read back from its artifact (all that a worker group leaves behind)."""
    manifest = read_manifest(artifact)
    method = manifest["method"]
    info = {"method": "maskllm", "pattern": manifest["pattern"], "seconds": method["seconds"],
            "tokens": manifest["data"]["tokens"], "workers": method["workers"],
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
                    variants: dict[str, Variant]) -> list[Variant]:
    """A per-head attention plan: learned gates (resuming from `store`), an earlier stage's gates
    re-binarised, or random scores; written as an artifact with the N:M masks of `st.masks`."""
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
                                         store=store, on_log=on_log)
        scores = gates
    seconds = time.perf_counter() - t0
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
    info = {"method": f"attention-{st.method}", "streaming": plan.streaming_fraction(), "sink": sink,
            "window": st.windows or window, "seconds": round(seconds, 2), "tokens": tokens,
            "prior": st.gates_from or None}
    return [Variant(st.name, artifact=artifact, info=info)]


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
                records[task] = score(model, s.tokenizer, samples, desc=f"{v.name}/{task}")
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
        return learn_stage(cfg, self.session(cfg), st, run_dir / "artifacts", prior, store,
                           MetricsLog(run_dir, st.name, cfg.tensorboard))

    def attention(self, cfg: Config, st: AttentionStage, run_dir: Path, variants: dict[str, Variant]) -> list[Variant]:
        store = CheckpointDir(run_dir / "checkpoints" / st.name, st.keep_checkpoints)
        return attention_stage(cfg, self.session(cfg), st, run_dir / "artifacts", store,
                               MetricsLog(run_dir, st.name, cfg.tensorboard), variants)

    def evaluate(self, cfg: Config, st: EvalStage, run_dir: Path, variants: list[Variant]) -> dict[str, dict[str, dict]]:
        return eval_stage(cfg, self.session(cfg), st, variants)

    def retrieval(self, cfg: Config, st: RetrievalStage, run_dir: Path, variants: list[Variant]) -> dict[str, dict]:
        return retrieval_stage(cfg, self.session(cfg), st, variants, run_dir / "retrieval")


def run(cfg: Config, run_dir: Path | None = None, backend=None) -> Path:
    """Run every stage of `cfg` in order with `backend` (default: `LocalBackend`); returns the run
    directory.

    Given the directory of an interrupted run of the same config, it resumes: finished stages are
    skipped and a learning stage continues from its latest checkpoint."""
    backend = backend or LocalBackend()
    run_dir = Path(run_dir or new_run_dir(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    snapshot = dump_config(cfg)
    if (run_dir / "config.yaml").exists() and (run_dir / "config.yaml").read_text() != snapshot:
        raise MaskpipeError(f"{run_dir}: holds a run of another config; resume it with its own config.yaml")
    write_text(run_dir / "config.yaml", snapshot)
    status = {"status": "running", "stage": None, "maskpipe_version": __version__,
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_json(run_dir / "status.json", status)
    results_file = run_dir / "results.json"
    results: dict[str, Any] = (json.loads(results_file.read_text()) if results_file.exists()
                               else {"stages": {}, "perplexity": {}, "retrieval": {}, "done": []})
    results.setdefault("retrieval", {})  # a run directory from before retrieval stages existed
    variants: dict[str, Variant] = {"dense": Variant("dense")}
    variants |= {name: Variant.from_record(name, rec) for name, rec in results["stages"].items()}
    with logs_to(run_dir):
        try:
            for st in cfg.stages:
                if st.name in results["done"]:
                    log.info("%s: already done in %s, skipped", st.name, run_dir)
                    continue
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
                    else:
                        results["retrieval"].update(backend.retrieval(cfg, st, run_dir, chosen))
                for v in new:
                    variants[v.name] = v
                    results["stages"][v.name] = v.record()
                results["done"].append(st.name)
                write_json(results_file, results)
            tables = ([results_table(results["perplexity"], variants)] if results["perplexity"] else []) + (
                [retrieval_table(results["retrieval"])] if results["retrieval"] else [])
            if tables:
                write_text(run_dir / "results.md", "\n".join(tables))
            status["status"] = "completed"
        except KeyboardInterrupt:
            status["status"] = "stopped"
            raise
        except BaseException as e:
            status.update(status="failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            status["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            write_json(run_dir / "status.json", status)
    return run_dir
