import json
import os
import re
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from maskpipe.jobs.cli import main
from maskpipe.pipeline.io.artifacts import MASKS_FILE, load_artifact
from maskpipe.pipeline.config import load_config
from maskpipe.pipeline.run.runner import run
from tests.conftest import CORPORA, MICRO, ROOT


def test_validate_ok_and_error(in_root, capsys):
    assert main(["validate", "configs/tiny.yaml"]) == 0
    assert "configs/tiny.yaml: ok" in capsys.readouterr().out
    assert main(["validate", "configs/tiny.yaml", "sparsity.pattern=4:2"]) == 2
    assert 'configs/tiny.yaml: sparsity.pattern: expected "N:M" with 0<N<M, got "4:2"' in capsys.readouterr().err


@pytest.fixture(scope="module")
def wanda_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "wanda"
    assert main(["oneshot", "--model", str(MICRO), "--dtype", "float32", "--method", "wanda", "--pattern", "2:4",
                 "--data", str(CORPORA / "kjv.train.txt"), "--n-samples", "4", "--seqlen", "64",
                 "--out", str(out)]) == 0
    return out


def test_oneshot_eval_apply(wanda_artifact, tmp_path, capsys):
    masks, manifest = load_artifact(wanda_artifact)
    assert manifest["method"]["name"] == "wanda" and manifest["data"]["tokens"] == 4 * 64
    capsys.readouterr()
    assert main(["eval", "--model", str(MICRO), "--dtype", "float32", "--masks", str(wanda_artifact), "--dense",
                 "--data", str(CORPORA / "kjv.valid.txt"), "--seqlen", "128", "--out", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| dense |" in out and "| wanda |" in out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["wanda"]["eval"]["ppl"] > results["dense"]["eval"]["ppl"] > 1
    assert main(["apply", "--model", str(MICRO), "--dtype", "float32", "--masks", str(wanda_artifact),
                 "--out", str(tmp_path / "sparse")]) == 0
    assert "50.00% of their weights masked" in capsys.readouterr().out
    sparse = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    w = sparse.model.layers[0].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5)


def test_apply_out_writes_the_base_models_dtype_unless_dtype_is_given(wanda_artifact, tmp_path, capsys):
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(MICRO, dtype=torch.bfloat16).save_pretrained(bf16)
    for f in MICRO.glob("tokenizer*"):
        (bf16 / f.name).write_bytes(f.read_bytes())
    for base, flags, expected in ((MICRO, [], torch.float32), (bf16, [], torch.bfloat16),
                                  (MICRO, ["--dtype", "bfloat16"], torch.bfloat16)):
        out = tmp_path / f"sparse-{base.name}-{len(flags)}"
        assert main(["apply", "--model", str(base), *flags, "--masks", str(wanda_artifact), "--out", str(out)]) == 0
        assert json.loads((out / "config.json").read_text())["dtype"] == str(expected).removeprefix("torch.")
        sparse = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
        assert {p.dtype for p in sparse.parameters()} == {expected}
    capsys.readouterr()


def test_apply_refuses_other_model_and_corrupt_artifact(wanda_artifact, tmp_path, capsys):
    from transformers import LlamaConfig
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(LlamaConfig.from_pretrained(MICRO)).save_pretrained(other)
    for f in MICRO.glob("tokenizer*"):
        (other / f.name).write_bytes(f.read_bytes())
    assert main(["apply", "--model", str(other), "--masks", str(wanda_artifact), "--out", str(tmp_path / "o")]) == 2
    assert "fingerprint mismatch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in wanda_artifact.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / MASKS_FILE).write_bytes((broken / MASKS_FILE).read_bytes()[:100])
    assert main(["apply", "--model", str(MICRO), "--masks", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "unreadable" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["apply", "--model", str(tmp_path / "missing"), "--masks", str(broken)]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_rerun_of_a_finished_run_skips_its_stages(in_root, tmp_path):
    overrides = ["stages=[{stage: oneshot, method: magnitude}, {stage: eval, data: [kjv], seqlen: 128, batch_size: 8}]"]
    cfg = load_config("configs/tiny.yaml", overrides)
    run_dir = run(cfg, tmp_path / "run")
    first = json.loads((run_dir / "results.json").read_text())
    assert first["done"] == ["magnitude", "eval"] and set(first["perplexity"]) == {"dense", "magnitude"}
    stamp = (run_dir / "artifacts" / "magnitude" / MASKS_FILE).stat().st_mtime_ns
    run(cfg, run_dir)
    assert (run_dir / "artifacts" / "magnitude" / MASKS_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(Exception, match="holds a run of another config"):
        run(load_config("configs/tiny.yaml", overrides + ["seed=1"]), run_dir)


@pytest.mark.slow
def test_maskpipe_run_tiny_yaml(tmp_path):
    """The README's main command on the embedded default, as a user types it: a fresh process that
    starts its own local Ray instance."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    out = subprocess.run(["maskpipe", "run", "configs/tiny.yaml", "--run-dir", str(tmp_path / "tiny")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| dense |" in out.stdout and "| maskllm |" in out.stdout
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    for name in ("magnitude", "wanda", "sparsegpt", "maskllm"):
        load_artifact(tmp_path / "tiny" / "artifacts" / name)
    assert results["stages"]["maskllm"]["workers"] == 2
    ppl = results["perplexity"]
    assert ppl["dense"]["kjv"]["ppl"] < ppl["sparsegpt"]["kjv"]["ppl"]
    # the learned mask closes a good share of its prior's gap on both corpora (56% / 57% when measured in
    # one process, docs/RESULTS.md); with train excerpts from the head of each corpus it closed 26% / 36%
    for corpus in ("kjv", "pydocs"):
        assert ((ppl["sparsegpt"][corpus]["ppl"] - ppl["maskllm"][corpus]["ppl"])
                / (ppl["sparsegpt"][corpus]["ppl"] - ppl["dense"][corpus]["ppl"])) > 0.4
    assert json.loads((tmp_path / "tiny" / "status.json").read_text())["status"] == "completed"
    log = (tmp_path / "tiny" / "run.log").read_text()
    assert "resumed_from_step" not in log
    # the learn stage's log lines are its progress, from rank 0 of the Ray worker group
    assert re.search(r"maskllm: step 10/\d+ \(\d+%\), [\d,]+ tokens/s, ETA \d+m\d\ds \| loss=", log)


def test_learned_mask_transfers_as_a_prior_of_a_new_run(in_root, tmp_path):
    """A learned artifact starts another run's mask: by the prior rule on its hard mask, or from its
    stored logits (soft). With a negligible learning rate the new mask is the prior's."""
    learn = "{stage: learn, name: %s, data: calib, steps: 2, batch_size: 2, seqlen: 64, lr: 1.0e-12, %s}"
    source = run(load_config("configs/tiny.yaml", [
        "stages=[{stage: oneshot, method: magnitude}, "
        + learn % ("general", "prior: {stage: magnitude}, save_logits: float32") + "]"]), tmp_path / "a")
    general = source / "artifacts" / "general"
    prior_masks, _ = load_artifact(general)
    for prior in (f"{{artifact: {general}, strength: 100}}", f"{{artifact: {general}, soft: true}}"):
        target = run(load_config("configs/tiny.yaml", ["stages=[" + learn % ("domain", f"prior: {prior}") + "]"]),
                     tmp_path / f"b{len(prior)}")
        masks, manifest = load_artifact(target / "artifacts" / "domain")
        assert manifest["method"]["prior"]["artifact"] == str(general)
        assert all(torch.equal(masks[k], prior_masks[k]) for k in masks), prior
    with pytest.raises(Exception, match="prior .* is 2:4, the stage learns 4:8"):
        run(load_config("configs/tiny.yaml", ["stages=[" + learn % ("d", f"pattern: '4:8', prior: {{artifact: {general}}}")
                                              + "]"]), tmp_path / "c")


def test_weight_update_baseline_row_is_evaluated_and_the_base_restored(in_root, tmp_path):
    sgpt = "{stage: oneshot, name: %s, method: sparsegpt, data: calib, n_samples: 8, seqlen: 64, weight_update: %s}"
    cfg = load_config("configs/tiny.yaml", ["stages=[" + sgpt % ("mask", "false") + ", " + sgpt % ("wu", "true")
                                            + ", {stage: eval, data: [kjv], seqlen: 128, batch_size: 8}]"])
    results = json.loads((run(cfg, tmp_path / "r") / "results.json").read_text())
    ppl = {k: v["kjv"]["ppl"] for k, v in results["perplexity"].items()}
    assert results["stages"]["wu"]["weight_update"] is True
    # the fingerprint is checked before the updated weights go in; the update recovers what the mask costs
    assert ppl["dense"] < ppl["wu"] < ppl["mask"]
    assert "(weight update)" in (tmp_path / "r" / "results.md").read_text()


def test_attention_stages_and_retrieval_in_a_run(in_root, tmp_path, capsys):
    """configs/tiny-attention.yaml, shortened: learned, MoA, random and all-streaming plans, each an artifact
    that retrieval and perplexity stages evaluate beside the dense model; a rerun resumes nothing twice."""
    overrides = ["stages.0.steps=4", "stages.1.profile_batches=1", "stages.5.data=[kjv]", "stages.4.passkey.samples=2",
                 "stages.4.multikey.samples=1", "stages.4.niah.depths=[0.0, 1.0]", "stages.4.niah.samples=1"]
    assert main(["run", "configs/tiny-attention.yaml", *overrides, "--run-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| dense |" in out and "| duo50 |" in out and "KV cache at 320" in out
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    variants = {"dense", "duo50", "moa50", "random50", "all-streaming"}
    assert set(results["retrieval"]) == set(results["perplexity"]) == variants
    cost = {k: v["cost"] for k, v in results["retrieval"].items()}
    assert cost["dense"]["kv_cache_fraction"] == 1.0
    assert cost["moa50"]["kv_cache_bytes"] <= cost["duo50"]["kv_cache_bytes"]  # MoA spends the same budget per head
    assert cost["duo50"]["kv_cache_bytes"] == cost["random50"]["kv_cache_bytes"] < cost["dense"]["kv_cache_bytes"]
    assert cost["all-streaming"]["attention_flops"] < cost["duo50"]["attention_flops"]
    _, manifest = load_artifact(tmp_path / "r" / "artifacts" / "duo50")
    heads = [h for layer in manifest["attention"]["layers"] for h in layer]
    assert sum(h["pattern"] == "streaming" for h in heads) == len(heads) // 2
    assert all(0 <= h["gate"] <= 1 and h["sink"] == 4 and h["window"] == 32 for h in heads)
    assert (tmp_path / "r" / "retrieval" / "retrieval" / "duo50-niah.png").is_file()
    # the artifact is usable outside the run, by the retrieval command
    assert main(["retrieval", "--model", "tests/fixtures/models/micro-llama", "--dtype", "float32", "--masks",
                 str(tmp_path / "r" / "artifacts" / "duo50"), "--passkey", "192", "--samples", "2",
                 "--out", str(tmp_path / "cli")]) == 0
    assert "| duo50 |" in capsys.readouterr().out


def test_one_artifact_carries_nm_masks_and_an_attention_plan(in_root, tmp_path, capsys):
    stages = ("stages=[{stage: oneshot, method: magnitude}, {stage: attention, name: both, method: random, "
              "masks: magnitude, seqlen: 128}, {stage: retrieval, passkey: {lengths: [96], samples: 2}}]")
    run_dir = run(load_config("configs/tiny.yaml", [stages]), tmp_path / "r")
    masks, manifest = load_artifact(run_dir / "artifacts" / "both")
    magnitude, _ = load_artifact(run_dir / "artifacts" / "magnitude")
    assert manifest["pattern"] == "2:4" and all(torch.equal(masks[k], magnitude[k]) for k in magnitude)
    assert manifest["attention"]["streaming_fraction"] == 0.5
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["retrieval"]) == {"dense", "magnitude", "both"}
    assert results["retrieval"]["both"]["cost"]["kv_cache_fraction"] < 1
    assert main(["apply", "--model", str(MICRO), "--dtype", "float32", "--masks", str(run_dir / "artifacts" / "both"),
                 "--out", str(tmp_path / "applied")]) == 0
    out = capsys.readouterr().out
    assert "50.00% of their weights masked" in out and "attention plan with 4 of 8 KV heads streaming" in out
    assert json.loads((tmp_path / "applied" / "maskpipe.json").read_text())["attention"] == manifest["attention"]
