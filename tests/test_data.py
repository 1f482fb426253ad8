import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.schema import DataConfig
from maskpipe.pipeline.io.data import TokenStream, calibration_blocks, eval_text, open_source
from tests.conftest import CORPORA, ROOT

SEQLEN = 64


def corpus(*sources, **kw) -> DataConfig:
    return DataConfig.model_validate({"sources": list(sources), **kw})


def lines(name: str) -> list[str]:
    return (CORPORA / name).read_text().splitlines()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two short corpora so that an epoch is a dozen blocks: unique records, a blank one to skip, and one
    record long enough to leave several blocks in the packing buffer."""
    d = tmp_path_factory.mktemp("small")
    kjv = [f"{i}: {line[:100]}" for i, line in enumerate(lines("kjv.train.txt")[:24])]
    py = [f"{i}: {line[:100]}" for i, line in enumerate(lines("pydocs.train.txt")[:6])]
    py.append(lines("pydocs.valid.txt")[0][:1500])
    (d / "kjv.txt").write_text("\n".join(kjv[:10] + [" "] + kjv[10:]) + "\n")
    (d / "py.txt").write_text("\n".join(py) + "\n")
    return {"kjv": str(d / "kjv.txt"), "py": str(d / "py.txt"), "kjv_records": kjv}


def documents(blocks: torch.Tensor, eos: int) -> list[tuple[int, ...]]:
    """The packed token stream cut back into records at the EOS separators (the last, partial one dropped)."""
    out, doc = [], []
    for t in blocks.flatten().tolist():
        if t == eos:
            out.append(tuple(doc))
            doc = []
        else:
            doc.append(t)
    return out


def token_ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("rank", [0, 1])
def test_exact_resume_across_epochs_windows_mixing_and_ranks(small, tokenizer, rank):
    data = corpus(small["kjv"], small["py"], weights=[2, 1], shuffle_buffer=8, shuffle_blocks=5)
    stream = TokenStream(data, tokenizer, SEQLEN, seed=3, rank=rank, world_size=2)
    states, blocks = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(stream.state_dict())))
        blocks.append(next(stream))
    sources = [st["start"]["sources"] for st in states]
    assert max(s[0]["epoch"] for s in sources) >= 2  # the run wraps epochs
    assert any(s[0]["epoch"] > 0 and s[0]["records"] > 0 for s in sources)  # some resumes land mid-epoch > 0
    assert any(len(s[1]["buffer"]) > SEQLEN for s in sources)  # and some with blocks still in a buffer
    assert {st["pos"] for st in states} >= {1, 2, 3}  # and mid-window

    for k in range(0, 35, 3):
        resumed = TokenStream(data, tokenizer, SEQLEN, seed=3, rank=rank, world_size=2)
        resumed.load_state_dict(states[k])
        for j in range(k, k + 5):
            assert torch.equal(next(resumed), blocks[j]), f"resumed at block {k}, block {j} differs"


def test_weights_are_shares_of_tokens_not_of_records(small, tokenizer):
    # py's records are far longer than kjv's (one of 1,500 characters); equal weights must still give
    # equal tokens. Mixing record by record gave py most of the tokens.
    data = corpus(small["kjv"], small["py"], shuffle_blocks=0)
    stream = TokenStream(data, tokenizer, SEQLEN)
    stream.next_batch(41)
    shares = stream.token_shares()
    assert list(shares) == [small["kjv"], small["py"]]
    assert abs(shares[small["kjv"]] - 0.5) <= 1 / 41
    weighted = TokenStream(corpus(small["kjv"], small["py"], weights=[3, 1]), tokenizer, SEQLEN)
    weighted.next_batch(512)  # one whole shuffle window: exact up to a block
    assert weighted.token_shares()[small["kjv"]] == pytest.approx(0.75, abs=1 / 512)
    assert weighted.tokens() == 512 * SEQLEN


def test_block_shuffle_spreads_a_batch_over_the_corpus(small, tokenizer):
    eos = tokenizer.eos_token_id
    in_order = TokenStream(corpus(small["kjv"], shuffle_blocks=0), tokenizer, SEQLEN).next_batch(4)
    shuffled = TokenStream(corpus(small["kjv"], shuffle_blocks=12), tokenizer, SEQLEN).next_batch(12)
    first12 = TokenStream(corpus(small["kjv"], shuffle_blocks=0), tokenizer, SEQLEN).next_batch(12)
    # The same twelve blocks, in another order: nothing lost, nothing repeated.
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, first12.tolist()))
    assert not torch.equal(shuffled[:4], in_order)
    positions = [next(i for i, b in enumerate(first12) if torch.equal(b, s)) for s in shuffled[:4]]
    assert max(positions) - min(positions) >= 4  # a batch is no longer four consecutive pieces
    assert int((shuffled == eos).sum()) == int((first12 == eos).sum())


def test_ranks_deal_out_the_single_rank_stream_and_packing_keeps_every_token(small, tokenizer):
    data = corpus(small["kjv"], shuffle_buffer=8, shuffle_blocks=0)
    single = TokenStream(data, tokenizer, SEQLEN, seed=0).next_batch(24)
    ranks = [TokenStream(data, tokenizer, SEQLEN, seed=0, rank=r, world_size=3).next_batch(8) for r in range(3)]
    assert single.shape == (24, SEQLEN) and single.dtype == torch.long
    for r in range(3):
        assert torch.equal(ranks[r], single[r::3])
    # One source, so no oversampling: every record whole, exactly once per epoch, blank one skipped.
    records = {token_ids(tokenizer, r) for r in small["kjv_records"]}
    assert set(documents(single, tokenizer.eos_token_id)[: len(records)]) == records


def test_state_is_global_so_a_run_resumes_on_another_number_of_ranks(small, tokenizer):
    data = corpus(small["kjv"], small["py"], shuffle_buffer=8)
    single = TokenStream(data, tokenizer, SEQLEN, seed=1)
    single.next_batch(4)
    expected = single.next_batch(6)
    two = [TokenStream(data, tokenizer, SEQLEN, seed=1, rank=r, world_size=2) for r in range(2)]
    for s in two:
        s.next_batch(2)  # a global batch of 4 on two ranks
    assert two[0].state_dict() == two[1].state_dict()
    three = [TokenStream(data, tokenizer, SEQLEN, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in three:
        s.load_state_dict(json.loads(json.dumps(two[0].state_dict())))
    got = torch.stack([b for blocks in zip(*(s.next_batch(2) for s in three)) for b in blocks])
    assert torch.equal(got, expected)


def test_default_stream_reads_a_corpus_stored_in_order_from_all_over_not_its_head(tmp_path, tokenizer):
    # A book or a manual is stored in order; read in file order, a run's first blocks (all a short
    # budget sees) are its first chapters. The default record buffer spreads them over the whole file.
    records = [f"{i}: {line[:60]}" for i, line in enumerate(lines("kjv.train.txt"))]  # 111 chapters
    (tmp_path / "book.txt").write_text("\n".join(records) + "\n")
    ids = {token_ids(tokenizer, r): i for i, r in enumerate(records)}
    for data, spread in ((corpus(str(tmp_path / "book.txt"), shuffle_blocks=0), True),
                         (corpus(str(tmp_path / "book.txt"), shuffle_buffer=0, shuffle_blocks=0), False)):
        blocks = TokenStream(data, tokenizer, SEQLEN).next_batch(12)  # about a quarter of the file
        seen = [ids[d] for d in documents(blocks, tokenizer.eos_token_id)]
        assert len(seen) >= 20
        assert (max(seen) > 0.75 * len(records)) == spread, sorted(seen)


def test_default_short_run_reads_pieces_of_many_long_documents_not_a_few_whole_ones(tmp_path, tokenizer):
    # 300 documents of about 3,100 tokens. A window of 512 x 64 tokens held about 11 of them, so a short
    # run (and its calibration set) read those few from end to end; a 2M-token window holds the whole file.
    (tmp_path / "docs.txt").write_text("\n".join(f"Document {i} says hello. " * 240 for i in range(300)) + "\n")
    blocks = TokenStream(corpus(str(tmp_path / "docs.txt")), tokenizer, SEQLEN).next_batch(64)
    docs = {re.search(r"Document (\d+)", tokenizer.decode(b)).group(1) for b in blocks}
    assert len(docs) >= 40, sorted(docs)
    old = TokenStream(corpus(str(tmp_path / "docs.txt"), shuffle_blocks=512), tokenizer, SEQLEN).next_batch(64)
    assert len({re.search(r"Document (\d+)", tokenizer.decode(b)).group(1) for b in old}) <= 20


def test_a_shuffle_window_never_holds_more_than_one_epoch_of_every_source(small, tokenizer):
    # A window larger than the corpus would only repeat blocks (and tokenize them all up front).
    shuffled = TokenStream(corpus(small["kjv"], small["py"], shuffle_blocks=10_000), tokenizer, SEQLEN)
    first = next(shuffled)
    window = sorted(tuple(b.tolist()) for b in [first, *shuffled.next_batch(len(shuffled._window) - 1)])
    in_order = TokenStream(corpus(small["kjv"], small["py"], shuffle_blocks=0), tokenizer, SEQLEN)
    assert len(window) < 40  # an epoch of the two sources is about 30 blocks
    assert window == sorted(tuple(b.tolist()) for b in in_order.next_batch(len(window)))


def test_records_end_with_the_separator_text_instead_of_eos_when_asked(small, tokenizer):
    blocks = TokenStream(corpus(small["kjv"], shuffle_buffer=0, shuffle_blocks=0, separator="\n"), tokenizer,
                         SEQLEN).next_batch(4)
    assert tokenizer.eos_token_id not in blocks.flatten().tolist()
    first = token_ids(tokenizer, small["kjv_records"][0] + "\n")
    assert tuple(blocks.flatten().tolist()[: len(first)]) == first


def test_unshuffled_stream_is_the_corpus_in_order(small, tokenizer):
    blocks = calibration_blocks(corpus(small["kjv"], shuffle_buffer=0, shuffle_blocks=0), tokenizer, n_samples=20,
                                seqlen=SEQLEN)
    expected = [token_ids(tokenizer, r) for r in small["kjv_records"]]
    assert documents(blocks, tokenizer.eos_token_id)[: len(expected)] == expected


def test_same_seed_same_blocks_other_seed_other_order(small, tokenizer):
    mixed = corpus(small["kjv"], small["py"], shuffle_buffer=16)
    a = calibration_blocks(mixed, tokenizer, n_samples=8, seqlen=SEQLEN, seed=0)
    assert torch.equal(a, calibration_blocks(mixed, tokenizer, n_samples=8, seqlen=SEQLEN, seed=0))
    assert not torch.equal(a, calibration_blocks(mixed, tokenizer, n_samples=8, seqlen=SEQLEN, seed=1))


def test_shuffle_buffer_reorders_records_per_seed_and_per_epoch(small, tokenizer):
    data = corpus(small["kjv"], shuffle_buffer=8, shuffle_blocks=0)
    n = len(small["kjv_records"])
    eos = tokenizer.eos_token_id
    docs = {seed: documents(calibration_blocks(data, tokenizer, 30, SEQLEN, seed), eos) for seed in (0, 1)}
    in_order = [token_ids(tokenizer, r) for r in small["kjv_records"]]
    epoch0, epoch1 = docs[0][:n], docs[0][n : 2 * n]
    assert sorted(epoch0) == sorted(epoch1) == sorted(in_order)
    assert len({tuple(epoch0), tuple(epoch1), tuple(in_order), tuple(docs[1][:n])}) == 4


def test_jsonl_and_parquet_sources_with_custom_text_fields(tmp_path, tokenizer):
    # Apart and unshuffled: datasets sleeps 5 s whenever a shuffled or mixed parquet stream closes.
    jsonl = {"path": str(tmp_path / "*.jsonl"), "text_field": "content"}
    for part in range(2):
        rows = [{"id": i, "content": f"json record {part}.{i}"} for i in range(3)]
        (tmp_path / f"{part}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    json_records = [f"json record {p}.{i}" for p in range(2) for i in range(3)]
    assert eval_text(corpus(jsonl)) == "\n\n".join(json_records)  # files in sorted order

    table = pa.table({"body": [f"parquet record {i}" for i in range(3)], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "b.parquet")
    parquet = corpus({"path": str(tmp_path / "b.parquet"), "text_field": "body"})
    assert list(open_source(parquet.sources[0]).features) == ["text"]
    assert sorted(r["text"] for r in open_source(parquet.sources[0])) == [f"parquet record {i}" for i in range(3)]
    assert TokenStream(parquet, tokenizer, 16).next_batch(3).shape == (3, 16)

    # A zero weight leaves a source out of the mix.
    only_json = TokenStream(corpus(jsonl, parquet.sources[0], weights=[1, 0]), tokenizer, 16)
    assert only_json.labels == [jsonl["path"]]


def test_bad_sources_raise_clear_errors(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"other": "no text"}) + "\n")
    with pytest.raises(MaskpipeError, match=r"a\.jsonl.*a record has no text field 'text'"):
        eval_text(corpus(str(tmp_path / "a.jsonl")))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(MaskpipeError, match=r"b\.parquet.*no text field 'text' \(fields: \['body'\]\)"):
        TokenStream(corpus(str(tmp_path / "b.parquet")), tokenizer, SEQLEN)
    with pytest.raises(MaskpipeError, match="no files match"):
        TokenStream(corpus(str(tmp_path / "missing" / "*.txt")), tokenizer, SEQLEN)
    with pytest.raises(MaskpipeError, match="no files match"):
        TokenStream(corpus(str(tmp_path / "missing.jsonl")), tokenizer, SEQLEN)
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(MaskpipeError, match="empty corpus"):
        next(TokenStream(corpus(str(tmp_path / "blank.txt")), tokenizer, SEQLEN))
    with pytest.raises(MaskpipeError, match="empty corpus"):
        eval_text(corpus(str(tmp_path / "blank.txt")))


def test_eval_text_follows_the_wikitext_protocol():
    path = CORPORA / "kjv.valid.txt"
    assert eval_text(corpus(str(path))) == "\n\n".join(lines("kjv.valid.txt"))
    assert eval_text(corpus({"path": str(path), "sample_by": "document"})) == path.read_text()


def test_state_from_a_different_stream_is_refused(small, tokenizer):
    data = corpus(small["kjv"], shuffle_buffer=8)
    stream = TokenStream(data, tokenizer, SEQLEN)
    next(stream)
    state = stream.state_dict()
    with pytest.raises(MaskpipeError, match="seqlen: saved 64, this stream 32"):
        TokenStream(data, tokenizer, 32).load_state_dict(state)
    with pytest.raises(MaskpipeError, match="seed: saved 0, this stream 5"):
        TokenStream(data, tokenizer, SEQLEN, seed=5).load_state_dict(state)


def test_vendored_train_excerpts_are_spread_over_their_whole_source():
    # The valid files are the end of each source: an excerpt from the head of the train file (Genesis
    # and Exodus only) made the embedded default learn a mask for text it is never evaluated on.
    manifest = json.loads((CORPORA / "excerpts.json").read_text())
    assert sorted(manifest) == ["kjv.train.txt", "pydocs.train.txt"]
    for name, m in manifest.items():
        picked, total = m["records"], m["source_records"]
        assert lines(name) == [r for r in lines(name) if r.strip()] and len(lines(name)) == len(picked)
        assert picked == sorted(set(picked)) and picked[0] < 0.05 * total and picked[-1] > 0.95 * total
        assert max(b - a for a, b in zip(picked, picked[1:])) <= 3 * total / len(picked)
        source = ROOT / m["source"]  # ../shared beside the repository, where CI has it
        if source.is_file():
            recs = [r for r in source.read_text(encoding="utf-8").split("\n") if r.strip()]
            assert len(recs) == total and lines(name) == [recs[i] for i in picked]
