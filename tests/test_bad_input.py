"""Bad input, nothing lost: every bad input a user can hand maskpipe ends in a message that says what is
wrong, a non-zero exit and no partial output; a writer killed or failing mid-write leaves the previous
artifact or checkpoint as it was."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from math import comb, log2
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from maskpipe.jobs.cli import main
from maskpipe.pipeline.nm import encoding
from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, MASKS_FILE, load_artifact, save_artifact
from maskpipe.pipeline.train.checkpoint import META, CheckpointDir
from maskpipe.pipeline.nm.encoding import BITMAP, Codec, nm_rank, nm_unrank
from maskpipe.pipeline.nm.sparsity import nm_mask
from tests.conftest import MODEL_FLAGS, cli_fails, MICRO, ROOT

MODEL = MODEL_FLAGS


def fails(argv: list[str], capsys, message: str, *absent) -> str:
    return cli_fails(argv, capsys, message, *absent)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "magnitude"
    assert main(["oneshot", *MODEL, "--method", "magnitude", "--out", str(out)]) == 0
    return out


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------------------- artifacts


def truncate(path):
    blob = (path / MASKS_FILE).read_bytes()
    (path / MASKS_FILE).write_bytes(blob[: len(blob) // 2])


def flip_payload(path):
    blob = bytearray((path / MASKS_FILE).read_bytes())
    blob[-100] ^= 0x04
    (path / MASKS_FILE).write_bytes(bytes(blob))


def flip_tensor_name(path):  # "masks" -> "masls" in the safetensors header: still valid JSON
    blob = (path / MASKS_FILE).read_bytes()
    (path / MASKS_FILE).write_bytes(blob.replace(b'"masks"', b'"masls"', 1))


def edit_manifest(change):
    def edit(path):
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        change(manifest)
        (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    return edit


LAYER = "model.layers.0.mlp.up_proj"
CORRUPTIONS = {
    "truncated masks": (truncate, "masks.safetensors: unreadable"),
    "bit-flipped masks": (flip_payload, "checksum mismatch (corrupted artifact)"),
    "masks header edited": (flip_tensor_name, "holds no uint8 tensor 'masks' where the manifest lists"),
    "format version 99": (edit_manifest(lambda m: m.update(format_version=99)),
                          "format_version 99 is not one this maskpipe (0.1.0) reads (it reads 1, 2)"),
    "format version 1 over format-2 masks": (edit_manifest(lambda m: m.update(format_version=1)),
                                             "masks.safetensors and manifest.json list different layers"),
    "missing keys": (edit_manifest(lambda m: [m.pop("pattern"), m["base_model"].pop("fingerprint")]),
                     "manifest.json: missing keys: pattern, base_model.fingerprint"),
    "layer without its offset": (edit_manifest(lambda m: m["layers"][LAYER].pop("offset")),
                                 f"missing keys: layers.{LAYER}.offset"),
    "unknown encoding": (edit_manifest(lambda m: m.update(encoding={"name": "zstd"})),
                         "unknown mask encoding {'name': 'zstd'}"),
    "words too narrow": (edit_manifest(lambda m: m["encoding"].update(word_bits=40)),
                         "nm-combinadic: 17 groups of 2:4 do not fit a word of 40 bits"),
    "shape of another layer": (edit_manifest(lambda m: m["layers"][LAYER].update(shape=[384, 64])),
                               f"{LAYER}: 3977 bytes, expected 1991 for 24576 weights"),
    "manifest not JSON": (lambda p: (p / MANIFEST_FILE).write_text("{format: maskpipe"), "manifest.json: not valid JSON"),
    "not an artifact": (lambda p: (p / MANIFEST_FILE).unlink(), "not a mask artifact (no manifest.json)"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupted_artifact_is_refused_and_nothing_is_written(case, artifact, tmp_path, capsys):
    corrupt, message = CORRUPTIONS[case]
    bad = copy(artifact, tmp_path / "bad")
    corrupt(bad)
    fails(["apply", *MODEL, "--masks", str(bad), "--out", str(tmp_path / "out")], capsys, message, tmp_path / "out")


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """The micro model's architecture with other weights, one with other shapes, and models that
    maskpipe cannot prune: an unknown model type and GPT-2 (Conv1D layers)."""
    root = tmp_path_factory.mktemp("models")
    config = LlamaConfig.from_pretrained(MICRO)
    torch.manual_seed(0)
    models = {"other-weights": AutoModelForCausalLM.from_config(config),
              "other-shapes": AutoModelForCausalLM.from_config(LlamaConfig(**{**config.to_dict(), "intermediate_size": 256})),
              "gpt2": AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=2048))}
    for name, model in models.items():
        model.save_pretrained(root / name)
        for f in MICRO.glob("tokenizer*"):
            shutil.copy(f, root / name)
    shutil.copytree(root / "other-weights", root / "unknown-arch")
    cfg = json.loads((root / "unknown-arch" / "config.json").read_text())
    (root / "unknown-arch" / "config.json").write_text(json.dumps({**cfg, "model_type": "maskpipe-no-such-arch"}))
    return root


@pytest.mark.parametrize("model,message", [
    ("other-weights", "base model fingerprint mismatch: the artifact was made for"),
    ("other-shapes", "model.layers.0.mlp.down_proj: artifact shape [128, 384] != model shape [128, 256]"),
    ("unknown-arch", "cannot load as a causal LM: The checkpoint you are trying to load has model type "
                     "`maskpipe-no-such-arch`"),
    ("gpt2", "unsupported architecture GPT2LMHeadModel: transformer.h.0.attn.c_attn is a GPT-2 style Conv1D"),
    ("missing", "no such model directory"),
])
def test_an_artifact_for_another_model_or_an_unusable_model_is_refused(model, message, artifact, other_models, tmp_path,
                                                                       capsys):
    fails(["apply", "--model", str(other_models / model), "--dtype", "float32", "--masks", str(artifact),
           "--out", str(tmp_path / "out")], capsys, message, tmp_path / "out")


@pytest.fixture(scope="module")
def parts(tmp_path_factory, artifact):
    """Artifacts of one base model: attention layers, MLP layers (4:8), an attention plan, and one more plan."""
    from maskpipe.pipeline.attention.plans import kv_heads, uniform_plan
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.core.models import load_model, prunable_linears

    root = tmp_path_factory.mktemp("parts")
    model = load_model(ModelConfig(name_or_path=str(MICRO), dtype="float32", device="cpu"))
    every = prunable_linears(model, ModelConfig(name_or_path=str(MICRO)))
    base = {"name_or_path": str(MICRO), "revision": None, "architecture": "LlamaForCausalLM"}

    def write(name, pattern, keep=None, plan=None):
        linears = {k: v for k, v in every.items() if keep is None or keep(k)}
        masks = {k: nm_mask(v.weight.abs(), *map(int, pattern.split(":"))) for k, v in linears.items()} if pattern else {}
        return save_artifact(root / name, masks, linears, base_model=base, pattern=pattern,
                             method={"name": "magnitude"}, attention=plan)

    plan = uniform_plan(kv_heads(model)[:2], True, 2, 8).to_json(model)
    return {"attn": write("attn", "2:4", lambda k: "self_attn" in k), "mlp": write("mlp", "4:8", lambda k: "mlp" in k),
            "plan": write("plan", None, plan=plan), "plan2": write("plan2", None, plan=plan), "all": artifact}


def test_several_artifacts_apply_together(parts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["apply", *MODEL, "--masks", str(parts["attn"]), str(parts["mlp"]), str(parts["plan"]),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "16 layers at 2:4, 50.00%" in printed and "12 layers at 4:8, 50.00%" in printed
    assert "together: 28 of 28 prunable layers masked, with an attention plan" in printed
    sparsity = json.loads((out / "config.json").read_text())["maskpipe_sparsity"]
    assert sparsity["sparsity_structure"] == ["2:4", "4:8"] and len(sparsity["targets"]) == 28
    provenance = json.loads((out / "maskpipe.json").read_text())
    assert [a["path"] for a in provenance["artifacts"]] == [str(parts[k]) for k in ("attn", "mlp", "plan")]
    assert provenance["attention"]["streaming_fraction"] == 1.0


@pytest.mark.parametrize("names,message", [
    (("all", "mlp"), "both mask model.layers.0.mlp.down_proj: artifacts applied together must mask different layers"),
    (("attn", "attn"), "both mask model.layers.0.self_attn.k_proj"),
    (("plan", "plan2"), "both carry an attention plan: apply at most one"),
])
def test_overlapping_artifacts_are_refused(names, message, parts, tmp_path, capsys):
    fails(["apply", *MODEL, "--masks", *(str(parts[n]) for n in names), "--out", str(tmp_path / "o")], capsys,
          message, tmp_path / "o")


def test_artifacts_for_different_models_are_refused_together(parts, other_models, tmp_path, capsys):
    foreign = copy(parts["mlp"], tmp_path / "foreign")
    manifest = json.loads((foreign / MANIFEST_FILE).read_text())
    manifest["base_model"]["architecture"] = "Qwen2ForCausalLM"
    (foreign / MANIFEST_FILE).write_text(json.dumps(manifest))
    fails(["apply", *MODEL, "--masks", str(parts["attn"]), str(foreign), "--out", str(tmp_path / "o")], capsys,
          f"the artifacts were made for different architectures: {parts['attn']} for LlamaForCausalLM, "
          f"{foreign} for Qwen2ForCausalLM", tmp_path / "o")
    # one artifact that fits and one made on other weights for other layers: only the fingerprint can tell
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.core.models import load_model, prunable_linears

    cfg = ModelConfig(name_or_path=str(other_models / "other-weights"), dtype="float32", device="cpu")
    mlp = {k: v for k, v in prunable_linears(load_model(cfg), cfg).items() if "mlp" in k}
    other = save_artifact(tmp_path / "other", {k: nm_mask(v.weight.abs(), 4, 8) for k, v in mlp.items()}, mlp,
                          base_model={"name_or_path": cfg.name_or_path}, pattern="4:8", method={"name": "magnitude"})
    fails(["apply", *MODEL, "--masks", str(parts["attn"]), str(other), "--out", str(tmp_path / "o")], capsys,
          f"{other}: base model fingerprint mismatch", tmp_path / "o")


# ------------------------------------------------------------------------------------ configs, data, runs


@pytest.mark.parametrize("pattern,message", [
    ("3:5", "model.layers.0.self_attn.q_proj: input dimension 128 is not divisible by M=5"),
    ("4:4", '--pattern: expected "N:M" with 0<N<M, got "4:4"'),
    ("6:4", 'expected "N:M" with 0<N<M, got "6:4"'),
])
def test_an_impossible_pattern_is_refused(pattern, message, tmp_path, capsys):
    fails(["oneshot", *MODEL, "--method", "magnitude", "--pattern", pattern, "--out", str(tmp_path / "a")], capsys,
          message, tmp_path / "a")


def test_a_learn_stage_refuses_a_pattern_that_does_not_divide_the_layers(in_root, tmp_path, capsys):
    fails(["run", "configs/tiny.yaml", "workers.num_workers=0", "stages=[{stage: learn, pattern: '3:5', data: calib, "
           "steps: 1, batch_size: 1, seqlen: 32}]", "--run-dir", str(tmp_path / "r")], capsys,
          "input dimension 128 is not divisible by M=5", tmp_path / "r" / "artifacts")


@pytest.mark.parametrize("text,command,message", [
    ("", "oneshot", "empty corpus, no record has any text"),
    ("\n\n  \n", "eval", "empty corpus, no record has any text"),
    ("In the beginning\n", "oneshot", "the corpus has 6 tokens, fewer than one block of 64 (seqlen)"),
    ("In the beginning\n", "eval", "evaluation text has 6 tokens, fewer than one window of 64"),
])
def test_an_empty_or_too_short_corpus_is_refused(text, command, message, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    extra = (["--method", "wanda", "--n-samples", "2", "--out", str(tmp_path / "a")] if command == "oneshot"
             else ["--out", str(tmp_path / "a")])
    fails([command, *MODEL, "--data", str(corpus), "--seqlen", "64", *extra], capsys, message, tmp_path / "a")


@pytest.mark.parametrize("override,message", [
    ("colour=blue", "configs/tiny.yaml: colour: unknown key"),
    ("model.quantize=true", "configs/tiny.yaml: model.quantize: unknown key"),
    ("stages.3.momentum=0.9", "configs/tiny.yaml: stages.3.momentum: unknown key"),
])
def test_a_config_with_unknown_keys_is_refused(override, message, in_root, tmp_path, capsys):
    fails(["validate", "configs/tiny.yaml", override], capsys, message)
    fails(["run", "configs/tiny.yaml", override, "--run-dir", str(tmp_path / "r")], capsys, message, tmp_path / "r")


def test_a_directory_that_is_not_a_run_is_refused(artifact, in_root, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep")
    fails(["publish", str(tmp_path / "notes"), "--out", str(tmp_path / "card")], capsys,
          "notes: neither a run directory (config.yaml and results.json) nor a mask artifact (manifest.json)",
          tmp_path / "card")
    # an output folder that is not an earlier publish is never replaced
    fails(["publish", str(artifact), "--out", str(tmp_path / "notes")], capsys,
          "notes: exists and holds no manifest.json; refusing to replace it")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep"
    # a run directory whose config.yaml is no config is not resumed (nor told to resume with that file)
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "config.yaml").write_text("name: something-else\n")
    fails(["run", "configs/tiny.yaml", "workers.num_workers=0", "--run-dir", str(other)], capsys,
          "config.yaml: the run's own config does not validate")
    assert (other / "config.yaml").read_text() == "name: something-else\n"


# ---------------------------------------------------------------------------------- interrupted writers


def linear_and_masks(seed: int):
    torch.manual_seed(0)
    linears = {"layer": nn.Linear(64, 16)}
    return linears, {"layer": nm_mask(torch.rand(16, 64, generator=torch.Generator().manual_seed(seed)), 2, 4)}


CHILD = """
import os, sys, time, torch
import maskpipe.pipeline.io.artifacts, maskpipe.pipeline.train.checkpoint; from maskpipe import pipeline
from safetensors.torch import save_file
from tests.test_bad_input import linear_and_masks

