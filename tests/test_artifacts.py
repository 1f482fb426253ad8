import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.io.artifacts import (MASKS_FILE, MANIFEST_FILE, atomic_dir, check_compatible, load_artifact,
                                materialize, read_manifest, save_artifact)
from maskpipe.pipeline.core.schema import ModelConfig
from maskpipe.pipeline.core.models import load_model, prunable_linears
from maskpipe.pipeline.nm.sparsity import is_nm, masked, nm_mask
from tests.conftest import FIXTURES, MICRO

BASE = {"name_or_path": "micro-llama", "revision": None}


def magnitude(linears, n=2, m=4):
    return {k: nm_mask(l.weight.abs(), n, m) for k, l in linears.items()}


def write(tmp_path, linears, masks, pattern="2:4"):
    return save_artifact(tmp_path / "art", masks, linears, base_model=BASE, pattern=pattern,
                         method={"name": "magnitude", "params": {}})


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_save_load_identical_and_exact_sparsity(tmp_path, micro, pattern):
    model, linears = micro
    n, m = map(int, pattern.split(":"))
    masks = magnitude(linears, n, m)
    path = write(tmp_path, linears, masks, pattern)
    loaded, manifest = load_artifact(path)
    assert loaded.keys() == masks.keys()
    for k in masks:
        assert torch.equal(loaded[k], masks[k]) and is_nm(loaded[k], n, m)
    check_compatible(manifest, linears)
    with masked(linears, loaded):
        for k, lin in linears.items():
            zeros = (lin.weight == 0).float().mean().item()
            assert zeros == pytest.approx(1 - n / m)


def test_a_2of4_artifact_takes_at_most_066_bits_per_weight_and_holds_no_weights(tmp_path, micro):
    """The whole masks file, safetensors header included, over the weights it masks: log2(6)/4 = 0.646
    is the limit, the encoding packs 17 groups in 44 bits (0.647)."""
    _, linears = micro
    path = write(tmp_path, linears, magnitude(linears))
    weights = sum(l.weight.numel() for l in linears.values())
    bits = (path / MASKS_FILE).stat().st_size * 8 / weights
    assert 0.646 < bits <= 0.66
    from safetensors.torch import load_file
    [blob] = load_file(path / MASKS_FILE).values()
    assert blob.dtype == torch.uint8 and blob.numel() * 8 / weights < 0.648  # each layer ends on a whole word and byte
    manifest = read_manifest(path)
    assert manifest["format_version"] == 2 and manifest["encoding"]["name"] == "nm-combinadic"
    assert (manifest["encoding"]["groups_per_word"], manifest["encoding"]["word_bits"]) == (17, 44)
    assert manifest["base_model"]["fingerprint"].startswith("sha256:") and manifest["pattern"] == "2:4"
    assert manifest["layers"]["model.layers.0.mlp.down_proj"]["shape"] == [128, 384]
    assert (path / MANIFEST_FILE).stat().st_size < 16_384


def test_format_1_artifacts_still_read(micro_cfg):
    """A format-1 artifact (bitmaps, written by maskpipe 0.1.0 before the compact encoding) of block 0."""
    path = FIXTURES / "artifacts" / "micro-llama-magnitude-2of4-v1"
    masks, manifest = load_artifact(path)
    assert manifest["format_version"] == 1 and manifest["encoding"] == "packbits-le"
    cfg = ModelConfig.model_validate({**micro_cfg.model_dump(), "prune": {"include": ["model.layers.0.*"]}})
    linears = prunable_linears(load_model(cfg), cfg)
    check_compatible(manifest, linears)
    assert masks.keys() == linears.keys()
    assert all(torch.equal(masks[k], m) for k, m in magnitude(linears).items())


def test_other_model_is_refused_before_anything_changes(tmp_path, micro, micro_cfg):
    model, linears = micro
    path = write(tmp_path, linears, magnitude(linears))
    _, manifest = load_artifact(path)
    with torch.no_grad():
        linears["model.layers.0.self_attn.q_proj"].weight[0, 0] += 1.0
    with pytest.raises(MaskpipeError, match="fingerprint mismatch"):
        check_compatible(manifest, linears)
    other = {k.replace("layers.3", "layers.9"): v for k, v in linears.items()}
    with pytest.raises(MaskpipeError, match="the model has no layer model.layers.3"):
        check_compatible(manifest, other)
    manifest["layers"]["model.layers.0.mlp.up_proj"]["shape"] = [384, 256]
    with pytest.raises(MaskpipeError, match=r"up_proj: artifact shape \[384, 256\] != model shape \[384, 128\]"):
        check_compatible(manifest, linears)


