import json

import numpy as np
import pytest
import torch

from maskpipe.jobs.cli import main
from maskpipe.pipeline.io.artifacts import load_artifact, read_manifest
from maskpipe.pipeline.attention.plans import AttentionPlan
from maskpipe.pipeline.io.interop import duo_streaming
from maskpipe.pipeline.core.models import base_weight
from maskpipe.pipeline.nm.sparsity import nm_mask
from tests.conftest import MICRO

MODEL = ["--model", str(MICRO), "--dtype", "float32", "--device", "cpu"]


def write_maskllm_npz(path, masks):
    """Exactly what MaskLLM's tool_compress_mask.py releases: packbits of each flattened keep-mask."""
    np.savez_compressed(path, **{f"{name}.weight.mask": np.packbits(m.numpy().astype(bool)) for name, m in masks.items()})


def error_lines(capsys) -> list[str]:
    """The error lines a failed command printed (model loading writes progress bars to stderr too)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def magnitude_masks(linears, n=2, m=4):
    return {name: nm_mask(base_weight(lin).abs(), n, m) for name, lin in linears.items()}


def test_a_maskllm_npz_imports_applies_and_exports_back_to_the_same_bits(micro, tmp_path, capsys):
    model, linears = micro
    masks = magnitude_masks(linears)
    write_maskllm_npz(tmp_path / "mask_compressed.npz", masks)
    art = tmp_path / "imported"
    assert main(["import", "maskllm", str(tmp_path / "mask_compressed.npz"), *MODEL, "--out", str(art)]) == 0
    loaded, manifest = load_artifact(art)
    assert manifest["pattern"] == "2:4" and manifest["method"]["name"] == "maskllm-import"
    assert manifest["method"]["source_sha256"].startswith("sha256:")
    assert set(loaded) == set(masks) and all(torch.equal(loaded[k], masks[k]) for k in masks)
    assert main(["apply", *MODEL, "--masks", str(art), "--out", str(tmp_path / "sparse")]) == 0
    assert "50.00% of their weights masked" in capsys.readouterr().out
    assert main(["export", "maskllm", str(art), "--out", str(tmp_path / "back.npz")]) == 0
    with np.load(tmp_path / "mask_compressed.npz", allow_pickle=False) as a, \
            np.load(tmp_path / "back.npz", allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files) == sorted(f"{k}.weight.mask" for k in masks)
        for k in a.files:
            assert np.array_equal(a[k], b[k])


def test_maskllm_import_infers_the_smallest_pattern_and_checks_a_given_one(micro, tmp_path, capsys):
    model, linears = micro
    write_maskllm_npz(tmp_path / "m.npz", magnitude_masks(linears, 1, 4))
    assert main(["import", "maskllm", str(tmp_path / "m.npz"), *MODEL, "--out", str(tmp_path / "a")]) == 0
    assert read_manifest(tmp_path / "a")["pattern"] == "1:4"
    # a 1:4 mask is no 2:4 mask: the error names the layer and the group, nothing is written
    assert main(["import", "maskllm", str(tmp_path / "m.npz"), *MODEL, "--pattern", "2:4",
                 "--out", str(tmp_path / "b")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "keeps 1 of 4, not 2:4" in err[0] and "model.layers." in err[0]
    assert not (tmp_path / "b").exists()


def test_maskllm_import_refuses_keys_the_model_lacks_and_wrong_sizes(micro, tmp_path, capsys):
    model, linears = micro
    masks = magnitude_masks(linears)
    name = sorted(masks)[0]
    np.savez_compressed(tmp_path / "extra.npz", **{"model.layers.9.mlp.up_proj.weight.mask": np.packbits(masks[name].numpy())})
    np.savez_compressed(tmp_path / "short.npz", **{f"{name}.weight.mask": np.packbits(masks[name].numpy())[:-1]})
    np.savez(tmp_path / "pickled.npz", **{f"{name}.weight.mask": np.array([{"x": 1}], dtype=object)})
    for file, expected in (("extra.npz", "has no prunable linear 'model.layers.9.mlp.up_proj'"),
                           ("short.npz", "packed uint8 bytes"), ("pickled.npz", "allow_pickle")):
        assert main(["import", "maskllm", str(tmp_path / file), *MODEL, "--out", str(tmp_path / "x")]) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and expected in err[0] and file in err[0]
    assert not (tmp_path / "x").exists()


def duoattention_sparsify(gates, sparsity):
    """DuoAttention's sparsify_attention_heads (duo_attn/utils.py), without its tie-breaking noise."""
    threshold = np.quantile(gates, sparsity)
    return gates >= threshold  # full heads


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 1.0])
def test_duo_binarisation_is_duoattentions_quantile_rule(sparsity):
    gates = np.random.default_rng(0).random((6, 8))
    expected = ~duoattention_sparsify(gates, sparsity) if 0 < sparsity < 1 else np.full(gates.shape, sparsity >= 1)
    for ties in ("upstream", "head-order"):  # distinct gates: the noise changes nothing
        assert np.array_equal(duo_streaming(gates, sparsity=sparsity, ties=ties), expected)
    tied = np.full((4, 2), 0.5)  # equal gates, head order: the first heads in order stream
    assert duo_streaming(tied, sparsity=0.5, ties="head-order").reshape(-1).tolist() == [True] * 4 + [False] * 4
    assert np.array_equal(duo_streaming(gates, threshold=0.3, ties="head-order"), gates < 0.3)


