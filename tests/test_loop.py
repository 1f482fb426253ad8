"""The one training loop (`pipeline.train.loop`): masks and gates learn what they learned before it existed,
and gates and DMA's key scorer learn data-parallel on two real (gloo) ranks what one process learns on the
same batch.

The recorded values come from the two loops that `pipeline.train.loop.train` replaced (commit a179437), run
on a corpus the test writes itself, so that they do not move with the fixture corpora. A learned hard mask
is an argmax over logits, so the last bits of a kernel's rounding flip a few near-tied groups: on one CPU
with AVX2 kernels and another with AVX-512 the masks below differ in 2 (candidates) and 54 (positions) of
786,432 weights, and the gates by 6e-7. The masks are compared weight by weight against the recorded ones
(`fixtures/loop_masks.npz`, np.packbits of each hard mask) and must agree on all but 1e-3 of them (a loop that changed would flip far more); the
candidates mask was checked bit for bit against a179437's digest (8067199acf928b91) with AVX2 kernels."""

import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from maskpipe.pipeline.train.checkpoint import CheckpointDir
from tests.conftest import MICRO

# The hard masks and the gates that the loops of a179437 learned.
RECORDED_MASKS = Path(__file__).parent / "fixtures" / "loop_masks.npz"
MASK_AGREEMENT = 1 - 1e-3
# Learned under the stage's default budget (half the KV heads streaming: mean gate held at 0.5)
RECORDED_GATES = [[0.4784659743309021, 0.4788059592247009], [0.47757431864738464, 0.47638949751853943],
                  [0.47687050700187683, 0.6261546015739441], [0.4794212579727173, 0.5063179135322571]]


