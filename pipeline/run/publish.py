"""Publishing an artifact: a folder ready for the Hugging Face Hub, the artifact plus a model card.

The card (`README.md`) opens with YAML front matter rendered by huggingface_hub's `ModelCardData`
(base model, license, library, tags, and `model-index`: every number the run measured for the artifact,
with the dataset and the protocol, as `EvalResult`s), then says what the artifact is for (base model, revision, fingerprint), how
well it does (the run's perplexity and retrieval, beside the dense model and the one-shot baselines),
how it was made (method, data, tokens, config) and how to apply it, in three lines.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.attention.dynamic_masks import SCORER_FILE, DynamicMask, card_lines
from maskpipe.pipeline.io.artifacts import (
    LOGITS_FILE,
    MANIFEST_FILE,
    MASKS_FILE,
    atomic_dir,
    check_compatible,
    check_replaceable,
    load_artifact,
    load_soft_logits,
)
from maskpipe.pipeline.io.hub import hub_ref
from maskpipe.pipeline.run.results import Results, card_tables
from maskpipe.pipeline.io.rundir import RunDir

CARD = "README.md"


def is_run(path: Path) -> bool:
    return RunDir(path).config.is_file() and RunDir(path).results.is_file()


def resolve(source: str | Path, stage: str | None = None) -> tuple[Path, Path | None]:
    """(artifact directory, its run directory or None) for a run directory (its learned artifact, or
    `stage`'s) or an artifact directory (inside a run's `artifacts/` or on its own)."""
    source = Path(source)
    if (source / MANIFEST_FILE).is_file():
        run = RunDir.holding(source)
        return source, run.root if run is not None and is_run(run.root) else None
    if not is_run(source):
        raise MaskpipeError(f"{source}: neither a run directory (config.yaml and results.json) nor a mask artifact "
                            f"({MANIFEST_FILE})")
    run = RunDir(source)
    results = Results.read(run.results)
    stages = results.stages
    if stage is None:
        learned = results.learned()
        if len(learned) != 1:
            raise MaskpipeError(f"{source}: {'several learned artifacts' if learned else 'no learned artifact'} "
                                f"({', '.join(learned or stages) or 'no stage wrote one'}): choose one with --stage")
        stage = learned[0]
    if stage not in stages or not (run.artifact(stage) / MANIFEST_FILE).is_file():
        raise MaskpipeError(f"{source}: no artifact of a stage {stage!r} (have: {', '.join(stages) or 'none'})")
    return run.artifact(stage), source


SERVING = ("A mask changes no storage format: `maskpipe apply --out` writes the weights ⊙ mask as an ordinary dense "
           "checkpoint (zeros where the mask drops a weight), and serving engines load it as a dense model, with "
           "no speed-up: current vLLM does (its 2:4 sparse path was removed). Where a 2:4 "
           "speed-up exists is PyTorch's semi-structured sparse kernels (`torch.sparse.to_sparse_semi_structured`, "
           "torchao), on GPUs of compute capability 8.0 or newer: `pipeline.nm.sparsity.to_semi_structured` converts "
           "the masked linears of a loaded model. An attention plan needs maskpipe's attention implementation "
           "(or DuoAttention's own code: `maskpipe export duo-attention`); so does a dynamic attention mask "
           "(`pipeline.attention.dynamic_masks`: masked attention, and decoding with a KV cache evicted to its budget).")


def _dataset(corpus: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """The model-index dataset of a perplexity corpus: the hub dataset (with its config and split) where
    the corpus is one, else the corpus's name, its local sources in `dataset_args`."""
    sources = ((config or {}).get("data") or {}).get(corpus, {}).get("sources", [])
    sources = [src if isinstance(src, dict) else {"path": src} for src in sources]
    if len(sources) == 1 and hub_ref(str(sources[0].get("path", ""))) is not None:
        src = sources[0]
        return {"dataset_type": src["path"], "dataset_config": src.get("name"), "dataset_split": src.get("split")}
    paths = [str(src.get("path")) for src in sources if src.get("path")]
    return {"dataset_type": corpus, "dataset_args": {"sources": ", ".join(paths)} if paths else None}


