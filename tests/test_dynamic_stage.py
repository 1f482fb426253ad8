"""The `dynamic` stage (`pipeline.stages.dynamic`) and a dynamic attention mask as a variant and an artifact
(`pipeline.attention.dynamic_masks`): a full budget is the dense model, the KV cache holds only the kept
keys, learning resumes bit for bit, the artifact round-trips and is refused on another model, apply and
publish know the scorer, and config errors name their key."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from maskpipe.jobs.cli import main
from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.attention.dynamic import KeyScorer
from maskpipe.pipeline.attention.dynamic_masks import SCORER_FILE, DynamicMask
from maskpipe.pipeline.attention.kv_scores import Budget
from maskpipe.pipeline.config import config_from_dict
from maskpipe.pipeline.core.schema import ConfigError, ModelConfig
from maskpipe.pipeline.io.artifacts import MANIFEST_FILE, read_manifest, save_artifact
from maskpipe.pipeline.io.session import Session, Variant
from maskpipe.pipeline.run.runner import run
from tests.conftest import CORPORA, MICRO, MODEL_FLAGS

MODEL = {"name_or_path": str(MICRO), "dtype": "float32", "device": "cpu"}
DMA = {"stage": "dynamic", "name": "dma", "method": "learned", "data": "calib", "keep": 0.25, "sink": 2, "window": 8,
       "steps": 4, "batch_size": 2, "seqlen": 128, "lr": 0.2, "log_every": 1, "checkpoint_every": 2}


def config(stages, tmp_path=None, **data):
    return config_from_dict({"name": "dyn", "seed": 0, "model": MODEL,
                             "data": {"calib": {"sources": [str(CORPORA / "kjv.train.txt")], "shuffle_buffer": 8},
                                      **data},
                             "stages": stages})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One run: a learned mask, full budgets (a fraction, and a count beyond every prompt and answer), an
    N:M mask with a SnapKV mask in the same artifact, then retrieval and perplexity of every variant."""
    tmp = tmp_path_factory.mktemp("dynamic")
    short = tmp / "short.txt"
    short.write_text((CORPORA / "kjv.valid.txt").read_text()[:6000])
    cfg = config([
        DMA,
        {"stage": "dynamic", "name": "full-fraction", "method": "key-norm", "keep": 1.0},
        {"stage": "dynamic", "name": "full-count", "method": "h2o", "keep": 100000},
        {"stage": "oneshot", "name": "nm", "method": "magnitude"},
        {"stage": "dynamic", "name": "nm-snapkv", "method": "snapkv", "keep": 0.5, "masks": "nm", "obs_window": 8},
        {**DMA, "name": "nm-dma", "masks": "nm", "steps": 2},
        {**DMA, "name": "dma-profiled", "window": None, "profile_samples": 2, "steps": 2},  # recent: the default
        {"stage": "retrieval", "passkey": {"lengths": [96], "samples": 3}},
        {"stage": "eval", "data": ["short"], "seqlen": 64, "batch_size": 4},
    ], short={"sources": [{"path": str(short), "sample_by": "document"}]})
    return run(cfg, tmp / "run")


def results(run_dir):
    return json.loads((run_dir / "results.json").read_text())