def upstream_sparsify_after_seed_42(gates, threshold=None, sparsity=None):
    """What DuoAttention's scripts do: seed_everything(42) (np.random.seed), then sparsify_attention_heads:
    noise uniform in [0, 1e-6) from numpy's global generator, the quantile of the noisy gates, >= it is full."""
    state = np.random.get_state()
    np.random.seed(42)
    try:
        noisy = gates + np.random.uniform(0, 1e-6, gates.shape)
    finally:
        np.random.set_state(state)
    if sparsity is not None:
        threshold = np.quantile(noisy, sparsity)
        threshold = 2 if sparsity >= 1 else -1 if sparsity <= 0 else threshold
    return noisy >= threshold


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_imported_plans_break_ties_exactly_as_duoattentions_own_code_by_default(micro, tmp_path, sparsity):
    gates = np.repeat([0.2, 0.5, 0.5, 0.9], 2).reshape(4, 2)  # ties inside and across the quantile
    full = upstream_sparsify_after_seed_42(gates, sparsity=sparsity)
    assert np.array_equal(duo_streaming(gates, sparsity=sparsity), ~full)
    assert np.array_equal(duo_streaming(gates, threshold=0.5), ~upstream_sparsify_after_seed_42(gates, threshold=0.5))
    write_duo_pattern(tmp_path / "duo", gates, sink=4, recent=16)
    for ties, streaming in (("upstream", ~full), ("head-order", duo_streaming(gates, sparsity=sparsity, ties="head-order"))):
        flags = ["--ties", ties] if ties != "upstream" else []
        art = tmp_path / ties
        assert main(["import", "duo-attention", str(tmp_path / "duo"), *MODEL, "--sparsity", str(sparsity), *flags,
                     "--out", str(art)]) == 0
        manifest = read_manifest(art)
        assert manifest["method"]["params"]["ties"] == ties  # the manifest says which rule made the plan
        plan = AttentionPlan.from_json(manifest["attention"])
        assert plan.streaming.numpy().tolist() == streaming.tolist()
    if sparsity == 0.5:  # the quantile splits the four 0.5 gates: there the two rules differ
        assert not np.array_equal(~full, duo_streaming(gates, sparsity=sparsity, ties="head-order"))


def write_duo_pattern(folder, gates, sink, recent):
    folder.mkdir()
    np.savetxt(folder / "full_attention_heads.tsv", gates, delimiter="\t")  # as DuoAttention saves them
    (folder / "config.json").write_text(json.dumps({"sink_size": sink, "recent_size": recent}))


def test_a_duoattention_pattern_imports_applies_and_exports_back_to_the_same_gates(micro, tmp_path, capsys):
    model, _ = micro
    gates = np.round(np.random.default_rng(1).random((4, 2)), 6)  # micro-llama: 4 layers x 2 KV heads
    write_duo_pattern(tmp_path / "duo", gates, sink=4, recent=16)
    art = tmp_path / "plan"
    assert main(["import", "duo-attention", str(tmp_path / "duo"), *MODEL, "--sparsity", "0.5",
                 "--out", str(art)]) == 0
    manifest = read_manifest(art)
    plan = AttentionPlan.from_json(manifest["attention"])
    assert manifest["layers"] == {} and manifest["pattern"] is None
    assert np.array_equal(plan.streaming.numpy(), ~duoattention_sparsify(gates, 0.5))
    assert plan.streaming.sum() == 4 and set(plan.sink.flatten().tolist()) == {4}
    assert set(plan.window.flatten().tolist()) == {16}
    assert np.allclose(plan.gate.numpy(), gates, atol=1e-7)
    assert main(["apply", *MODEL, "--masks", str(art)]) == 0
    assert "attention plan with 4 of 8 KV heads streaming" in capsys.readouterr().out
    assert main(["retrieval", *MODEL, "--masks", str(art), "--passkey", "96", "--samples", "2",
                 "--out", str(tmp_path / "r")]) == 0
    assert main(["export", "duo-attention", str(art), "--out", str(tmp_path / "back")]) == 0
    back = np.loadtxt(tmp_path / "back" / "full_attention_heads.tsv", delimiter="\t")
    assert np.array_equal(back, gates)
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"]) == (4, 16)
    # flags override config.json, and the TSV alone works with them
    assert main(["import", "duo-attention", str(tmp_path / "back" / "full_attention_heads.tsv"), *MODEL,
                 "--threshold", "0.5", "--sink", "2", "--recent", "8", "--out", str(tmp_path / "plan2")]) == 0
    plan2 = AttentionPlan.from_json(read_manifest(tmp_path / "plan2")["attention"])
    assert torch.equal(plan2.streaming, torch.from_numpy(gates < 0.5)) and set(plan2.window.flatten().tolist()) == {8}


