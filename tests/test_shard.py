"""Sharded mask learning on CPU: real process groups (gloo), two ranks, against one process.

Each run spawns fresh processes that load the micro model and call `train_masks` with a strategy; rank 0
writes the returned (consolidated) logits. The same global batch and seed must give the same mask
whatever the strategy and world size, and a checkpoint written by one strategy and world size must
resume under another.
"""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from maskpipe.pipeline.train.checkpoint import Checkpoint, CheckpointDir
from maskpipe.pipeline.train.shard import owned_rows
from tests.conftest import CORPORA, MICRO, ROOT

STEPS = 8
# Two ranks sum their gradients in another order than one process, and the float differences grow
# through AdamW's normalised steps: measured at most ~3e-3 on a few logits over 8 steps at lr 1e-2.
ATOL = 1e-2


class Stop(Exception):
    pass


def _learn(rank, world, port, strategy, out, ckpt_dir, stop_at, threads, kw):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from maskpipe.pipeline.core.schema import DataConfig, ModelConfig
    from maskpipe.pipeline.stages.learn import LearnStage
    from maskpipe.pipeline.io.data import TokenStream
    from maskpipe.pipeline.nm.learn import train_masks
    from maskpipe.pipeline.core.models import fingerprint, load_model, load_tokenizer, prunable_linears

    recompute = kw.pop("activation_checkpointing", False)
    zero_stage = kw.pop("zero_stage", 3)
    shard_group = kw.pop("shard_group", None)
    meta = kw.pop("meta", False)
    cfg = ModelConfig(name_or_path=str(MICRO), dtype=kw.pop("dtype", "float32"), device="cpu")
    model, tokenizer = load_model(cfg, meta=meta), load_tokenizer(cfg)
    linears = prunable_linears(model, cfg)
    before = fingerprint(linears)  # a meta load reads each weight from the checkpoint for it
    st = LearnStage.model_validate({"stage": "learn", "name": "learn", "data": "d", "steps": STEPS, "batch_size": 4,
                                    "seqlen": 32, "lr": 1e-2, "log_every": 2, "checkpoint_every": 2,
                                    "keep_checkpoints": 2, "grad_accum": 2, **kw})
    data = DataConfig.model_validate({"sources": [str(CORPORA / "kjv.train.txt")], "shuffle_buffer": 8})
    stream = TokenStream(data, tokenizer, 32, seed=0, rank=rank, world_size=world)

    def on_log(entry):
        if stop_at is not None and entry.get("step") == stop_at:
            raise Stop

    try:
        logits, history = train_masks(model, linears, st, 2, 4, stream, seed=0,
                                      store=CheckpointDir(ckpt_dir, keep=2), on_log=on_log, strategy=strategy,
                                      zero_stage=zero_stage, activation_checkpointing=recompute,
                                      shard_group=shard_group)
        # The weights as training left them (FSDP: each rank's rows, put together in row order).
        after = fingerprint({k: _Whole(lin.weight) for k, lin in linears.items()})
        if rank == 0:
            save_file(logits, out, metadata={"fingerprint_before": before, "fingerprint_after": after})
    except Stop:
        pass
    finally:
        if world > 1:
            dist.destroy_process_group()