def eval_results(results: Results | None, stage: str, config: dict[str, Any] | None) -> list[EvalResult]:
    """Every number the run measured for `stage` as model-index entries: perplexity per corpus (with
    its protocol: window length, stride, tokens scored), retrieval exact match per task, and every
    lm-eval metric per task (acc, acc_norm, ...; with the number of shots)."""
    if results is None:
        return []
    out = []
    for corpus, cell in results.perplexity.get(stage, {}).items():
        protocol = {k: getattr(cell, k) for k in ("seqlen", "stride", "tokens", "windows") if getattr(cell, k)}
        out.append(EvalResult(task_type="text-generation", task_name="Language modeling (perplexity)",
                              dataset_name=corpus, **_dataset(corpus, config), metric_type="perplexity",
                              metric_name=f"Perplexity ({corpus})", metric_value=round(cell.ppl, 4),
                              metric_args=protocol or None))
    for task, row in results.retrieval.get(stage, {}).items():
        if isinstance(row, dict) and "acc" in row:
            out.append(EvalResult(task_type="text-generation", task_name="Long-context retrieval",
                                  dataset_type=f"maskpipe/{task}", dataset_name=f"{task} (synthetic)",
                                  metric_type="exact_match", metric_name=f"{task} exact match",
                                  metric_value=round(row["acc"], 4), metric_args={"samples": row.get("n")}))
    for task, row in results.lm_eval.get(stage, {}).items():
        shots = row.get("num_fewshot")
        for metric, value in row.items():
            if metric in ("n", "num_fewshot") or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            out.append(EvalResult(task_type="text-generation", task_name="Zero-shot tasks (lm-evaluation-harness)",
                                  dataset_type=task, dataset_name=task, metric_type=metric,
                                  metric_name=f"{metric} ({task})", metric_value=round(value, 4),
                                  metric_config=f"{shots or 0}-shot", metric_args={"num_fewshot": shots or 0},
                                  source_name="lm-evaluation-harness",
                                  source_url="https://github.com/EleutherAI/lm-evaluation-harness"))
    return out


FILES = {MASKS_FILE: "the masks, encoded as the manifest says", MANIFEST_FILE: "format, base model, layers, "
         "checksums, method, data, config", LOGITS_FILE: "the learned logits (soft state), to seed another mask",
         SCORER_FILE: "the dynamic attention mask's learned key scorer (float32 w, A)"}