def test_a_dynamic_mask_at_a_full_budget_runs_as_the_dense_model(run_dir):
    res = results(run_dir)
    dense = res["perplexity"]["dense"]["short"]["ppl"]
    assert res["perplexity"]["full-fraction"]["short"]["ppl"] == pytest.approx(dense, rel=1e-5)
    assert res["perplexity"]["full-count"]["short"]["ppl"] == pytest.approx(dense, rel=1e-5)
    assert res["perplexity"]["dma"]["short"]["ppl"] != pytest.approx(dense, rel=1e-5)
    # A count beyond prompt + answer never evicts: decoding (prefill masked by H2O's rule, then an
    # evicting cache) generates what the dense model generates.
    folder = run_dir / "retrieval" / "retrieval"
    same = [json.loads((folder / f"{v}.json").read_text())["samples"]["passkey"] for v in ("dense", "full-count")]
    assert [r["generated"] for r in same[0]] == [r["generated"] for r in same[1]]
    s = Session(ModelConfig(**MODEL))
    ids = torch.tensor([s.tokenizer("The grass is green. " * 12).input_ids])
    with torch.no_grad():
        want = s.model(input_ids=ids).logits
        with s.running(Variant("full-fraction", artifact=run_dir / "artifacts" / "full-fraction")) as model:
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_recent_profile_gives_each_kv_head_a_share_of_the_same_budget(run_dir):
    """recent: profile (a learned scorer's default): after learning, each (layer, KV head) its recent share,
    in the artifact; the variant evaluates, and its KV cache is the same size as the uniform split's."""
    from maskpipe.pipeline.attention.dynamic_learning import SHARES
    from maskpipe.pipeline.stages.dynamic import DynamicStage

    def stage(**kw):
        return DynamicStage(stage="dynamic", name="d", **kw)

    assert stage(data="calib").profiled and stage(data="calib", recent="profile").profiled
    assert not stage(data="calib", recent=0.75).profiled and not stage(data="calib", window=8).profiled
    assert not stage(method="h2o").profiled and stage(method="h2o").budget.recent == 0.75

    budget = read_manifest(run_dir / "artifacts" / "dma-profiled")["dynamic"]["budget"]
    assert len(budget["shares"]) == 4 and all(len(row) == 2 and set(row) <= set(SHARES) for row in budget["shares"])
    res = results(run_dir)
    assert res["retrieval"]["dma-profiled"]["cost"]["keys_per_head"] == res["retrieval"]["dma"]["cost"]["keys_per_head"]
    assert res["perplexity"]["dma-profiled"]["short"]["ppl"] > 0
    from maskpipe.pipeline.attention.dynamic_masks import card_lines

    card = "\n".join(card_lines(read_manifest(run_dir / "artifacts" / "dma-profiled")["dynamic"]))
    assert "window a share of the budget per KV head, from a profile" in card
    assert "- recent share of the budget, per layer (KV heads in order): " in card


def test_the_kv_cache_of_a_dynamic_variant_holds_only_its_kept_keys(run_dir, monkeypatch):
    from maskpipe.pipeline.attention import dynamic_masks

    res = results(run_dir)["retrieval"]
    cost = res["dma"]["cost"]
    assert cost["keys_per_head"] == round(0.25 * cost["length"]) and cost["kv_cache_fraction"] < 0.3
    assert res["dense"]["cost"]["kv_cache_fraction"] == 1.0
    s = Session(ModelConfig(**MODEL))
    dyn = s.dynamic_of(Variant("dma", artifact=run_dir / "artifacts" / "dma"))
    held = []
    original = dynamic_masks.evict_decode

    def spy(model, source, budget, ids, new):
        tokens, cache = original(model, source, budget, ids, new, return_cache=True)
        held.extend(layer.keys.shape[2] for layer in cache.layers)
        assert all(layer.pos.shape[-1] == layer.keys.shape[2] for layer in cache.layers)
        return tokens

    monkeypatch.setattr(dynamic_masks, "evict_decode", spy)
    ids = torch.tensor([s.tokenizer("The grass is green. The sky is blue. " * 10).input_ids])
    dyn.decode(s.model, ids, 6)
    assert held and set(held) == {round(0.25 * ids.shape[1])}


def test_resuming_a_dynamic_stage_mid_learning_gives_the_uninterrupted_scorer_bit_for_bit(tmp_path, monkeypatch):
    from maskpipe.pipeline.stages import dynamic as stage

    cfg = config([DMA])
    whole = run(cfg, tmp_path / "whole")
    original = stage.train_scorer

    def killed_at_step_3(*a, on_log=None, **kw):
        def log(entry):
            on_log(entry)
            if entry.get("step") == 3:
                raise KeyboardInterrupt
        return original(*a, on_log=log, **kw)

    monkeypatch.setattr(stage, "train_scorer", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "status.json").read_text())["status"] == "stopped"
    events = []

    def recorded(*a, on_log=None, **kw):
        return original(*a, on_log=lambda e: (events.append(e), on_log(e)), **kw)

    monkeypatch.setattr(stage, "train_scorer", recorded)
    cut = run(cfg, tmp_path / "cut")
    assert events[0] == {"resumed_from_step": 2} and [e["step"] for e in events[1:]] == [3, 4]
    a, b = (load_file(str(r / "artifacts" / "dma" / SCORER_FILE)) for r in (whole, cut))
    assert set(a) == {"w", "A"} and all(torch.equal(a[k], b[k]) for k in a)
    sums = [read_manifest(r / "artifacts" / "dma")["dynamic"]["scorer"]["tensors"] for r in (whole, cut)]
    assert sums[0] == sums[1]