class _Whole(torch.nn.Module):
    """A stand-in linear whose weight is a sharded weight gathered whole (a collective)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def learn(tmp_path, name, strategy, world, ckpt_dir=None, stop_at=None, **kw):
    """Logits of a run (None if it was stopped), and its checkpoint directory."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, ckpt_dir = tmp_path / f"{name}.safetensors", ckpt_dir or tmp_path / f"{name}-ckpt"
    threads = max(1, int(os.environ.get("OMP_NUM_THREADS", 2)) // world)
    args = (world, port, strategy, str(out), str(ckpt_dir), stop_at, threads, kw)
    if world == 1:
        _learn(0, *args)
    else:
        mp.start_processes(_learn, args=args, nprocs=world, start_method="spawn")
    return (load_file(out) if out.exists() else None), ckpt_dir


def fingerprints(tmp_path, name):
    """(before training, after) as rank 0 of run `name` recorded them."""
    from safetensors import safe_open

    with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
        meta = f.metadata()
    return meta["fingerprint_before"], meta["fingerprint_after"]


def assert_same_mask(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    agree = sum(int((a[k].argmax(-1) == b[k].argmax(-1)).sum()) for k in a) / sum(a[k][..., 0].numel() for k in a)
    assert agree > 0.999
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the whole global batch."""
    return learn(tmp_path_factory.mktemp("single"), "single", "none", 1)[0]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_learn_the_single_process_mask(single, tmp_path, strategy):
    logits, ckpt = learn(tmp_path, strategy, strategy, 2)
    assert_same_mask(logits, single)
    # Each rank wrote the rows it owns: the checkpoint is sharded, and reads back whole.
    last = Checkpoint(CheckpointDir(ckpt, keep=2).list()[-1])
    assert sorted(p.name for p in last.path.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    name = sorted(logits)[0]
    rows = load_file(last.path / "shard-00001.safetensors")[f"logits.{name}"]
    assert rows.shape[0] == owned_rows(logits[name].shape[0], 1, 2)[1] - owned_rows(logits[name].shape[0], 1, 2)[0]
    torch.testing.assert_close(last.read(f"logits.{name}"), logits[name])


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_learns_the_single_process_mask(single, tmp_path, zero_stage):
    logits, _ = learn(tmp_path, f"zero{zero_stage}", "deepspeed", 2, zero_stage=zero_stage)
    assert_same_mask(logits, single)


def test_sharded_checkpoint_resumes_on_another_world_size_and_strategy(single, tmp_path):
    """FSDP on two ranks stops at step 6 (last checkpoint at 4) and one process resumes it; a one-process
    checkpoint resumes as FSDP on two ranks. Both end with the uninterrupted run's mask."""
    stopped, ckpt = learn(tmp_path, "cut", "fsdp", 2, stop_at=6)
    assert stopped is None and Checkpoint(CheckpointDir(ckpt, keep=2).list()[-1]).meta["world_size"] == 2
    resumed, _ = learn(tmp_path, "resumed", "none", 1, ckpt_dir=ckpt)
    assert_same_mask(resumed, single)

    _, ckpt1 = learn(tmp_path, "cut1", "none", 1, stop_at=4)
    resumed2, _ = learn(tmp_path, "resumed2", "fsdp", 2, ckpt_dir=ckpt1)
    assert_same_mask(resumed2, single)


def test_deepspeed_resumes_a_checkpoint_of_another_strategy(single, tmp_path):
    """ZeRO-3 partitions into flat shards of its own; it reads and writes maskpipe's row shards through
    DeepSpeed's full-parameter accessors, so it resumes an FSDP checkpoint and its own resumes in one process."""
    _, ckpt = learn(tmp_path, "cut", "fsdp", 2, stop_at=4)
    _, ckpt2 = learn(tmp_path, "zero3", "deepspeed", 2, ckpt_dir=ckpt, stop_at=6)
    resumed, _ = learn(tmp_path, "resumed", "none", 1, ckpt_dir=ckpt2)
    assert_same_mask(resumed, single)


def test_hybrid_sharding_learns_the_single_process_mask_and_resumes_on_two_ranks(single, tmp_path):
    """Four ranks as two groups of two (FSDP2 on a 2-D mesh: sharded within a group, replicated across):
    the first group writes the rows, and the checkpoint resumes as plain FSDP on two ranks."""
    logits, _ = learn(tmp_path, "hsdp", "fsdp", 4, shard_group=2)
    assert_same_mask(logits, single)
    _, ckpt = learn(tmp_path, "hsdp-cut", "fsdp", 4, shard_group=2, stop_at=6)
    last = Checkpoint(CheckpointDir(ckpt, keep=2).list()[-1])
    name = sorted(logits)[0]
    assert sorted(f.name for f in last.path.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    torch.testing.assert_close(last.read(f"logits.{name}").shape, logits[name].shape)
    resumed, _ = learn(tmp_path, "hsdp-resumed", "fsdp", 2, ckpt_dir=ckpt)
    assert_same_mask(resumed, single)


def test_per_position_logits_and_activation_checkpointing_learn_under_fsdp(tmp_path):
    """The leaner parametrization (M logits per group) trains and exports candidate logits; activation
    checkpointing recomputes each block with the same Gumbel noise, so it changes nothing."""
    plain, _ = learn(tmp_path, "pos", "fsdp", 2, logits_per_group="positions")
    assert next(iter(plain.values())).shape[-1] == 6  # exported over the 2:4 candidates
    recomputed, _ = learn(tmp_path, "pos-ac", "fsdp", 2, logits_per_group="positions", activation_checkpointing=True)
    assert_same_mask(recomputed, plain, atol=1e-5)


def test_fsdp_loaded_from_meta_learns_the_same_mask_with_the_same_fingerprint(tmp_path):
    """Each rank builds the model on meta and reads only its rows of the checkpoint (bf16 frozen
    weights under fp32 logits): the same mask as FSDP over whole loads, and the fingerprint of the
    masked weights, from the checkpoint before training and from the ranks' rows after, is the
    whole load's."""
    whole, _ = learn(tmp_path, "whole", "fsdp", 2, dtype="bfloat16")
    sliced, _ = learn(tmp_path, "sliced", "fsdp", 2, dtype="bfloat16", meta=True)
    assert_same_mask(sliced, whole, atol=1e-6)
    reference = fingerprints(tmp_path, "whole")[0]
    assert fingerprints(tmp_path, "whole")[1] == reference
    assert fingerprints(tmp_path, "sliced") == (reference, reference)


def _stage(rank, world, port, tmp, meta):
    """What a Ray Train worker runs (workers/learn.py), without Ray: a Session and `learn_stage`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from maskpipe.pipeline.train.checkpoint import CheckpointDir
    from maskpipe.pipeline.config import config_from_dict
    from maskpipe.pipeline.io.rundir import RunDir
    from maskpipe.pipeline.io.session import Session
    from maskpipe.pipeline.stages.learn import learn_stage

    prior = ROOT / "tests" / "fixtures" / "artifacts" / "micro-llama-magnitude-2of4-v1"
    cfg = config_from_dict({
        "name": "meta", "seed": 0, "model": {"name_or_path": str(MICRO), "dtype": "bfloat16", "device": "cpu"},
        "data": {"calib": {"sources": [str(CORPORA / "kjv.train.txt")], "shuffle_buffer": 8}},
        "stages": [{"stage": "learn", "name": "maskllm", "data": "calib", "steps": 4, "batch_size": 4, "seqlen": 32,
                    "lr": 1e-2, "log_every": 2, "prior": {"artifact": str(prior), "strength": 10}}],
        "workers": {"num_workers": world, "strategy": "fsdp", "sharded_load": meta}})
    try:
        session = Session(cfg.model, meta=cfg.workers.loads_sharded)
        learn_stage(cfg, session, cfg.stages[0], RunDir(tmp), prior, CheckpointDir(Path(tmp) / "ckpt", 2),
                    None, rank, world)
    finally:
        dist.destroy_process_group()


def test_a_learning_stage_loaded_from_meta_writes_the_artifact_of_a_whole_load(tmp_path):
    """The Ray workers' path under fsdp (Session on meta, the prior checked against the checkpoint's
    weights, rank 0 fingerprinting from the checkpoint): the artifact is the whole load's, and it
    applies to a whole load of the model."""
    from maskpipe.pipeline.io.artifacts import check_compatible, load_artifact
    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.core.models import load_model, prunable_linears

    for meta in (False, True):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_stage, args=(2, port, str(tmp_path / str(meta)), meta), nprocs=2, start_method="spawn")
    (whole, whole_manifest), (sliced, manifest) = (load_artifact(tmp_path / m / "artifacts" / "maskllm")
                                                   for m in ("False", "True"))
    assert manifest["base_model"]["fingerprint"] == whole_manifest["base_model"]["fingerprint"]
    assert whole.keys() == sliced.keys() and all(torch.equal(whole[k], sliced[k]) for k in whole)
    cfg = ModelConfig(name_or_path=str(MICRO), dtype="float32", device="cpu")
    check_compatible(manifest, prunable_linears(load_model(cfg), cfg))


def test_the_mask_optimizer_is_torchs_fused_adamw_and_steps_as_the_default_within_float32_rounding():
    from maskpipe.pipeline.train.shard import adamw

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 16, 6, generator=g) for _ in range(3)]
    grads = [[torch.randn(t.shape, generator=g) * 10 ** s for t in start] for s in range(-3, 3)]
    fused, plain = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    opts = adamw(fused, 1e-2, 0.1), torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.1, foreach=False)
    assert opts[0].param_groups[0]["fused"] and opts[0].state_dict()["param_groups"][0]["weight_decay"] == 0.1
    for step in grads:
        for params, opt in zip((fused, plain), opts):
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
    for a, b, s in zip(fused, plain, start):
        assert (a - s).abs().max() > 1e-2  # six steps moved every tensor
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
