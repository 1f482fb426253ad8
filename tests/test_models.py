import pytest
import torch

from maskpipe.pipeline import MaskpipeError
from maskpipe.pipeline.core.schema import ModelConfig, PruneTargets
from maskpipe.pipeline.core.models import decoder_blocks, fingerprint, load_model, load_tokenizer, materialize, prunable_linears
from tests.conftest import MICRO


def test_micro_llama_loads_frozen_with_block_linears_only(micro):
    model, linears = micro
    assert all(not p.requires_grad for p in model.parameters())
    assert len(linears) == 4 * 7  # q k v o gate up down in each of 4 blocks
    assert all(name.startswith("model.layers.") for name in linears)
    assert not any("embed" in n or "lm_head" in n for n in linears)


def test_include_exclude_globs(micro_cfg, micro):
    model, _ = micro
    cfg = micro_cfg.model_copy(update={"prune": PruneTargets(include=["*.mlp.*"], exclude=["*.down_proj"])})
    names = prunable_linears(model, cfg)
    assert len(names) == 8 and all(n.endswith(("gate_proj", "up_proj")) for n in names)
    cfg = micro_cfg.model_copy(update={"prune": PruneTargets(include=["*.nothing"])})
    with pytest.raises(MaskpipeError, match="no nn.Linear in the decoder blocks matches"):
        prunable_linears(model, cfg)


def test_fingerprint_is_dtype_independent_and_weight_sensitive(micro_cfg, micro):
    model, linears = micro
    fp = fingerprint(linears)
    bf16 = load_model(micro_cfg.model_copy(update={"dtype": "bfloat16"}))
    assert fingerprint(prunable_linears(bf16, micro_cfg)) == fp
    with torch.no_grad():
        linears["model.layers.2.mlp.up_proj"].weight[3, 5] += 0.5
    assert fingerprint(linears) != fp


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(MaskpipeError, match="no such model directory"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nowhere")))
    with pytest.raises(MaskpipeError, match="no such model directory"):
        load_tokenizer(ModelConfig(name_or_path="./nowhere"))


def _save_random(tmp_path, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return ModelConfig(name_or_path=str(tmp_path), dtype="float32", device="cpu")


def test_qwen2_gqa_tied_embeddings(tmp_path):
    from transformers import Qwen2Config

    cfg = _save_random(tmp_path, Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True))
    model = load_model(cfg)
    linears = prunable_linears(model, cfg)
    assert len(linears) == 14 and model.lm_head.weight is model.model.embed_tokens.weight
    assert linears["model.layers.0.self_attn.k_proj"].weight.shape == (32, 64)  # 2 KV heads of 16
    assert fingerprint(linears).startswith("sha256:")


def test_mistral_style(tmp_path):
    from transformers import MistralConfig

    cfg = _save_random(tmp_path, MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, sliding_window=32))
    assert len(prunable_linears(load_model(cfg), cfg)) == 14


def test_gpt2_conv1d_is_refused_clearly(tmp_path):
    from transformers import GPT2Config

    cfg = _save_random(tmp_path, GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(MaskpipeError, match="GPT-2 style Conv1D"):
        load_model(cfg)


def test_decoder_blocks(micro):
    model, _ = micro
    assert len(decoder_blocks(model)) == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_meta_load_reads_nothing_until_materialized_and_then_equals_a_whole_load(micro_cfg, dtype):
    cfg = micro_cfg.model_copy(update={"dtype": dtype})
    whole, lazy = load_model(cfg), load_model(cfg, meta=True)
    assert all(p.is_meta for p in lazy.parameters())
    assert all(not b.is_meta for b in lazy.buffers())  # rotary frequencies are made, not read
    # The fingerprint reads each deferred weight from the checkpoint, cast as the whole load casts it.
    assert fingerprint(prunable_linears(lazy, cfg)) == fingerprint(prunable_linears(whole, cfg))
    materialize(lazy)
    for (name, a), (_, b) in zip(whole.named_parameters(), lazy.named_parameters(), strict=True):
        assert torch.equal(a, b) and a.dtype == b.dtype and not b.requires_grad, name
    x = torch.randint(0, 2048, (1, 16))
    assert torch.equal(whole(x).logits, lazy(x).logits)


def test_meta_load_refuses_a_checkpoint_without_safetensors(micro_cfg, tmp_path):
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((MICRO / f).read_bytes())
    with pytest.raises(MaskpipeError, match="no model.safetensors"):
        load_model(micro_cfg.model_copy(update={"name_or_path": str(tmp_path)}), meta=True)