def model_card(manifest: dict[str, Any], results: Results | None, stage: str, *, repo: str | None,
               base_model: str, license: str, files: list[tuple[str, int, str]]) -> ModelCard:
    """The card of an artifact; `files` lists (name, bytes, what) of the files published with it."""
    masks_bytes = next(size for name, size, _ in files if name == MASKS_FILE)
    base = manifest["base_model"]
    pattern, method = manifest["pattern"], manifest["method"]
    weights = sum(math.prod(info["shape"]) for info in manifest["layers"].values())
    tags = ["maskpipe", "sparsity", "pruning", *([pattern] if pattern else []), method.get("name", "mask")]
    if "attention" in manifest:
        tags.append("attention-plan")
    if "dynamic" in manifest:
        tags.append("dynamic-attention")
    evals = eval_results(results, stage, manifest.get("config"))
    data = ModelCardData(model_name=repo or stage, base_model=base_model if hub_ref(base_model) is not None else None,
                         license=license, tags=tags, library_name="maskpipe",
                         metrics=sorted({e.metric_type for e in evals}) or None, eval_results=evals or None)
    head = "a dynamic attention mask" if "dynamic" in manifest else "a per-head attention plan"
    what = f"a {pattern} sparsity mask" if pattern else head
    if pattern and ("attention" in manifest or "dynamic" in manifest):
        what += f" and {head}"
    revision = base.get("revision") or "none recorded (the default branch, or a local copy)"
    body = [f"# {stage}: {what} for {base_model}", "",
            f"{what[0].upper() + what[1:]} over the frozen weights of `{base_model}`, made with maskpipe "
            f"(method `{method.get('name')}`). It holds no weights: anyone with the base model can apply it, "
            "export a sparse model from it, or start another task's mask from it."]
    if pattern:
        encoding = manifest["encoding"]  # format 1 names it with a bare string
        body += ["", f"{len(manifest['layers'])} linear layers, {weights:,} weights masked, stored in "
                     f"{masks_bytes:,} bytes ({masks_bytes * 8 / weights:.3f} bits per weight; encoding "
                     f"`{encoding['name'] if isinstance(encoding, dict) else encoding}`)."]
    body += ["", "## Base model", "", "| | |", "| --- | --- |",
             f"| model | `{base['name_or_path']}` |", f"| revision | {revision} |",
             f"| architecture | {base.get('architecture', '')} |",
             f"| fingerprint | `{base['fingerprint']}` |", "",
             "The fingerprint is a sha256 over the names, shapes and bfloat16 bytes of the base weights the artifact "
             "was made for (the masked layers; for a plan, every decoder linear): `maskpipe apply` refuses it on any "
             "other model, or on other shapes, before touching anything."]
    if "dynamic" in manifest:
        body += ["", "## Dynamic attention mask", "",
                 "Each KV head keeps, per query, a budget of keys chosen by score; decoding evicts the rest from "
                 "the KV cache.", ""] + card_lines(manifest["dynamic"])
    if results is not None:
        body += ["", "## Results", ""] + card_tables(results, stage)
    else:
        body += ["", "## Results", "", "No evaluation was recorded with this artifact (published without its run)."]
    params = method.get("params", {})
    data_info = manifest["data"]
    facts = {"method": method.get("name"), "pattern": pattern, "prior": method.get("prior") or None,
             "corpus": data_info.get("corpus"), "sources": ", ".join(data_info.get("sources", [])) or None,
             "tokens": f"{data_info['tokens']:,}" if "tokens" in data_info else None,
             **{k: params[k] for k in ("steps", "batch_size", "seqlen", "lr", "n_samples") if k in params},
             "time (s)": method.get("seconds"), "workers": method.get("workers")}
    body += ["", "## How it was made", "", "| | |", "| --- | --- |"]
    body += [f"| {k} | {json.dumps(v) if isinstance(v, dict) else v} |" for k, v in facts.items()
             if v not in (None, "")]
    if manifest.get("config"):
        body += ["", "<details><summary>Full config</summary>", "", "```yaml",
                 yaml.safe_dump(manifest["config"], sort_keys=False).rstrip(), "```", "", "</details>"]
    body += ["", "## Files", "", "| file | bytes | what |", "| --- | --- | --- |"]
    body += [f"| `{name}` | {size:,} | {what} |" for name, size, what in files]
    folder = repo.split("/")[-1] if repo else stage
    rev = f" --revision {base['revision']}" if base.get("revision") else ""
    body += ["", "## How to apply", "", "```bash",
             f"hf download {repo or 'REPO_ID'} --local-dir {folder}",
             f"maskpipe apply --model {base_model}{rev} --masks {folder} --out {folder}-sparse",
             f"python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('{folder}-sparse')\"",
             "```", "",
             "`apply` checks the fingerprint and shapes, then writes the weights ⊙ mask as a model directory that "
             "transformers loads (its `config.json` records the sparsity). It also takes several artifacts "
             "that mask different layers. To start a new task's mask from this one, give a learn stage "
             f"`prior: {{artifact: {folder}}}`" + (" (add `soft: true` to start from its stored logits)."
                                                  if manifest.get("soft") else ".")]
    body += ["", "## Serving", "", SERVING]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n".join(body) + "\n")


def publish(artifact: Path, run: Path | None, out: str | Path, *, repo: str | None = None,
            base_model: str | None = None, license: str = "apache-2.0", model: str | None = None) -> Path:
    """Write `out`: the files of `artifact` and its model card (with the results of `run`), atomically.
    Before anything is written, `out` must be a new folder or an earlier publish outside any run's
    artifacts, and the artifact must verify (`verify`; and `check_base_model`, against `model` or the
    local base model it names)."""
    check_out(out)
    manifest = verify(artifact)
    check_base_model(artifact, manifest, model)
    results = Results.read(RunDir(run).results) if run else None
    files = [(name, (artifact / name).stat().st_size, what) for name, what in FILES.items()
             if (artifact / name).is_file()]
    card = model_card(manifest, results, artifact.name, repo=repo,
                      base_model=base_model or manifest["base_model"]["name_or_path"], license=license, files=files)
    with atomic_dir(out, replaces=MANIFEST_FILE) as tmp:
        for name, _, _ in files:
            shutil.copyfile(artifact / name, tmp / name)
        card.save(tmp / CARD)
    return Path(out)