def write_corpus(path) -> str:
    rng = random.Random(0)
    words = ["river", "stone", "garden", "window", "letter", "market", "winter", "candle", "harbor", "meadow"]
    lines = [f"In year {rng.randint(100, 999)} the {rng.choice(words)} by the {rng.choice(words)} was "
             f"{rng.choice(['old', 'new', 'quiet', 'bright'])}. It stood near the {rng.choice(words)} for "
             f"{rng.randint(2, 90)} days." for _ in range(600)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _stream(corpus, tokenizer, seqlen, rank=0, world=1):
    from maskpipe.pipeline.core.schema import DataConfig
    from maskpipe.pipeline.io.data import TokenStream

    class BlocksOfA179437(TokenStream):
        """The batches the recorded values were learned on: shuffle windows of exactly 512 blocks, the
        default then, even past an epoch. The stream's windows have changed since; the loop must not."""

        def _fill_window(self):
            return [self._draw() for _ in range(512)]

    data = DataConfig.model_validate({"sources": [corpus], "shuffle_buffer": 8})
    return BlocksOfA179437(data, tokenizer, seqlen, seed=0, rank=rank, world_size=world)


def learned_masks(model, linears, tokenizer, corpus, ckpt, per_group: str) -> dict[str, torch.Tensor]:
    from maskpipe.pipeline.stages.learn import LearnStage
    from maskpipe.pipeline.nm.learn import hard_mask, train_masks

    st = LearnStage.model_validate({"stage": "learn", "name": "learn", "data": "d", "steps": 6, "batch_size": 2,
                                    "seqlen": 32, "lr": 1e-2, "log_every": 2, "checkpoint_every": 4,
                                    "grad_accum": 2, "warmup_steps": 2, "sparse_reg": 1e-3,
                                    "logits_per_group": per_group})
    logits, _ = train_masks(model, linears, st, 2, 4, _stream(corpus, tokenizer, 32), seed=0,
                            store=CheckpointDir(ckpt, keep=2))
    return {k: hard_mask(v, 2, 4) for k, v in logits.items()}


def gate_stage(**kw):
    from maskpipe.pipeline.stages.attention import AttentionStage

    return AttentionStage.model_validate({"stage": "attention", "data": "d", "steps": 4, "batch_size": 2,
                                          "seqlen": 128, "needles": 2, "warmup_steps": 1, "log_every": 2,
                                          "checkpoint_every": 2, "keep_checkpoints": 2, **kw})


def learn_gates(model, tokenizer, corpus, ckpt, on_log=None):
    from maskpipe.pipeline.attention.gates import train_gates

    return train_gates(model, tokenizer, gate_stage(), _stream(corpus, tokenizer, 128), sink=4, window=16, seed=0,
                       store=CheckpointDir(ckpt, keep=2), on_log=on_log)


def learn_scorer(model, tokenizer, corpus, ckpt, on_log=None, loss="attention"):
    from maskpipe.pipeline.attention.dynamic_learning import train_scorer
    from maskpipe.pipeline.stages.dynamic import DynamicStage

    st = DynamicStage.model_validate({"stage": "dynamic", "data": "d", "keep": 0.25, "sink": 2, "window": 8,
                                      "steps": 3, "batch_size": 2, "seqlen": 128, "lr": 0.2, "warmup_steps": 1,
                                      "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 2})
    scorer, history = train_scorer(model, tokenizer, st, _stream(corpus, tokenizer, 128), st.budget, seed=0,
                                   store=CheckpointDir(ckpt, keep=2), on_log=on_log, loss=loss)
    return {k: v.detach() for k, v in scorer.state_dict().items()}, history


def learn_scorers(model, tokenizer, corpus, ckpt):
    """The scorer under every loss (one spawn of the ranks for all): "attention" averages over rows,
    "hidden" and "kl" over answer positions (micro-llama's samples hold equally many: the split is even)."""
    return {loss: learn_scorer(model, tokenizer, corpus, Path(ckpt) / loss, loss=loss)
            for loss in ("attention", "hidden", "kl")}


def test_fixed_seeds_learn_the_recorded_masks_and_gates(micro, tokenizer, tmp_path, monkeypatch):
    # The recordings drew torch's noise through whole tensors; the CPU's fused 2:4 kernel draws its own
    # (`pipeline.nm.fused`, pinned against the whole-tensor path from the same uniforms in test_soft_mask).
    from maskpipe.pipeline.nm import fused

    monkeypatch.setattr(fused, "ENABLED", False)
    model, linears = micro
    corpus = write_corpus(tmp_path / "corpus.txt")
    recorded = np.load(RECORDED_MASKS, allow_pickle=False)
    for per_group in ("candidates", "positions"):
        masks = learned_masks(model, linears, tokenizer, corpus, tmp_path / per_group, per_group)
        same = total = 0
        for name, mask in masks.items():
            ours = mask.numpy().ravel()
            theirs = np.unpackbits(recorded[f"{per_group}|{name}"], count=ours.size).astype(bool)
            same, total = same + int((ours == theirs).sum()), total + ours.size
        assert len(masks) == len([k for k in recorded.files if k.startswith(per_group)])
        assert same / total >= MASK_AGREEMENT, (per_group, total - same)
    gates, history = learn_gates(model, tokenizer, corpus, tmp_path / "gates")
    torch.testing.assert_close(gates, torch.tensor(RECORDED_GATES), atol=1e-6, rtol=0)
    assert [h["step"] for h in history] == [2, 4] and list(history[0]) == ["step", "distance", "lr", "gate_mean",
                                                                           "gates_below_half"]


def _on_ranks(rank, world, port, learn, corpus, ckpt, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.core.models import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path=str(MICRO), dtype="float32", device="cpu")
    model, tokenizer = load_model(cfg), load_tokenizer(cfg)
    try:
        learned = learn(model, tokenizer, corpus, ckpt)
        if rank == 0:
            torch.save(learned, out)
    finally:
        dist.destroy_process_group()


def on_two_ranks(tmp_path, name, learn):
    """What `learn(model, tokenizer, corpus, checkpoint folder)` returns on rank 0 of two gloo ranks that
    run it together on tmp_path's corpus.txt, their checkpoints under tmp_path/name."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"{name}.pt"
    mp.start_processes(_on_ranks, args=(2, port, learn, str(tmp_path / "corpus.txt"), str(tmp_path / name), str(out)),
                       nprocs=2, start_method="spawn")
    return torch.load(out)


@pytest.mark.slow
def test_two_ranks_learn_the_gates_of_one_process_and_resume_on_one(micro, tokenizer, tmp_path):
    """Each rank runs half of every global batch; the checkpoint two ranks wrote resumes on one."""
    model, _ = micro
    corpus = write_corpus(tmp_path / "corpus.txt")
    single, history = learn_gates(model, tokenizer, corpus, tmp_path / "single")
    two, two_history = on_two_ranks(tmp_path, "two", learn_gates)
    torch.testing.assert_close(two, single, atol=1e-5, rtol=0)
    assert [h["step"] for h in two_history] == [2, 4]
    for a, b in zip(two_history, history):
        assert a["distance"] == pytest.approx(b["distance"], rel=1e-4)

    written = tmp_path / "two" / "step-00000002"
    assert [f.name for f in written.glob("shard-*")] == ["shard-00000.safetensors"]  # rank 0 holds the gates whole
    shutil.copytree(written, tmp_path / "cut" / "step-00000002")
    events = []
    resumed, _ = learn_gates(model, tokenizer, corpus, tmp_path / "cut", on_log=events.append)
    assert events[0] == {"resumed_from_step": 2}
    torch.testing.assert_close(resumed, single, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_ranks_learn_the_scorer_of_one_process_and_resume_on_one(micro, tokenizer, tmp_path):
    """DMA's key scorer, as the gates: each rank runs one of the two rows of every global batch, under the
    attention objective and the distillation ones; the checkpoint two ranks wrote resumes on one."""
    model, _ = micro
    corpus = write_corpus(tmp_path / "corpus.txt")
    two = on_two_ranks(tmp_path, "two", learn_scorers)
    for loss, (learned, history) in two.items():
        single, single_history = learn_scorer(model, tokenizer, corpus, tmp_path / "single" / loss, loss=loss)
        for name, p in single.items():  # AdamW's normalised steps carry the sums' last bits (~1e-6 here)
            torch.testing.assert_close(learned[name], p, rtol=1e-5, atol=1e-5)
        assert [h["step"] for h in history] == [1, 2, 3]
        for a, b in zip(history, single_history):
            assert a["distance"] == pytest.approx(b["distance"], rel=1e-5)

    written = tmp_path / "two" / "attention" / "step-00000002"
    assert [f.name for f in written.glob("shard-*")] == ["shard-00000.safetensors"]  # rank 0 holds the scorer whole
    shutil.copytree(written, tmp_path / "cut" / "step-00000002")
    events = []
    resumed, _ = learn_scorer(model, tokenizer, corpus, tmp_path / "cut", on_log=events.append)
    assert events[0] == {"resumed_from_step": 2}
    for name, p in two["attention"][0].items():
        torch.testing.assert_close(resumed[name], p, rtol=1e-5, atol=1e-5)
