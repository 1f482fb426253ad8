"""benchmarks/gpu_check.py: one line and status 2 without CUDA; every part's code path on the CPU (--smoke)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "benchmarks" / "gpu_check.py")


def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1 and "no CUDA device" in done.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_smoke_runs_every_part_on_cpu_and_isolates_the_one_that_fails(tmp_path):
    """semi_structured must fail without CUDA, and is recorded as failed while every other part runs:
    the parts are the ones a GPU runs, at toy sizes (learn step, four strategies in a process group,
    the FlexAttention plan against its SDPA reference, perplexity and passkey, the dynamic mask through
    FlexAttention and its evicting decode)."""
    done = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["semi_structured", "stages", "learn_step", "strategies", "flex_prefill", "dynamic_mask"]
    assert parts["semi_structured"]["status"].startswith("failed: RuntimeError: 2:4 semi-structured kernels need CUDA")
    for name in ("stages", "learn_step", "strategies", "flex_prefill", "dynamic_mask"):
        assert parts[name]["status"] == "ok", (name, parts[name]["status"], parts[name].get("traceback"))
    strategies = {r["strategy"]: r for r in parts["strategies"]["rows"]}
    assert set(strategies) == {"none", "fsdp", "fsdp, loaded from meta", "deepspeed ZeRO-3"}
    for r in strategies.values():
        assert r["argmax_agreement"] == 1.0 and r["max_abs_logit_diff"] < 1e-3
    flex = parts["flex_prefill"]["rows"][0]
    assert flex["max_abs_logit_diff_vs_sdpa_plan"] < 0.1  # bf16 logits: the same plan, two kernels
    assert flex["kv_cache_fraction"] < 1 and flex["attention_flops_fraction"] < 1
    dyn = parts["dynamic_mask"]["rows"][0]
    assert dyn["max_abs_logit_diff_vs_sdpa"] < 0.1  # bf16 logits: the same mask, two kernels
    assert dyn["evicted_kv_bytes"] < dyn["dense_kv_bytes"] and dyn["attended_keys_fraction"] < 1
    assert 0 < dyn["layer0_blocks_computed_fraction"] <= 1 and dyn["evict_decode_tokens_per_s"] > 0
    step = parts["learn_step"]
    assert step["ratio"] > 0 and step["plan"]["mask logits"] > 0
    assert (tmp_path / "gpu_check.md").read_text().count("## ") == 6