def test_duo_import_refuses_a_table_of_another_shape_and_missing_sizes(tmp_path, capsys):
    write_duo_pattern(tmp_path / "wrong", np.full((6, 8), 0.5), sink=4, recent=16)
    assert main(["import", "duo-attention", str(tmp_path / "wrong"), *MODEL, "--sparsity", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "6 rows x 8 gates, the model has 4 layers x 2 KV heads" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    np.savetxt(tmp_path / "bare" / "full_attention_heads.tsv", np.full((4, 2), 0.5), delimiter="\t")
    assert main(["import", "duo-attention", str(tmp_path / "bare"), *MODEL, "--sparsity", "0.5",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--sink: not given and no config.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache, repo, files):
    """A repo laid out as huggingface_hub caches it: models--OWNER--NAME/snapshots/<commit>/FILE and
    refs/main naming the commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    for name, source in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(source.read_bytes())


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    for key, value in (("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(key, value)
    # huggingface_hub reads its environment once, at import: the constants are what it consults
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_importers_and_masks_take_a_hub_repo_id_read_from_the_hf_cache_offline(micro, tmp_path, offline_hub,
                                                                               capsys):
    model, linears = micro
    write_maskllm_npz(tmp_path / "mask_compressed.npz", magnitude_masks(linears))
    hub_cache(offline_hub, "acme/llama-maskllm", {"mask_compressed.npz": tmp_path / "mask_compressed.npz"})
    assert main(["import", "maskllm", "acme/llama-maskllm", *MODEL, "--out", str(tmp_path / "a")]) == 0
    assert main(["import", "maskllm", f"acme/llama-maskllm@{COMMIT}", *MODEL, "--out", str(tmp_path / "b")]) == 0
    assert load_artifact(tmp_path / "a")[1]["layers"] == load_artifact(tmp_path / "b")[1]["layers"]

    gates = np.linspace(0, 1, 8).reshape(4, 2)
    write_duo_pattern(tmp_path / "duo", gates, sink=4, recent=16)
    hub_cache(offline_hub, "acme/duo", {n: tmp_path / "duo" / n for n in ("full_attention_heads.tsv", "config.json")})
    assert main(["import", "duo-attention", "acme/duo", *MODEL, "--sparsity", "0.5", "--out", str(tmp_path / "p")]) == 0
    assert read_manifest(tmp_path / "p")["attention"]

    # a published artifact (as `publish --push` uploads it) as --masks, named by its repo
    hub_cache(offline_hub, "acme/micro-2of4", {f.name: f for f in (tmp_path / "a").iterdir()})
    capsys.readouterr()
    assert main(["apply", *MODEL, "--masks", "acme/micro-2of4"]) == 0
    assert "50.00% of their weights masked" in capsys.readouterr().out
    assert main(["export", "maskllm", "acme/micro-2of4", "--out", str(tmp_path / "back.npz")]) == 0
    with np.load(tmp_path / "mask_compressed.npz") as a, np.load(tmp_path / "back.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)

    # offline and not in the cache: one line that says so, nothing written
    assert main(["import", "maskllm", "acme/other", *MODEL, "--out", str(tmp_path / "c")]) == 2
    assert error_lines(capsys) == [
        f"error: acme/other: cannot download the MaskLLM mask from the Hugging Face Hub: not in the local Hugging "
        f"Face cache ({offline_hub}) and HF_HUB_OFFLINE is set"]
    assert main(["apply", *MODEL, "--masks", "acme/gone@v2", "--out", str(tmp_path / "d")]) == 2
    assert error_lines(capsys) == [
        f"error: acme/gone@v2: cannot download the mask artifact from the Hugging Face Hub: not in the local "
        f"Hugging Face cache ({offline_hub}) and HF_HUB_OFFLINE is set"]
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