def check_out(out: str | Path) -> None:
    """Refuse an `--out` inside a run directory's `artifacts/` (a run's own outputs are the run's) or an
    existing folder that is not an earlier publish (it has no model card), before any work."""
    out = Path(out).resolve()
    for p in (out, *out.parents):
        if p.name == "artifacts" and RunDir(p.parent).config.is_file():
            raise MaskpipeError(f"--out {out}: inside the artifacts of run {p.parent}; publish writes a folder of its "
                                "own (choose a directory outside the run's artifacts)")
    check_replaceable(out, MANIFEST_FILE, accept=lambda marker: (marker.parent / CARD).is_file(),
                      what="`maskpipe publish` folder")


def verify(artifact: Path) -> dict[str, Any]:
    """The manifest of `artifact` once what publish copies checks out: every layer's mask against its
    checksum, shape and pattern, and the stored logits (if any) readable, one per layer, with the
    shape [out, in/M, C(M,N)] the manifest's layers and pattern imply."""
    _, manifest = load_artifact(artifact)
    if "dynamic" in manifest:  # its scorer against the checksums the manifest lists
        DynamicMask.from_json(manifest["dynamic"], artifact, str(artifact))
    if "soft" not in manifest and not (artifact / LOGITS_FILE).exists():
        return manifest
    logits = load_soft_logits(artifact)
    n, m = map(int, manifest["pattern"].split(":"))
    if set(logits) != set(manifest["layers"]):
        raise MaskpipeError(f"{artifact / LOGITS_FILE}: holds logits for other layers than {MANIFEST_FILE} lists "
                            "(corrupted artifact)")
    for name, info in manifest["layers"].items():
        rows, cols = info["shape"]
        want = [rows, cols // m, math.comb(m, n)]
        if list(logits[name].shape) != want:
            raise MaskpipeError(f"{artifact / LOGITS_FILE}: {name}: logits of shape {list(logits[name].shape)} where "
                                f"the manifest implies {want} (corrupted artifact)")
    return manifest


def model_at_hand(manifest: dict[str, Any], model: str | None = None) -> str | None:
    """The model to check an artifact against: `model` if given, else the base model its manifest names
    when that is a local folder here; None for a hub id or a folder of another machine."""
    if model is not None:
        return model
    name = manifest["base_model"]["name_or_path"]
    return name if Path(name).expanduser().is_dir() else None


def check_base_model(artifact: Path, manifest: dict[str, Any], model: str | None = None) -> None:
    """Check the artifact's fingerprint and shapes against the model at hand (`model_at_hand`): a
    published mask that fits no model would otherwise be found out only by whoever downloads it. The
    weights are read one tensor at a time from their safetensors (a meta load), never the whole model."""
    from maskpipe.pipeline.attention.plans import check_plan
    from maskpipe.pipeline.core.models import decoder_linears, load_model
    from maskpipe.pipeline.core.schema import ModelConfig

    base = manifest["base_model"]
    model = model_at_hand(manifest, model)
    if model is None:
        return
    remote = bool(((manifest.get("config") or {}).get("model") or {}).get("trust_remote_code"))
    cfg = ModelConfig(name_or_path=model, revision=base.get("revision") if model == base["name_or_path"] else None,
                      dtype="float32", device="cpu", trust_remote_code=remote)
    loaded = load_model(cfg, meta=True)
    check_compatible(manifest, decoder_linears(loaded), str(artifact))
    if "attention" in manifest:
        check_plan(manifest["attention"], loaded, str(artifact))


def push(folder: str | Path, repo: str, dry_run: bool = False) -> list[str]:
    """Upload `folder` to the Hub model repo `repo` (created if missing; the token comes from the
    environment, HF_TOKEN, or a saved login). With `dry_run`, only list what would go."""
    from huggingface_hub import HfApi

    files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    if not dry_run:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                          commit_message=f"maskpipe publish: {', '.join(files)}")
    return files