def test_corrupted_artifacts_fail_clearly(tmp_path, micro):
    _, linears = micro
    path = write(tmp_path, linears, magnitude(linears))
    blob = (path / MASKS_FILE).read_bytes()
    (path / MASKS_FILE).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MaskpipeError, match="unreadable"):
        load_artifact(path)
    flipped = bytearray(blob)
    flipped[-10] ^= 0x01
    (path / MASKS_FILE).write_bytes(bytes(flipped))
    with pytest.raises(MaskpipeError, match="checksum mismatch"):
        load_artifact(path)
    (path / MASKS_FILE).write_bytes(blob)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(MaskpipeError, match="format_version 99"):
        load_artifact(path)
    del manifest["pattern"]
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(MaskpipeError, match="missing keys: pattern"):
        load_artifact(path)
    with pytest.raises(MaskpipeError, match="not a mask artifact"):
        load_artifact(tmp_path)


def test_atomic_dir_keeps_the_old_version_on_failure(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as d:
        (d / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as d:
            (d / "f").write_text("half")
            raise RuntimeError("killed")
    assert (dest / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]  # the one-writer lock stays
    with atomic_dir(dest) as d:
        (d / "f").write_text("new")
    assert (dest / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_materialized_model_loads_and_matches_masked_logits(tmp_path, micro, micro_cfg, tokenizer):
    model, linears = micro
    masks = magnitude(linears)
    x = torch.randint(0, 2048, (1, 32))
    with masked(linears, masks):
        expected = model(x).logits
    out = materialize(model, tokenizer, linears, masks, tmp_path / "sparse", {"masks": "test"},
                      {k: "2:4" for k in masks})
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(reloaded(x).logits, expected, atol=1e-5)
    for k, lin in prunable_linears(reloaded, micro_cfg).items():
        assert torch.equal(lin.weight != 0, masks[k] & (lin.weight != 0)) and is_nm(masks[k], 2, 4)
    # the sparsity travels in config.json under maskpipe_sparsity (compressed-tensors' field names, not its
    # layout: the output is a plain dense checkpoint)
    sparsity = reloaded.config.maskpipe_sparsity
    assert sparsity["format"] == "dense" and sparsity["sparsity_structure"] == "2:4"
    assert sparsity["global_sparsity"] == 0.5 and sparsity["targets"] == sorted(masks)
    assert json.loads((out / "maskpipe.json").read_text()) == {"masks": "test"}
    # a mistyped --out never deletes a directory that is not a materialized model
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(MaskpipeError, match="holds no maskpipe.json; refusing to replace it"):
        materialize(model, tokenizer, linears, masks, tmp_path / "mine", {}, {})
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_an_artifact_carries_an_attention_plan_with_or_without_masks(tmp_path, micro, micro_cfg, capsys):
    from maskpipe.jobs.cli import main
    from maskpipe.pipeline.attention.plans import AttentionPlan, check_plan, kv_heads, uniform_plan
    from maskpipe.pipeline.io.session import Session, Variant
    from tests.conftest import MICRO

    model, linears = micro
    shape = kv_heads(model)[:2]
    streaming = torch.zeros(shape, dtype=torch.bool)
    streaming[0] = True
    plan = uniform_plan(shape, streaming, 2, 8, torch.rand(shape))
    only = save_artifact(tmp_path / "plan", {}, linears, base_model=BASE, pattern=None,
                         method={"name": "attention-learned"}, attention=plan.to_json(model))
    both = save_artifact(tmp_path / "both", magnitude(linears), linears, base_model=BASE, pattern="2:4",
                         method={"name": "attention-learned"}, attention=plan.to_json(model))
    masks, manifest = load_artifact(only)
    assert masks == {} and manifest["pattern"] is None and manifest["layers"] == {}
    assert manifest["base_model"]["fingerprint"] == manifest["attention"]["fingerprint"]
    back = check_plan(manifest["attention"], model, str(only))
    assert torch.equal(back.streaming, plan.streaming) and torch.allclose(back.gate, plan.gate, atol=1e-6)
    masks, manifest = load_artifact(both)
    assert set(masks) == set(linears) and AttentionPlan.from_json(manifest["attention"]).shape == shape
    with pytest.raises(MaskpipeError, match="needs masks, an attention plan or both"):
        save_artifact(tmp_path / "none", {}, linears, base_model=BASE, pattern=None, method={"name": "x"})

    # a session runs each: the plan alone, the masks alone, both together
    s = Session(micro_cfg)
    x = torch.randint(0, 2048, (1, 40))
    logits = {}
    for name, art in [("dense", None), ("plan", only), ("both", both)]:
        with s.running(Variant(name, artifact=art)) as m:
            logits[name] = m(input_ids=x).logits
    with s.running(Variant("masks", artifact=write(tmp_path, s.linears, magnitude(s.linears)))) as m:
        logits["masks"] = m(input_ids=x).logits
    assert torch.equal(logits["plan"][:, :10], logits["dense"][:, :10])  # streaming starts past sink + window
    assert not torch.allclose(logits["plan"], logits["dense"], atol=1e-3)
    assert not torch.allclose(logits["both"], logits["masks"], atol=1e-3)
    assert s.model.config._attn_implementation == "sdpa"

    assert main(["apply", "--model", str(MICRO), "--dtype", "float32", "--masks", str(both)]) == 0
    out = capsys.readouterr().out
    assert "50.00% of their weights masked" in out and f"attention plan with {shape[1]} of {streaming.numel()} KV" in out

    # another base model: the plan is refused by its fingerprint, a plan for other heads by its shape
    other = AutoModelForCausalLM.from_config(model.config)
    with pytest.raises(MaskpipeError, match="fingerprint mismatch"):
        check_plan(manifest["attention"], other, "art")
    wrong = uniform_plan((shape[0], shape[1] + 1), True, 2, 8).to_json(model)
    with pytest.raises(MaskpipeError, match="attention plan is for 4 layers x 3 KV heads"):
        check_plan(wrong, model, "art")


def test_the_artifact_format_and_gate_learning_stand_below_the_schema_and_the_evaluations():
    """The artifact format needs no config schema, gate learning no retrieval evaluation: what they share
    with them (`Pattern`, the prompt templates) lives in lower modules (`pipeline.core.vocab`, `pipeline.eval.prompts`)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys, pipeline.io.artifacts, pipeline.attention.plans, pipeline.io.interop; "
            "print([m for m in ('pipeline.config', 'pipeline.eval.retrieval') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_are_readable_by_the_team_as_the_umask_allows(tmp_path, umask_022, micro):
    from maskpipe.pipeline.io.artifacts import write_json, write_text
    from maskpipe.pipeline.io.interop import export_maskllm

    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "b.json", {"x": 1})
    write(tmp_path, micro[1], magnitude(micro[1]))
    export_maskllm(tmp_path / "art", tmp_path / "m.npz")
    for f in ("a.txt", "b.json", "m.npz", "art/manifest.json"):
        assert (tmp_path / f).stat().st_mode & 0o777 == 0o644, f
    os.umask(0o002)
    write_json(tmp_path / "b.json", {"x": 2})
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o664


def test_a_runs_files_and_eval_out_are_readable_by_the_team(tmp_path, umask_022, monkeypatch):
    from maskpipe.jobs.cli import main
    from maskpipe.pipeline.config import load_config
    from maskpipe.pipeline.run.runner import run
    from tests.conftest import CORPORA, ROOT

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a file: store, for trackers.json
    cfg = load_config("configs/tiny.yaml", ["stages=[{stage: eval, data: [kjv], seqlen: 64, batch_size: 8}]",
                                            "workers.num_workers=0", f"logging.mlflow.tracking_uri=file:{tmp_path}/ml"])
    out = run(cfg, tmp_path / "run")
    for name in ("config.yaml", "results.json", "results.md", "status.json", "trackers.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    assert main(["eval", "--model", str(MICRO), "--dtype", "float32", "--data", str(CORPORA / "kjv.valid.txt"),
                 "--seqlen", "64", "--out", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