def half_then_hang(tensors, filename, metadata=None):
    save_file(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    open(sys.argv[3], "w").close()  # tell the parent: mid-write
    time.sleep(120)

pipeline.io.artifacts.save_file = pipeline.train.checkpoint.save_file = half_then_hang
if sys.argv[1] == "artifact":
    linears, masks = linear_and_masks(2)
    pipeline.io.artifacts.save_artifact(sys.argv[2], masks, linears, base_model={"name_or_path": "x"}, pattern="2:4",
                                     method={"name": "second"})
else:
    pipeline.train.checkpoint.CheckpointDir(sys.argv[2], keep=1).save(2, {"x": torch.full((4,), 2.0)}, {"v": 2})
"""


def kill_mid_write(kind: str, dest, tmp_path) -> None:
    marker = tmp_path / "mid-write"
    child = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(dest), str(marker)], cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the writer ended before it was killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL


def test_killing_an_artifact_writer_leaves_the_previous_artifact(tmp_path):
    linears, masks = linear_and_masks(1)
    dest = save_artifact(tmp_path / "art", masks, linears, base_model={"name_or_path": "x"}, pattern="2:4",
                         method={"name": "first"})
    kill_mid_write("artifact", dest, tmp_path)
    loaded, manifest = load_artifact(dest)
    assert manifest["method"]["name"] == "first" and torch.equal(loaded["layer"], masks["layer"])
    # the dead writer left its temporary directory; the next write succeeds and removes it
    assert len(list(tmp_path.glob(".art.tmp-*"))) == 1
    _, second = linear_and_masks(2)
    save_artifact(dest, second, linears, base_model={"name_or_path": "x"}, pattern="2:4", method={"name": "again"})
    assert torch.equal(load_artifact(dest)[0]["layer"], second["layer"])
    # no debris; only the output's lock file stays beside it (removing it would let two writers in)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.lock", "art", "mid-write"]


def test_killing_a_checkpoint_writer_leaves_the_previous_checkpoint(tmp_path):
    store = CheckpointDir(tmp_path / "ckpt", keep=1)
    store.save(1, {"x": torch.full((4,), 1.0)}, {"v": 1})
    kill_mid_write("checkpoint", tmp_path / "ckpt", tmp_path)
    [latest] = store.list()  # read through the files, whichever tensor file(s) a checkpoint holds
    state = json.loads((latest / META).read_text())
    assert latest.name == "step-00000001" and {k: state[k] for k in ("step", "v")} == {"step": 1, "v": 1}
    [tensors] = latest.glob("*.safetensors")
    assert set(state["shards"]) == {tensors.name}  # its checksum is recorded beside the step
    assert torch.equal(load_file(tensors)["x"], torch.full((4,), 1.0))
    # a resumed run saves step 2 again, over what the killed save left
    store.save(2, {"x": torch.full((4,), 2.0)}, {"v": 2})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000002"]


def test_an_exception_mid_write_leaves_the_previous_artifact_and_no_debris(tmp_path, monkeypatch):
    import maskpipe.pipeline.io.artifacts; from maskpipe import pipeline
    from safetensors.torch import save_file

    linears, masks = linear_and_masks(1)
    dest = save_artifact(tmp_path / "art", masks, linears, base_model={"name_or_path": "x"}, pattern="2:4",
                         method={"name": "first"})

    def half_then_fail(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(pipeline.io.artifacts, "save_file", half_then_fail)
    _, second = linear_and_masks(2)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(dest, second, linears, base_model={"name_or_path": "x"}, pattern="2:4", method={"name": "x"})
    assert torch.equal(load_artifact(dest)[0]["layer"], masks["layer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.lock", "art"]


# -------------------------------------------------------------------------------------------- encoding


@st.composite
def nm_masks(draw):
    """A random N:M mask, M ≤ 8: each group's kept positions drawn as a set."""
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    rows, groups = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    kept = draw(st.lists(st.sets(st.integers(0, m - 1), min_size=n, max_size=n), min_size=rows * groups,
                         max_size=rows * groups))
    mask = np.zeros((rows * groups, m), dtype=bool)
    for g, positions in enumerate(kept):
        mask[g, list(positions)] = True
    return n, m, torch.from_numpy(mask).reshape(rows, groups * m)


@settings(max_examples=300, deadline=None)
@given(nm_masks(), st.sampled_from([8, 16, encoding.CHUNK_WORDS]))
def test_pack_unpack_round_trips_every_nm_up_to_m8(case, chunk_words):
    n, m, mask = case
    with mock.patch.object(encoding, "CHUNK_WORDS", chunk_words):  # small chunks: many chunk boundaries
        for codec in (Codec.best(n, m), Codec(n, m, BITMAP)):
            data = codec.encode(mask)
            assert data.dtype == np.uint8 and len(data) == codec.nbytes(mask.numel())
            assert torch.equal(codec.decode(data, list(mask.shape)), mask)
            assert Codec.from_json(n, m, codec.to_json()) == codec


@pytest.mark.parametrize("n,m", [(n, m) for m in range(2, 9) for n in range(1, m)] + [(3, 20), (9, 18)])
def test_ranks_follow_the_candidate_order_and_approach_the_information_limit(n, m):
    # encoding.candidates defines the order (itertools.combinations; learn.nm_candidates is the same table):
    # the rank arithmetic and the table lookups must both follow it.
    cands = encoding.candidates(n, m)
    assert (nm_rank(cands, n, m) == np.arange(len(cands))).all()
    assert (nm_unrank(np.arange(len(cands)), n, m) == cands).all()
    assert (encoding._rank_sum(cands, n, m) == np.arange(len(cands))).all()
    assert (encoding._unrank_walk(np.arange(len(cands)), n, m) == cands).all()
    codec = Codec.best(n, m)
    limit = log2(comb(m, n)) / m
    assert limit <= codec.bits_per_weight <= limit * (1.005 if m <= 8 else 1.01)
    if (n, m) == (2, 4):
        assert (codec.k, codec.w) == (17, 44) and codec.bits_per_weight < 0.66


def test_patterns_beyond_int64_ranks_fall_back_to_the_bitmap():
    codec = Codec.best(34, 68)  # C(68, 34) > 2^63
    assert codec.name == BITMAP
    mask = nm_mask(torch.randn(2, 136), 34, 68)
    assert torch.equal(codec.decode(codec.encode(mask), [2, 136]), mask)


def test_a_word_out_of_range_is_no_encoding():
    codec = Codec.best(2, 4)
    with pytest.raises(ValueError, match=r"a word holds a value ≥ C\^k = 6\^17"):
        codec.decode(np.full(codec.nbytes(68), 0xFF, dtype=np.uint8), [1, 68])
