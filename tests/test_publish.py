import json
import re
import shutil
import tomllib

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from maskpipe.jobs.cli import main
from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, MASKS_FILE, load_artifact
from maskpipe.pipeline.config import load_config
from maskpipe.pipeline.run.runner import run
from tests.conftest import MICRO, ROOT

STAGES = ("stages=[{stage: oneshot, method: magnitude}, {stage: learn, name: maskllm, data: calib, "
          "prior: {stage: magnitude}, steps: 2, batch_size: 2, seqlen: 64}, "
          "{stage: eval, data: [kjv], seqlen: 128, batch_size: 8}, {stage: retrieval, passkey: {lengths: [96], samples: 2}}]")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run: a one-shot baseline, a learned mask from it, perplexity and passkey retrieval."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        return run(load_config("configs/tiny.yaml", [STAGES, "workers.num_workers=0"]),
                   tmp_path_factory.mktemp("pub") / "run")


def test_publish_a_run_writes_the_artifact_and_a_card_with_results_and_how_to_apply(run_dir, tmp_path, capsys):
    out = tmp_path / "card"
    assert main(["publish", str(run_dir), "--out", str(out), "--base-model", "acme/micro-llama", "--license",
                 "apache-2.0", "--push", "acme/micro-llama-2of4", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"{run_dir / 'artifacts' / 'maskllm'} (run {run_dir}): published to {out}" in printed
    assert "would upload to https://huggingface.co/acme/micro-llama-2of4: README.md, logits.safetensors, " \
           "manifest.json, masks.safetensors" in printed
    for name in (MASKS_FILE, MANIFEST_FILE, "logits.safetensors"):
        assert (out / name).read_bytes() == (run_dir / "artifacts" / "maskllm" / name).read_bytes()

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "acme/micro-llama" and card.data.license == "apache-2.0"
    assert {"sparsity", "2:4", "pruning", "maskllm"} <= set(card.data.tags)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["base_model"]["fingerprint"] in card.text
    # the metrics table: dense, the one-shot baseline and this artifact, perplexity vs dense and passkey
    ppl = json.loads((run_dir / "results.json").read_text())["perplexity"]
    dense, mag, learned = (ppl[v]["kjv"]["ppl"] for v in ("dense", "magnitude", "maskllm"))
    assert "| variant | PPL kjv | passkey (exact match) |" in card.text
    assert f"| dense | {dense:.2f} | 1.00 |" in card.text
    assert f"| magnitude | {mag:.2f} ({mag / dense - 1:+.1%} vs dense) | 1.00 |" in card.text
    assert f"| **maskllm (this artifact)** | {learned:.2f} ({learned / dense - 1:+.1%} vs dense) | 1.00 |" in card.text
    closed = (mag - learned) / (mag - dense)
    assert f"maskllm closes {closed:.0%} of the gap between the best one-shot mask (magnitude)" in card.text
    # how it was made: method, tokens, data, the full config
    assert "| tokens | 256 |" in card.text and "| steps | 2 |" in card.text and "kjv.train.txt" in card.text
    assert "```yaml\nname: tiny\n" in card.text
    # how to apply: three lines
    snippet = re.search(r"## How to apply\n\n```bash\n(.*?)```", card.text, re.S).group(1).strip().splitlines()
    assert snippet == [
        "hf download acme/micro-llama-2of4 --local-dir micro-llama-2of4",
        "maskpipe apply --model acme/micro-llama --masks micro-llama-2of4 --out micro-llama-2of4-sparse",
        "python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('micro-llama-2of4-sparse')\"",
    ]


def test_the_published_folder_is_an_artifact_that_applies(run_dir, tmp_path, capsys):
    out = tmp_path / "magnitude-card"
    assert main(["publish", str(run_dir), "--stage", "magnitude", "--out", str(out)]) == 0
    assert "card has no base_model" in capsys.readouterr().err  # a local path is no hub id
    assert "base_model" not in ModelCard.load(out / "README.md").data.to_dict()
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"  # maskpipe's own license by default
    masks, _ = load_artifact(out)
    expected, _ = load_artifact(run_dir / "artifacts" / "magnitude")
    assert all(torch.equal(masks[k], expected[k]) for k in expected)
    assert main(["apply", "--model", str(MICRO), "--dtype", "float32", "--masks", str(out)]) == 0
    assert "28 layers at 2:4, 50.00% of their weights masked" in capsys.readouterr().out
    # publishing again replaces the folder; an artifact outside a run has no results to show
    assert main(["publish", str(run_dir / "artifacts" / "maskllm"), "--out", str(out)]) == 0
    assert "**maskllm (this artifact)**" in (out / "README.md").read_text()
    standalone = tmp_path / "alone"
    (standalone / "a").mkdir(parents=True)
    for f in (run_dir / "artifacts" / "magnitude").iterdir():
        (standalone / "a" / f.name).write_bytes(f.read_bytes())
    assert main(["publish", str(standalone / "a"), "--out", str(tmp_path / "alone-card")]) == 0
    assert "No evaluation was recorded with this artifact" in (tmp_path / "alone-card" / "README.md").read_text()


def test_push_uploads_the_folder_with_huggingface_hub(run_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw)))
    out = tmp_path / "pushed"
    assert main(["publish", str(run_dir), "--out", str(out), "--push", "acme/m"]) == 0
    assert calls[0] == ("create_repo", "acme/m", {"repo_type": "model", "exist_ok": True})
    assert calls[1][0] == "upload_folder"
    assert {k: calls[1][1][k] for k in ("repo_id", "folder_path", "repo_type")} == {
        "repo_id": "acme/m", "folder_path": str(out), "repo_type": "model"}
    calls.clear()
    assert main(["publish", str(run_dir), "--out", str(out), "--push", "acme/m", "--dry-run"]) == 0
    assert calls == []


