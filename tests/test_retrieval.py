import json

import pytest
import torch

from maskpipe.jobs.cli import main
from maskpipe.pipeline.attention.plans import kv_heads, planned, uniform_plan
from maskpipe.pipeline.eval.prompts import FILLER, PASSKEY_INTRO, PASSKEY_QUESTION, build_prompt, split_sentences
from maskpipe.pipeline.eval.retrieval import exact_match, multikey_samples, niah_samples, passkey_samples, score
from tests.conftest import CORPORA, MICRO

NEEDLE = "The pass key is 12345. Remember it. 12345 is the pass key."


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_fits_its_length_with_the_needle_at_a_sentence_boundary(tokenizer, depth):
    hay = split_sentences(FILLER) * 40
    ids, realised = build_prompt(tokenizer, PASSKEY_INTRO, hay, [NEEDLE], [depth], PASSKEY_QUESTION, 200)
    assert 190 <= len(ids) <= 200
    text = tokenizer.decode(ids)
    assert text.startswith(PASSKEY_INTRO) and text.endswith(PASSKEY_QUESTION)
    before, after = text[len(PASSKEY_INTRO):-len(PASSKEY_QUESTION)].split(NEEDLE)
    assert before.strip() == "" or before.strip().endswith(".")
    assert after.strip() == "" or after.strip()[0].isupper()
    assert realised == pytest.approx(depth, abs=0.05)
    if depth == 0.0:
        assert before.strip() == ""
    if depth == 1.0:
        assert after.strip() == ""


def test_samples_are_fixed_by_the_seed_and_lengths_are_tokens(tokenizer):
    a = passkey_samples(tokenizer, [96, 160], 3, seed=0)
    assert [s.ids for s in a] == [s.ids for s in passkey_samples(tokenizer, [96, 160], 3, seed=0)]
    assert [s.answers for s in a] != [s.answers for s in passkey_samples(tokenizer, [96, 160], 3, seed=1)]
    assert all(s.length - 12 <= len(s.ids) <= s.length for s in a)
    hay = split_sentences((CORPORA / "kjv.valid.txt").read_text())
    grid = niah_samples(tokenizer, hay, [128], [0.0, 1.0], 2, seed=0)
    assert [(s.length, s.depth) for s in grid] == [(128, 0.0)] * 2 + [(128, 1.0)] * 2
    mk = multikey_samples(tokenizer, [320], 2, seed=0, keys=3, values=2)
    text = tokenizer.decode(mk[0].ids)
    assert len(mk[0].answers) == 2 and text.count("One of the special magic numbers for") == 6
    assert all(f"for {mk[0].info['key']} is: {v}." in text for v in mk[0].answers)


def test_exact_match():
    assert exact_match(" 12345. Remember", ["12345"])
    assert not exact_match(" 123456", ["12345"]) and not exact_match(" 1234 5", ["12345"])
    assert not exact_match(" the key", ["12345"])
    assert exact_match(" 22 and 11.", ["11", "22"]) and not exact_match(" 22 and 33", ["11", "22"])


def test_retrieval_cli_on_the_micro_model(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["retrieval", "--model", str(MICRO), "--dtype", "float32", "--passkey", "96", "160", "--samples", "4",
                 "--niah", "96", "160", "--depths", "0", "0.5", "1", "--niah-samples", "1",
                 "--data", str(CORPORA / "kjv.valid.txt"), "--multikey", "128", "--keys", "2",
                 "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| dense |" in table and "passkey (by length 96/160)" in table
    results = json.loads((out / "results.json").read_text())["dense"]
    assert results["passkey"]["n"] == 8 and results["multikey"]["n"] == 4
    assert {(c["length"], c["depth"]) for c in results["niah"]["cells"]} == {(L, d) for L in (96, 160)
                                                                            for d in (0.0, 0.5, 1.0)}
    assert (out / "retrieval" / "dense-niah.png").stat().st_size > 0
    samples = json.loads((out / "retrieval" / "dense.json").read_text())["samples"]
    assert len(samples["niah"]) == 6 and all("generated" in r for r in samples["niah"])
    # the micro model was trained on this passkey template: the dense model retrieves
    assert results["passkey"]["acc"] >= 0.75 and results["niah"]["acc"] >= 0.5


@torch.no_grad()
def one_at_a_time(model, tokenizer, samples):
    """The decoding retrieval used before batching: one prompt, no padding, its own budget."""
    texts = []
    for s in samples:
        budget = len(tokenizer(" " + ", ".join(s.answers), add_special_tokens=False).input_ids) + 2
        out = model(input_ids=torch.tensor([s.ids]), use_cache=True)
        new = []
        for _ in range(budget):
            new.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[new[-1]]]), cache=out.cache, use_cache=True)
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


@pytest.mark.slow
def test_batched_decoding_generates_exactly_what_one_prompt_at_a_time_does(micro, tokenizer):
    model, _ = micro
    hay = split_sentences((CORPORA / "kjv.valid.txt").read_text())
    samples = (passkey_samples(tokenizer, [96], 2, seed=3) + niah_samples(tokenizer, hay, [160], [0.0, 0.5, 1.0], 1, 3)
               + multikey_samples(tokenizer, [256], 2, seed=3, keys=2, values=2, haystack=hay))
    assert len({len(s.ids) for s in samples if s.length == 160}) > 2  # the batches really are padded
    # every head streaming with a short window: its sink (counted from each prompt's first token, not from
    # the padding) decides these generations
    plan = uniform_plan(kv_heads(model)[:2], True, sink=4, window=24)
    for plan_ in (None, plan):
        with planned(model, plan_):
            reference = one_at_a_time(model, tokenizer, samples)
            batched = score(model, tokenizer, samples)
            assert [r["generated"] for r in batched] == reference
            assert [r["generated"] for r in score(model, tokenizer, samples, batch_size=3)] == reference


def test_a_tokenizer_whose_pad_id_is_past_the_embedding_table_decodes(micro, tokenizer):
    # Some tokenizers add their pad token past the model's embedding table; padded positions are
    # masked, so decoding pads with an id the model has and generates what it generates without it.
    import copy

    model, _ = micro
    padded = copy.deepcopy(tokenizer)
    padded.add_special_tokens({"pad_token": "<pad-past-the-table>"})
    assert padded.pad_token_id >= model.get_input_embeddings().num_embeddings
    samples = passkey_samples(tokenizer, [96, 128], 2, seed=0)
    assert score(model, padded, samples) == score(model, tokenizer, samples)


def test_prompt_ids_past_the_embedding_table_are_one_error(micro):
    from maskpipe.pipeline import MaskpipeError
    from maskpipe.pipeline.eval.retrieval import greedy_decode

    model, _ = micro
    with pytest.raises(MaskpipeError, match="token ids past the model's embedding table"):
        greedy_decode(model, [[1, 2, model.get_input_embeddings().num_embeddings]], 2)
