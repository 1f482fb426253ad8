import math

import pytest
import torch

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.eval.perplexity import perplexity, windows


def test_windows_non_overlapping_drop_the_tail():
    assert windows(10, 4, None) == [(0, 4, 1), (4, 8, 1)]
    assert windows(10, 4, 4) == windows(10, 4, None)


def test_sliding_windows_score_every_token_once():
    spans = windows(23, 8, 3)
    scored = [t for s, e, first in spans for t in range(s + first, e)]
    assert scored == list(range(1, 23))


@pytest.fixture(scope="module")
def ids(tokenizer):
    from tests.conftest import CORPORA

    text = "\n\n".join((CORPORA / "kjv.valid.txt").read_text().splitlines()[:6])
    return tokenizer(text, return_tensors="pt").input_ids[0][:640]


def test_batch_size_does_not_change_the_number(micro, ids):
    model, _ = micro
    a = perplexity(model, ids, 64, batch_size=1)
    b = perplexity(model, ids, 64, batch_size=5)
    assert a.tokens == b.tokens == (len(ids) // 64) * 63 and a.windows == len(ids) // 64
    assert a.ppl == pytest.approx(b.ppl, rel=1e-5)


def test_matches_the_reference_loop(micro, ids):
    # The SparseGPT/Wanda evaluation loop: mean over windows of the HF loss.
    model, _ = micro
    seqlen = 64
    losses = [model(ids[i * seqlen:(i + 1) * seqlen][None], labels=ids[i * seqlen:(i + 1) * seqlen][None]).loss
              for i in range(len(ids) // seqlen)]
    reference = math.exp(torch.stack(losses).mean().item())
    assert perplexity(model, ids, seqlen).ppl == pytest.approx(reference, rel=1e-5)
    assert 10 < reference < 200  # the fixture's measured kjv perplexity is about 35


def test_sliding_window_beats_non_overlapping(micro, ids):
    model, _ = micro
    assert perplexity(model, ids, 64, stride=16).ppl < perplexity(model, ids, 64).ppl


def test_too_short_text_is_an_error(micro):
    with pytest.raises(MaskpipeError, match="fewer than one window"):
        perplexity(micro[0], torch.arange(10), 64)


def test_a_mask_learned_from_a_learned_mask_reports_the_gap_of_the_one_shot_mask_it_started_from():
    from maskpipe.pipeline.run.results import perplexity_table

    ppl = {"dense": {"kjv": {"ppl": 68.0, "tokens": 10}}, "sparsegpt": {"kjv": {"ppl": 76.0, "tokens": 10}},
           "general": {"kjv": {"ppl": 69.0, "tokens": 10}}, "domain": {"kjv": {"ppl": 67.0, "tokens": 10}},
           "dsnot": {"kjv": {"ppl": 74.0, "tokens": 10}}, "from-dsnot": {"kjv": {"ppl": 70.0, "tokens": 10}}}
    stages = {"sparsegpt": {"method": "sparsegpt"}, "general": {"method": "maskllm", "prior": "sparsegpt"},
              "domain": {"method": "maskllm", "prior": "general"},
              "dsnot": {"method": "dsnot", "prior": "sparsegpt"}, "from-dsnot": {"method": "maskllm", "prior": "dsnot"}}
    table = perplexity_table(ppl, stages)
    assert "maskllm from sparsegpt (gap closed: kjv 88%)" in table  # (76 - 69) / (76 - 68)
    assert "maskllm from general (gap of sparsegpt's closed: kjv 112%)" in table  # (76 - 67) / (76 - 68)
    assert "maskllm from dsnot (gap closed: kjv 67%)" in table  # a one-shot prior is its own start: (74 - 70) / (74 - 68)
    plans = perplexity_table({"dense": ppl["dense"], "learned-50": {"kjv": {"ppl": 68.3, "tokens": 10}},
                              "learned-75": {"kjv": {"ppl": 68.5, "tokens": 10}}},
                             {"learned-50": {"method": "attention-learned"},
                              "learned-75": {"method": "attention-learned", "prior": "learned-50"}})
    assert "attention-learned from learned-50 |" in plans and "gap" not in plans  # a plan has no gap to close