def _artifact(session, path, mask):
    return save_artifact(path, {}, session.linears, base_model=session.base_model_info(), pattern=None,
                         method={"name": f"dynamic-{mask.method}"}, dynamic=(mask.to_json(session.model), mask.tensors()))


def test_a_dynamic_artifact_round_trips_and_is_refused_on_another_model(tmp_path):
    s = Session(ModelConfig(**MODEL))
    scorer = KeyScorer.for_model(s.model, seed=3)
    mask = DynamicMask("learned", Budget(fraction=0.3, sink=2, window=8), {}, scorer)
    path = _artifact(s, tmp_path / "a", mask)
    manifest = read_manifest(path)
    assert manifest["dynamic"]["shape"] == [4, 2, 32] and manifest["dynamic"]["scorer"]["parameters"] == 4 * 2 * (2 * 32 + 1)
    back = Session(ModelConfig(**MODEL)).dynamic_of(Variant("a", artifact=path))
    assert back.method == "learned" and back.budget == mask.budget
    assert all(torch.equal(back.scorer.state_dict()[k], v) for k, v in scorer.state_dict().items())
    factored = DynamicMask("learned", mask.budget, {}, KeyScorer.for_model(s.model, rank=1))  # w_in, w_out, A
    back = Session(ModelConfig(**MODEL)).dynamic_of(Variant("f", artifact=_artifact(s, tmp_path / "f", factored)))
    assert back.scorer.state_dict().keys() == factored.scorer.state_dict().keys() == {"w_in", "w_out", "A"}
    assert all(torch.equal(back.scorer.state_dict()[k], v) for k, v in factored.scorer.state_dict().items())
    # per-head shares travel, and must fit the model's heads
    per_head = DynamicMask("learned", Budget(keys=40, shares=((0.5, 1.0),) * 4), {}, scorer)
    path_p = _artifact(s, tmp_path / "p", per_head)
    assert Session(ModelConfig(**MODEL)).dynamic_of(Variant("p", artifact=path_p)).budget == per_head.budget
    bad = read_manifest(path_p)
    bad["dynamic"]["budget"]["shares"] = [[0.5, 1.0, 1.0]] * 4
    (path_p / MANIFEST_FILE).write_text(json.dumps(bad))
    with pytest.raises(MaskpipeError, match=r"malformed dynamic mask .*shares for 4 x 3 heads"):
        Session(ModelConfig(**MODEL)).dynamic_of(Variant("p", artifact=path_p))
    # the recent window's share travels; an artifact from before it was written meant half the budget
    shared = DynamicMask("learned", Budget(keys=40, recent=0.6), {}, scorer)
    path_r = _artifact(s, tmp_path / "r", shared)
    assert Session(ModelConfig(**MODEL)).dynamic_of(Variant("r", artifact=path_r)).budget.resolve(100) == (4, 24, 12)
    old = read_manifest(path_r)
    del old["dynamic"]["budget"]["recent"]
    (path_r / MANIFEST_FILE).write_text(json.dumps(old))
    assert Session(ModelConfig(**MODEL)).dynamic_of(Variant("r", artifact=path_r)).budget.resolve(100) == (4, 20, 16)

    other = Session(ModelConfig(**MODEL))
    with torch.no_grad():
        other.model.model.layers[0].self_attn.q_proj.weight.add_(1e-3)
    with pytest.raises(MaskpipeError, match="fingerprint mismatch: the dynamic mask was made for"):
        other.dynamic_of(Variant("a", artifact=path))
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "dynamic": {**manifest["dynamic"], "shape": [4, 2, 16]}}))
    with pytest.raises(MaskpipeError, match=r"dynamic mask is for layers x KV heads x head_dim \[4, 2, 16\]"):
        Session(ModelConfig(**MODEL)).dynamic_of(Variant("a", artifact=path))
    (path / MANIFEST_FILE).write_text(json.dumps({**manifest, "attention": {"layers": []}}))
    with pytest.raises(MaskpipeError, match="carries both an attention plan and a dynamic mask"):
        Session(ModelConfig(**MODEL)).dynamic_of(Variant("a", artifact=path))
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    save_file({"w": torch.zeros(4, 2, 32), "A": torch.zeros(4, 2)}, str(path / SCORER_FILE))
    with pytest.raises(MaskpipeError, match="checksum or shape mismatch"):
        Session(ModelConfig(**MODEL)).dynamic_of(Variant("a", artifact=path))