def test_publish_refuses_what_it_cannot_pick(run_dir, tmp_path, capsys):
    assert main(["publish", str(run_dir), "--stage", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "no artifact of a stage 'nope' (have: magnitude, maskllm)" in capsys.readouterr().err
    results = json.loads((run_dir / "results.json").read_text())
    two = tmp_path / "two"
    (two / "artifacts").mkdir(parents=True)
    (two / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    results["stages"]["again"] = results["stages"]["maskllm"]
    (two / "results.json").write_text(json.dumps(results))
    assert main(["publish", str(two), "--out", str(tmp_path / "o")]) == 2
    assert "several learned artifacts (maskllm, again): choose one with --stage" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_package_is_apache_2_0_licensed_and_ships_the_license_text():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_the_cards_model_index_holds_every_number_the_run_measured_for_the_artifact(run_dir, tmp_path):
    from huggingface_hub import metadata_load

    # the run plus lm-eval rows for its learned mask, as an lm_eval stage writes them
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    results = json.loads((run / "results.json").read_text())
    results["lm_eval"] = {"maskllm": {"rte": {"acc": 0.52, "acc_stderr": 0.03, "n": 277, "num_fewshot": 0},
                                      "hellaswag": {"acc": 0.31, "acc_stderr": 0.01, "acc_norm": 0.36,
                                                    "acc_norm_stderr": 0.01, "n": 100, "num_fewshot": 0}}}
    (run / "results.json").write_text(json.dumps(results))
    out = tmp_path / "card"
    assert main(["publish", str(run), "--out", str(out), "--base-model", "acme/micro-llama",
                 "--push", "acme/micro-2of4", "--dry-run"]) == 0

    card = ModelCard.load(out / "README.md")
    assert card.data.license == "apache-2.0" and card.data.library_name == "maskpipe"
    assert metadata_load(out / "README.md")["model-index"][0]["name"] == "acme/micro-2of4"
    evals = card.data.eval_results
    assert evals is not None
    found = {(e.dataset_name, e.metric_type): e for e in evals}
    ppl = results["perplexity"]["maskllm"]["kjv"]
    passkey = results["retrieval"]["maskllm"]["passkey"]["acc"]
    assert {k: e.metric_value for k, e in found.items()} == {
        ("kjv", "perplexity"): round(ppl["ppl"], 4), ("passkey (synthetic)", "exact_match"): passkey,
        ("rte", "acc"): 0.52, ("hellaswag", "acc"): 0.31, ("hellaswag", "acc_norm"): 0.36}
    # the dataset and the protocol
    kjv = found[("kjv", "perplexity")]
    assert kjv.dataset_type == "kjv" and "kjv.valid.txt" in kjv.dataset_args["sources"]
    assert kjv.metric_args == {"seqlen": 128, "tokens": ppl["tokens"], "windows": ppl["windows"]}
    assert found[("hellaswag", "acc_norm")].metric_config == "0-shot"
    assert found[("hellaswag", "acc_norm")].source_name == "lm-evaluation-harness"
    assert set(card.data.metrics) == {"perplexity", "exact_match", "acc", "acc_norm"}
