"""The memory plan: exact counts from the model's config, and what each strategy shards."""

import re

import pytest

from maskpipe.jobs.cli import main
from maskpipe.pipeline.train.plan import memory_plan, model_shape, parse_bytes
from tests.conftest import cli_fails


def test_shape_counts_the_model_without_loading_it(micro, micro_cfg):
    model, linears = micro
    shape = model_shape(model.config, micro_cfg)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.masked == sum(lin.weight.numel() for lin in linears.values())
    assert shape.blocks == model.config.num_hidden_layers


def test_what_each_strategy_shards(micro, micro_cfg):
    shape = model_shape(micro[0].config, micro_cfg)
    kw = dict(n=2, m=4, micro_batch=2, seqlen=64)
    one = memory_plan(shape, strategy="none", world=1, **kw)
    ddp = memory_plan(shape, strategy="ddp", world=8, **kw)
    fsdp = memory_plan(shape, strategy="fsdp", world=8, **kw)
    zero2 = memory_plan(shape, strategy="deepspeed", zero_stage=2, world=8, **kw)
    assert one["mask logits"] == shape.masked // 4 * 6 * 4  # 6 fp32 logits per group of 4
    assert ddp["frozen weights"] == one["frozen weights"] and ddp["gradients"] == 2 * one["gradients"]
    for item in ("frozen weights", "mask logits", "optimizer state", "gradients"):
        assert fsdp[item] == pytest.approx(one[item] / 8, rel=1e-3)
    assert zero2["frozen weights"] == one["frozen weights"] and zero2["optimizer state"] < one["optimizer state"]
    assert fsdp["gathered blocks"] > 0 == one["gathered blocks"]
    ac = memory_plan(shape, strategy="none", world=1, activation_checkpointing=True, **kw)
    assert ac["activations"] < one["activations"]
    lean = memory_plan(shape, strategy="none", world=1, logits_per_group="positions", logits_dtype="bfloat16", **kw)
    assert lean["mask logits"] == one["mask logits"] * 4 // 6 // 2


def test_plan_command_for_llama2_7b_on_8_gpus(in_root, capsys):
    """The recipe in configs/ fits 8 x 80 GB with FSDP and activation checkpointing; DDP does not."""
    assert main(["plan", "configs/llama2-7b-2of4.yaml", "--gpus", "8", "--gpu-memory", "80GiB",
                 "--hf-config", "configs/hf/llama-2-7b"]) == 0
    out = capsys.readouterr().out
    assert "6.74B parameters" in out and "per device, fsdp, activation checkpointing" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and "|" in line}
    assert lines["fsdp"].endswith("fits") and "too big" in lines["ddp"].split("|")[1]


def test_plan_errors_name_what_is_wrong(in_root, capsys):
    assert main(["plan", "configs/tiny.yaml", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["plan", "configs/tiny-attention.yaml"]) == 2
    assert "no learning stage" in capsys.readouterr().err
    assert parse_bytes("80GiB") == 80 * 1024**3 and parse_bytes("1.5 GB") == 1_500_000_000


def test_loading_and_oneshot_plans_shrink_with_sharding_and_offload(in_root):
    from transformers import AutoConfig

    from maskpipe.pipeline.core.schema import ModelConfig
    from maskpipe.pipeline.train.plan import GiB, loading_plan, oneshot_plan

    shape = model_shape(AutoConfig.from_pretrained("configs/hf/llama-2-13b"), ModelConfig(name_or_path="llama-2-13b"))
    whole = loading_plan(shape, n=2, m=4, world=8, sharded=False)
    sliced = loading_plan(shape, n=2, m=4, world=8, sharded=True)
    assert whole["frozen weights"] == shape.params * 2 and sliced["frozen weights"] == shape.params * 2 // 8
    assert sum(sliced.values()) < sum(whole.values()) / 7
    kw = dict(method="sparsegpt", n_samples=128, seqlen=2048, batch_size=8)
    on_gpu, offloaded = oneshot_plan(shape, **kw), oneshot_plan(shape, offload=True, **kw)
    outside = shape.params - shape.blocks * shape.block_params  # embeddings and head
    assert offloaded["frozen weights"] == (outside + shape.block_params) * 2
    assert on_gpu["frozen weights"] == shape.params * 2
    assert sum(offloaded.values()) < 24 * GiB < sum(on_gpu.values())  # 13B one-shot on a 24 GB card


# ------------------------------------------------------------------------------ the plan command, as a user errs

PLAN = ["plan", "configs/llama2-7b-2of4.yaml", "--hf-config", "configs/hf/llama-2-7b"]


@pytest.mark.parametrize("args,message", [
    (["--gpus", "0"], "--gpus: at least 1 device, got 0"),
    (["--gpus", "-1"], "--gpus: at least 1 device, got -1"),
    (["--gpus", "3"], "--gpus 3: stage 'maskllm': batch_size 16 does not split evenly over 3 workers"),
    (["--gpu-memory", "80"], "--gpu-memory: '80' has no unit; write e.g. 80GiB"),
])
def test_plan_refuses_impossible_arguments(args, message, in_root, capsys):
    cli_fails([*PLAN, *args], capsys, message, one_line=True)


def test_plan_says_what_would_fit(in_root, capsys):
    assert main([*PLAN, "--gpus", "1", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit in 80.00 GiB" in out
    fits = out.split("what would fit:\n")[1].splitlines()
    assert any(line.startswith("  logits_per_group: positions: ") for line in fits)
    assert any(line.startswith("  logits_dtype: bfloat16: ") for line in fits)
    assert any(re.match(r"  grad_accum: \d+, batch_size: 1 ", line) for line in fits)
    assert any(re.match(r"  \d+ devices \(fsdp, .*\(fits\)", line) for line in fits)
    # with 8 devices it fits, and nothing is suggested
    assert main([*PLAN, "--gpus", "8", "--gpu-memory", "80GiB"]) == 0
    assert "what would fit" not in capsys.readouterr().out


def test_plan_offline_points_at_the_shipped_model_configs(in_root, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = cli_fails(["plan", "configs/llama2-7b-2of4.yaml", "--gpus", "8"], capsys, "give --hf-config DIR (shipped: ", one_line=True)
    assert "configs/hf/llama-2-7b" in err