def test_a_dynamic_mask_joins_nm_masks_in_one_artifact_or_two_but_applies_alone_among_attention_masks(run_dir, tmp_path, capsys):
    art = run_dir / "artifacts"
    assert not (art / "full-count" / SCORER_FILE).exists() and "scorer" not in read_manifest(art / "full-count")["dynamic"]
    both = read_manifest(art / "nm-snapkv")
    assert both["pattern"] == "2:4" and both["layers"] and both["dynamic"]["method"] == "snapkv"
    # A scorer learned with the N:M masks on, in one artifact with them; and the same as two artifacts.
    learned = read_manifest(art / "nm-dma")
    assert learned["layers"] == read_manifest(art / "nm")["layers"] and (art / "nm-dma" / SCORER_FILE).is_file()
    res = results(run_dir)
    assert res["perplexity"]["nm-dma"]["short"]["ppl"] != res["perplexity"]["nm"]["short"]["ppl"]
    capsys.readouterr()
    assert main(["apply", *MODEL_FLAGS, "--masks", str(art / "nm"), str(art / "dma")]) in (0, None)
    assert "with a dynamic attention mask" in capsys.readouterr().out
    assert main(["apply", *MODEL_FLAGS, "--masks", str(art / "dma"), str(art / "full-count")]) == 2
    assert "another attention mask: apply at most one dynamic mask" in capsys.readouterr().err


def test_apply_and_publish_know_the_scorer(run_dir, tmp_path, capsys):
    art = run_dir / "artifacts"
    capsys.readouterr()
    assert main(["apply", *MODEL_FLAGS, "--masks", str(art / "dma"), "--out", str(tmp_path / "applied")]) in (0, None)
    out = capsys.readouterr().out
    # DMA's mixed form: 4 layers x 2 KV heads x (2 x 32 + 1)
    assert "dynamic learned: 25% of the keys per KV head (sink 2, window 8)" in out and "520 parameters" in out
    assert (tmp_path / "applied" / SCORER_FILE).is_file()
    assert json.loads((tmp_path / "applied" / "maskpipe.json").read_text())["dynamic"]["method"] == "learned"

    assert main(["publish", str(run_dir), "--stage", "dma", "--out", str(tmp_path / "pub")]) in (0, None)
    card = (tmp_path / "pub" / "README.md").read_text()
    assert "## Dynamic attention mask" in card and "- method: `learned`" in card
    assert "25% of the keys per KV head and query (sink 2, window 8" in card
    assert "520 parameters (" in card and "dynamic-attention" in card and f"`{SCORER_FILE}`" in card
    assert (tmp_path / "pub" / SCORER_FILE).read_bytes() == (art / "dma" / SCORER_FILE).read_bytes()
    (tmp_path / "pub" / SCORER_FILE).write_bytes(b"not safetensors")
    capsys.readouterr()
    assert main(["publish", str(tmp_path / "pub"), "--out", str(tmp_path / "pub2")]) == 2
    assert SCORER_FILE in capsys.readouterr().err and not (tmp_path / "pub2").exists()


@pytest.mark.parametrize("change, expected", [
    ({"keep": 1.5}, "stages.0.keep: a fraction of the keys must be in (0, 1], got 1.5"),
    ({"keep": 0}, "stages.0.keep: a count of keys must be >= 1, got 0"),
    ({"data": None}, "stages.0.data: learning a key scorer needs a haystack corpus"),
    ({"method": "tova"}, "stages.0.method: Input should be 'learned', 'h2o', 'snapkv', 'key-norm', 'random' or 'oracle'"),
    ({"kernel": 4}, "stages.0.kernel: expected an odd pooling width"),
    ({"masks": "later"}, "stages.0.masks: no earlier oneshot or learn stage named 'later'"),
    ({"data": "nope"}, "stages.0.data: no corpus named 'nope'"),
    ({"mix_heads": False, "rank": 2}, "stages.0.rank: factors the mixed-heads scorer; remove it or set mix_heads: true"),
    ({"rank": 0}, "stages.0.rank: Input should be greater than 0"),
    ({"recent": 1.5}, "stages.0.recent: a share of the budget in (0, 1], or profile, got 1.5"),
    ({"recent": "profile"}, "stages.0.recent: profile chooses a learned scorer's split per KV head: needs method "
                            "learned and no window"),
])
def test_a_dynamic_stage_config_error_names_its_key(change, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"name": "t", "model": {"name_or_path": "m"}, "data": {"calib": "a.txt"},
                          "stages": [{**DMA, **change}]}, "f.yaml")
    assert f"f.yaml: {expected}" in str(e.value)
